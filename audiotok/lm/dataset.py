"""Feeding code datasets (read by :class:`audiotok.formats.codedataset.CodeDataset`) to a language model."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from ..formats.codedataset import CodeDataset, CodeRecord
from .packing import pack_sequences
from .patterns import CodebookPattern
from .vocab import CodeVocabulary


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

    def examples(self, records: Iterable[CodeRecord]) -> Iterator[dict[str, torch.Tensor]]:
        """The blocks that ``records`` pack into."""
        return pack_sequences(self.sequences(records), self.seq_len, self.pad_id, self.drop_remainder)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        records = self.code_dataset
        worker = get_worker_info()
        if worker is not None:
            records = records.split_by_rank(worker.id, worker.num_workers)
        return self.examples(records)
