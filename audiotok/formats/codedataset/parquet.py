"""Parquet shards of a code dataset: the schema, the writer and the reader (see :mod:`audiotok.formats.codedataset`)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import IO, Any

import numpy as np

from ...utils.untrusted import OptionalEntry, parse_json
from .records import RECORD_FIELDS, CodeRecord, ShardWriter, check_record, damaged

#: Prefix of the Parquet columns that hold kept metadata: ``meta.{field}``.
METADATA_COLUMN_PREFIX = "meta."
#: The Parquet key-value metadata ``audiotok`` (:func:`~audiotok.formats.codedataset.manifest.dataset_metadata`;
#: entries missing in older shards).
PARQUET_METADATA_SHAPE = {k: OptionalEntry(v) for k, v in {
    "model_id": str, "config_hash": str, "codes_fingerprint": (str, type(None)), "sample_rate": int,
    "hop_length": int, "frame_rate": float, "n_quantizers": int, "codebook_size": int, "mono": bool}.items()}
#: Key of the Parquet key-value metadata entry that holds
#: :func:`~audiotok.formats.codedataset.manifest.dataset_metadata` (JSON).
PARQUET_METADATA_KEY = "audiotok"


def parquet_schema(mono: bool = True, metadata: dict[str, Any] | None = None, kept_fields: tuple[str, ...] = ()):
    """Columns of a Parquet shard (see :mod:`audiotok.formats.codedataset`): ``codes`` is a nested list of uint16,
    ``[K][F]`` (``mono``) or ``[C][K][F]``; ``metadata`` goes to the key-value metadata as JSON."""
    import pyarrow as pa

    codes = pa.list_(pa.list_(pa.uint16()))
    schema = pa.schema([
        ("key", pa.string()),
        ("codes", codes if mono else pa.list_(codes)),
        ("n_frames", pa.int32()),
        ("num_samples", pa.int64()),
        ("sample_rate", pa.int32()),
        ("channels", pa.int16()),
        ("source_key", pa.string()),
        ("model_id", pa.string()),
        *[(METADATA_COLUMN_PREFIX + f, pa.string()) for f in kept_fields],
    ])
    return schema.with_metadata({PARQUET_METADATA_KEY: json.dumps(metadata or {})})


def nested_list_array(arrays: list[np.ndarray]):
    """uint16 arrays of one rank ``d`` (shapes may differ) -> an Arrow array of ``d``-deep nested lists,
    built from the flat values and offsets (no Python lists)."""
    import pyarrow as pa

    ndim = arrays[0].ndim if arrays else 2
    values = pa.array(np.concatenate([a.ravel() for a in arrays]) if arrays else np.zeros(0, np.uint16), pa.uint16())
    for level in reversed(range(ndim)):  # innermost lists first: one list per index of the outer axes
        lengths = [np.full(int(np.prod(a.shape[:level])), a.shape[level]) for a in arrays]
        offsets = np.concatenate([[0], np.cumsum(np.concatenate(lengths) if lengths else [])]).astype(np.int32)
        values = pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), values)
    return values


class ParquetShardWriter(ShardWriter):
    """Parquet: one row per record, written in row groups of ``row_group_records`` rows (or about
    ``row_group_bytes`` of codes); ``metadata`` (:func:`~audiotok.formats.codedataset.manifest.dataset_metadata`)
    in the key-value metadata."""

    suffix = ".parquet"

    def __init__(self, path: str | os.PathLike, metadata: dict[str, Any] | None = None,
                 kept_fields: tuple[str, ...] = (), staged: bool = False, row_group_records: int = 256,
                 row_group_bytes: int = 64 << 20):
        import pyarrow.parquet as pq

        super().__init__(path, metadata, kept_fields, staged)
        mono = self.metadata.get("mono", True)
        self.ndim = 2 if mono else 3  # [K, F] or [C, K, F]
        self.schema = parquet_schema(mono, self.metadata, self.kept_fields)
        self._writer = pq.ParquetWriter(str(self.tmp), self.schema, compression="zstd")
        self._rows: dict[str, list] = {name: [] for name in self.schema.names}
        self._bytes = 0
        self.row_group_records, self.row_group_bytes = row_group_records, row_group_bytes

    def _add(self, meta: dict[str, Any], codes: np.ndarray) -> None:
        if codes.ndim != self.ndim:
            raise ValueError(f"this shard holds codes of rank {self.ndim}, got shape {codes.shape}")
        row = {**{k: meta[k] for k in RECORD_FIELDS if k in self._rows}, "codes": codes.astype("<u2", copy=False),
               **{METADATA_COLUMN_PREFIX + k: json.dumps(meta["metadata"][k]) for k in self.kept_fields}}
        for name, column in self._rows.items():
            column.append(row[name])
        self._bytes += codes.nbytes
        if len(self._rows["key"]) >= self.row_group_records or self._bytes >= self.row_group_bytes:
            self._flush()

    def _flush(self) -> None:
        import pyarrow as pa

        if self._rows["key"]:
            columns = {**self._rows, "codes": nested_list_array(self._rows["codes"])}
            self._writer.write_table(pa.table(columns, schema=self.schema))
            self._rows = {name: [] for name in self.schema.names}
            self._bytes = 0

    def _finish(self) -> None:
        if self._writer is not None:
            self._flush()
            self._writer.close()
            self._writer = None


def _check_shard_metadata(stored: bytes | None, expected: dict[str, Any] | None, path: str | os.PathLike) -> None:
    """``ValueError`` if a Parquet shard's key-value metadata (``stored``) states other values than
    ``expected`` (each value both record)."""
    if stored is None or expected is None:
        return
    meta = parse_json(stored, f"{path}: key-value metadata {PARQUET_METADATA_KEY!r}", PARQUET_METADATA_SHAPE)
    wrong = [f"{k} {meta[k]!r} (the manifest says {expected[k]!r})" for k in meta
             if k in expected and None not in (meta[k], expected[k]) and meta[k] != expected[k]]
    if wrong:
        raise ValueError(f"{path}: the shard's metadata disagrees with the manifest: {', '.join(wrong)}")


def list_column_codes(column, keys: list[str], path: str | os.PathLike) -> list[np.ndarray]:
    """A nested-list ``codes`` column (pyarrow, ``[K][F]`` or ``[C][K][F]`` uint16 per row) -> one
    uint16 array per row, cut from the column's flat values by its offsets (no Python lists)."""
    import pyarrow as pa

    levels, array = [], column
    while pa.types.is_list(array.type):
        levels.append(array.offsets.to_numpy())  # indexes into ``array.values``
        array = array.values
    values = array.to_numpy(zero_copy_only=False)
    out = []
    for row, key in enumerate(keys):
        lo, hi, shape = row, row + 1, []
        for offsets in levels:
            lengths = np.diff(offsets[lo:hi + 1])
            if lengths.size and (lengths != lengths[0]).any():
                raise ValueError(f"{path}: record {key!r} has codebook rows of different lengths "
                                 f"{sorted(set(lengths.tolist()))}")
            shape.append(int(lengths[0]) if lengths.size else 0)
            lo, hi = offsets[lo], offsets[hi]
        out.append(values[lo:hi].astype(np.uint16, copy=False).reshape(shape))
    return out


def _pop_kept(row: dict[str, Any], path: str | os.PathLike) -> dict[str, Any]:
    """Remove the ``meta.{field}`` columns from a Parquet row; their values, decoded."""
    names = [name for name in row if name.startswith(METADATA_COLUMN_PREFIX)]
    return {name[len(METADATA_COLUMN_PREFIX):]: parse_json(row.pop(name), f"{path}: record {row.get('key')!r} "
                                                           f"column {name!r}", object) for name in names}


def read_parquet(path: str | os.PathLike, fileobj: IO[bytes] | None = None,
                 expected: dict[str, Any] | None = None) -> Iterator[CodeRecord]:
    """The records of the Parquet shard ``path`` (read from ``fileobj``, seekable, when given), each
    checked (:func:`~audiotok.formats.codedataset.records.check_record`), after the shard's own metadata."""
    import pyarrow as pa

    with damaged(path, (pa.ArrowException,)):
        yield from _parquet_records(path, fileobj, expected)


def _parquet_records(path: str | os.PathLike, fileobj: IO[bytes] | None,
                     expected: dict[str, Any] | None) -> Iterator[CodeRecord]:
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(path if fileobj is None else fileobj)
    _check_shard_metadata((parquet.schema_arrow.metadata or {}).get(PARQUET_METADATA_KEY.encode()), expected, path)
    for batch in parquet.iter_batches(batch_size=256):
        codes = batch.column("codes")
        if "shape" in batch.schema.names:  # format_version 1: raw bytes and a shape column
            rows = batch.drop_columns(["codes", "shape"]).to_pylist()
            for row, data, shape in zip(rows, codes.to_pylist(), batch.column("shape").to_pylist()):
                flat = np.frombuffer(data, dtype="<u2")
                if flat.size != np.prod(shape):
                    raise ValueError(f"{path}: record {row['key']!r} has {flat.size} codes, its shape is {shape}")
                kept = _pop_kept(row, path)
                yield check_record(CodeRecord(row["key"], flat.reshape(shape).astype(np.uint16), row, kept), path,
                                    expected)
            continue
        rows = batch.drop_columns(["codes"]).to_pylist()
        for row, array in zip(rows, list_column_codes(codes, [r["key"] for r in rows], path)):
            kept = _pop_kept(row, path)
            yield check_record(CodeRecord(row["key"], array, row, kept), path, expected)
