"""The shards of a code dataset: their names, and the writer and reader of each shard type (see
:mod:`audiotok.formats.codedataset`)."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import PurePosixPath
from typing import IO

from .manifest import Manifest
from .parquet import ParquetShardWriter, read_parquet
from .records import CodeRecord, ShardWriter
from .tar import TarShardWriter, read_tar

#: The writer of each shard type (``format`` of a bulk job).
SHARD_WRITERS: dict[str, type[ShardWriter]] = {"webdataset": TarShardWriter, "parquet": ParquetShardWriter}
#: The reader of each shard suffix.
_READERS = {TarShardWriter.suffix: read_tar, ParquetShardWriter.suffix: read_parquet}
#: The name of a pooled-layout shard (:func:`part_shard_name`).
PART_SHARD = re.compile(r"part-\d{6}-\d{4,}\.(tar|parquet)")


def part_shard_name(part: int, index: int, suffix: str) -> str:
    """Shard ``index`` of ``part`` in the pooled layout: ``part-000123-0000.tar``."""
    return f"part-{part:06d}-{index:04d}{suffix}"


def sidecar_name(url: str) -> str:
    """The code shard of an input shard in the sidecar layout: ``.../train-000123.tar`` ->
    ``train-000123.codes.tar``."""
    name = PurePosixPath(url.split("?", 1)[0].rstrip("/")).name
    name = re.sub(r"(\.tar|\.tar\.gz|\.tgz)$", "", name)
    return f"{name}.codes.tar"


def read_shard(path: str | os.PathLike, fileobj: IO[bytes] | None = None,
               manifest: Manifest | None = None) -> Iterator[CodeRecord]:
    """The records of one shard (``.tar`` or ``.parquet``, by the suffix of ``path``), in order, each
    checked, against the ``manifest`` of its dataset too when given (its model, codebooks, code range,
    rates and frame counts; a Parquet shard's own metadata); read from ``fileobj`` (an open binary
    file, seekable for Parquet) when given."""
    reader = _READERS.get(os.path.splitext(os.fspath(path))[1])
    if reader is None:
        raise ValueError(f"{path}: unknown shard type (expected .tar or .parquet)")
    return reader(path, fileobj, None if manifest is None else manifest.shard_metadata())
