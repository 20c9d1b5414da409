"""Reading code datasets written by the bulk tokenizer, and feeding them to a language model.

A code dataset is a folder with ``manifest.json`` and shards, each a WebDataset tar or a Parquet file:

``manifest.json``
    ``{"format": "audiotok-code-dataset", "format_version": 1, "model_id", "config"`` (a
    :class:`~audiotok.config.DACConfig` dict)``, "config_hash", "hop_length", "frame_rate", "shards":
    [{"path", "records", "frames"}, ...], "records", "audio_hours", "failures": [{"key", "reason"}]}``.
    Shard paths are relative to the folder. Readers ignore keys they do not know.

tar shards
    per record ``{key}.codes.npy`` (``.npy`` of uint16, ``[K, F]``, or ``[C, K, F]`` when channels
    were coded separately) and ``{key}.json`` (``key, source_key, num_samples, sample_rate`` (of the
    source), ``n_frames, channels, model_id``), consecutive in the tar.

Parquet shards
    columns ``key`` (string), ``codes`` (binary: the raw little-endian uint16 bytes of the array, C
    order), ``shape`` (list<int32>), ``n_frames`` (int32), ``num_samples`` (int64), ``sample_rate``
    (int32), ``channels`` (int16), ``source_key`` (string), ``model_id`` (string).
"""

from __future__ import annotations

import copy
import io
import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from ..config import DACConfig
from .packing import pack_sequences
from .patterns import CodebookPattern
from .vocab import DEFAULT_SPECIAL, CodeVocabulary

FORMAT = "audiotok-code-dataset"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"


@dataclass
class CodeRecord:
    """One coded file: ``codes`` is uint16 ``[K, F]`` (mono) or ``[C, K, F]`` (channels coded one by
    one); ``meta`` holds ``key, source_key, num_samples, sample_rate, n_frames, channels, model_id``."""

    key: str
    codes: np.ndarray
    meta: dict[str, Any]

    @property
    def channel_codes(self) -> np.ndarray:
        """``[C, K, F]`` codes, ``C = 1`` for a ``[K, F]`` record."""
        return self.codes if self.codes.ndim == 3 else self.codes[None]


def _check_record(record: CodeRecord, shard: Path) -> CodeRecord:
    codes = record.codes
    if codes.dtype != np.uint16 or codes.ndim not in (2, 3):
        raise ValueError(f"{shard}: record {record.key!r} has {codes.dtype} codes of shape {codes.shape}, "
                         f"expected uint16 [K, F] or [C, K, F]")
    if "n_frames" in record.meta and record.meta["n_frames"] != codes.shape[-1]:
        raise ValueError(f"{shard}: record {record.key!r} has {codes.shape[-1]} frames, "
                         f"its metadata says {record.meta['n_frames']}")
    return record


def _split_member(name: str) -> tuple[str, str] | None:
    """``(key, "codes" | "json")`` for a record's tar member, ``None`` for any other member."""
    for suffix, kind in ((".codes.npy", "codes"), (".json", "json")):
        if name.endswith(suffix):
            return name[: -len(suffix)], kind
    return None


def _read_tar(path: Path) -> Iterator[CodeRecord]:
    members: dict[str, bytes] = {}
    key = None

    def record() -> CodeRecord:
        missing = {"codes", "json"} - set(members)
        if missing:
            raise ValueError(f"{path}: record {key!r} has no {' or '.join(sorted(missing))} member")
        codes = np.load(io.BytesIO(members["codes"]), allow_pickle=False)
        return _check_record(CodeRecord(key, codes, json.loads(members["json"])), path)

    with tarfile.open(path, mode="r|*") as tar:
        for member in tar:
            split = _split_member(member.name) if member.isfile() else None
            if split is None:
                continue
            name, kind = split
            if key is not None and name != key:
                yield record()
                members = {}
            key = name
            members[kind] = tar.extractfile(member).read()
    if key is not None:
        yield record()


def _read_parquet(path: Path) -> Iterator[CodeRecord]:
    import pyarrow.parquet as pq

    for batch in pq.ParquetFile(path).iter_batches(batch_size=256):
        for row in batch.to_pylist():
            data, shape = row.pop("codes"), row.pop("shape")
            flat = np.frombuffer(data, dtype="<u2")
            if flat.size != np.prod(shape):
                raise ValueError(f"{path}: record {row['key']!r} has {flat.size} codes, its shape is {shape}")
            yield _check_record(CodeRecord(row["key"], flat.reshape(shape).astype(np.uint16), row), path)


class CodeDataset:
    """The records of a code dataset, streamed shard by shard in manifest order.

    Args:
        path: the dataset folder (holding ``manifest.json``).

    Attributes:
        root: the folder.
        manifest: the parsed ``manifest.json``.
        shards: the manifest's shard entries this dataset reads (all, or one part after
            :meth:`split_by_rank`).
    """

    def __init__(self, path: str | os.PathLike):
        self.root = Path(path)
        self.manifest: dict[str, Any] = json.loads((self.root / MANIFEST).read_text())
        if self.manifest.get("format") != FORMAT:
            raise ValueError(f"{self.root / MANIFEST}: format is {self.manifest.get('format')!r}, expected {FORMAT!r}")
        version = self.manifest.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise ValueError(f"{self.root}: code dataset format_version {version!r} is not supported "
                             f"(this reader knows up to {FORMAT_VERSION})")
        self.shards: list[dict[str, Any]] = list(self.manifest["shards"])

    @property
    def config(self) -> DACConfig:
        """The configuration of the model that wrote the codes."""
        return DACConfig.from_dict(self.manifest["config"])

    def vocabulary(self, offsets: bool = True, special: Sequence[str] = DEFAULT_SPECIAL,
                   n_codebooks: int | None = None) -> CodeVocabulary:
        """A vocabulary for these codes: the model's ``codebook_size`` and ``n_codebooks`` (or the first
        ``n_codebooks``); the same for every pattern."""
        config = self.config
        n_codebooks = config.n_codebooks if n_codebooks is None else n_codebooks
        return CodeVocabulary(config.codebook_size, n_codebooks, offsets, tuple(special))

    def split_by_rank(self, rank: int, world_size: int) -> CodeDataset:
        """The part of this dataset that process ``rank`` of ``world_size`` reads: shards ``rank``,
        ``rank + world_size``, ... Parts do not overlap and together cover every shard; a part is
        empty when there are fewer shards than processes."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        part = copy.copy(self)
        part.shards = self.shards[rank::world_size]
        return part

    def __len__(self) -> int:
        """Records in this dataset's shards, as the manifest counts them."""
        return sum(int(shard["records"]) for shard in self.shards)

    def __iter__(self) -> Iterator[CodeRecord]:
        for shard in self.shards:
            path = self.root / shard["path"]
            if path.suffix == ".tar":
                records = _read_tar(path)
            elif path.suffix == ".parquet":
                records = _read_parquet(path)
            else:
                raise ValueError(f"{path}: unknown shard type (expected .tar or .parquet)")
            count = 0
            for record in records:
                count += 1
                yield record
            if count != shard["records"]:
                raise ValueError(f"{path}: read {count} records, the manifest lists {shard['records']}")

    def __repr__(self) -> str:
        return f"CodeDataset({str(self.root)!r}, shards={len(self.shards)}, records={len(self)})"


class LMTokenDataset(IterableDataset):
    """Packed language-model examples from a code dataset, for a ``torch`` ``DataLoader``.

    Each record (each coded channel, see ``channel``) is encoded with ``vocab`` (bos and eos added)
    and the sequences are packed into blocks by :func:`~audiotok.lm.pack_sequences`. With
    ``num_workers > 0`` each worker reads its own shards (``split_by_rank`` over workers, within the
    part this process got from ``CodeDataset.split_by_rank``), so a worker without shards yields nothing.

    Args:
        code_dataset: the records.
        vocab: token ids; must have a ``pad`` token.
        pattern: codebook layout; ``flatten`` gives ``input_ids`` ``[seq_len]``, delay and parallel
            ``[K, seq_len]``.
        seq_len: tokens (time steps) per example.
        n_codebooks: use the first ``K`` codebooks (default ``vocab.n_codebooks``).
        channel: for ``[C, K, F]`` records, the channel to use; ``None`` uses every channel as its own
            sequence. A ``[K, F]`` record (or ``C = 1``) serves as every channel.
        drop_remainder: drop the final partial block.

    Yields:
        ``{"input_ids", "attention_mask", "labels"}`` int64 tensors, as :func:`~audiotok.lm.pack_sequences`.
    """

    def __init__(self, code_dataset: CodeDataset, vocab: CodeVocabulary, pattern: CodebookPattern | str = "flatten",
                 *, seq_len: int, n_codebooks: int | None = None, channel: int | None = None,
                 drop_remainder: bool = False):
        super().__init__()
        self.code_dataset = code_dataset
        self.vocab = vocab
        self.pattern = CodebookPattern(pattern)
        self.seq_len = seq_len
        self.n_codebooks = vocab.n_codebooks if n_codebooks is None else n_codebooks
        self.channel = channel
        self.drop_remainder = drop_remainder
        if channel is not None and channel < 0:
            raise ValueError(f"channel must be >= 0, got {channel}")
        if not 1 <= self.n_codebooks <= vocab.n_codebooks:
            raise ValueError(f"n_codebooks must be in [1, {vocab.n_codebooks}], got {self.n_codebooks}")
        self.pad_id = vocab.special_id("pad")

    def sequences(self, records: Iterable[CodeRecord]) -> Iterator[np.ndarray]:
        """Token ids of each selected channel of each record, unpacked."""
        for record in records:
            channels = record.channel_codes
            if channels.shape[1] < self.n_codebooks:
                raise ValueError(f"record {record.key!r} has {channels.shape[1]} codebooks, "
                                 f"{self.n_codebooks} are used")
            if self.channel is not None:
                if channels.shape[0] > 1 and not 0 <= self.channel < channels.shape[0]:
                    raise ValueError(f"record {record.key!r} has {channels.shape[0]} channels, "
                                     f"channel {self.channel} was asked for")
                channels = channels[self.channel if channels.shape[0] > 1 else 0][None]
            for codes in channels:
                yield self.vocab.encode(codes[: self.n_codebooks], self.pattern)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        records = self.code_dataset
        worker = get_worker_info()
        if worker is not None:
            records = records.split_by_rank(worker.id, worker.num_workers)
        return pack_sequences(self.sequences(records), self.seq_len, self.pad_id, self.drop_remainder)
