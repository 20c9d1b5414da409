"""A code-dataset record: its fields, key and checks, and the base of the shard writers (see
:mod:`audiotok.formats.codedataset`)."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from ...audio import AUDIO_EXTENSIONS
from ...codes import check_frames
from ...utils.io import replace_durably, temp_path
from ...utils.untrusted import OptionalEntry, check_number, check_shape

#: Per-record metadata fields, in the order they are written (WebDataset ``{key}.json``).
RECORD_FIELDS = ("key", "source_key", "num_samples", "sample_rate", "n_frames", "channels", "model_id")
#: A record's ``{key}.json`` tar member (:data:`RECORD_FIELDS`, and ``codes_fingerprint`` in tar shards written
#: since it was added; ``source_key`` is not read).
RECORD_SHAPE = {"key": str, "num_samples": int, "sample_rate": int, "n_frames": int, "channels": int,
                "model_id": OptionalEntry(str), "codes_fingerprint": OptionalEntry(str)}

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")
_Writer = TypeVar("_Writer", bound="ShardWriter")


def safe_name(source_key: str, max_len: int = 64) -> str:
    """A short WebDataset-safe name for a source key: its last path / ``:`` component without an
    audio extension, with everything but letters, digits, ``_`` and ``-`` replaced by ``_``."""
    name = source_key.replace("\\", "/").rsplit("/", 1)[-1].rsplit(":", 1)[-1]
    stem, dot, ext = name.rpartition(".")
    if dot and stem and "." + ext.lower() in AUDIO_EXTENSIONS:
        name = stem
    name = _UNSAFE.sub("_", name)[-max_len:].strip("_-")
    return name or "record"


def record_key(source_key: str, part: int, position: int) -> str:
    """Unique output key of the record at ``position`` of ``part`` (of the input's fixed partition):
    ``{safe_name}_p{part}_{position}``.

    No dots (WebDataset splits member names at the first dot of the base name) and no slashes; unique
    in the whole output since ``(part, position)`` is.
    """
    return f"{safe_name(source_key)}_p{part}_{position}"


def check_metadata_fields(fields: list[str] | tuple[str, ...]) -> None:
    """Raise ``ValueError`` unless ``fields`` are distinct non-empty names."""
    if any(not isinstance(f, str) or not f for f in fields) or len(set(fields)) != len(fields):
        raise ValueError(f"metadata fields must be distinct non-empty names, got {list(fields)}")


def check_codes(codes: np.ndarray, what: str) -> None:
    """``ValueError`` naming ``what`` unless ``codes`` are uint16 ``[K, F]`` or ``[C, K, F]``."""
    if codes.dtype != np.uint16 or codes.ndim not in (2, 3):
        raise ValueError(f"{what} has {codes.dtype} codes of shape {codes.shape}, expected uint16 [K, F] or [C, K, F]")


@dataclass
class CodeRecord:
    """One coded file: ``codes`` is uint16 ``[K, F]`` (mono) or ``[C, K, F]`` (channels coded one by
    one); ``meta`` holds ``key, source_key, num_samples, sample_rate, n_frames, channels, model_id``;
    ``metadata`` the fields kept from the source (empty for datasets before format 3)."""

    key: str
    codes: np.ndarray
    meta: dict[str, Any]
    metadata: dict[str, Any] = field(default_factory=dict)

    def lookup(self, name: str) -> Any:
        """Field ``name`` of :attr:`metadata`, else of :attr:`meta` (a ``KeyError`` if neither has it)."""
        return self.metadata[name] if name in self.metadata else self.meta[name]

    @property
    def channel_codes(self) -> np.ndarray:
        """``[C, K, F]`` codes, ``C = 1`` for a ``[K, F]`` record."""
        return self.codes if self.codes.ndim == 3 else self.codes[None]


def check_record(record: CodeRecord, shard: str | os.PathLike, expected: dict[str, Any] | None) -> CodeRecord:
    """``record``, unless its codes or fields disagree with each other or with ``expected`` (the
    :meth:`Manifest.shard_metadata <audiotok.formats.codedataset.manifest.Manifest.shard_metadata>` of its dataset,
    when known): then ``ValueError`` naming the shard and record."""
    codes, meta, where = record.codes, record.meta, f"{shard}: record {record.key!r}"
    check_codes(codes, where)
    check_shape(meta, RECORD_SHAPE, where)
    if meta["n_frames"] != codes.shape[-1]:
        raise ValueError(f"{where} has {codes.shape[-1]} frames, its metadata says {meta['n_frames']}")
    if expected is None:
        return record
    problems = [f"{name} {meta[name]!r} (the manifest says {expected[name]!r}): codes of another model"
                for name in ("model_id", "codes_fingerprint")
                if None not in (meta.get(name), expected[name]) and meta[name] != expected[name]]
    if expected["n_quantizers"] is not None and codes.shape[-2] != expected["n_quantizers"]:
        problems.append(f"{codes.shape[-2]} codebooks (the manifest says n_quantizers {expected['n_quantizers']})")
    if expected["mono"] is not None and (codes.ndim == 2) != expected["mono"]:
        problems.append(f"codes of shape {codes.shape} (the manifest says mono {expected['mono']})")
    if codes.ndim == 3 and codes.shape[0] != meta["channels"]:
        problems.append(f"{codes.shape[0]} coded channels (its metadata says channels {meta['channels']})")
    if codes.size and int(codes.max()) >= expected["codebook_size"]:
        problems.append(f"code {int(codes.max())} (the codebooks have {expected['codebook_size']} entries)")
    if problems:
        raise ValueError(f"{where} has {'; '.join(problems)}")
    for name in ("num_samples", "sample_rate"):
        check_number(meta[name], f"{where}: {name}", minimum=1, integer=True)
    check_frames(codes.shape[-1], meta["num_samples"], meta["sample_rate"], expected["sample_rate"],
                 expected["hop_length"], where)
    return record


@contextmanager
def damaged(path: str | os.PathLike, errors: tuple[type[BaseException], ...]) -> Iterator[None]:
    """An error of ``errors`` in the block (a truncated or damaged file, as its parser reports it) as a
    ``ValueError`` naming the shard ``path``."""
    try:
        yield
    except errors as e:
        raise ValueError(f"{path}: damaged or truncated shard ({type(e).__name__}: {e})") from e


class ShardWriter:
    """Base class: records are added to a temporary file; :meth:`close` moves it into place.
    ``metadata`` (:func:`~audiotok.formats.codedataset.manifest.dataset_metadata`) is stored where the shard type
    has room for it; ``kept_fields`` are the kept metadata fields every record carries (see
    :mod:`audiotok.formats.codedataset`). ``staged=True``: ``path`` is itself a staging file
    (:meth:`audiotok.utils.store.Store.staging_path`) written directly and left there by :meth:`close`, for
    the caller to publish (:meth:`~audiotok.utils.store.Store.put_file`).

    A context manager: the block closes the shard when it ends, or aborts it on an error::

        with TarShardWriter("codes/shard-0000.tar", metadata) as shard:
            shard.add(meta, codes)
    """

    suffix = ""

    def __init__(self, path: str | os.PathLike, metadata: dict[str, Any] | None = None,
                 kept_fields: tuple[str, ...] = (), staged: bool = False):
        check_metadata_fields(kept_fields)
        self.path = Path(path)
        self.metadata = metadata or {}
        self.kept_fields = tuple(kept_fields)
        self.staged = staged
        self.tmp = self.path if staged else temp_path(self.path)
        self.records = 0
        self.frames = 0
        self.seconds = 0.0

    def add(self, meta: dict[str, Any], codes: np.ndarray) -> None:
        """One record: ``meta`` holds :data:`RECORD_FIELDS` and, with ``kept_fields``, ``metadata``
        (a dict with exactly those keys, JSON values); ``codes`` is uint16 ``[K, F]`` or ``[C, K, F]``."""
        check_codes(codes, f"record {meta['key']!r}")
        if self.kept_fields and set(meta.get("metadata", {})) != set(self.kept_fields):
            raise ValueError(f"record {meta['key']!r} has metadata {sorted(meta.get('metadata', {}))}, "
                             f"expected {sorted(self.kept_fields)}")
        self._add(meta, codes)
        self.records += 1
        self.frames += int(meta["n_frames"])
        self.seconds += meta["num_samples"] / meta["sample_rate"]

    def _add(self, meta: dict[str, Any], codes: np.ndarray) -> None:
        raise NotImplementedError

    def _finish(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Finish the file and move it to :attr:`path` (staged: leave it finished at :attr:`path`)."""
        self._finish()
        if not self.staged:
            replace_durably(self.tmp, self.path)

    def abort(self) -> None:
        """Drop the unfinished file."""
        try:
            self._finish()
        except Exception:
            pass
        self.tmp.unlink(missing_ok=True)

    def __enter__(self: _Writer) -> _Writer:
        return self

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        if kind is None:
            self.close()
        else:
            self.abort()
