"""Local paths and fsspec URLs: the one place that tells them apart and opens a URL's filesystem.

A *location* is a local path or a URL ``scheme://...`` read and written with `fsspec
<https://filesystem-spec.readthedocs.io>`_: ``s3://`` (``s3fs``, installed with ``audiotok[cloud]``),
``gs://`` (``gcsfs``), ``hf://`` (``huggingface_hub``), ``memory://`` ... A ``file://`` URL is a
local path. Filesystem options (credentials, ``endpoint_url``, ...) are passed as
``storage_options``; fsspec's own configuration (``FSSPEC_S3_ENDPOINT_URL=...``, files in
``~/.config/fsspec/``) and each filesystem's usual environment (``AWS_PROFILE``,
``GOOGLE_APPLICATION_CREDENTIALS``, ``HF_TOKEN``) apply as well.

Filesystem objects are not kept across processes: callers keep the URL and the options and call
:func:`url_to_fs` where they need one (fsspec caches the instance per process), so objects that
hold a location can be sent to DataLoader workers.
"""

from __future__ import annotations

import os
import posixpath
import re
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fsspec import AbstractFileSystem

_LOCAL_SCHEMES = ("file", "local")
#: ``scheme://`` at the start of a URL; fsspec chains (``simplecache::s3://``) included.
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*(?:::[A-Za-z][A-Za-z0-9+.-]*)*)://")


def scheme(location: str | os.PathLike) -> str | None:
    """The scheme of a URL (``"s3"`` for ``s3://bucket/x``), ``None`` for a plain path."""
    match = _SCHEME.match(os.fspath(location))
    return match.group(1).lower() if match else None


def is_url(location: str | os.PathLike) -> bool:
    """``True`` for a URL read through fsspec: a scheme other than ``file://``."""
    return scheme(location) not in (None, *_LOCAL_SCHEMES)


def local_path(location: str | os.PathLike) -> str:
    """``location`` as a local path when it is one (a ``file://`` URL loses its prefix); URLs as given."""
    location = os.fspath(location)
    if scheme(location) in _LOCAL_SCHEMES:
        return location.split("://", 1)[1]
    return location


def url_to_fs(url: str, storage_options: dict[str, Any] | None = None) -> tuple[AbstractFileSystem, str]:
    """The fsspec filesystem of ``url`` (made with ``storage_options``) and the path inside it
    (no trailing ``/``). An ``ImportError`` names the package a scheme needs."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    return fs, path.rstrip("/")


def check_scheme(location: str | os.PathLike) -> None:
    """Raise ``ImportError`` (naming the package to install) when ``location`` is a URL whose
    fsspec implementation is not installed; ``ValueError`` for a scheme fsspec does not know."""
    name = scheme(location)
    if not is_url(location) or name is None:
        return
    try:
        import fsspec
    except ImportError:
        raise ImportError(f"{location}: URLs need fsspec: pip install 'audiotok[cloud]'") from None
    for protocol in name.split("::"):
        fsspec.get_filesystem_class(protocol)


def glob_url(pattern: str, storage_options: dict[str, Any] | None = None) -> list[str]:
    """The files matching a glob pattern URL (``s3://bucket/train-*.tar``), as URLs, sorted."""
    fs, path = url_to_fs(pattern, storage_options)
    return [fs.unstrip_protocol(p) for p in sorted(fs.glob(path)) if fs.isfile(p)]


def list_url(url: str, storage_options: dict[str, Any] | None = None) -> list[str]:
    """The files under the folder ``url``, recursively, as ``/``-separated paths relative to it,
    sorted; hidden files and folders (a name starting with ``.``) left out, as
    :func:`audiotok.audio.find_files` does. Raises ``FileNotFoundError`` unless ``url`` is a folder."""
    fs, base = url_to_fs(url, storage_options)
    fs.invalidate_cache()
    if not fs.isdir(base):
        raise FileNotFoundError(f"{url}: no such folder")
    names = [posixpath.relpath(p, base) for p in fs.find(base)]
    return sorted(n for n in names if not any(part.startswith(".") for part in n.split("/")))
