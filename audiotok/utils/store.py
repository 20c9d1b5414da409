"""Where a code dataset lives: every file operation on one, reading (:class:`audiotok.formats.codedataset.CodeDataset`)
or writing (a bulk job, :mod:`audiotok.bulk`), goes through a :class:`Store`.

A store is a root (a local folder, :class:`LocalStore`, or an fsspec URL such as ``s3://bucket/codes``,
:class:`FsspecStore`; :func:`open_store` picks) holding files named by ``/``-separated paths
relative to it. The guarantees a writer relies on:

* :meth:`Store.write_bytes` and :meth:`Store.put_file` are atomic: a reader sees the old file or
  the whole new one, never a partial file under the final name;
* a file is built locally at :meth:`Store.staging_path` and published with :meth:`Store.put_file`
  (on a local store that is a rename in the same folder, on an object store one upload);
* a failure of the storage itself (a full disk, permission denied, an unreachable object store) is
  an :class:`audiotok.utils.io.StorageError` naming the file, whatever the store;
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

import hashlib
import json
import os
import posixpath
import shutil
import socket
import tempfile
import weakref
from contextlib import AbstractContextManager
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from .io import atomic_write, is_temp_name, replace_durably, storage_errors, temp_path
from .untrusted import Shape, parse_json
from .urls import is_url, local_path, url_to_fs

if TYPE_CHECKING:
    from fsspec import AbstractFileSystem


def check_name(name: str) -> str:
    """``name`` unchanged if it is a store name: ``/``-separated, relative, without empty, ``.`` or
    ``..`` parts (so one file has one name, on every kind of store); else ``ValueError``."""
    if not isinstance(name, str) or any(part in ("", ".", "..") for part in name.split("/")):
        raise ValueError(f"store names are relative paths inside the store, got {name!r}")
    return name


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

    def open(self, name: str) -> IO[bytes]:
        """The file ``name`` opened for reading, as a stream (a missing file: ``FileNotFoundError``)."""
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

    def read_json(self, name: str, shape: Shape) -> Any:
        """The JSON file ``name``, checked to have ``shape`` (:func:`audiotok.utils.untrusted.parse_json`)."""
        return parse_json(self.read_bytes(name), f"{self.url}/{name}", shape)

    def write_json(self, name: str, obj: Any) -> None:
        self.write_bytes(name, (json.dumps(obj, indent=1) + "\n").encode())

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"


class LocalStore(Store):
    """A folder on a local or shared filesystem; writes are durable (:mod:`audiotok.utils.io`). An ``OSError``
    of the file system (a full disk, permission denied) is a :class:`~audiotok.utils.io.StorageError`."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.url = str(self.root)

    def _path(self, name: str) -> Path:
        return self.root / check_name(name)

    def exists(self, name: str) -> bool:
        with storage_errors(self._path(name)):
            return self._path(name).is_file()

    def list(self, prefix: str = "") -> list[str]:
        base = self._path(prefix) if prefix else self.root
        if not base.is_dir():
            return []
        names = []
        with storage_errors(base):
            for dirpath, _, files in os.walk(base):
                names += [(Path(dirpath) / f).relative_to(self.root).as_posix() for f in files if not is_temp_name(f)]
        return sorted(names)

    def read_bytes(self, name: str) -> bytes:
        with storage_errors(self._path(name)):
            return self._path(name).read_bytes()

    def open(self, name: str) -> IO[bytes]:
        with storage_errors(self._path(name)):
            return open(self._path(name), "rb")

    def write_bytes(self, name: str, data: bytes) -> None:
        with storage_errors(self._path(name)), atomic_write(self._path(name), "wb") as f:
            f.write(data)

    def staging_path(self, name: str) -> Path:
        path = self._path(name)
        with storage_errors(path.parent):
            path.parent.mkdir(parents=True, exist_ok=True)
        return temp_path(path)

    def put_file(self, local: str | os.PathLike, name: str) -> None:
        path = self._path(name)
        with storage_errors(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            replace_durably(local, path)

    def delete(self, name: str) -> None:
        with storage_errors(self._path(name)):
            self._path(name).unlink(missing_ok=True)

    def clean_staging(self) -> tuple[str, ...]:
        removed = []
        with storage_errors(self.root):
            for dirpath, _, files in os.walk(self.root):
                for f in files:
                    if is_temp_name(f):
                        path = Path(dirpath) / f
                        path.unlink(missing_ok=True)
                        removed.append(path.relative_to(self.root).as_posix())
        return tuple(sorted(removed))


class FsspecStore(Store):
    """A location of an fsspec filesystem (``s3://bucket/codes``, ``gs://...``, ``hf://...``; see
    :mod:`audiotok.utils.urls`): an object store, where a single upload is atomic.

    Files are built in a local staging folder (under ``TMPDIR``, removed with the store; a killed
    process's by :meth:`clean_staging` on the same machine) and uploaded whole by :meth:`put_file`;
    :meth:`write_bytes` is one upload. On S3 and GCS an object appears whole or not at all: below
    ``2 * chunksize`` (100 MiB by default) s3fs does one ``PutObject``, above it a multipart upload
    whose object S3 creates only at ``CompleteMultipartUpload`` (a failed upload is aborted; one
    killed mid-way leaves invisible parts until a bucket lifecycle rule
    ``AbortIncompleteMultipartUpload`` drops them). On the Hugging Face hub every upload is a
    commit. Listings are read afresh on each call (fsspec's listing cache is cleared), since other
    processes write to the same location. Any error of the filesystem (a connection refused, a
    timeout, a denied request: fsspec raises many types) is a :class:`~audiotok.utils.io.StorageError`;
    ``FileNotFoundError`` stays what it is.

    Args:
        url: the location (a "folder": names are appended after a ``/``).
        storage_options: options of the fsspec filesystem (credentials, ``endpoint_url`` ...).
    """

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None):
        self.url = url.rstrip("/")
        self.storage_options = dict(storage_options or {})
        self.root = url_to_fs(self.url, self.storage_options)[1]
        # TMPDIR/audiotok-staging/{url hash}-{host}-{pid}-{random}: clean_staging finds a gone process's
        self._staging_root = Path(tempfile.gettempdir(), "audiotok-staging")
        self._prefix = f"{_url_hash(self.url)}-{socket.gethostname()}-"
        self._staging_folder: Path | None = None

    @property
    def _staging(self) -> Path:
        """This store's staging folder, made on first use (a store only read from makes none)."""
        if self._staging_folder is None:
            self._staging_root.mkdir(exist_ok=True)
            self._staging_folder = Path(tempfile.mkdtemp(prefix=f"{self._prefix}{os.getpid()}-",
                                                         dir=self._staging_root))
            weakref.finalize(self, _remove_staging, self._staging_folder, os.getpid())
        return self._staging_folder

    @property
    def fs(self) -> AbstractFileSystem:
        """The filesystem, this process's (fsspec makes a new one in a forked child)."""
        return url_to_fs(self.url, self.storage_options)[0]

    def _path(self, name: str) -> str:
        return f"{self.root}/{check_name(name)}"

    def _errors(self, name: str = "") -> AbstractContextManager[None]:
        """Any error of the filesystem in the block as a :class:`~audiotok.utils.io.StorageError` naming ``name``."""
        return storage_errors(f"{self.url}/{name}" if name else self.url, (Exception,))

    def exists(self, name: str) -> bool:
        path = self._path(name)
        with self._errors(name):
            fs = self.fs
            fs.invalidate_cache()
            return bool(fs.isfile(path))

    def list(self, prefix: str = "") -> list[str]:
        base = self._path(prefix) if prefix else self.root
        with self._errors(prefix):
            fs = self.fs
            fs.invalidate_cache()
            if not fs.isdir(base):
                return []
            names = (posixpath.relpath(p, self.root) for p in fs.find(base))
            return sorted(n for n in names if not is_temp_name(n))

    def read_bytes(self, name: str) -> bytes:
        path = self._path(name)
        with self._errors(name):
            return bytes(self.fs.cat_file(path))

    def open(self, name: str) -> IO[bytes]:
        path = self._path(name)
        with self._errors(name):
            return self.fs.open(path, "rb")

    def write_bytes(self, name: str, data: bytes) -> None:
        path = self._path(name)
        with self._errors(name):
            self.fs.pipe_file(path, data)

    def staging_path(self, name: str) -> Path:
        return temp_path(self._staging / posixpath.basename(check_name(name)))

    def put_file(self, local: str | os.PathLike, name: str) -> None:
        path = self._path(name)
        with self._errors(name):
            self.fs.put_file(os.fspath(local), path)
        os.unlink(local)

    def delete(self, name: str) -> None:
        path = self._path(name)
        try:
            with self._errors(name):
                self.fs.rm_file(path)
        except FileNotFoundError:
            pass

    def clean_staging(self) -> tuple[str, ...]:
        """Empty this store's staging folder and remove those that processes now gone left on this
        machine for the same URL (files of a killed process's unfinished builds); returns their paths."""
        removed: list[str] = []
        for folder in sorted(self._staging_root.glob(self._prefix + "*")):
            if folder == self._staging_folder or _left_by_a_gone_process(folder):
                removed += [str(f) for f in sorted(folder.rglob("*")) if f.is_file()]
                shutil.rmtree(folder, ignore_errors=True)
        if self._staging_folder is not None:
            self._staging_folder.mkdir(exist_ok=True)
        return tuple(removed)


def _url_hash(url: str) -> str:
    return hashlib.sha1(url.encode()).hexdigest()[:16]


def process_gone(host: str, pid: str) -> bool:
    """Whether ``pid`` names a process of this machine (``host`` is this host name) that has ended;
    ``False`` for another machine's, a running one (another user's included) or a malformed pid."""
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except OSError:  # exists, another user's
        return False
    return False


def _left_by_a_gone_process(folder: Path) -> bool:
    """Whether a staging folder ``{url hash}-{host}-{pid}-{random}`` was made on this machine by a
    process that has ended."""
    host, pid, _ = (folder.name[17:].rsplit("-", 2) + ["", ""])[:3]
    return process_gone(host, pid)


def _remove_staging(folder: Path, pid: int) -> None:
    """Remove a store's staging folder, in the process that made it only (not in forked children)."""
    if os.getpid() == pid:
        shutil.rmtree(folder, ignore_errors=True)


def open_store(location: str | os.PathLike, storage_options: dict[str, Any] | None = None) -> Store:
    """The store at ``location``: a local folder path or ``file://`` URL (a :class:`LocalStore`,
    created on first write; ``storage_options`` unused), or an fsspec URL such as
    ``s3://bucket/codes`` (a :class:`FsspecStore` made with ``storage_options``)."""
    if is_url(location):
        return FsspecStore(os.fspath(location), storage_options)
    return LocalStore(local_path(location))
