"""Bulk tokenization: a whole dataset to code shards, on many processes, resumable.

    python recipes/tokenize.py --input corpus/ --input-type folder --output codes/ --model descript/dac_44khz
    torchrun --nproc_per_node 8 recipes/tokenize.py --input 'shards/train-{000..999}.tar' \\
        --input-type webdataset --output codes/ --model descript/dac_44khz --device cuda --dtype bf16

Output format (``format_version`` 1)
====================================

An output folder holds shards and a ``manifest.json``, plus a ``.bulk/`` folder of progress files
(readers ignore it; it lets the job resume and must stay for "run again does nothing").

``manifest.json``::

    {"format": "audiotok-code-dataset", "format_version": 1,
     "model_id": str, "config": DACConfig.to_dict(), "config_hash": DACConfig.architecture_hash(),
     "hop_length": int, "frame_rate": float,
     "shards": [{"path": "shard-r000-w00-00000.tar", "records": int, "frames": int}, ...],
     "records": int, "audio_hours": float,
     "failures": [{"key": source key, "reason": str, "detail": str}, ...],
     "input": {"type": ..., "path": ..., ...}, "n_quantizers": K, "mono": bool, "created": ISO 8601 time}

``path`` is relative to the folder; ``frames`` is the sum of the records' ``n_frames``;
``audio_hours`` is the duration of the source audio of all records. Failure reasons: ``decode``,
``empty``, ``nonfinite``, ``missing``, ``noaudio``, ``shard`` (see :class:`audiotok.data.DecodeError`),
``short``, ``resample``, ``encode``.

Codes are the first ``K = n_quantizers`` codebooks, ``uint16``, shape ``[K, F]`` (``mono``: channels
averaged before coding) or ``[C, K, F]`` (each of the ``C`` source channels coded on its own).
``F = n_frames = ceil(T / hop_length)`` with ``T`` the length after resampling to the model rate.

WebDataset shards (``.tar``): per record, members ``{key}.codes.npy`` (``numpy.save`` of the codes)
and ``{key}.json`` with ``key``, ``source_key`` (the source's own key), ``num_samples`` and
``sample_rate`` (of the source audio), ``n_frames``, ``channels`` (of the source audio) and
``model_id``. Keys (``{name}_p{part}_{position}``) have no dots or slashes and are unique.

Parquet shards (``.parquet``): one row per record, columns ``key`` (string), ``codes`` (binary: the
codes as raw little-endian uint16, C order), ``shape`` (list<int32>), ``n_frames`` (int32),
``num_samples`` (int64), ``sample_rate`` (int32), ``channels`` (int16), ``source_key`` (string),
``model_id`` (string).

Work split, resume, failures
============================

With ``world_size`` ranks and ``W`` DataLoader workers per rank the input is cut into
``world_size * W`` parts with the sources' own partitioning (part ``rank * W + worker``, see
:mod:`audiotok.bulk.inputs`); each part is a deterministic stream written to its own shards
``shard-r{rank}-w{worker}-{n}``. ``.bulk/part-*.json`` records, atomically after each shard is
moved into place, the shards and failures of the part and the stream position they cover. A
restarted job (same command, world size and workers) deletes what an interrupted run left
unrecorded and continues every part at its recorded position: no record is written twice or
missed. Each rank then writes ``.bulk/rank-*.json``; rank 0 waits for every rank (a barrier) and
merges them into ``manifest.json``. Unreadable, empty, NaN, too-short records are skipped and listed.
"""

from .inputs import Decoded, Failure, InputSpec, PartReader, part_stream, prepare
from .job import (
    DTYPES,
    FORMAT_NAME,
    FORMAT_VERSION,
    FORMATS,
    MANIFEST_NAME,
    STATE_DIR,
    BulkConfig,
    BulkSummary,
    encode_items,
    tokenize_dataset,
)
from .writers import RECORD_FIELDS, ParquetShardWriter, TarShardWriter, parquet_schema, record_key, safe_name

__all__ = [
    "DTYPES",
    "FORMATS",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "RECORD_FIELDS",
    "STATE_DIR",
    "BulkConfig",
    "BulkSummary",
    "Decoded",
    "Failure",
    "InputSpec",
    "ParquetShardWriter",
    "PartReader",
    "TarShardWriter",
    "encode_items",
    "parquet_schema",
    "part_stream",
    "prepare",
    "record_key",
    "safe_name",
    "tokenize_dataset",
]
