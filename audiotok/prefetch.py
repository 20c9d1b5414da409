"""Running an iterator ahead in a background thread, so host work overlaps the device's.

The encoder loop (:meth:`audiotok.AudioTokenizer.run_plan`, and for the bulk job
:meth:`~audiotok.AudioTokenizer.encode_each`) pads and stacks the next batch while the model runs on the
current one: the model's kernels release the GIL, and the padding is memory copies that mostly do too.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Generator, Iterable
from typing import TypeVar

T = TypeVar("T")

_DONE = object()


class _Raised:
    def __init__(self, error: BaseException):
        self.error = error


def prefetch(items: Iterable[T], depth: int = 1) -> Generator[T, None, None]:
    """Yield ``items`` in order, computed by a background thread up to ``depth`` items ahead of the
    consumer. An exception of ``items`` is raised here, at its place in the sequence. Closing the
    returned generator (or leaving a loop over it by an exception) stops the thread and waits for it."""
    if depth < 1:
        raise ValueError(f"depth must be at least 1, got {depth}")
    ahead: queue.Queue = queue.Queue(depth)
    stop = threading.Event()

    def put(x: object) -> bool:
        while not stop.is_set():
            try:
                ahead.put(x, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for x in items:
                if not put(x):
                    return
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            put(_Raised(e))
            return
        put(_DONE)

    thread = threading.Thread(target=produce, name="audiotok-prefetch", daemon=True)
    thread.start()
    try:
        while (x := ahead.get()) is not _DONE:
            if isinstance(x, _Raised):
                raise x.error
            yield x
    finally:
        stop.set()
        thread.join()
