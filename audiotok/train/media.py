"""What the trainers show besides numbers: audio and spectrograms in TensorBoard, and console lines.

TensorBoard media (rank 0, at each validation; nothing when TensorBoard is not installed):

- Codec (:func:`write_reconstructions`): the first :data:`EXCERPTS_PER_GROUP` validation excerpt(s) of
  each validation group, the same ones at every validation (the validation set is fixed by
  ``data.seed``), at most :data:`MEDIA_SECONDS` of each: ``val_audio/<group>/<i>/reconstruction``
  (audio at the model's sample rate) and ``val_mel/<group>/<i>`` (an image: the log-mel spectrograms
  of the input, left, and the reconstruction, right, on one colour scale). The input itself,
  ``val_audio/<group>/<i>/input``, does not change and is written once per launch, at its first
  validation. Cost: one more generator pass over these few excerpts; the paper's base config (3 groups
  of 5 s excerpts at 44.1 kHz) adds about 1.3 MB of audio to the event file per validation.
- Prior: generated samples, ``samples/<i>`` (:mod:`audiotok.lm.samples`).

Console lines (the ``logging`` module; :func:`train_line`, :func:`validation_line`, :func:`summary_line`) come
from the run harness (:mod:`audiotok.train.harness`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..nn.distances import MelSpectrogram

if TYPE_CHECKING:
    from ..data.dataset import Excerpt
    from ..nn.model import DAC
    from .stopping import StopControl

#: Validation excerpts logged per validation group (the first ones of the group).
EXCERPTS_PER_GROUP = 1
#: Longest audio logged per excerpt or sample (seconds).
MEDIA_SECONDS = 10.0
#: The dynamic range (dB) of the spectrogram images: lower values are drawn as the bottom colour.
DB_RANGE = 80.0

# matplotlib's viridis at 0, 1/8, ..., 1, interpolated linearly between these (no matplotlib needed).
_VIRIDIS = np.array([
    [0.267004, 0.004874, 0.329415], [0.282623, 0.140926, 0.457517], [0.229739, 0.322361, 0.545706],
    [0.172719, 0.448791, 0.557885], [0.127568, 0.566949, 0.550556], [0.134692, 0.658636, 0.517649],
    [0.369214, 0.788888, 0.382914], [0.678489, 0.863742, 0.189503], [0.993248, 0.906157, 0.143936],
])


def colourize(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] (clipped), any shape ``S`` -> uint8 RGB ``[*S, 3]`` on a viridis colour map
    (0 dark blue, 1 yellow)."""
    x = np.clip(np.nan_to_num(np.asarray(values, dtype=np.float64)), 0.0, 1.0) * (len(_VIRIDIS) - 1)
    low = np.minimum(x.astype(np.int64), len(_VIRIDIS) - 2)
    frac = (x - low)[..., None]
    rgb = _VIRIDIS[low] * (1 - frac) + _VIRIDIS[low + 1] * frac
    return np.round(rgb * 255).astype(np.uint8)


class MelImage:
    """Log-mel spectrograms drawn side by side, as an image for ``SummaryWriter.add_image(...,
    dataformats="HWC")``: :class:`~audiotok.nn.distances.MelSpectrogram` (window about 46 ms, hop a
    quarter of it, ``n_mels`` bands), in dB, on one scale for all (the loudest cell at the top of the
    colour map, :data:`DB_RANGE` below it at the bottom), low frequencies at the bottom, a white
    column between spectrograms, every band ``scale`` pixels high."""

    def __init__(self, sample_rate: int, n_mels: int = 80, scale: int = 2):
        window = 2 ** round(math.log2(0.046 * sample_rate))  # 2048 at 44.1 kHz, 1024 at 24 and 16 kHz
        self.mel = MelSpectrogram(sample_rate, window, n_mels)
        self.scale = scale

    @torch.no_grad()
    def __call__(self, *audio: torch.Tensor) -> np.ndarray:
        """Audio clips ``[1, N_i]`` (or ``[N_i]``) -> uint8 ``[scale * n_mels, W, 3]``, ``W`` the sum of
        their frame counts (``1 + N_i // hop``) plus one column between clips."""
        db = [20 * torch.log10(self.mel(a.detach().float().cpu().reshape(1, 1, -1))[0, 0].clamp(min=1e-5))
              for a in audio]  # each [n_mels, frames]
        top = max(float(d.max()) for d in db)
        parts = []
        for i, d in enumerate(db):
            if i:
                parts.append(np.full((d.shape[0], 1, 3), 255, dtype=np.uint8))
            parts.append(colourize(((d - top + DB_RANGE) / DB_RANGE).numpy()[::-1]))
        return np.repeat(np.concatenate(parts, axis=1), self.scale, axis=0)


def clip_audio(audio: torch.Tensor, sample_rate: int) -> torch.Tensor:
    """``[..., N]`` -> float32 ``[n]`` on the CPU: the first :data:`MEDIA_SECONDS`, in [-1, 1]."""
    return audio.detach().float().cpu().reshape(-1)[: round(MEDIA_SECONDS * sample_rate)].clamp(-1, 1)


def media_excerpts(excerpts: Sequence[Excerpt], per_group: int = EXCERPTS_PER_GROUP) -> list[tuple[str, Excerpt]]:
    """The validation excerpts shown: the first ``per_group`` of each group, as ``("<group>/<i>", excerpt)``."""
    picked: list[tuple[str, Excerpt]] = []
    for group in dict.fromkeys(e.group for e in excerpts):
        of_group = [e for e in excerpts if e.group == group][:per_group]
        picked += [(f"{group}/{i}", e) for i, e in enumerate(of_group)]
    return picked


@torch.no_grad()
def write_reconstructions(writer: Any, generator: DAC, excerpts: Sequence[tuple[str, Excerpt]], step: int,
                          mel_image: MelImage, with_inputs: bool, device: torch.device) -> None:
    """Reconstruct ``excerpts`` (from :func:`media_excerpts`; audio ``[1, N]``) with ``generator`` (in eval
    mode, put back in training mode after) and write ``val_audio/<name>/reconstruction``,
    ``val_mel/<name>`` and, when ``with_inputs``, ``val_audio/<name>/input`` at ``step`` to ``writer`` (a
    ``SummaryWriter``)."""
    rate = generator.config.sample_rate
    generator.eval()
    try:
        for name, excerpt in excerpts:
            x = excerpt.audio
            y = generator(x[None].to(device))[0][0]  # [1, N]
            x, y = clip_audio(x, rate), clip_audio(y, rate)
            if with_inputs:
                writer.add_audio(f"val_audio/{name}/input", x, step, sample_rate=rate)
            writer.add_audio(f"val_audio/{name}/reconstruction", y, step, sample_rate=rate)
            writer.add_image(f"val_mel/{name}", mel_image(x, y), step, dataformats="HWC")
    finally:
        generator.train()


# -- console lines ---------------------------------------------------------------------------------


def duration(seconds: float) -> str:
    """``0.4 s``, ``42 s``, ``12.5 min``, ``3.25 h``."""
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"


def count(n: float) -> str:
    """``950``, ``12.3k``, ``4.56M``, ``7.89G``."""
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:.0f}"


def train_line(step: int, end: int, losses: dict[str, float], lr: float, steps_per_s: float, seen: str) -> str:
    """One line per logged training step: ``step 120/1000 | loss 12.3 mel 1.23 | lr 1.00e-04 | 2.50 steps/s
    eta 5.9 min | 1.2 h audio``."""
    parts = " ".join(f"{k} {v:.4g}" for k, v in losses.items())
    eta = (end - step) / steps_per_s if steps_per_s > 0 else math.inf
    return (f"step {step}/{end} | {parts} | lr {lr:.2e} | {steps_per_s:.2f} steps/s eta "
            f"{duration(eta) if math.isfinite(eta) else '?'} | {seen}")


def validation_line(step: int, metrics: dict[str, float], formats: Mapping[str, str], best: str, improved: bool) -> str:
    """One line per validation, the metrics of ``formats`` in their formats, ``(best)`` after the metric ``best``
    when ``improved``: ``step 500 validation | mel_distance 1.2345 (best) | si_sdr 5.43 dB``."""
    parts = [f"{k} {form.format(metrics[k])}{' (best)' if k == best and improved else ''}"
             for k, form in formats.items() if k in metrics]
    return " | ".join([f"step {step} validation", *parts])


def stop_reason(step: int, end: int, num_iters: int, stop: StopControl) -> str:
    """Why a loop that started for ``end`` steps stopped at ``step``: a signal, its time limit (``stop``),
    or ``num_iters`` / ``max_steps`` reached."""
    import signal

    if stop.stop_signal is not None:
        return f"signal {signal.Signals(stop.stop_signal).name}"
    if stop.stopped_at is not None:
        return f"time limit {stop.time_limit:g} s"
    return f"reached num_iters {num_iters}" if end == num_iters else f"reached max_steps {end}"


def summary_line(step: int, first_step: int, wall_s: float, seen: str, best: str, reason: str) -> str:
    """The closing line: ``training stopped at step 400 (reached num_iters 400): 100 steps this launch in
    12.5 min, 2.1 h audio seen; best ...``."""
    return (f"training stopped at step {step} ({reason}): {step - first_step} steps this launch in "
            f"{duration(wall_s)}, {seen} seen; {best}")
