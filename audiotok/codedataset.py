"""The code-dataset format: what the bulk tokenizer writes and :mod:`audiotok.lm` reads.

This module is the format's only implementation (constants, record fields, schemas, tar member
names, shard writers and readers); :mod:`audiotok.bulk` writes with it, :class:`audiotok.lm.CodeDataset`
reads with it.

Format (``format_version`` 3)
=============================

A code dataset is a folder with shards and a ``manifest.json`` (and, while or after the bulk
tokenizer writes it, a ``.bulk/`` folder of job files that readers ignore). The bulk tokenizer
names shards ``part-{part:06d}-{n:04d}.tar`` / ``.parquet`` (shard ``n`` of part ``part`` of the
input's fixed partition, :mod:`audiotok.bulk`), or, in the sidecar layout, ``{input shard
name}.codes.tar``; readers take the shards the manifest lists, whatever their names. The folder may be a location in an
object store (``s3://bucket/codes``), read and written with fsspec.

``manifest.json``::

    {"format": "audiotok-code-dataset", "format_version": 3,
     "model_id": str, "config": DACConfig.to_dict(), "config_hash": DACConfig.architecture_hash(),
     "codes_fingerprint": str, "hop_length": int, "frame_rate": float,
     "shards": [{"path": "part-000000-0000.tar", "records": int, "frames": int}, ...],
     "records": int, "audio_hours": float,
     "failures": [{"key": source key, "reason": str, "detail": str}, ...],
     "input": {"type": ..., "path": ..., ...}, "n_quantizers": K, "mono": bool,
     "metadata": [field, ...], "layout": "pooled" | "sidecar", "created": ISO 8601 time}

``path`` is relative to the folder; ``frames`` is the sum of the records' ``n_frames``;
``audio_hours`` is the duration of the source audio of all records. ``codes_fingerprint`` is the
:func:`audiotok.checkpoint.codes_fingerprint` of the encoder and quantizer weights that wrote the codes
(16 lowercase hex digits): a model of the same architecture with another fingerprint has other
codebooks, so readers refuse to pair the codes with it (:meth:`audiotok.lm.CodeDataset.check_codec`,
priors). Datasets written before audiotok recorded it have no ``codes_fingerprint``: readers then
check the architecture (``config_hash``) alone. Failure reasons: ``decode``,
``empty``, ``nonfinite``, ``missing``, ``noaudio``, ``shard``, ``metadata`` (see :class:`audiotok.data.DecodeError`),
``short``, ``resample``, ``encode``. Readers ignore keys they do not know.

Codes are the first ``K = n_quantizers`` codebooks, ``uint16``, shape ``[K, F]`` (``mono``: channels
averaged before coding) or ``[C, K, F]`` (each of the ``C`` source channels coded on its own).
``F = n_frames = ceil(T / hop_length)`` with ``T`` the length after resampling to the model rate.

Each record has the metadata :data:`RECORD_FIELDS`: ``key``, ``source_key`` (the source's own key),
``num_samples`` and ``sample_rate`` (of the source audio), ``n_frames``, ``channels`` (of the source
audio) and ``model_id``. Keys (``{name}_p{part}_{position}``, :func:`record_key`: item ``position`` of
part ``part``) have no dots or slashes and are unique; in the sidecar layout a record's key is its
input sample's WebDataset ``__key__`` (it may hold slashes). ``source_key`` is the stable
reference to the source item: ``{row index}`` or ``{row index}:{audio path}`` for a saved /
non-streaming Hugging Face dataset, ``shard{i}.{n}[:{path}]`` for a streaming one (row ``n`` of shard
``i`` of the stream, ``IterableDataset.shard(n_shards, i)``), ``{shard url}:{sample key}`` for
WebDataset shards and the path relative to the folder for folders.

Kept metadata (format 3). ``metadata`` lists the source fields stored with every record (the bulk
tokenizer's ``keep``: Hugging Face columns, WebDataset members such as ``txt`` or ``json``, or the
extensions of sidecar files next to folder audio); each record holds them as a JSON object
(:attr:`CodeRecord.metadata`; members and sidecars ending in ``json`` parsed, others UTF-8 text).
Format 1 and 2 datasets have no ``metadata`` key and records without kept fields.

WebDataset shards (``.tar``): per record, consecutive members ``{key}.codes.npy`` (``numpy.save`` of
the codes) and ``{key}.json`` (the record fields and, in shards of this version on, the writer's
``codes_fingerprint``), then ``{key}.meta.json`` (the kept metadata as a
JSON object) when ``metadata`` is not empty. Sidecar shards also hold, in input order, a member
``{key}.failure.txt`` (text ``reason: detail``) for each input sample that has no codes, so that
they pair sample for sample with their input shard; readers of records pass other members over.
Members have mtime 0.

Parquet shards (``.parquet``, :func:`parquet_schema`): one row per record, columns ``key`` (string),
``codes`` (nested lists of uint16: ``list<list<uint16>>`` ``[K][F]``, or ``list<list<list<uint16>>>``
``[C][K][F]``, so ``datasets`` and pyarrow read arrays directly), ``n_frames`` (int32),
``num_samples`` (int64), ``sample_rate`` (int32), ``channels`` (int16), ``source_key`` (string),
``model_id`` (string), then one column ``meta.{field}`` (string: the value as JSON text) per kept
metadata field. The key-value metadata ``audiotok`` (:data:`PARQUET_METADATA_KEY`) holds JSON
with ``model_id``, ``config_hash``, ``codes_fingerprint`` (not in shards written before it existed),
``sample_rate``, ``hop_length``, ``frame_rate``, ``n_quantizers``, ``codebook_size`` and ``mono``
(:func:`dataset_metadata`). Version-1 shards stored
``codes`` as raw little-endian bytes with a ``shape`` column; readers take both.

Readers check every record against the manifest (see :func:`read_shard`): its ``model_id`` and
``codes_fingerprint`` (a tar record's, a Parquet shard's metadata), so that a shard of another model
dropped into a dataset is refused; a shard listed twice in a manifest is refused; a truncated shard is
an error naming it.

Every shard is written to a temporary file and moved into place atomically (:func:`audiotok.io.replace_durably`;
the bulk tokenizer builds it at :meth:`audiotok.bulk.store.Store.staging_path` and publishes it with
:meth:`~audiotok.bulk.store.Store.put_file`), so a reader (or a resumed job) sees the whole file or none
of it; ``manifest.json`` is written last.
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
import zlib
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from .audio import AUDIO_EXTENSIONS
from .codes import check_fingerprint, check_frames
from .config import DACConfig
from .io import replace_durably, temp_path
from .untrusted import OptionalEntry, check_number, check_shape, parse_json

FORMAT_NAME = "audiotok-code-dataset"
FORMAT_VERSION = 3
MANIFEST_NAME = "manifest.json"
#: Per-record metadata fields, in the order they are written (WebDataset ``{key}.json``).
RECORD_FIELDS = ("key", "source_key", "num_samples", "sample_rate", "n_frames", "channels", "model_id")
#: Tar member suffixes of a record: ``{key}.codes.npy``, ``{key}.meta.json`` (kept metadata, format 3)
#: and ``{key}.json`` (matched in this order: ``.meta.json`` also ends in ``.json``).
MEMBER_SUFFIXES = {"codes": ".codes.npy", "metadata": ".meta.json", "json": ".json"}
#: Tar member of a sidecar shard's sample that has no codes: ``{key}.failure.txt`` (``reason: detail``).
FAILURE_SUFFIX = ".failure.txt"
#: Prefix of the Parquet columns that hold kept metadata: ``meta.{field}``.
METADATA_COLUMN_PREFIX = "meta."

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")

#: The entries of ``manifest.json`` a reader uses (see the module docstring; other entries are not read).
MANIFEST_SHAPE = {
    "format": str, "format_version": int, "model_id": str, "config": dict, "config_hash": str,
    "codes_fingerprint": OptionalEntry((str, type(None))), "hop_length": int, "frame_rate": float,
    "shards": [{"path": str, "records": int, "frames": int}], "records": OptionalEntry(int),
    "audio_hours": OptionalEntry(float), "failures": OptionalEntry([{"key": str, "reason": str}]),
    "n_quantizers": OptionalEntry(int), "mono": OptionalEntry(bool), "metadata": OptionalEntry([str]),
}
#: A record's ``{key}.json`` tar member (:data:`RECORD_FIELDS`, and ``codes_fingerprint`` in tar shards written
#: since it was added; ``source_key`` is not read).
RECORD_SHAPE = {"key": str, "num_samples": int, "sample_rate": int, "n_frames": int, "channels": int,
                "model_id": OptionalEntry(str), "codes_fingerprint": OptionalEntry(str)}
#: The Parquet key-value metadata ``audiotok`` (:func:`dataset_metadata`; entries missing in older shards).
PARQUET_METADATA_SHAPE = {k: OptionalEntry(v) for k, v in {
    "model_id": str, "config_hash": str, "codes_fingerprint": (str, type(None)), "sample_rate": int,
    "hop_length": int, "frame_rate": float, "n_quantizers": int, "codebook_size": int, "mono": bool}.items()}


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


def manifest_header(model_id: str, config: DACConfig, codes_fingerprint: str) -> dict[str, Any]:
    """The manifest's format and model fields (the writer adds shards, counts and its own keys):
    ``codes_fingerprint`` is the :attr:`AudioTokenizer.codes_fingerprint` of the model that writes the codes."""
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "model_id": model_id,
        "config": config.to_dict(),
        "config_hash": config.architecture_hash(),
        "codes_fingerprint": codes_fingerprint,
        "hop_length": config.hop_length,
        "frame_rate": config.frame_rate,
    }


def dataset_metadata(model_id: str, config: DACConfig, codes_fingerprint: str | None, n_quantizers: int | None,
                     mono: bool | None) -> dict[str, Any]:
    """What a reader needs to interpret a shard's codes without the manifest: the model (``model_id``,
    ``config_hash``, ``codes_fingerprint``), the rates (``sample_rate``, ``hop_length``, ``frame_rate``)
    and the codes (``n_quantizers``, ``codebook_size``, ``mono``). A reader builds it from a manifest
    (:func:`manifest_metadata`) to check every shard against; there ``None`` is a value the manifest
    does not record."""
    return {"model_id": model_id, "config_hash": config.architecture_hash(), "codes_fingerprint": codes_fingerprint,
            "sample_rate": config.sample_rate, "hop_length": config.hop_length, "frame_rate": config.frame_rate,
            "n_quantizers": n_quantizers, "codebook_size": config.codebook_size, "mono": mono}


def read_manifest(data: bytes | str, where: str | os.PathLike) -> dict[str, Any]:
    """The manifest in ``data`` (the text of ``manifest.json``), checked by :func:`check_manifest`."""
    manifest = parse_json(data, where, dict)
    check_manifest(manifest, where)
    return manifest


def check_manifest(manifest: dict[str, Any], where: str | os.PathLike) -> None:
    """Raise ``ValueError`` unless ``manifest`` is a code-dataset manifest this reader knows
    (:data:`MANIFEST_SHAPE`) whose shard paths stay inside the dataset folder (a manifest never makes
    a reader open other files), whose ``codes_fingerprint``, if any, is 16 lowercase hex digits, and
    whose entries agree with each other: ``config_hash``, ``hop_length`` and ``frame_rate`` with
    ``config``, ``n_quantizers`` within its codebooks, ``records`` with the shards' records."""
    if manifest.get("format") != FORMAT_NAME:
        raise ValueError(f"{where}: format is {manifest.get('format')!r}, expected {FORMAT_NAME!r}")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(f"{where}: code dataset format_version {version!r} is not supported "
                         f"(this reader knows up to {FORMAT_VERSION})")
    shards = manifest.get("shards")
    for path in (s.get("path") for s in (shards if isinstance(shards, list) else []) if isinstance(s, dict)):
        if not isinstance(path, str) or not path or os.path.isabs(path) or ".." in Path(path).parts:
            raise ValueError(f"{where}: shard path {path!r} is not a relative path inside the dataset folder")
    check_shape(manifest, MANIFEST_SHAPE, where)
    check_fingerprint(manifest.get("codes_fingerprint"), f"{where}: codes_fingerprint")
    try:
        config = DACConfig.from_dict(manifest["config"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: invalid config: {e}") from None
    stated = {"config_hash": (manifest["config_hash"], config.architecture_hash()),
              "hop_length": (manifest["hop_length"], config.hop_length),
              "frame_rate": (manifest["frame_rate"], config.frame_rate)}
    if "records" in manifest:
        stated["records"] = (manifest["records"], sum(s["records"] for s in manifest["shards"]))
    wrong = [f"{k} {ours!r} (expected {theirs!r})" for k, (ours, theirs) in stated.items() if ours != theirs]
    if wrong:
        raise ValueError(f"{where}: entries disagree with its config and shards: {', '.join(wrong)}")
    if not 1 <= manifest.get("n_quantizers", 1) <= config.n_codebooks:
        raise ValueError(f"{where}: n_quantizers {manifest['n_quantizers']} is not within the config's "
                         f"{config.n_codebooks} codebooks")
    negative = [s["path"] for s in manifest["shards"] if s["records"] < 0 or s["frames"] < 0]
    if negative:
        raise ValueError(f"{where}: shard {negative[0]!r} has a negative record or frame count")
    listed = Counter(os.path.normpath(s["path"]) for s in manifest["shards"])
    twice = sorted(path for path, count in listed.items() if count > 1)
    if twice:
        raise ValueError(f"{where}: shard {twice[0]!r} is listed {listed[twice[0]]} times: its records would "
                         "be read as many times")


def manifest_metadata(manifest: dict[str, Any]) -> dict[str, Any]:
    """The :func:`dataset_metadata` a checked manifest states, which its shards must agree with."""
    config = DACConfig.from_dict(manifest["config"])
    return dataset_metadata(manifest["model_id"], config, manifest.get("codes_fingerprint"),
                            manifest.get("n_quantizers"), manifest.get("mono"))


def check_metadata_fields(fields: list[str] | tuple[str, ...]) -> None:
    """Raise ``ValueError`` unless ``fields`` are distinct non-empty names."""
    if any(not isinstance(f, str) or not f for f in fields) or len(set(fields)) != len(fields):
        raise ValueError(f"metadata fields must be distinct non-empty names, got {list(fields)}")


def _check_codes(codes: np.ndarray, what: str) -> None:
    if codes.dtype != np.uint16 or codes.ndim not in (2, 3):
        raise ValueError(f"{what} has {codes.dtype} codes of shape {codes.shape}, expected uint16 [K, F] or [C, K, F]")


# ---------------------------------------------------------------------------------------------
# Writing

class ShardWriter:
    """Base class: records are added to a temporary file; :meth:`close` moves it into place.
    ``metadata`` (:func:`dataset_metadata`) is stored where the shard type has room for it;
    ``kept_fields`` are the kept metadata fields every record carries (see the module docstring).
    ``staged=True``: ``path`` is itself a staging file (:meth:`audiotok.bulk.store.Store.staging_path`)
    written directly and left there by :meth:`close`, for the caller to publish
    (:meth:`~audiotok.bulk.store.Store.put_file`)."""

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
        _check_codes(codes, f"record {meta['key']!r}")
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


class TarShardWriter(ShardWriter):
    """WebDataset tar: members ``{key}.codes.npy`` (``np.save`` of the uint16 codes) and ``{key}.json``
    (the record fields, and the ``codes_fingerprint`` of ``metadata``; the manifest holds the rest).
    Members have mtime 0, so the same records give the same bytes."""

    suffix = ".tar"

    def __init__(self, path: str | os.PathLike, metadata: dict[str, Any] | None = None,
                 kept_fields: tuple[str, ...] = (), staged: bool = False):
        super().__init__(path, metadata, kept_fields, staged)
        self._file = open(self.tmp, "wb")
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.PAX_FORMAT)

    def _member(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), 0, 0o644
        self._tar.addfile(info, io.BytesIO(data))

    def add_failure(self, key: str, reason: str, detail: str = "") -> None:
        """Member ``{key}``:data:`FAILURE_SUFFIX` (text ``reason: detail``) for a sample that has no
        codes (sidecar shards; readers of records pass it over)."""
        self._member(key + FAILURE_SUFFIX, (f"{reason}: {detail}" if detail else reason).encode())

    def _add(self, meta: dict[str, Any], codes: np.ndarray) -> None:
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(codes.astype("<u2", copy=False)), allow_pickle=False)
        self._member(meta["key"] + MEMBER_SUFFIXES["codes"], buf.getvalue())
        fields = {k: meta[k] for k in RECORD_FIELDS}
        if self.metadata.get("codes_fingerprint") is not None:
            fields["codes_fingerprint"] = self.metadata["codes_fingerprint"]
        self._member(meta["key"] + MEMBER_SUFFIXES["json"], json.dumps(fields).encode())
        if self.kept_fields:
            kept = {k: meta["metadata"][k] for k in self.kept_fields}
            self._member(meta["key"] + MEMBER_SUFFIXES["metadata"], json.dumps(kept).encode())

    def _finish(self) -> None:
        if not self._file.closed:
            self._tar.close()
            self._file.flush()
            self._file.close()


#: Key of the Parquet key-value metadata entry that holds :func:`dataset_metadata` (JSON).
PARQUET_METADATA_KEY = "audiotok"


def parquet_schema(mono: bool = True, metadata: dict[str, Any] | None = None, kept_fields: tuple[str, ...] = ()):
    """Columns of a Parquet shard (see the module docstring): ``codes`` is a nested list of uint16,
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
    ``row_group_bytes`` of codes); ``metadata`` (:func:`dataset_metadata`) in the key-value metadata."""

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


SHARD_WRITERS: dict[str, type[ShardWriter]] = {"webdataset": TarShardWriter, "parquet": ParquetShardWriter}


# ---------------------------------------------------------------------------------------------
# Reading


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


def _check_record(record: CodeRecord, shard: str | os.PathLike, expected: dict[str, Any] | None) -> CodeRecord:
    """``record``, unless its codes or fields disagree with each other or with ``expected`` (the
    :func:`manifest_metadata` of its dataset, when known): then ``ValueError`` naming the shard and record."""
    codes, meta, where = record.codes, record.meta, f"{shard}: record {record.key!r}"
    _check_codes(codes, where)
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


def _split_member(name: str) -> tuple[str, str] | None:
    """``(key, "codes" | "metadata" | "json")`` for a record's tar member, ``None`` for any other member."""
    for kind, suffix in MEMBER_SUFFIXES.items():
        if name.endswith(suffix):
            return name[: -len(suffix)], kind
    return None


@contextmanager
def _damaged(path: str | os.PathLike, errors: tuple[type[BaseException], ...]) -> Iterator[None]:
    """An error of ``errors`` in the block (a truncated or damaged file, as its parser reports it) as a
    ``ValueError`` naming the shard ``path``."""
    try:
        yield
    except errors as e:
        raise ValueError(f"{path}: damaged or truncated shard ({type(e).__name__}: {e})") from e


def _read_tar(path: str | os.PathLike, fileobj: IO[bytes] | None = None,
              expected: dict[str, Any] | None = None) -> Iterator[CodeRecord]:
    with _damaged(path, (tarfile.TarError, EOFError, zlib.error)):
        yield from _tar_records(path, fileobj, expected)


def _tar_records(path: str | os.PathLike, fileobj: IO[bytes] | None,
                 expected: dict[str, Any] | None) -> Iterator[CodeRecord]:
    members: dict[str, bytes] = {}
    key: str | None = None

    def record(key: str) -> CodeRecord:
        missing = {"codes", "json"} - set(members)
        if missing:
            raise ValueError(f"{path}: record {key!r} has no {' or '.join(sorted(missing))} member")
        where = f"{path}: member {key!r}"
        try:
            codes = np.load(io.BytesIO(members["codes"]), allow_pickle=False)
        except (ValueError, EOFError, OSError) as e:
            raise ValueError(f"{where}{MEMBER_SUFFIXES['codes']}: not a readable .npy array ({e})") from None
        kept = {}
        if "metadata" in members:
            kept = parse_json(members["metadata"], where + MEMBER_SUFFIXES["metadata"], dict)
        meta = parse_json(members["json"], where + MEMBER_SUFFIXES["json"], dict)
        return _check_record(CodeRecord(key, codes, meta, kept), path, expected)

    with tarfile.open(path if fileobj is None else None, mode="r|*", fileobj=fileobj) as tar:
        for member in tar:
            split = _split_member(member.name) if member.isfile() else None
            if split is None:
                continue
            name, kind = split
            if key is not None and name != key:
                yield record(key)
                members = {}
            key = name
            data = tar.extractfile(member)  # a regular file (isfile above): never None
            members[kind] = data.read() if data is not None else b""
    if key is not None:
        yield record(key)


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


def _read_parquet(path: str | os.PathLike, fileobj: IO[bytes] | None = None,
                  expected: dict[str, Any] | None = None) -> Iterator[CodeRecord]:
    import pyarrow as pa

    with _damaged(path, (pa.ArrowException,)):
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
                yield _check_record(CodeRecord(row["key"], flat.reshape(shape).astype(np.uint16), row, kept), path,
                                    expected)
            continue
        rows = batch.drop_columns(["codes"]).to_pylist()
        for row, array in zip(rows, list_column_codes(codes, [r["key"] for r in rows], path)):
            kept = _pop_kept(row, path)
            yield _check_record(CodeRecord(row["key"], array, row, kept), path, expected)


def read_shard(path: str | os.PathLike, fileobj: IO[bytes] | None = None,
               expected: dict[str, Any] | None = None) -> Iterator[CodeRecord]:
    """The records of one shard (``.tar`` or ``.parquet``, by the suffix of ``path``), in order, each
    checked, against ``expected`` too when given (:func:`manifest_metadata` of the dataset: codebooks,
    code range, rates and frame counts; a Parquet shard's own metadata); read from ``fileobj`` (an
    open binary file, seekable for Parquet) when given."""
    suffix = os.path.splitext(os.fspath(path))[1]
    if suffix == ".tar":
        return _read_tar(path, fileobj, expected)
    if suffix == ".parquet":
        return _read_parquet(path, fileobj, expected)
    raise ValueError(f"{path}: unknown shard type (expected .tar or .parquet)")
