"""``AudioTokenizer``: audio in, code indices out, and back."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import audio as audio_utils
from .checkpoint import Checkpoint, build_model, load_checkpoint, save_folder, save_original, save_transformers
from .config import DACConfig
from .hub import resolve
from .model import DAC


@dataclass
class EncodedAudio:
    """Codes for a batch of clips.

    Attributes:
        codes: ``[B, K, F]`` int64 code indices; frames past ``lengths[b]`` are padding.
        lengths: ``[B]`` valid frames per item.
        num_samples: ``[B]`` samples per item in the input, at ``sample_rate``.
        sample_rate: rate of the audio that was encoded (before resampling to the model rate).
    """

    codes: torch.Tensor
    lengths: torch.Tensor
    num_samples: torch.Tensor
    sample_rate: int

    def to(self, device: str | torch.device) -> EncodedAudio:
        return EncodedAudio(self.codes.to(device), self.lengths, self.num_samples, self.sample_rate)


class AudioTokenizer:
    """Encode audio to DAC code indices and decode them back, for inference.

    Weight norm is folded, the model is in eval mode and all work runs under ``torch.inference_mode``.
    """

    def __init__(self, model: DAC, model_id: str = "dac", device: str | torch.device | None = None):
        if not model.is_folded:
            model.fold_weight_norm()
        self.model = model.eval()
        self.model_id = model_id
        self.to(device or "cpu")

    # -- construction and saving -------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, source: str | os.PathLike | None = None,
                        device: str | torch.device | None = None) -> AudioTokenizer:
        """Load a model.

        ``source``: ``None`` for the model that ships with the package; an audiotok folder; a
        transformers DAC folder; an original descript ``.pth`` file; or a Hugging Face hub id
        (e.g. ``descript/dac_44khz``), taken from the local cache when present.
        """
        checkpoint = load_checkpoint(resolve(source))
        if source is not None and not Path(str(source)).expanduser().exists():
            checkpoint.model_id = str(source)
        return cls(build_model(checkpoint, folded=True), checkpoint.model_id, device)

    @classmethod
    def from_config(cls, config: DACConfig | str, device: str | torch.device | None = None,
                    seed: int | None = None) -> AudioTokenizer:
        """A randomly initialised model of a config or preset name (for tests and experiments)."""
        if isinstance(config, str):
            config = DACConfig.preset(config)
        if seed is not None:
            torch.manual_seed(seed)
        return cls(DAC(config), "random", device)

    def checkpoint(self) -> Checkpoint:
        return Checkpoint(self.config, self.model.state_dict(), self.model_id)

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """Write ``config.json`` and plain weights (``model.safetensors``) to ``folder``."""
        save_folder(self.checkpoint(), folder)

    def export_transformers(self, folder: str | os.PathLike) -> None:
        """Write a folder that ``transformers.DacModel.from_pretrained`` loads with every weight used."""
        save_transformers(self.checkpoint(), folder)

    def export_original(self, path: str | os.PathLike) -> None:
        """Write an original descript-audio-codec ``.pth`` file (weight_g / weight_v keys)."""
        save_original(self.checkpoint(), path)

    def to(self, device: str | torch.device) -> AudioTokenizer:
        self.model.to(device)
        self.device = torch.device(device)
        return self

    # -- properties ------------------------------------------------------------------------------

    @property
    def config(self) -> DACConfig:
        return self.model.config

    @property
    def sample_rate(self) -> int:
        return self.config.sample_rate

    @property
    def hop_length(self) -> int:
        return self.config.hop_length

    @property
    def frame_rate(self) -> float:
        return self.config.frame_rate

    @property
    def n_codebooks(self) -> int:
        return self.config.n_codebooks

    @property
    def codebook_size(self) -> int:
        return self.config.codebook_size

    def __repr__(self) -> str:
        c = self.config
        return (f"AudioTokenizer({self.model_id!r}, sample_rate={c.sample_rate}, n_codebooks={c.n_codebooks}, "
                f"codebook_size={c.codebook_size}, frame_rate={c.frame_rate:.2f}, device={self.device})")

    # -- encode / decode -------------------------------------------------------------------------

    def _prepare(self, audio: audio_utils.AudioInput, sample_rate: int) -> tuple[list[np.ndarray], list[int]]:
        sample_rate = audio_utils.check_sample_rate(sample_rate)
        clips = audio_utils.split_clips(audio)
        lengths = [c.shape[-1] for c in clips]
        prepared = []
        for i, clip in enumerate(clips):
            clip = audio_utils.resample(audio_utils.downmix(clip), sample_rate, self.sample_rate)
            if clip.shape[-1] == 0:
                raise ValueError(f"clip {i} is too short to resample from {sample_rate} to {self.sample_rate} Hz")
            prepared.append(clip)
        return prepared, lengths

    @torch.inference_mode()
    def encode(self, audio: audio_utils.AudioInput, sample_rate: int,
               n_quantizers: int | None = None) -> EncodedAudio:
        """Encode audio to code indices.

        Args:
            audio: ``[T]``, ``[C, T]`` or ``[B, C, T]`` tensor or array (float, or int PCM), or a list
                of ``[T]`` / ``[C, T]`` clips of different lengths. Channels are averaged to mono.
            sample_rate: rate of ``audio`` in Hz; it is resampled to :attr:`sample_rate`.
            n_quantizers: code with the first K codebooks only (default: all).

        Returns:
            :class:`EncodedAudio` with ``codes`` ``[B, K, F]``.
        """
        clips, num_samples = self._prepare(audio, sample_rate)
        frames = [-(-c.shape[-1] // self.hop_length) for c in clips]
        codes = torch.zeros(len(clips), n_quantizers or self.n_codebooks, max(frames), dtype=torch.long)
        # Items of equal length go through the model together; unequal ones one at a time so that
        # no item's codes depend on another's padding.
        by_length: dict[int, list[int]] = {}
        for i, c in enumerate(clips):
            by_length.setdefault(c.shape[-1], []).append(i)
        for idx in by_length.values():
            x = torch.from_numpy(np.stack([clips[i] for i in idx])).to(self.device)
            out = self.model.encode(x, n_quantizers).codes
            codes[idx, :, : out.shape[-1]] = out.cpu()
        return EncodedAudio(codes, torch.tensor(frames), torch.tensor(num_samples), int(sample_rate))

    def _check_codes(self, codes: torch.Tensor) -> torch.Tensor:
        if isinstance(codes, np.ndarray):
            codes = torch.from_numpy(codes)
        if not isinstance(codes, torch.Tensor):
            raise TypeError(f"decode takes EncodedAudio or a code tensor, got {type(codes).__name__}")
        if codes.dtype.is_floating_point or codes.dtype == torch.bool or codes.is_complex():
            raise ValueError(f"codes must be integers, got dtype {codes.dtype}")
        if codes.ndim == 2:
            codes = codes[None]
        if codes.ndim != 3:
            raise ValueError(f"codes must be [B, K, F] or [K, F], got shape {tuple(codes.shape)}")
        b, k, f = codes.shape
        if k < 1 or k > self.n_codebooks:
            raise ValueError(f"codes have {k} codebooks; this model has 1..{self.n_codebooks}")
        if f == 0 or b == 0:
            raise ValueError(f"codes are empty (shape {tuple(codes.shape)})")
        lo, hi = int(codes.min()), int(codes.max())
        if lo < 0 or hi >= self.codebook_size:
            raise ValueError(f"code values must be in [0, {self.codebook_size}), found range [{lo}, {hi}]")
        return codes.long()

    @torch.inference_mode()
    def decode(self, codes: EncodedAudio | torch.Tensor | np.ndarray) -> torch.Tensor:
        """Decode codes to audio at :attr:`sample_rate`.

        Args:
            codes: :class:`EncodedAudio` (items are cropped to their original duration and zero
                past it), or a code tensor ``[B, K, F]`` / ``[K, F]`` (all F frames decoded). K may
                be fewer than :attr:`n_codebooks`: the first K codebooks are used.

        Returns:
            float32 audio ``[B, 1, T]`` on the CPU.
        """
        if not isinstance(codes, EncodedAudio):
            return self.model.decode_codes(self._check_codes(codes).to(self.device)).float().cpu()
        encoded = codes
        codes = self._check_codes(encoded.codes)
        n_out = [round(int(n) * self.sample_rate / encoded.sample_rate) for n in encoded.num_samples]
        audio = torch.zeros(codes.shape[0], 1, max(n_out))
        # Decode items of equal frame count together, each on its own frames only.
        by_frames: dict[int, list[int]] = {}
        for i, f in enumerate(encoded.lengths.tolist()):
            by_frames.setdefault(f, []).append(i)
        for f, idx in by_frames.items():
            out = self.model.decode_codes(codes[idx, :, :f].to(self.device)).float().cpu()
            for j, i in enumerate(idx):
                n = min(n_out[i], out.shape[-1])
                audio[i, :, :n] = out[j, :, :n]
        return audio
