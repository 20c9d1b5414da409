"""Shard writers (WebDataset tar, Parquet), record keys, and atomic file writes.

Every shard is written to a temporary name in its final folder and moved into place with
:func:`audiotok.io.replace_durably`, so a reader (or a resumed job) sees either the whole file or none of it.
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..io import replace_durably, temp_path

#: Per-record metadata fields, in the order they are written (WebDataset ``{key}.json``).
RECORD_FIELDS = ("key", "source_key", "num_samples", "sample_rate", "n_frames", "channels", "model_id")

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")
_AUDIO_SUFFIXES = {"wav", "flac", "ogg", "oga", "opus", "mp3", "aif", "aiff", "m4a", "aac", "webm"}


def safe_name(source_key: str, max_len: int = 64) -> str:
    """A short WebDataset-safe name for a source key: its last path / ``:`` component without an
    audio extension, with everything but letters, digits, ``_`` and ``-`` replaced by ``_``."""
    name = source_key.replace("\\", "/").rsplit("/", 1)[-1].rsplit(":", 1)[-1]
    stem, dot, ext = name.rpartition(".")
    if dot and stem and ext.lower() in _AUDIO_SUFFIXES:
        name = stem
    name = _UNSAFE.sub("_", name)[-max_len:].strip("_-")
    return name or "record"


def record_key(source_key: str, part: int, position: int) -> str:
    """Unique output key of the record at ``position`` of ``part``: ``{safe_name}_p{part}_{position}``.

    No dots (WebDataset splits member names at the first dot of the base name) and no slashes; unique
    in the whole output since ``(part, position)`` is.
    """
    return f"{safe_name(source_key)}_p{part}_{position}"


class ShardWriter:
    """Base class: records are added to a temporary file; :meth:`close` moves it into place."""

    suffix = ""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.tmp = temp_path(self.path)
        self.records = 0
        self.frames = 0
        self.seconds = 0.0

    def add(self, meta: dict[str, Any], codes: np.ndarray) -> None:
        """One record: ``meta`` holds :data:`RECORD_FIELDS`; ``codes`` is uint16 ``[K, F]`` or ``[C, K, F]``."""
        if codes.dtype != np.uint16 or codes.ndim not in (2, 3):
            raise ValueError(f"codes must be uint16 [K, F] or [C, K, F], got {codes.dtype} {codes.shape}")
        self._add(meta, codes)
        self.records += 1
        self.frames += int(meta["n_frames"])
        self.seconds += meta["num_samples"] / meta["sample_rate"]

    def _add(self, meta: dict[str, Any], codes: np.ndarray) -> None:
        raise NotImplementedError

    def _finish(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Finish the file and move it to :attr:`path`."""
        self._finish()
        replace_durably(self.tmp, self.path)

    def abort(self) -> None:
        """Drop the unfinished file."""
        try:
            self._finish()
        except Exception:
            pass
        self.tmp.unlink(missing_ok=True)


class TarShardWriter(ShardWriter):
    """WebDataset tar: members ``{key}.codes.npy`` (``np.save`` of the uint16 codes) and ``{key}.json``."""

    suffix = ".tar"

    def __init__(self, path: str | os.PathLike):
        super().__init__(path)
        self._file = open(self.tmp, "wb")
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.PAX_FORMAT)
        self._mtime = int(time.time())

    def _member(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), self._mtime, 0o644
        self._tar.addfile(info, io.BytesIO(data))

    def _add(self, meta: dict[str, Any], codes: np.ndarray) -> None:
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(codes.astype("<u2", copy=False)), allow_pickle=False)
        self._member(f"{meta['key']}.codes.npy", buf.getvalue())
        self._member(f"{meta['key']}.json", json.dumps({k: meta[k] for k in RECORD_FIELDS}).encode())

    def _finish(self) -> None:
        if not self._file.closed:
            self._tar.close()
            self._file.flush()
            self._file.close()


def parquet_schema():
    """Columns of a Parquet shard (see :mod:`audiotok.bulk`)."""
    import pyarrow as pa

    return pa.schema([
        ("key", pa.string()),
        ("codes", pa.binary()),
        ("shape", pa.list_(pa.int32())),
        ("n_frames", pa.int32()),
        ("num_samples", pa.int64()),
        ("sample_rate", pa.int32()),
        ("channels", pa.int16()),
        ("source_key", pa.string()),
        ("model_id", pa.string()),
    ])


class ParquetShardWriter(ShardWriter):
    """Parquet: one row per record, written in row groups of ``row_group_records`` rows (or about
    ``row_group_bytes`` of codes)."""

    suffix = ".parquet"

    def __init__(self, path: str | os.PathLike, row_group_records: int = 256, row_group_bytes: int = 64 << 20):
        import pyarrow.parquet as pq

        super().__init__(path)
        self.schema = parquet_schema()
        self._writer = pq.ParquetWriter(str(self.tmp), self.schema, compression="zstd")
        self._rows: dict[str, list] = {name: [] for name in self.schema.names}
        self._bytes = 0
        self.row_group_records, self.row_group_bytes = row_group_records, row_group_bytes

    def _add(self, meta: dict[str, Any], codes: np.ndarray) -> None:
        data = np.ascontiguousarray(codes.astype("<u2", copy=False)).tobytes()
        row = {**{k: meta[k] for k in RECORD_FIELDS if k in self._rows}, "codes": data, "shape": list(codes.shape)}
        for name, column in self._rows.items():
            column.append(row[name])
        self._bytes += len(data)
        if len(self._rows["key"]) >= self.row_group_records or self._bytes >= self.row_group_bytes:
            self._flush()

    def _flush(self) -> None:
        import pyarrow as pa

        if self._rows["key"]:
            self._writer.write_table(pa.table(self._rows, schema=self.schema))
            self._rows = {name: [] for name in self.schema.names}
            self._bytes = 0

    def _finish(self) -> None:
        if self._writer is not None:
            self._flush()
            self._writer.close()
            self._writer = None


SHARD_WRITERS: dict[str, type[ShardWriter]] = {"webdataset": TarShardWriter, "parquet": ParquetShardWriter}
