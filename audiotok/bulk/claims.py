"""Claims on a bulk job's parts, through its output's store: who works on which part, and which are
done (the protocol is in :mod:`audiotok.bulk`'s docstring, "Work split"). Each of these calls is a
round trip to the store, or several: the part loop (:mod:`audiotok.bulk.parts`) makes them in its
claims thread, off the encoding path."""

from __future__ import annotations

import os
import re
import secrets
import socket
import time
from typing import Any

from ..utils.store import Store, process_gone

#: Folder (inside the output) for the plan, claims, per-part progress and done markers.
STATE_DIR = ".bulk"
#: A claim file (:class:`Claims`).
CLAIM_SHAPE = {"owner": str, "expires": float}


def state_path(kind: str, part: int) -> str:
    """A part's job file of ``kind`` (``claims``, ``progress``, ``done``): ``.bulk/KIND/part-N.json``."""
    return f"{STATE_DIR}/{kind}/part-{part:06d}.json"


def default_owner() -> str:
    return f"{socket.gethostname()}/{os.getpid()}/{secrets.token_hex(3)}"


def _dead_here(owner: str) -> bool:
    """Whether ``owner`` (``host/pid/...``) is a process of this host that no longer runs."""
    host, _, rest = owner.partition("/")
    return process_gone(host, rest.partition("/")[0])


class Claims:
    """Claim files ``.bulk/claims/part-N.json`` ``{"owner", "expires"}`` (see :mod:`audiotok.bulk`).

    A claim is free when missing, expired, or held by a process of this host that no longer runs.
    :meth:`offer` writes claims; :meth:`won`, ``settle`` seconds later, re-reads them: the parts whose
    claim still names this owner are won (without exclusive create two processes may both win a
    part, rarely; outputs are deterministic, so that costs work, not correctness). ``held``: the parts
    whose claim this owner wrote and may still hold (not released, not found to name another owner).
    """

    def __init__(self, store: Store, owner: str, lease: float):
        self.store, self.owner, self.lease = store, owner, lease
        self.settle = min(1.0, lease / 10)
        self.held: set[int] = set()

    def read(self, part: int) -> dict[str, Any] | None:
        try:
            return self.store.read_json(state_path("claims", part), CLAIM_SHAPE)
        except (OSError, ValueError):  # unreadable or malformed: free
            return None

    def held_by_other(self, part: int, now: float) -> float | None:
        """The expiry time of another live owner's claim on ``part``, else ``None``."""
        claim = self.read(part)
        if claim is None or claim.get("owner") == self.owner or claim.get("expires", 0) <= now:
            return None
        return None if _dead_here(str(claim.get("owner"))) else float(claim["expires"])

    def _write(self, part: int) -> None:
        self.store.write_json(state_path("claims", part), {"owner": self.owner, "expires": time.time() + self.lease})

    def offer(self, parts: list[int]) -> None:
        for part in parts:
            self.held.add(part)
            self._write(part)

    def won(self, parts: list[int]) -> list[int]:
        won = [p for p in parts if (self.read(p) or {}).get("owner") == self.owner]
        self.held -= set(parts) - set(won)
        return won

    def renew(self, parts: list[int]) -> list[int]:
        """Renew the claims on ``parts``; returns those another owner has taken."""
        lost = []
        for part in parts:
            if (self.read(part) or {}).get("owner") == self.owner:
                self._write(part)
            else:
                lost.append(part)
        self.held -= set(lost)
        return lost

    def release(self, part: int) -> None:
        """Delete this owner's claim on ``part`` (another owner's is left)."""
        if (self.read(part) or {}).get("owner") == self.owner:
            self.store.delete(state_path("claims", part))
        self.held.discard(part)


class Scheduler:
    """Which parts this process works on next: not done, claim free, in order from ``offset``."""

    def __init__(self, store: Store, claims: Claims, num_parts: int, offset: int):
        self.store, self.claims, self.num_parts = store, claims, num_parts
        self.order = [(offset + i) % num_parts for i in range(num_parts)]
        self.done: set[int] = set()
        self.next_expiry: float | None = None

    def refresh_done(self) -> bool:
        """Re-list the done markers; whether every part is done."""
        self.done = done_parts(self.store)
        return len(self.done) >= self.num_parts

    def is_done(self, part: int) -> bool:
        if part not in self.done and self.store.exists(state_path("done", part)):
            self.done.add(part)
        return part in self.done

    def propose(self, want: int, busy: set[int]) -> list[int]:
        """Offer claims on up to ``want`` free parts, not held (:attr:`Claims.held`) nor in ``busy``;
        :meth:`confirm` them later."""
        now, self.next_expiry = time.time(), None
        candidates: list[int] = []
        for part in self.order:
            if len(candidates) >= want:
                break
            if part in busy or part in self.claims.held or self.is_done(part):
                continue
            expires = self.claims.held_by_other(part, now)
            if expires is not None:
                self.next_expiry = min(expires, self.next_expiry or expires)
                continue
            candidates.append(part)
        self.claims.offer(candidates)
        return candidates

    def confirm(self, parts: list[int]) -> list[int]:
        """The parts of :meth:`propose` this process won and that are still to do."""
        won = []
        for part in self.claims.won(parts):
            if self.is_done(part):  # finished by another process meanwhile
                self.claims.release(part)
            else:
                won.append(part)
        return won

    def release(self, parts: list[int]) -> None:
        """Give back the claims on ``parts``, whose done marker is written: they are done."""
        for part in parts:
            self.claims.release(part)
            self.done.add(part)

    def wait(self) -> None:
        """Sleep until a claim of another process may have lapsed, or a part may be done (a few seconds)."""
        limit = min(self.claims.lease / 4, 5.0)
        delay = limit if self.next_expiry is None else min(limit, self.next_expiry - time.time() + 0.05)
        time.sleep(max(delay, 0.1))



def done_parts(store: Store) -> set[int]:
    """The parts that have a done marker."""
    names = store.list(f"{STATE_DIR}/done")
    return {int(m.group(1)) for n in names if (m := re.search(r"part-(\d+)\.json$", n))}
