"""Worker processes that end with the process that started them.

A worker blocked on a queue (a bulk reader waiting for its next part, a DataLoader worker waiting
for an index) never notices that its parent was killed (``SIGKILL``, the out-of-memory killer):
it would hold its memory for good. Every worker process audiotok starts runs :func:`die_with_parent`
first (DataLoaders get it as their ``worker_init_fn``, :func:`worker_init`):

* on Linux the kernel sends the worker ``SIGKILL`` when its parent ends (``prctl(PR_SET_PDEATHSIG)``);
* everywhere (macOS included) a daemon thread polls the parent's pid and ends the worker with
  ``os._exit`` within :data:`POLL_SECONDS` of the parent's end.
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
from collections.abc import Callable

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


def die_with_parent(parent: int, poll: float = POLL_SECONDS) -> None:
    """Make this (worker) process end when the process ``parent`` ends: the parent death signal on
    Linux, and a watchdog thread everywhere. Ends at once if ``parent`` is already gone."""
    _set_parent_death_signal()
    if os.getppid() != parent:  # the parent ended before the signal was asked for
        os._exit(_ORPHAN_EXIT)
    threading.Thread(target=_watch, args=(parent, poll), name="audiotok-parent-watchdog", daemon=True).start()


def _init_worker(parent: int, worker_id: int) -> None:
    die_with_parent(parent)


def worker_init() -> Callable[[int], None]:
    """A DataLoader ``worker_init_fn`` (picklable) whose workers end with this process."""
    return functools.partial(_init_worker, os.getpid())
