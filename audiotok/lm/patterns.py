"""Codebook patterns: how the ``[K, F]`` codes of one sequence are laid out for a language model.

Every function here works on numpy arrays and on torch tensors (on any device) and returns the same
kind of array, always int64. ``invert_pattern(apply_pattern(codes, p), p, K)`` equals ``codes``
exactly for every pattern.
"""

from __future__ import annotations

import enum
from typing import TypeVar, overload

import numpy as np
import torch
from numpy.typing import ArrayLike

from ..codes import is_integer_dtype

Array = TypeVar("Array", np.ndarray, torch.Tensor)

DELAY_PAD = -1
"""Default marker for the empty cells of the ``delay`` pattern."""


class CodebookPattern(str, enum.Enum):
    """Layout of ``K`` residual codebooks x ``F`` frames for a language model.

    * ``flatten``: one stream, frame-major ``[c0f0, c1f0, ..., c(K-1)f0, c0f1, ...]``, length ``K*F``.
    * ``delay``: ``K`` streams, codebook ``k`` shifted right by ``k`` steps (MusicGen), shape
      ``[K, F+K-1]``; the ``k`` cells before and the ``K-1-k`` cells after row ``k`` hold a pad marker.
    * ``parallel``: ``K`` streams as they are, ``[K, F]`` (a model with ``K`` heads).
    """

    FLATTEN = "flatten"
    DELAY = "delay"
    PARALLEL = "parallel"


@overload
def as_int64(x: torch.Tensor, ndim: int, name: str) -> torch.Tensor: ...
@overload
def as_int64(x: ArrayLike, ndim: int, name: str) -> np.ndarray: ...
def as_int64(x: ArrayLike | torch.Tensor, ndim: int, name: str) -> np.ndarray | torch.Tensor:
    """``x`` as an int64 array (a tensor stays a tensor on its device) with ``ndim`` dimensions."""
    if isinstance(x, torch.Tensor):
        if not is_integer_dtype(x.dtype):
            raise TypeError(f"{name} must hold integers, got {x.dtype}")
        x = x.long()
    else:
        x = np.asarray(x)
        if not is_integer_dtype(x.dtype) and not (x.size == 0 and x.dtype.kind == "f"):
            raise TypeError(f"{name} must hold integers, got {x.dtype}")
        x = x.astype(np.int64, copy=False)
    if x.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(x.shape)}")
    return x


def _full(like: Array, shape: tuple[int, int], value: int) -> Array:
    if isinstance(like, torch.Tensor):
        return torch.full(shape, value, dtype=torch.long, device=like.device)
    return np.full(shape, value, dtype=np.int64)


def _contiguous(x: Array) -> Array:
    if isinstance(x, torch.Tensor):
        return x.contiguous()
    return np.ascontiguousarray(x)


def apply_pattern(codes: Array, pattern: CodebookPattern | str, pad_value: int = DELAY_PAD) -> Array:
    """Lay out one sequence of codes.

    Args:
        codes: ``[K, F]`` integer codes.
        pattern: a :class:`CodebookPattern` or its name.
        pad_value: marker for the empty cells of ``delay``.

    Returns:
        int64 ``[K*F]`` (flatten), ``[K, F+K-1]`` (delay) or ``[K, F]`` (parallel). For ``parallel``
        the result may share memory with ``codes``.
    """
    pattern = CodebookPattern(pattern)
    codes = as_int64(codes, 2, "codes")
    n_codebooks, n_frames = codes.shape
    if pattern is CodebookPattern.FLATTEN:
        return codes.T.reshape(-1)
    if pattern is CodebookPattern.DELAY:
        out = _full(codes, (n_codebooks, n_frames + n_codebooks - 1), pad_value)
        for k in range(n_codebooks):
            out[k, k : k + n_frames] = codes[k]
        return out
    return codes


def invert_pattern(seq: Array, pattern: CodebookPattern | str, n_codebooks: int, pad_value: int = DELAY_PAD) -> Array:
    """Undo :func:`apply_pattern`.

    Args:
        seq: ``[K*F]`` (flatten), ``[K, F+K-1]`` (delay) or ``[K, F]`` (parallel).
        pattern: the pattern ``seq`` was laid out with.
        n_codebooks: ``K``.
        pad_value: the marker in the empty cells of ``delay``; every such cell must hold it.

    Returns:
        int64 ``[K, F]`` codes.

    Raises:
        ValueError: if ``seq`` does not have the shape (or, for ``delay``, the pad cells) of the pattern.
    """
    pattern = CodebookPattern(pattern)
    if n_codebooks < 1:
        raise ValueError(f"n_codebooks must be >= 1, got {n_codebooks}")
    if pattern is CodebookPattern.FLATTEN:
        seq = as_int64(seq, 1, "seq")
        if seq.shape[0] % n_codebooks:
            raise ValueError(f"flattened length {seq.shape[0]} is not a multiple of n_codebooks={n_codebooks}")
        return _contiguous(seq.reshape(-1, n_codebooks).T)
    seq = as_int64(seq, 2, "seq")
    if seq.shape[0] != n_codebooks:
        raise ValueError(f"{pattern.value} sequence has {seq.shape[0]} rows, expected n_codebooks={n_codebooks}")
    if pattern is CodebookPattern.PARALLEL:
        return seq
    n_frames = seq.shape[1] - n_codebooks + 1
    if n_frames < 0:
        raise ValueError(f"delay sequence of length {seq.shape[1]} is shorter than n_codebooks - 1 = {n_codebooks - 1}")
    for k in range(n_codebooks):
        for cells in (seq[k, :k], seq[k, k + n_frames :]):
            if (cells != pad_value).any():
                raise ValueError(
                    f"delay row {k} must hold the pad marker {pad_value} in its first {k} and last "
                    f"{n_codebooks - 1 - k} cells, got {cells.tolist()}"
                )
    rows = [seq[k, k : k + n_frames] for k in range(n_codebooks)]
    return torch.stack(rows) if isinstance(seq, torch.Tensor) else np.stack(rows)
