"""Codec quality metrics: codebook utilization, the paper's mel and STFT distances, SI-SDR, and
wrappers around the optional ViSQOL, PESQ and STOI packages.

Audio arguments are tensors or arrays ``[T]``, ``[C, T]`` or ``[B, C, T]`` with ``estimate`` (the
decoded audio) and ``reference`` (the input) of the same shape. The spectral distances and SI-SDR
use :mod:`audiotok.nn.distances` (needs ``transformers`` for the mel filters); ViSQOL, PESQ and STOI
take one mono clip each and need ``pip install 'audiotok[eval]'`` (``visqol-python``, ``pesq``,
``pystoi``). Those packages are imported on first use only.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch

from .audio import AudioLike, downmix, resample, to_float_array
from .codes import is_integer_dtype

if TYPE_CHECKING:
    from torch import nn

CodesLike = torch.Tensor | np.ndarray | Sequence[torch.Tensor | np.ndarray]

#: Rates at which the optional metrics are defined: ViSQOL audio mode works at 48 kHz, speech mode,
#: wide-band PESQ at 16 kHz, narrow-band PESQ at 8 kHz, STOI at 10 kHz.
VISQOL_RATES = {"audio": 48000, "speech": 16000}
PESQ_RATES = {"wb": 16000, "nb": 8000}
STOI_RATE = 10000


# ---------------------------------------------------------------------------------------------
# Codebook utilization


class CodebookUtilization(NamedTuple):
    """Normalized code entropies: ``per_codebook[k] = H_k / log2(size)`` and
    ``overall = sum_k H_k / (K log2(size))`` (the paper's codebook usage), both in [0, 1]."""

    per_codebook: list[float]
    overall: float

    def perplexity(self, codebook_size: int) -> list[float]:
        """Perplexity ``2 ** H_k`` of each codebook (``codebook_size ** per_codebook[k]``): how many
        equally used codes would have the same entropy, from 1 (one code) to ``codebook_size``."""
        return [float(codebook_size ** u) for u in self.per_codebook]


def codebook_utilization(
    codes: CodesLike, codebook_size: int, lengths: Sequence[int] | torch.Tensor | None = None
) -> CodebookUtilization:
    """Entropy of each codebook's code histogram over all frames, divided by ``log2(codebook_size)``.

    Args:
        codes: ``[N, K, F]`` (or ``[K, F]``) integer codes, or a list of ``[K, F_i]`` items of
            different lengths.
        codebook_size: number of entries per codebook (at least 2).
        lengths: valid frames per item of a ``[N, K, F]`` batch (e.g. ``EncodedAudio.lengths``);
            frames past them (padding) are left out.

    A sample of fewer frames than ``codebook_size`` cannot reach 1.0 (at most
    ``log2(frames) / log2(size)``): count frames before reading much into values near the top.
    """
    if codebook_size < 2:
        raise ValueError(f"codebook_size must be at least 2, got {codebook_size}")
    if isinstance(codes, (torch.Tensor, np.ndarray)):
        array = _as_int_array(codes)
        if array.ndim == 2:
            array = array[None]
        if array.ndim != 3:
            raise ValueError(f"codes must be [N, K, F], [K, F] or a list of [K, F], got shape {array.shape}")
        items = list(array)
    else:
        items = [_as_int_array(c) for c in codes]
        if not items or any(c.ndim != 2 for c in items):
            raise ValueError("codes must be [N, K, F], [K, F] or a non-empty list of [K, F] arrays")
    if lengths is not None:
        lengths = [int(n) for n in lengths]
        if len(lengths) != len(items):
            raise ValueError(f"{len(lengths)} lengths for {len(items)} items")
        items = [c[:, :n] for c, n in zip(items, lengths)]
    if len({c.shape[0] for c in items}) != 1:
        raise ValueError(f"items have different codebook counts: {sorted({c.shape[0] for c in items})}")
    flat = np.concatenate(items, axis=1)
    if flat.shape[1] == 0:
        raise ValueError("codes have no frames")
    if flat.min() < 0 or flat.max() >= codebook_size:
        raise ValueError(f"code values must be in [0, {codebook_size}), found [{flat.min()}, {flat.max()}]")
    per_codebook = []
    for row in flat:
        p = np.bincount(row, minlength=codebook_size) / row.size
        p = p[p > 0]
        per_codebook.append(float(-(p * np.log2(p)).sum() / math.log2(codebook_size)) + 0.0)
    return CodebookUtilization(per_codebook, float(np.mean(per_codebook)))


def _as_int_array(codes: torch.Tensor | np.ndarray) -> np.ndarray:
    array = codes.detach().cpu().numpy() if isinstance(codes, torch.Tensor) else np.asarray(codes)
    if not is_integer_dtype(array.dtype):
        raise ValueError(f"codes must be integers, got dtype {array.dtype}")
    return array.astype(np.int64, copy=False)


# ---------------------------------------------------------------------------------------------
# Spectral distances and SI-SDR (the paper's objective metrics)


def _pair(estimate: AudioLike, reference: AudioLike) -> tuple[torch.Tensor, torch.Tensor]:
    """Both as float32 tensors ``[B, C, T]`` on the estimate's device."""
    x = estimate if isinstance(estimate, torch.Tensor) else torch.from_numpy(to_float_array(estimate))
    y = reference if isinstance(reference, torch.Tensor) else torch.from_numpy(to_float_array(reference))
    if x.shape != y.shape:
        raise ValueError(f"estimate and reference shapes differ: {tuple(x.shape)} vs {tuple(y.shape)}")
    if x.ndim not in (1, 2, 3) or x.shape[-1] == 0:
        raise ValueError(f"audio must be a non-empty [T], [C, T] or [B, C, T], got shape {tuple(x.shape)}")
    while x.ndim < 3:
        x, y = x[None], y[None]
    return x.float(), y.to(x.device).float()


@functools.lru_cache(maxsize=8)
def _mel_loss(sample_rate: int, device: str) -> nn.Module:
    from .nn.distances import MelSpectrogramLoss

    return MelSpectrogramLoss(sample_rate).to(device)


@functools.lru_cache(maxsize=4)
def _stft_loss(device: str) -> nn.Module:
    from .nn.distances import MultiScaleSTFTLoss

    return MultiScaleSTFTLoss().to(device)


@torch.no_grad()
def mel_distance(estimate: AudioLike, reference: AudioLike, sample_rate: int) -> float:
    """The paper's mel distance: :class:`~audiotok.nn.distances.MelSpectrogramLoss` with the recipe's
    defaults (7 scales, windows 32 to 2048, log10 mel L1, summed over scales). Lower is better.
    A batch gives the loss over the whole batch (the mean of the items' values when they have the
    same length)."""
    x, y = _pair(estimate, reference)
    return float(_mel_loss(int(sample_rate), str(x.device))(x, y))


@torch.no_grad()
def stft_distance(estimate: AudioLike, reference: AudioLike, sample_rate: int | None = None) -> float:
    """The paper's STFT distance: :class:`~audiotok.nn.distances.MultiScaleSTFTLoss` with its
    defaults (windows 2048 and 512; log power L1 plus magnitude L1, summed). Lower is better.
    ``sample_rate`` is accepted for symmetry with :func:`mel_distance`; the loss does not use it."""
    x, y = _pair(estimate, reference)
    return float(_stft_loss(str(x.device))(x, y))


@torch.no_grad()
def si_sdr(estimate: AudioLike, reference: AudioLike) -> float:
    """Scale-invariant SDR in dB (:func:`audiotok.nn.distances.si_sdr`), averaged over a batch.
    Higher is better."""
    from .nn.distances import si_sdr as si_sdr_items

    x, y = _pair(estimate, reference)
    return float(si_sdr_items(x, y).mean())


# ---------------------------------------------------------------------------------------------
# Optional perceptual metrics (one mono clip at a time)


def _require(module: str, package: str, metric: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(
            f"{metric} needs the '{package}' package: pip install {package} "
            f"(or pip install 'audiotok[eval]' for all evaluation metrics)"
        ) from e


def _mono_pair(estimate: AudioLike, reference: AudioLike, sample_rate: int,
               target_rate: int) -> tuple[np.ndarray, np.ndarray]:
    """One clip each (``[T]``, ``[C, T]`` or ``[1, C, T]``), downmixed and resampled: two float64 ``[T]``."""
    out = []
    for name, audio in (("estimate", estimate), ("reference", reference)):
        x = to_float_array(audio)
        if x.ndim == 3:
            if x.shape[0] != 1:
                raise ValueError(f"{name}: takes one clip, got a batch of {x.shape[0]}")
            x = x[0]
        if x.ndim == 1:
            x = x[None]
        if x.ndim != 2 or x.shape[-1] == 0:
            raise ValueError(f"{name}: expected a non-empty [T], [C, T] or [1, C, T], got shape {x.shape}")
        out.append(resample(np.ascontiguousarray(downmix(x)), int(sample_rate), target_rate)[0].astype(np.float64))
    if out[0].shape != out[1].shape:
        raise ValueError(f"estimate and reference lengths differ: {out[0].shape[0]} vs {out[1].shape[0]} samples")
    return out[0], out[1]


@functools.lru_cache(maxsize=4)
def _visqol_api(mode: str, lattice: bool | None) -> Any:
    visqol_module = _require("visqol", "visqol-python", "ViSQOL")
    api = visqol_module.VisqolApi()
    api.create(mode=mode, use_lattice_model=lattice if mode == "speech" else None)
    return api


def visqol_speech_mapper() -> str:
    """The MOS mapper ViSQOL speech mode uses by default here: ``"lattice"`` (the C++ default; needs
    ``ai-edge-litert``, i.e. ``pip install 'visqol-python[lattice]'``) or ``"polynomial"`` (the
    fallback, which reads up to 1-2 MOS points higher on degraded speech)."""
    quality_mapper = _require("visqol.quality_mapper", "visqol-python", "ViSQOL")
    return "lattice" if quality_mapper.has_lattice_runtime() else "polynomial"


def visqol(
    estimate: AudioLike, reference: AudioLike, sample_rate: int, mode: str = "audio", lattice: bool | None = None
) -> float:
    """ViSQOL v3 MOS-LQO (1 to 5, higher is better) with ``visqol-python`` (a Python port that
    matches Google's C++ ViSQOL 3.3.3 on its conformance tests).

    ``mode="audio"`` (music and general audio) resamples both clips to 48 kHz, ``mode="speech"`` to
    16 kHz. ``lattice`` (speech mode): ``None`` uses the deep-lattice mapper when ``ai-edge-litert``
    is installed and the polynomial one otherwise (see :func:`visqol_speech_mapper`). Install
    ``numba`` (``visqol-python[accel]``) for about 7x faster scoring after a one-time compilation.
    """
    if mode not in VISQOL_RATES:
        raise ValueError(f"mode must be 'audio' or 'speech', got {mode!r}")
    api = _visqol_api(mode, lattice)
    x, y = _mono_pair(estimate, reference, sample_rate, VISQOL_RATES[mode])
    return float(api.measure_from_arrays(y, x, VISQOL_RATES[mode]).moslqo)


def pesq_score(estimate: AudioLike, reference: AudioLike, sample_rate: int, mode: str = "wb") -> float:
    """PESQ (ITU-T P.862) MOS-LQO with the ``pesq`` package: ``mode="wb"`` (P.862.2, wide band, at
    16 kHz; -0.5 to 4.64) or ``"nb"`` (narrow band, at 8 kHz). Higher is better. Raises the
    package's ``NoUtterancesError`` when it finds no speech in the reference."""
    if mode not in PESQ_RATES:
        raise ValueError(f"mode must be 'wb' or 'nb', got {mode!r}")
    pesq = _require("pesq", "pesq", "PESQ")
    x, y = _mono_pair(estimate, reference, sample_rate, PESQ_RATES[mode])
    return float(pesq.pesq(PESQ_RATES[mode], y, x, mode))


def stoi_score(estimate: AudioLike, reference: AudioLike, sample_rate: int, extended: bool = False) -> float:
    """STOI speech intelligibility (0 to 1, higher is better; ``extended=True`` for ESTOI) with
    ``pystoi``, on clips resampled to its 10 kHz rate with soxr."""
    pystoi = _require("pystoi", "pystoi", "STOI")
    x, y = _mono_pair(estimate, reference, sample_rate, STOI_RATE)
    return float(pystoi.stoi(y, x, STOI_RATE, extended=extended))
