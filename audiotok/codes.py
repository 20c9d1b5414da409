"""Checks on code indices, shared by the quantizer, the tokenizer, the code formats and the CLI.

Each rule has one implementation here; the callers word their own messages around it only where
their exception type says more (``TypeError`` in :mod:`audiotok.lm`).
"""

from __future__ import annotations

import re

import numpy as np
import torch

#: Codebook sizes the stored formats can hold: uint16 codes (``.atok`` files, code datasets) and
#: 10-bit packed codes (``.atok`` with ``--pack-10bit``).
UINT16_CODEBOOK_SIZE = 1 << 16
PACKED_10BIT_CODEBOOK_SIZE = 1 << 10
_FINGERPRINT = re.compile(r"[0-9a-f]{16}")


def check_n_quantizers(n_quantizers: int | None, n_codebooks: int) -> int:
    """The number of codebooks to code with: ``n_codebooks`` for ``None``; ``ValueError`` unless an
    integer (not a float or bool) with ``1 <= n_quantizers <= n_codebooks``."""
    if n_quantizers is None:
        return n_codebooks
    integer = isinstance(n_quantizers, (int, np.integer)) and not isinstance(n_quantizers, bool)
    if not integer or not 1 <= n_quantizers <= n_codebooks:
        raise ValueError(f"n_quantizers must be an integer in 1..{n_codebooks}, got {n_quantizers!r}")
    return int(n_quantizers)


def check_uint16(codebook_size: int) -> None:
    """``ValueError`` unless codes of a ``codebook_size`` codebook fit uint16 storage."""
    if codebook_size > UINT16_CODEBOOK_SIZE:
        raise ValueError(f"codebook_size {codebook_size} does not fit the uint16 code storage "
                         f"(at most {UINT16_CODEBOOK_SIZE})")


def check_10bit(codebook_size: int) -> None:
    """``ValueError`` unless codes of a ``codebook_size`` codebook can be packed in 10 bits."""
    if codebook_size > PACKED_10BIT_CODEBOOK_SIZE:
        raise ValueError(f"10-bit packing needs codebook_size <= {PACKED_10BIT_CODEBOOK_SIZE}, got {codebook_size}")


def is_integer_dtype(dtype: torch.dtype | np.dtype) -> bool:
    """Whether a torch or numpy dtype holds integers (``bool`` does not count)."""
    if isinstance(dtype, torch.dtype):
        return not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)
    return np.dtype(dtype).kind in "iu"


def check_fingerprint(value: object, where: str) -> str | None:
    """``value`` unless it is neither ``None`` (not recorded) nor a
    :func:`~audiotok.weights.checkpoint.codes_fingerprint` (16 lowercase hex digits): then ``ValueError``
    naming ``where`` (the field that held it)."""
    if value is not None and not (isinstance(value, str) and _FINGERPRINT.fullmatch(value)):
        raise ValueError(f"{where}={value!r} is not 16 lowercase hex digits")
    return value


def check_frames(frames: int, num_samples: int, source_sample_rate: int, sample_rate: int, hop_length: int,
                 where: str) -> None:
    """``ValueError`` naming ``where`` unless ``frames`` code frames fit ``num_samples`` samples at
    ``source_sample_rate`` coded at ``sample_rate`` with ``hop_length``: ``ceil(T / hop_length)`` with
    ``T = round(num_samples * sample_rate / source_sample_rate)``, up to one frame (the resampler's rounding)."""
    expected = -(-round(num_samples * sample_rate / source_sample_rate) // hop_length)
    if abs(frames - expected) > 1:
        raise ValueError(f"{where}: codes have {frames} frames but num_samples={num_samples} at {source_sample_rate} "
                         f"Hz with hop {hop_length} at {sample_rate} Hz implies {expected}")
