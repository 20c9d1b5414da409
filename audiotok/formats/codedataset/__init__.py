"""The code-dataset format: what the bulk tokenizer writes and language models read.

This package is the format's only implementation; :mod:`audiotok.bulk` writes with it and every
reader (:mod:`audiotok.lm`, the ``audiotok info`` command, users) reads with :class:`CodeDataset`:

* :mod:`~audiotok.formats.codedataset.manifest`: the typed manifest (:class:`Manifest`, the only place its
  file name is spelled) and the metadata every shard carries (:func:`dataset_metadata`);
* :mod:`~audiotok.formats.codedataset.records`: a record (:class:`CodeRecord`), its fields, keys and checks,
  and the base of the shard writers (context managers: a shard is published when the block ends, dropped
  on an error);
* :mod:`~audiotok.formats.codedataset.tar` and :mod:`~audiotok.formats.codedataset.parquet`: one shard type each,
  writer and reader;
* :mod:`~audiotok.formats.codedataset.shards`: shard names, and the writer and reader of each shard type;
* :mod:`~audiotok.formats.codedataset.dataset`: :class:`CodeDataset`, the reader.

Files are read and written through :mod:`audiotok.utils.store` (a local folder or an fsspec URL).

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
:func:`audiotok.weights.checkpoint.codes_fingerprint` of the encoder and quantizer weights that wrote the codes
(16 lowercase hex digits): a model of the same architecture with another fingerprint has other
codebooks, so readers refuse to pair the codes with it (:meth:`CodeDataset.check_codec`, priors;
:class:`audiotok.identity.CodecIdentity`). Datasets written before audiotok recorded it have no
``codes_fingerprint``: readers then check the architecture (``config_hash``) alone. Failure reasons: ``decode``,
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

Every shard is written to a temporary file and moved into place atomically (:func:`audiotok.utils.io.replace_durably`;
the bulk tokenizer builds it at :meth:`audiotok.utils.store.Store.staging_path` and publishes it with
:meth:`~audiotok.utils.store.Store.put_file`), so a reader (or a resumed job) sees the whole file or none
of it; ``manifest.json`` is written last.
"""

from .dataset import CodeDataset, is_code_dataset
from .manifest import FORMAT_NAME, FORMAT_VERSION, MANIFEST_SHAPE, Manifest, ShardEntry, dataset_metadata
from .parquet import PARQUET_METADATA_KEY, ParquetShardWriter, list_column_codes, nested_list_array, parquet_schema
from .records import RECORD_FIELDS, CodeRecord, ShardWriter, check_metadata_fields, record_key, safe_name
from .shards import PART_SHARD, SHARD_WRITERS, part_shard_name, read_shard, sidecar_name
from .tar import FAILURE_SUFFIX, MEMBER_SUFFIXES, TarShardWriter

__all__ = [
    "FAILURE_SUFFIX",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "MANIFEST_SHAPE",
    "MEMBER_SUFFIXES",
    "PARQUET_METADATA_KEY",
    "PART_SHARD",
    "RECORD_FIELDS",
    "SHARD_WRITERS",
    "CodeDataset",
    "CodeRecord",
    "Manifest",
    "ParquetShardWriter",
    "ShardEntry",
    "ShardWriter",
    "TarShardWriter",
    "check_metadata_fields",
    "dataset_metadata",
    "is_code_dataset",
    "list_column_codes",
    "nested_list_array",
    "parquet_schema",
    "part_shard_name",
    "read_shard",
    "record_key",
    "safe_name",
    "sidecar_name",
]
