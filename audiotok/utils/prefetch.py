"""Host work in a background thread, so that it overlaps the device's: :func:`prefetch` runs an
iterator ahead of its consumer, :class:`WriteBehind` runs a producer's writes behind it.

The encoder loop (:meth:`audiotok.AudioTokenizer.run_plan`, and for the bulk job
:meth:`~audiotok.AudioTokenizer.encode_each`) pads and stacks the next batch while the model runs on the
current one: the model's kernels release the GIL, and the padding is memory copies that mostly do too.
The bulk job (:mod:`audiotok.bulk.parts`) writes pool n's shards while the model encodes pool n + 1:
file and network I/O release the GIL as well.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Generator, Iterable
from typing import Generic, TypeVar

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


class WriteBehind(Generic[T]):
    """Calls run one at a time, in the order given, by a background thread: the caller goes on while
    they run. At most ``depth`` calls wait besides the one running (:meth:`submit` waits for a place),
    which bounds the memory that they hold.

    The first exception of a call is raised in the caller's thread by the next :meth:`submit`,
    :meth:`results` or :meth:`close`, and the calls after it are not run: what they would have written
    is not written, as when the caller stops at an exception of its own.
    """

    def __init__(self, depth: int = 1, name: str = "audiotok-write"):
        if depth < 1:
            raise ValueError(f"depth must be at least 1, got {depth}")
        self._todo: queue.Queue = queue.Queue(depth)
        self._done: queue.Queue = queue.Queue()
        self._error: BaseException | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (call := self._todo.get()) is not _DONE:
            if self._error is None:
                try:
                    self._done.put(call())
                except BaseException as e:  # noqa: BLE001 - raised in the caller's thread
                    self._error = e
            self._todo.task_done()
        self._todo.task_done()

    def submit(self, call: Callable[[], T]) -> list[T]:
        """Queue ``call`` (waiting while ``depth`` calls wait); returns :meth:`results`."""
        if self._closed:
            raise RuntimeError("submit after close")
        self._todo.put(call)
        return self.results()

    def results(self, wait: bool = False) -> list[T]:
        """The results of the calls that ended since the last time they were returned, in order (after
        every call submitted has ended when ``wait``); raises the exception of a call that failed."""
        if wait:
            self._todo.join()
        out = []
        while not self._done.empty():
            out.append(self._done.get())
        if self._error is not None:
            raise self._error
        return out

    def close(self) -> list[T]:
        """Wait for the calls submitted (those after a failed one are dropped) and stop the thread;
        returns :meth:`results`. Closing again does nothing more."""
        if not self._closed:
            self._closed = True
            self._todo.put(_DONE)
            self._thread.join()
        return self.results()
