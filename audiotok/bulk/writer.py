"""Writing one part's results: its code shards (pooled or sidecar), progress files and done marker,
all through the output's store."""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any

import numpy as np

from ..formats.codedataset import SHARD_WRITERS, ShardWriter, TarShardWriter, part_shard_name
from ..utils.io import storage_errors
from ..utils.store import Store
from .claims import state_path
from .inputs import Failure

#: A part's progress file (:class:`PartWriter`); its done marker also has ``end``.
PROGRESS_SHAPE = {
    "part": int, "position": int, "failures": [{"key": str, "reason": str, "detail": str, "position": int}],
    "shards": [{"path": str, "records": int, "frames": int, "seconds": float, "start": int, "end": int}],
}
DONE_SHAPE = {**PROGRESS_SHAPE, "end": int}



class PartWriter:
    """Writes the results of one part, in position order, to its shards, through the store.

    Progress (``.bulk/progress/part-N.json``: the part's committed shards and failures and the
    position they cover) is written after each shard is published, so a process that takes the part
    over continues at ``position``; shards it writes again get the same names and contents. The done
    marker (``.bulk/done/part-N.json``) is written when the part ends.
    Pooled: a shard is committed at ``shard_records`` records or ``shard_frames`` frames. Sidecar
    (``sidecar`` = the shard's name): one shard for the whole part, failures included as members.
    """

    def __init__(self, store: Store, part: int, fmt: str, shard_records: int, shard_frames: int,
                 metadata: dict[str, Any], kept_fields: tuple[str, ...] = (), sidecar: str | None = None,
                 url: str = ""):
        self.store, self.part, self.fmt, self.metadata, self.kept_fields = store, part, fmt, metadata, kept_fields
        self.shard_records, self.shard_frames = shard_records, shard_frames
        self.sidecar, self.url = sidecar, url
        self.state: dict[str, Any] = {"part": part, "position": 0, "shards": [], "failures": []}
        if store.exists(state_path("progress", part)):
            self.state = store.read_json(state_path("progress", part), PROGRESS_SHAPE)
        for shard in self.state["shards"]:
            if not store.exists(shard["path"]):
                raise FileNotFoundError(f"{store.url}: {shard['path']!r} is recorded in "
                                        f"{state_path('progress', part)} but missing")
        self.position = self.state["position"]
        self.shard: ShardWriter | None = None
        self.shard_start = self.position
        self.failures: list[dict[str, Any]] = []

    @property
    def name(self) -> str:
        if self.sidecar is not None:
            return self.sidecar
        return part_shard_name(self.part, len(self.state["shards"]), SHARD_WRITERS[self.fmt].suffix)

    def _advance(self, position: int) -> None:
        if position != self.position:
            raise RuntimeError(f"part {self.part}: got position {position}, expected {self.position}")
        self.position += 1

    def _building(self) -> AbstractContextManager[None]:
        """Errors of the file system while the shard is built at its staging path (a full disk) as
        :class:`~audiotok.utils.io.StorageError` naming the shard."""
        return storage_errors(f"{self.store.url}/{self.name}")

    def _open(self) -> ShardWriter:
        if self.shard is None:
            path = self.store.staging_path(self.name)
            with self._building():
                self.shard = SHARD_WRITERS[self.fmt](path, self.metadata, self.kept_fields, staged=True)
            self.shard_start = self.position
        return self.shard

    def sample_key(self, key: str) -> str | None:
        """The input sample's ``__key__`` of a source key ``{url}:{__key__}`` (sidecar), else ``None``."""
        prefix = self.url + ":"
        return key[len(prefix):] if key.startswith(prefix) else None

    def add_failure(self, failure: Failure) -> None:
        self._advance(failure.position)
        self.failures.append({**failure.to_dict(), "position": failure.position})
        if self.sidecar is not None and (key := self.sample_key(failure.key)) is not None:
            shard = self._open()
            assert isinstance(shard, TarShardWriter)  # sidecar: webdataset format
            with self._building():
                shard.add_failure(key, failure.reason, failure.detail)

    def add_record(self, position: int, meta: dict[str, Any], codes: np.ndarray) -> None:
        self._advance(position)
        shard = self._open()
        with self._building():
            shard.add(meta, codes)
        if self.sidecar is None and (
                shard.records >= self.shard_records or shard.frames >= self.shard_frames):
            self.commit()

    def commit(self, done: bool = False) -> None:
        if done and self.sidecar is not None:
            self._open()  # a sidecar shard exists for every input shard, even one without records
        entry = None
        if self.shard is not None:
            with self._building():
                self.shard.close()
            self.store.put_file(self.shard.path, self.name)
            entry = {"path": self.name, "records": self.shard.records, "frames": self.shard.frames,
                     "seconds": self.shard.seconds, "start": self.shard_start, "end": self.position}
            self.state["shards"].append(entry)
        self.state["failures"].extend(self.failures)
        self.state["position"] = self.position
        if done:
            self.store.write_json(state_path("done", self.part), {**self.state, "end": self.position})
        elif entry is not None or self.failures:
            self.store.write_json(state_path("progress", self.part), self.state)
        self.shard, self.failures = None, []

    def finish(self, end: int) -> None:
        if end != self.position:
            raise RuntimeError(f"part {self.part} ended at {end} but {self.position} positions were written")
        self.commit(done=True)

    def abort(self) -> None:
        if self.shard is not None:
            self.shard.abort()
            self.shard = None
