"""Reading code datasets written by the bulk tokenizer, and feeding them to a language model.

A code dataset is a folder with ``manifest.json`` and shards (WebDataset tar or Parquet); the format
and its readers are in :mod:`audiotok.codedataset`.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from ..codedataset import MANIFEST_NAME, CodeRecord, manifest_metadata, read_manifest, read_shard
from ..codefile import check_codec
from ..config import DACConfig
from ..untrusted import shown
from ..urls import is_url, local_path, url_to_fs
from .packing import pack_sequences
from .patterns import CodebookPattern
from .vocab import DEFAULT_SPECIAL, CodeVocabulary

if TYPE_CHECKING:
    from ..tokenizer import AudioTokenizer


class CodeDataset:
    """The records of a code dataset, streamed shard by shard in manifest order.

    Args:
        path: the dataset folder (holding ``manifest.json``), or its fsspec URL (``s3://bucket/codes``,
            see :mod:`audiotok.urls`; shards are streamed from there).
        storage_options: options of the fsspec filesystem of a URL (credentials, ``endpoint_url`` ...).

    Attributes:
        root: the folder (a ``Path``), or the URL (a ``str``).
        manifest: the parsed ``manifest.json`` (:mod:`audiotok.codedataset` describes it).
        shards: the manifest's shard entries this dataset reads (all, or one part after
            :meth:`split_by_rank`).
    """

    def __init__(self, path: str | os.PathLike, storage_options: dict[str, Any] | None = None):
        location = local_path(path)
        self.root: Path | str = location.rstrip("/") if is_url(location) else Path(location)
        self.storage_options = dict(storage_options or {})
        try:
            with self._open(MANIFEST_NAME) as f:
                manifest = f.read()
        except FileNotFoundError:
            raise FileNotFoundError(f"{self.root}: no code dataset ({MANIFEST_NAME} missing; a bulk job writes it "
                                    "last); write one with: python recipes/tokenize_dataset.py --output "
                                    f"{self.root} ...") from None
        self.manifest: dict[str, Any] = read_manifest(manifest, f"{self.root}/{MANIFEST_NAME}")
        self.shards: list[dict[str, Any]] = list(self.manifest["shards"])
        self._expected = manifest_metadata(self.manifest)

    @property
    def config(self) -> DACConfig:
        """The configuration of the model that wrote the codes."""
        return DACConfig.from_dict(self.manifest["config"])

    @property
    def model_id(self) -> str:
        """The name of the model that wrote the codes."""
        return str(self.manifest["model_id"])

    @property
    def n_codebooks(self) -> int:
        """The codebooks every record holds: the manifest's ``n_quantizers`` (all of the model's in
        datasets that do not record it)."""
        return int(self.manifest.get("n_quantizers", self.config.n_codebooks))

    @property
    def codes_fingerprint(self) -> str | None:
        """The :func:`~audiotok.checkpoint.codes_fingerprint` of the weights that wrote the codes;
        ``None`` for datasets written before the manifest recorded it."""
        return self.manifest.get("codes_fingerprint")

    def check_codec(self, tokenizer: AudioTokenizer) -> None:
        """Raise ``ValueError`` (naming both models) unless ``tokenizer`` can decode these codes: the
        architecture that wrote them (``config_hash``) with at least ``n_quantizers`` codebooks and, when
        the dataset records it, the same encoder and quantizer weights (``codes_fingerprint``)."""
        check_codec(tokenizer, self.model_id, self.manifest["config_hash"], self.n_codebooks,
                    self.config.codebook_size, codes_fingerprint=self.codes_fingerprint)

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

    def _open(self, name: str) -> IO[bytes]:
        """The file ``name`` of the dataset, opened for reading (a URL's through this process's filesystem:
        each DataLoader worker its own)."""
        if isinstance(self.root, Path):
            return open(self.root / name, "rb")
        fs, base = url_to_fs(self.root, self.storage_options)
        return fs.open(f"{base}/{name}", "rb")

    def _read(self, name: str) -> Iterator[CodeRecord]:
        with self._open(name) as f:
            yield from read_shard(f"{self.root}/{name}", f, self._expected)

    def __iter__(self) -> Iterator[CodeRecord]:
        for shard in self.shards:
            count = frames = 0
            for record in self._read(shard["path"]):
                count += 1
                frames += record.codes.shape[-1]
                yield record
            if (count, frames) != (shard["records"], shard["frames"]):
                raise ValueError(f"{self.root}/{shown(shard['path'])}: read {count} records of {frames} frames, "
                                 f"the manifest lists {shard['records']} of {shard['frames']}")

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
