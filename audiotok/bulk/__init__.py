"""Bulk tokenization: a whole dataset to code shards, on many processes, resumable.

    python recipes/tokenize_dataset.py --input corpus/ --input-type folder --output codes/ --model descript/dac_44khz
    torchrun --nproc_per_node 8 recipes/tokenize_dataset.py --input 'shards/train-{000..999}.tar' \\
        --input-type webdataset --output codes/ --model descript/dac_44khz --device cuda --dtype bf16

The output is a code dataset (a folder of shards and ``manifest.json``, plus a ``.bulk/`` folder of
progress files that readers ignore; it lets the job resume and must stay for "run again does
nothing"); its format is specified and implemented in :mod:`audiotok.codedataset`.

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

from ..codedataset import (
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST_NAME,
    PARQUET_METADATA_KEY,
    RECORD_FIELDS,
    ParquetShardWriter,
    TarShardWriter,
    dataset_metadata,
    parquet_schema,
    record_key,
    safe_name,
)
from .inputs import Decoded, Failure, InputSpec, PartReader, part_stream, prepare
from .job import DTYPES, FORMATS, STATE_DIR, BulkConfig, BulkSummary, encode_items, tokenize_dataset

__all__ = [
    "DTYPES",
    "FORMATS",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "PARQUET_METADATA_KEY",
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
    "dataset_metadata",
    "encode_items",
    "parquet_schema",
    "part_stream",
    "prepare",
    "record_key",
    "safe_name",
    "tokenize_dataset",
]
