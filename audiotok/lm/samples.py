"""Samples of a prior in training, decoded to audio for TensorBoard.

:data:`PRIOR_SAMPLES` samples of at most :data:`PRIOR_SAMPLE_SECONDS` each (fewer when the backbone has
fewer positions), ``samples/<i>`` (audio), generated with the training seed (so successive validations
are comparable) and decoded with the codec the code dataset names, loaded offline. Cost:
``PRIOR_SAMPLES`` generations of up to ``PRIOR_SAMPLE_SECONDS * frame rate`` frames (one backbone step
per frame, per code for the flatten pattern, with a key-value cache) and their decoding, on the
training device (under torchrun the other ranks wait meanwhile, as they do for the validation).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from ..train.media import clip_audio
from ..utils.untrusted import shown
from .sampling import generate, max_frames_for

if TYPE_CHECKING:
    from .prior import CodePrior

#: Generated samples a prior run logs per validation, and their longest duration (seconds).
PRIOR_SAMPLES = 2
PRIOR_SAMPLE_SECONDS = 4.0


class PriorSamples:
    """Samples of a prior in training, decoded to audio for TensorBoard (``samples/<i>``).

    The codec is the one the prior's codes came from (``prior.codec.model_id``), loaded offline (a
    folder, the bundled model, or a hub model in the local cache) on first use; when it cannot be
    loaded, or is not the codec of the prior's codes, a warning says so once and no audio is written.
    A failure while sampling or decoding is a warning too, after which no more samples are written:
    samples never stop training. Text-conditioned priors are given the texts of the first records of
    ``texts`` (the validation records), one per sample.
    """

    def __init__(self, prior: CodePrior, seed: int, device: torch.device, texts: Sequence[str] = (),
                 n: int = PRIOR_SAMPLES, seconds: float = PRIOR_SAMPLE_SECONDS,
                 log: logging.Logger | None = None):
        self.prior, self.seed, self.device, self.n = prior, seed, device, n
        self.texts = list(texts)
        self.max_frames = max(1, round(seconds * prior.codec_config.frame_rate))
        self.log = log or logging.getLogger("audiotok.lm")
        self.codec: Any = None
        self.off = n < 1

    def _load_codec(self) -> Any:
        from ..tokenizer import AudioTokenizer

        model_id = self.prior.codec.model_id
        try:
            codec = AudioTokenizer.from_pretrained(model_id, device=self.device, local_files_only=True)
            self.prior.check_codec(codec)
        except Exception as e:  # any reason: samples are optional
            self.off = True
            self.log.warning("no audio samples in TensorBoard: the codec %r does not load offline or is not "
                             "the codec of these codes (%s)", shown(model_id), shown(e))
            return None
        return codec

    def write(self, writer: Any, step: int) -> None:
        """Generate, decode and write the samples of ``step`` (the prior is put in eval mode meanwhile)."""
        if self.off:
            return
        if self.codec is None:
            self.codec = self._load_codec()
            if self.codec is None:
                return
        training = self.prior.training
        self.prior.eval()
        try:
            frames = min(self.max_frames, max_frames_for(self.prior) or self.max_frames)
            for i in range(self.n):
                text = self.texts[i] if self.prior.text is not None and i < len(self.texts) else None
                codes = generate(self.prior, 1, text=text, max_frames=max(frames, 1), seed=self.seed + i).codes[0]
                audio = self.codec.decode(codes)  # [1, 1, T]
                writer.add_audio(f"samples/{i}", clip_audio(audio, self.codec.sample_rate), step,
                                 sample_rate=self.codec.sample_rate)
        except Exception as e:
            self.off = True
            self.log.warning("sampling for TensorBoard failed at step %d, no more samples this run: %s", step,
                             shown(e))
        finally:
            self.prior.train(training)
