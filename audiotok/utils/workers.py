"""Worker processes that end with the process that started them, and leave stopping to it.

A worker blocked on a queue (a bulk reader waiting for its next part, a DataLoader worker waiting
for an index) never notices that its parent was killed (``SIGKILL``, the out-of-memory killer):
it would hold its memory for good. Every worker process audiotok starts runs :func:`die_with_parent`
first (DataLoaders get it as their ``worker_init_fn``, :func:`worker_init`):

* on Linux the kernel sends the worker ``SIGKILL`` when its parent ends (``prctl(PR_SET_PDEATHSIG)``);
* everywhere (macOS included) a daemon thread polls the parent's pid and ends the worker with
  ``os._exit`` within :data:`POLL_SECONDS` of the parent's end.

A trainer's DataLoader workers also ignore SIGTERM and SIGINT (``worker_init(ignore_stop_signals=True)``).
Schedulers and ``timeout`` send SIGTERM to the whole process group, and Ctrl-C sends SIGINT to it: a
worker that died of it would make its DataLoader raise in the trainer, which must instead finish its
step and save (:mod:`audiotok.train.stopping`). The trainer decides, and ends them with
:func:`stop_workers` when it ends: at interpreter exit, ``multiprocessing`` would send its remaining
(daemonic) workers SIGTERM and wait for them, for good.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

#: How often the watchdog thread checks that the parent is alive (seconds).
POLL_SECONDS = 1.0
#: ``prctl`` option: the signal a process gets when its parent ends (``linux/prctl.h``).
_PR_SET_PDEATHSIG = 1
#: Exit status of a worker ended by the watchdog.
_ORPHAN_EXIT = 70


def _set_parent_death_signal() -> None:
    """Ask Linux to send this process ``SIGKILL`` when its parent ends (nothing elsewhere)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # no libc or no prctl: the watchdog thread still runs
        pass


def _watch(parent: int, poll: float) -> None:
    while os.getppid() == parent:
        time.sleep(poll)
    os._exit(_ORPHAN_EXIT)


def available_cpus() -> int:
    """CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def die_with_parent(parent: int, poll: float = POLL_SECONDS) -> None:
    """Make this (worker) process end when the process ``parent`` ends: the parent death signal on
    Linux, and a watchdog thread everywhere. Ends at once if ``parent`` is already gone."""
    _set_parent_death_signal()
    if os.getppid() != parent:  # the parent ended before the signal was asked for
        os._exit(_ORPHAN_EXIT)
    threading.Thread(target=_watch, args=(parent, poll), name="audiotok-parent-watchdog", daemon=True).start()


def _init_worker(parent: int, ignore_stop_signals: bool, worker_id: int) -> None:
    if ignore_stop_signals:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, signal.SIG_IGN)
    die_with_parent(parent)


def worker_init(ignore_stop_signals: bool = False) -> Callable[[int], None]:
    """A DataLoader ``worker_init_fn`` (picklable) whose workers end with this process, and with
    ``ignore_stop_signals`` ignore SIGTERM and SIGINT (a trainer's: it stops them)."""
    return functools.partial(_init_worker, os.getpid(), ignore_stop_signals)


def stop_workers(batches: Iterator[Any]) -> None:
    """End the worker processes of a DataLoader iterator now, as its deletion would (nothing for one without
    workers): each takes its exit sentinel after the item in progress."""
    shutdown = getattr(batches, "_shutdown_workers", None)  # what the iterator's __del__ calls
    if shutdown is not None:
        shutdown()
