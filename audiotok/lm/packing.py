"""Fixed-length blocks of token ids for a causal language model (``transformers`` conventions)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np
import torch
from numpy.typing import ArrayLike

IGNORE_INDEX = -100
"""Label of positions that take no part in the loss (``transformers``' ``ignore_index``)."""


def _as_ids(ids: ArrayLike | torch.Tensor) -> np.ndarray:
    if isinstance(ids, torch.Tensor):
        ids = ids.detach().cpu().numpy()
    ids = np.asarray(ids)
    if ids.ndim not in (1, 2) or (ids.dtype.kind not in "iu" and ids.size):
        raise ValueError(f"ids must be integer [L] or [K, L], got {ids.dtype} {ids.shape}")
    return ids.astype(np.int64, copy=False)


def _block(ids: np.ndarray, seq_len: int, pad_id: int) -> dict[str, torch.Tensor]:
    length = ids.shape[-1]
    input_ids = np.full(ids.shape[:-1] + (seq_len,), pad_id, dtype=np.int64)
    input_ids[..., :length] = ids
    attention_mask = np.zeros(seq_len, dtype=np.int64)
    attention_mask[:length] = 1
    labels = input_ids.copy()
    labels[..., length:] = IGNORE_INDEX
    return {
        "input_ids": torch.from_numpy(input_ids),
        "attention_mask": torch.from_numpy(attention_mask),
        "labels": torch.from_numpy(labels),
    }


def pad_to_length(ids: ArrayLike | torch.Tensor, seq_len: int, pad_id: int) -> dict[str, torch.Tensor]:
    """One sequence as a training example of ``seq_len`` positions (no packing).

    Args:
        ids: ``[L]`` (or ``[K, L]`` multi-stream) token ids, ``L <= seq_len``.
        seq_len: length of the example.
        pad_id: id written after the sequence.

    Returns:
        ``input_ids`` ``[seq_len]`` (``[K, seq_len]``), ``attention_mask`` ``[seq_len]`` (1 on the
        sequence, 0 on padding) and ``labels`` (``input_ids`` with ``-100`` on padding), all int64.
    """
    ids = _as_ids(ids)
    if ids.shape[-1] > seq_len:
        raise ValueError(f"sequence of length {ids.shape[-1]} does not fit seq_len={seq_len}")
    return _block(ids, seq_len, pad_id)


def pack_sequences(sequences: Iterable[ArrayLike | torch.Tensor], seq_len: int, pad_id: int,
                   drop_remainder: bool = False) -> Iterator[dict[str, torch.Tensor]]:
    """Concatenate sequences into blocks of ``seq_len`` tokens (standard GPT packing).

    Sequences (each normally with its own bos/eos) are joined end to end and cut every ``seq_len``
    tokens, so a sequence may span blocks and a block may hold several; attention is not masked
    between them and positions do not restart. Only the final partial block is padded (or dropped
    with ``drop_remainder``).

    Args:
        sequences: ``[L_i]`` token ids, or ``[K, L_i]`` multi-stream ids (delay / parallel patterns,
            joined along ``L``; every sequence must have the same ``K``).
        seq_len: tokens (time steps) per block.
        pad_id: id that fills the end of the final block.
        drop_remainder: drop the final partial block instead of padding it.

    Yields:
        Dicts as :func:`pad_to_length` returns: ``input_ids`` ``[seq_len]`` (``[K, seq_len]``),
        ``attention_mask`` ``[seq_len]``, ``labels`` with ``-100`` on padding; int64 tensors.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    pending: list[np.ndarray] = []
    length = 0
    for seq in sequences:
        seq = _as_ids(seq)
        if pending and seq.shape[:-1] != pending[0].shape[:-1]:
            raise ValueError(f"cannot pack sequences of shape {pending[0].shape} and {seq.shape} together")
        pending.append(seq)
        length += seq.shape[-1]
        if length >= seq_len:
            joined = np.concatenate(pending, axis=-1)
            full = length - length % seq_len
            for start in range(0, full, seq_len):
                yield _block(joined[..., start : start + seq_len], seq_len, pad_id)
            pending, length = [joined[..., full:].copy()], length - full
    if length and not drop_remainder:
        yield _block(np.concatenate(pending, axis=-1), seq_len, pad_id)
