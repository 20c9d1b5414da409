"""Atomic, durable file writes: the one implementation every writer in the package uses.

A file is written to a temporary name in its final folder (``.NAME.<random>.tmp``), flushed and
fsynced, then moved into place with ``os.replace`` and the folder fsynced, so a reader (or a
resumed job) sees the old file or the whole new one, never a partial file at the final path.

    with atomic_write("out/summary.json", "w") as f:    # a file written in one go
        json.dump(obj, f)

    tmp = temp_path(path)                                # a file built over time (a shard)
    ... write tmp ...
    replace_durably(tmp, path)

A write that fails for a reason of the storage (a full disk, a quota, a read-only file system,
permission denied, an unreachable object store) is a :class:`StorageError`: nothing is wrong with
the input, and the same command run again once the storage works picks up where it stopped.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


class StorageError(OSError):
    """An output could not be written (or the output's storage read back) for a reason of the storage:
    a full disk, a quota, a read-only file system, permission denied, an unreachable object store.
    The message is one line naming the file; ``errno`` is the underlying error's, when it has one."""


def _reason(error: BaseException) -> str:
    """One line describing ``error``: its ``strerror`` for an ``OSError``, else its first line of text."""
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


@contextmanager
def storage_errors(where: str | os.PathLike, errors: tuple[type[BaseException], ...] = (OSError,)) -> Iterator[None]:
    """Turn an error of ``errors`` raised in the block into a :class:`StorageError` naming ``where``
    (``FileNotFoundError``, a missing file rather than a failing storage, passes unchanged)."""
    try:
        yield
    except (StorageError, FileNotFoundError):
        raise
    except errors as e:
        error = StorageError(f"{where}: {_reason(e)}")
        error.errno = getattr(e, "errno", None)
        raise error from e


def temp_path(path: str | os.PathLike) -> Path:
    """A fresh temporary path beside ``path``: ``.NAME.<12 hex digits>.tmp`` (hidden, unique), with NAME
    cut to its first 100 characters so that the temporary name stays under the file system's limit
    (255 bytes) whatever the final name."""
    path = Path(path)
    return path.with_name(f".{path.name[:100]}.{secrets.token_hex(6)}.tmp")


def is_temp_name(name: str) -> bool:
    """Whether the file name (or ``/``-separated path) ``name`` is one :func:`temp_path` makes."""
    base = name.rsplit("/", 1)[-1]
    return base.startswith(".") and base.endswith(".tmp")


def fsync_file(path: str | os.PathLike) -> None:
    """Flush a written file's data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename in ``path`` durable (best effort: not every filesystem allows it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def replace_durably(tmp: str | os.PathLike, path: str | os.PathLike) -> None:
    """Move the finished file ``tmp`` to ``path`` (same folder): fsync it, ``os.replace``, fsync the folder."""
    fsync_file(tmp)
    os.replace(tmp, path)
    fsync_dir(Path(path).parent)


def check_writable(path: str | os.PathLike, folder: bool = False) -> None:
    """``ValueError`` naming ``path`` unless the writers here can put a file there (``folder``: files
    under the folder ``path``): the nearest folder of it that exists (the missing ones are created on
    writing) must be a folder this process may create files in. What no check can foresee (a full
    disk) is a :class:`StorageError` when writing."""
    path = Path(path)
    target = path if folder else path.parent
    existing = next(p for p in (target, *target.parents) if os.path.exists(p) or p == p.parent)
    if not existing.is_dir():
        raise ValueError(f"{path}: cannot write here: {existing} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{path}: cannot write here: no permission to create files in {existing}")


@contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", **open_kwargs: Any) -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path`` for writing; when the block ends without an error it
    replaces ``path`` durably, otherwise it is removed. Parent folders are created.

    Args:
        path: the final path.
        mode: ``"wb"`` or ``"w"`` (text; ``open_kwargs`` such as ``newline=""`` go to :func:`open`).
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write opens files with mode 'w' or 'wb', got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        with open(tmp, "xb" if mode == "wb" else "x", **open_kwargs) as f:  # x: never reuse a file
            yield f
        replace_durably(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise

