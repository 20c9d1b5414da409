"""Where a bulk job's output lives: every file operation of a job goes through a :class:`Store`.

A store is a root (a local folder; object-store URLs are added by :func:`open_store`) holding files
named by ``/``-separated paths relative to it. The guarantees a job relies on:

* :meth:`Store.write_bytes` and :meth:`Store.put_file` are atomic: a reader sees the old file or
  the whole new one, never a partial file under the final name;
* a file is built locally at :meth:`Store.staging_path` and published with :meth:`Store.put_file`
  (on a local store that is a rename in the same folder);
* there is no exclusive create or compare-and-swap (object stores do not all have one): a job's
  correctness must not depend on it, only on outputs being deterministic, so that two processes
  writing the same name write the same content.

    store = open_store("codes/")
    store.write_json(".bulk/plan.json", {"parts": 12})
    tmp = store.staging_path("part-00003-0000.tar")
    ... write tmp ...
    store.put_file(tmp, "part-00003-0000.tar")
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..io import atomic_write, replace_durably, temp_path


class Store:
    """Interface of an output location; names are ``/``-separated paths relative to the root."""

    url: str

    def exists(self, name: str) -> bool:
        raise NotImplementedError

    def list(self, prefix: str = "") -> list[str]:
        """Names of the files under the folder ``prefix`` (recursive; ``""``: the whole store), sorted;
        temporary files of unfinished writes are left out."""
        raise NotImplementedError

    def read_bytes(self, name: str) -> bytes:
        raise NotImplementedError

    def write_bytes(self, name: str, data: bytes) -> None:
        """Write ``name`` atomically (parent folders are created)."""
        raise NotImplementedError

    def staging_path(self, name: str) -> Path:
        """A fresh local path at which the file ``name`` is built before :meth:`put_file`."""
        raise NotImplementedError

    def put_file(self, local: str | os.PathLike, name: str) -> None:
        """Publish the finished local file ``local`` (from :meth:`staging_path`) as ``name``,
        atomically; ``local`` is consumed."""
        raise NotImplementedError

    def delete(self, name: str) -> None:
        """Remove ``name``; a missing file is not an error."""
        raise NotImplementedError

    def clean_staging(self) -> tuple[str, ...]:
        """Remove what unfinished builds left at staging paths of this store (a killed process's
        half-written shards); call it only when no build is under way. Returns what was removed."""
        return ()

    def local_path(self, name: str) -> Path | None:
        """The local path of ``name`` when the store is a local folder, else ``None``."""
        return None

    def read_json(self, name: str) -> Any:
        return json.loads(self.read_bytes(name))

    def write_json(self, name: str, obj: Any) -> None:
        self.write_bytes(name, (json.dumps(obj, indent=1) + "\n").encode())

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"


class LocalStore(Store):
    """A folder on a local or shared filesystem; writes are durable (:mod:`audiotok.io`)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.url = str(self.root)

    def _path(self, name: str) -> Path:
        parts = Path(name).parts
        if not name or Path(name).is_absolute() or ".." in parts:
            raise ValueError(f"store names are relative paths inside the store, got {name!r}")
        return self.root / name

    def exists(self, name: str) -> bool:
        return self._path(name).is_file()

    def list(self, prefix: str = "") -> list[str]:
        base = self._path(prefix) if prefix else self.root
        if not base.is_dir():
            return []
        names = []
        for dirpath, _, files in os.walk(base):
            for f in files:
                if f.startswith(".") and f.endswith(".tmp"):
                    continue
                names.append((Path(dirpath) / f).relative_to(self.root).as_posix())
        return sorted(names)

    def read_bytes(self, name: str) -> bytes:
        return self._path(name).read_bytes()

    def write_bytes(self, name: str, data: bytes) -> None:
        with atomic_write(self._path(name), "wb") as f:
            f.write(data)

    def staging_path(self, name: str) -> Path:
        path = self._path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        return temp_path(path)

    def put_file(self, local: str | os.PathLike, name: str) -> None:
        path = self._path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        replace_durably(local, path)

    def delete(self, name: str) -> None:
        self._path(name).unlink(missing_ok=True)

    def clean_staging(self) -> tuple[str, ...]:
        removed = []
        for dirpath, _, files in os.walk(self.root):
            for f in files:
                if f.startswith(".") and f.endswith(".tmp"):  # temp_path's names
                    path = Path(dirpath) / f
                    path.unlink(missing_ok=True)
                    removed.append(path.relative_to(self.root).as_posix())
        return tuple(sorted(removed))

    def local_path(self, name: str) -> Path | None:
        return self._path(name)


def open_store(location: str | os.PathLike) -> Store:
    """The store at ``location``: a local folder path (created on first write)."""
    return LocalStore(location)
