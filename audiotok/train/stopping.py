"""Stopping a training run early and cleanly: a time limit, SIGTERM and SIGINT.

A run given a time limit, or sent SIGTERM (spot instances, cluster pre-emption) or SIGINT (Ctrl-C),
finishes the step it is in, saves a checkpoint there and stops; running the same command again
resumes from that checkpoint exactly (:mod:`audiotok.train.state`).

The time-limit rule. The clock starts when ``train()`` is called. After each step but the last, the
run stops there when ::

    elapsed + 1.25 * (next step + its validation + save) > time limit

where, from what this run has measured so far,

- *next step* is the longest of the last 20 steps (data wait, forward, backward and optimizer steps,
  without validation and saves); the first step is always taken (nothing is measured before it);
- *its validation* counts only when the next step validates: the longest validation so far, or
  before the first one a step per validation excerpt (a validation batch is a forward pass only);
- *save* is the longest checkpoint save so far, or before the first one 1 s plus the checkpoint's
  size at 100 MB/s.

So the checkpoint written after the last step is complete before the limit unless a step or a save
takes more than 1.25 times the longest one measured. A run stopped by its time limit returns normally.

Signals. SIGTERM or SIGINT: the step in progress finishes (with its validation and save, if it has
them), a checkpoint is saved and ``train()`` raises :class:`TrainingInterrupted`, which the recipe
turns into the exit status ``128 + signal`` (143 for SIGTERM, 130 for SIGINT), the conventional
status of a process ended by a signal: schedulers and shell loops see a run that did not finish.
A second SIGINT aborts at once (``KeyboardInterrupt``; checkpoint saves are crash safe, so the newest
complete checkpoint survives); a repeated SIGTERM is ignored. The handlers are installed only while
``train()`` runs, in the main thread, and the previous ones are restored after it.

Under torchrun every rank takes part in the decision after each step: one all-reduce (maximum) of two
integers, this rank's signal and whether it is out of time, on a CPU (gloo) group, so it never waits
for a GPU. All ranks stop at the same step even when only one of them got the signal; rank 0 saves.
torchrun forwards SIGTERM and SIGINT to its workers and kills them 30 s later: a step and a save must
fit in that time.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import threading
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from time import monotonic
from types import FrameType, TracebackType
from typing import Any

from ..utils.distributed import DistEnv, max_over_ranks

log = logging.getLogger("audiotok.train")

SIGNALS = (signal.SIGTERM, signal.SIGINT)
SAFETY = 1.25  # estimates are multiplied by this
STEP_WINDOW = 20  # the step estimate is the longest of this many last steps
SAVE_BASE_S = 1.0  # the save estimate before any save is measured: this ...
SAVE_BYTES_PER_S = 100e6  # ... plus the checkpoint's size at this rate

_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_NUMBER = re.compile(r"\d+(?:\.\d*)?|\.\d+")
_PART = re.compile(rf"({_NUMBER.pattern})\s*([smhd])\s*", re.IGNORECASE)
_PARTS = re.compile(rf"(?:{_PART.pattern})+", re.IGNORECASE)


def parse_duration(value: str | float) -> float:
    """Seconds in ``value``: a number of seconds, or numbers each with the unit ``s``, ``m``, ``h`` or ``d``
    (``90``, ``90s``, ``9m``, ``1.5h``, ``2h30m``). ``ValueError`` for anything else and for zero."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    else:
        text = str(value).strip()
        if _NUMBER.fullmatch(text):
            seconds = float(text)
        elif _PARTS.fullmatch(text):
            seconds = sum(float(number) * _UNITS[unit.lower()] for number, unit in _PART.findall(text))
        else:
            raise ValueError(f"invalid duration {value!r}: expected seconds or numbers with s, m, h or d, "
                             "such as 90s, 9m, 1.5h or 2h30m")
    if not 0 < seconds < float("inf"):
        raise ValueError(f"invalid duration {value!r}: it must be positive")
    return seconds


def duration_arg(text: str) -> float:
    """The ``argparse`` type of a ``--time-limit``: :func:`parse_duration`, its error as argparse's."""
    try:
        return parse_duration(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_time_limit_argument(parser: argparse.ArgumentParser) -> None:
    """``--time-limit DURATION`` (seconds, as :func:`parse_duration` reads it), the option of every training
    recipe."""
    parser.add_argument("--time-limit", type=duration_arg, metavar="DURATION",
                        help="stop and save in time to end within this long (seconds, or 90s, 9m, 1.5h, 2h30m); "
                             "exit 0")


class TrainingInterrupted(Exception):
    """A signal stopped training at ``step``, once a checkpoint of that step was saved."""

    def __init__(self, signum: int, step: int):
        self.signum, self.step = signum, step
        super().__init__(f"{signal.Signals(signum).name}: training stopped at step {step}, where a checkpoint "
                         "was saved; run the same command again to resume")

    @property
    def exit_code(self) -> int:
        """The conventional exit status of a process a signal ended: ``128 + signum``."""
        return 128 + self.signum


class StopControl:
    """When to stop a training loop early: its time limit (seconds, from this object's creation) and
    stop signals. A context manager: the signal handlers are installed on entering (main thread only)
    and the previous ones restored on leaving.

    The loop calls :meth:`start` before its first step, wraps validations and saves in
    :meth:`timed` (``"validate"``, ``"save"``) and asks :meth:`should_stop` after each step but the last.
    """

    def __init__(self, time_limit: float | None = None):
        self.time_limit = time_limit
        self.started = monotonic()
        self.signum: int | None = None  # the first stop signal this process received
        self.stop_signal: int | None = None  # the signal that stopped the loop (any rank's)
        self.stopped_at: int | None = None  # the step the loop stopped at, when it stopped early
        self.saved_step: int | None = None  # the step of the last checkpoint saved in a ``timed("save", step)``
        self._steps: deque[float] = deque(maxlen=STEP_WINDOW)
        self._longest: dict[str, float] = {}
        self._mark: float | None = None  # the last step boundary
        self._excluded = 0.0  # validation and save time since then
        self._checkpoint_bytes = 0
        self._validation_steps = 0
        self._previous: dict[int, Any] = {}
        self._pid = os.getpid()

    # -- signals ----------------------------------------------------------------------------

    def __enter__(self) -> StopControl:
        if threading.current_thread() is threading.main_thread():
            for signum in SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        else:
            log.debug("not the main thread: SIGTERM and SIGINT keep their handlers")
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if os.getpid() != self._pid:  # a forked child (a DataLoader worker): the signal does what it did before
            self._as_before(signum, frame)
            return
        name = signal.Signals(signum).name
        if self.signum is None:
            self.signum = signum
            log.warning("%s: stopping after this step, once a checkpoint is saved%s", name,
                        " (Ctrl-C again aborts at once)" if signum == signal.SIGINT else "")
        elif signum == signal.SIGINT:
            raise KeyboardInterrupt
        else:
            log.warning("%s again: already stopping", name)

    def _as_before(self, signum: int, frame: FrameType | None) -> None:
        previous = self._previous.get(signum, signal.SIG_DFL)
        if callable(previous):
            previous(signum, frame)
        elif previous != signal.SIG_IGN:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    # -- measurements ---------------------------------------------------------------------------

    def start(self, checkpoint_bytes: int = 0, validation_excerpts: int = 0) -> None:
        """The loop starts now. ``checkpoint_bytes`` (about what a save writes) and ``validation_excerpts``
        give the save and validation estimates until a save and a validation have been measured."""
        self._mark, self._excluded = monotonic(), 0.0
        self._checkpoint_bytes, self._validation_steps = checkpoint_bytes, validation_excerpts

    @contextmanager
    def timed(self, kind: str, step: int | None = None) -> Iterator[None]:
        """Measure a validation (``"validate"``) or a save (``"save"``, of checkpoint ``step``): it counts
        towards its own estimate, not the step's."""
        begin = monotonic()
        try:
            yield
        finally:
            took = monotonic() - begin
            self._excluded += took
            self._longest[kind] = max(self._longest.get(kind, 0.0), took)
        if kind == "save":
            self.saved_step = step

    def estimate(self, validates_next: bool = False) -> float:
        """Seconds the next step (with its validation when ``validates_next``) and a save after it would
        take, by the rule of the module docstring (before :data:`SAFETY`)."""
        step = max(self._steps, default=0.0)
        validation = 0.0
        if validates_next:
            validation = self._longest.get("validate", self._validation_steps * step)
        save = self._longest.get("save", SAVE_BASE_S + self._checkpoint_bytes / SAVE_BYTES_PER_S)
        return step + validation + save

    # -- the decision ---------------------------------------------------------------------------

    def should_stop(self, step: int, env: DistEnv, validates_next: bool = False) -> bool:
        """Whether the loop stops after ``step``, which just finished: a signal on any rank, or no time left
        for another step and a save. Every rank must call this after the same steps; all get the same answer."""
        now = monotonic()
        if self._mark is not None:
            self._steps.append(now - self._mark - self._excluded)
        self._mark, self._excluded = now, 0.0
        limit = self.time_limit
        late = limit is not None and now - self.started + SAFETY * self.estimate(validates_next) > limit
        signum, out_of_time = max_over_ranks([self.signum or 0, int(late)], env)
        if not (signum or out_of_time):
            return False
        self.stopped_at = step
        if signum:
            self.stop_signal = signum
            log.warning("%s: rank %d of %d stops at step %d", signal.Signals(signum).name, env.rank, env.world_size,
                        step)
        else:
            log.info("time limit %g s: stopping at step %d after %.0f s (another step and a save take about "
                     "%.1f s)", self.time_limit, step, now - self.started, self.estimate(validates_next))
        return True

    def raise_if_interrupted(self) -> None:
        """Raise :class:`TrainingInterrupted` when a signal stopped the loop."""
        if self.stop_signal is not None and self.stopped_at is not None:
            raise TrainingInterrupted(self.stop_signal, self.stopped_at)
