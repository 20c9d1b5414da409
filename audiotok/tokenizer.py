"""``AudioTokenizer``: audio in, code indices out, and back."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import audio as audio_utils
from .codes import check_n_quantizers, is_integer_dtype
from .identity import CodecIdentity
from .nn.config import DACConfig
from .nn.layers import use_channels_last, use_fused_snake, warn_if_cpu_bf16_is_slow
from .nn.model import DAC
from .segments import Batch, ShapeGrid, make_batches, plan_segments
from .utils.distributed import DistEnv
from .utils.prefetch import prefetch
from .utils.untrusted import shown
from .weights.checkpoint import (
    Checkpoint,
    build_model,
    codes_fingerprint,
    load_checkpoint,
    save_folder,
    save_original,
    save_transformers,
)
from .weights.hub import names_bundled_model, resolve

logger = logging.getLogger("audiotok")

#: How a decoder decodes codes of other weights anyway (ends the message of :meth:`AudioTokenizer.check_codec`).
ALLOW_OTHER_WEIGHTS = "allow_other_weights=True, --allow-other-weights, decodes anyway"
#: Names of the dtypes ``from_pretrained`` runs in (command lines and configs).
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
#: The environment variable that silences models' notices (the bundled model's early-checkpoint notice) when
#: set to 1 (or true, yes, on), in this process and the processes it starts.
NOTICE_ENV = "AUDIOTOK_NO_NOTICE"
_notices_shown: set[tuple[str, str]] = set()


def _one_thread_in_forked_child() -> None:
    """torch's CPU kernels run on a GNU OpenMP thread team, which the parent creates the first time it
    runs a parallel kernel (loading a model folds weights; encoding runs convolutions). A forked child
    does not inherit those threads, and its first parallel kernel waits for them forever:
    ``datasets.Dataset.map(num_proc=N)``, ``multiprocessing`` with fork and a bare ``os.fork()`` hang.
    With one thread the child's kernels never use the team (torch's DataLoader workers do the same)."""
    torch.set_num_threads(1)


os.register_at_fork(after_in_child=_one_thread_in_forked_child)


@dataclass
class EncodedAudio:
    """Codes for a batch of clips.

    Attributes:
        codes: ``[B, K, F]`` int64 code indices (``[B, C, K, F]`` when channels were coded one by
            one); frames past ``lengths[b]`` are padding (zeros).
        lengths: ``[B]`` valid frames per item.
        num_samples: ``[B]`` samples per item in the input, at ``sample_rate``.
        sample_rate: rate of the audio that was encoded (before resampling to the model rate).
        codec: the model that wrote the codes (``None`` when unknown): :meth:`AudioTokenizer.decode`
            refuses codes of another model.
        channels: ``[B]`` channel count of each input clip before any downmix (``None`` when unknown).
    """

    codes: torch.Tensor
    lengths: torch.Tensor
    num_samples: torch.Tensor
    sample_rate: int
    codec: CodecIdentity | None = None
    channels: torch.Tensor | None = None

    def to(self, device: str | torch.device) -> EncodedAudio:
        return dataclasses.replace(self, codes=self.codes.to(device))

    def unbatch(self) -> list[torch.Tensor]:
        """Each item's codes without padding: ``[K, F_b]`` (``[C, K, F_b]`` when coded per channel)."""
        return [codes[..., :n] for codes, n in zip(self.codes, self.lengths.tolist())]


@dataclass
class EncodePlan:
    """What :meth:`AudioTokenizer.encode` does before the model runs (:meth:`AudioTokenizer.plan_encode`).

    Attributes:
        items: the clips (one per coded channel) at the model rate, ``[T]`` float32 each.
        batches: the forward passes: segments of ``items`` and their padded length
            (:meth:`AudioTokenizer.plan_batches`).
        frames: code frames per item.
        num_samples, sample_rate: of the input clips, as :class:`EncodedAudio` has them.
        n_quantizers: codebooks coded.
        mono: channels averaged (codes ``[B, K, F]``), else coded one by one (``[B, C, K, F]``).
        input_channels: each input clip's channel count before any downmix (all equal unless ``mono``).
        inputs: the passes' padded inputs made ahead (:meth:`AudioTokenizer.padded_inputs`), or ``None``.
    """

    items: list[np.ndarray]
    batches: list[Batch]
    frames: list[int]
    num_samples: list[int]
    sample_rate: int
    n_quantizers: int
    mono: bool
    input_channels: list[int]
    inputs: list[tuple[torch.Tensor, list[int]]] | None = None

    @property
    def channels(self) -> int:
        """Coded channels per clip: 1 when ``mono``, else the clips' channel count."""
        return 1 if self.mono else self.input_channels[0]


class AudioTokenizer:
    """Encode audio to DAC code indices and decode them back, for inference.

    Weight norm is folded, the model is in eval mode and all work runs under ``torch.inference_mode``.
    ``codes_fingerprint`` identifies the weights the tokenizer was made with (see
    :func:`~audiotok.weights.checkpoint.codes_fingerprint`); it is recorded with every encoding and checked on
    decoding, where the fingerprints of ``decodes_codes_of`` pass too: the weights a model stored in
    fp16 or bf16 was rounded from, whose codes it decodes as they were meant (:meth:`check_codec`).

    ``buckets``: pad forward passes to a few fixed shapes (:meth:`plan_batches`); ``None`` (the
    default): the device's default, :data:`DEFAULT_BUCKETS`. Codes are the same either way.
    """

    def __init__(self, model: DAC, model_id: str = "dac", device: str | torch.device | None = None,
                 dtype: torch.dtype = torch.float32, compile: bool = False, decoder_dtype: torch.dtype | None = None):
        if not model.is_folded:
            model.fold_weight_norm()
        use_fused_snake(model, compile)
        self.model = model.eval()
        self.model_id = model_id
        self.notice: str | None = None  # shown on loading, saved with the model
        self.card: str | None = None  # the model card (README.md), saved with the model
        self.decodes_codes_of: tuple[str, ...] = ()  # other weights' fingerprints whose codes it decodes
        self.codes_fingerprint = codes_fingerprint(model.state_dict())  # before any cast to half precision
        self.dtype = dtype
        self.decoder_dtype = decoder_dtype
        self.device = torch.device(device or "cpu")
        self.buckets: bool | None = None
        self.to()

    # -- construction and saving -------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, source: str | os.PathLike | None = None, device: str | torch.device | None = None,
                        dtype: torch.dtype = torch.float32, compile: bool = False,
                        decoder_dtype: torch.dtype | None = None, *, revision: str | None = None,
                        cache_dir: str | os.PathLike | None = None, token: str | bool | None = None,
                        local_files_only: bool = False, force_download: bool = False) -> AudioTokenizer:
        """Load a model for inference.

        Args:
            source: ``None`` or ``"default"`` for the model that ships with the package; an audiotok
                folder; a transformers DAC folder; an original descript ``.pth`` file; or a Hugging
                Face hub id (e.g. ``descript/dac_44khz``, alias ``dac_44khz`` or ``44khz``), taken from
                the local cache when present. Weights stored in fp16 or bf16 (the bundled model's are
                fp16) are upcast to float32 on loading, then cast to ``dtype``.
            device: where the model runs (default CPU).
            dtype: weights and activations; ``torch.bfloat16`` / ``torch.float16`` trade exactness for
                speed (code lookups, the decoder's last block and its output layer always run in
                fp32: half precision there adds an audible noise floor).
            compile: fuse every Snake activation into one kernel with ``torch.compile``, writing
                into the same spent buffers as eager mode (on CPU, 1.5 to 1.8x the speed of
                ``transformers.DacModel`` for encoding and 1.7 to 2.0x for decoding; needs a C++
                compiler, or Triton on CUDA; seconds to compile once per process). Results differ from
                eager mode in the last float bits.
            decoder_dtype: the decoder's dtype when it should differ from ``dtype``: codes depend on
                the encoder only, so ``dtype=float32, decoder_dtype=bfloat16`` keeps exact codes and
                decodes about 1.6x faster on CPUs with bf16 units.
            revision, cache_dir, token, local_files_only, force_download: for hub ids, passed to
                ``huggingface_hub.snapshot_download`` (ignored for the bundled model and local paths).

        A model's notice (e.g. that it is an early checkpoint) is logged when it first encodes
        (:meth:`show_notice`), not on loading.
        """
        hub_arguments = dict(revision=revision, cache_dir=cache_dir, token=token,
                             local_files_only=local_files_only, force_download=force_download)
        checkpoint = load_checkpoint(resolve(source, **hub_arguments))
        if not names_bundled_model(source) and not Path(str(source)).expanduser().exists():
            checkpoint.model_id = str(source)
        tokenizer = cls(build_model(checkpoint, folded=True), checkpoint.model_id, device, dtype, compile,
                        decoder_dtype)
        tokenizer.notice, tokenizer.card = checkpoint.notice, checkpoint.card
        tokenizer.decodes_codes_of = checkpoint.decodes_codes_of
        return tokenizer

    @classmethod
    def from_config(cls, config: DACConfig | str, device: str | torch.device | None = None,
                    seed: int | None = None) -> AudioTokenizer:
        """A randomly initialised model of a config or preset name (for tests and experiments)."""
        if isinstance(config, str):
            config = DACConfig.preset(config)
        if seed is not None:
            torch.manual_seed(seed)
        return cls(DAC(config), "random", device)

    def checkpoint(self, model_id: str | None = None) -> Checkpoint:
        """The model as a :class:`Checkpoint` (with its notice, model card and the fingerprints whose
        codes it decodes: :attr:`decodes_codes_of` and its own, which a copy stored at a lower precision
        than it runs in keeps decoding), named ``model_id`` (default: :attr:`model_id`)."""
        return Checkpoint(self.config, self.model.state_dict(), model_id or self.model_id, self.notice, self.card,
                          tuple(dict.fromkeys((*self.decodes_codes_of, self.codes_fingerprint))))

    def save_pretrained(self, folder: str | os.PathLike, model_id: str | None = None,
                        dtype: torch.dtype | str | None = None) -> None:
        """Write ``config.json`` (model id, architecture, notice), plain weights (``model.safetensors``)
        and the model card (``README.md``, when the model has one) to ``folder``. ``model_id``: the
        name code files written with the saved model record (default: this model's). ``dtype``: store
        the weights in ``torch.float16`` / ``"fp16"`` (half the size) or bf16 (default: as the model
        holds them); loading upcasts them. A copy whose rounded weights write other codes records this
        model's fingerprint in ``decodes_codes_of`` and decodes its codes (see
        :func:`~audiotok.weights.checkpoint.cast_weights`)."""
        save_folder(self.checkpoint(model_id), folder, dtype)

    def export_transformers(self, folder: str | os.PathLike, model_id: str | None = None,
                            dtype: torch.dtype | str | None = None) -> None:
        """Write a folder that ``transformers.DacModel.from_pretrained`` loads with every weight used
        (weights in ``dtype``, as in :meth:`save_pretrained`)."""
        save_transformers(self.checkpoint(model_id), folder, dtype)

    def export_original(self, path: str | os.PathLike, model_id: str | None = None,
                        dtype: torch.dtype | str | None = None) -> None:
        """Write an original descript-audio-codec ``.pth`` file (weight_g / weight_v keys; weights in
        ``dtype``, as in :meth:`save_pretrained`)."""
        save_original(self.checkpoint(model_id), path, dtype)

    def push_to_hub(self, repo_id: str, *, private: bool | None = None, token: str | bool | None = None,
                    revision: str | None = None, commit_message: str | None = None,
                    model_id: str | None = None, dtype: torch.dtype | str | None = None) -> str:
        """Upload the :meth:`save_pretrained` folder to the Hugging Face hub repository ``repo_id``
        (created if missing) and return the commit URL. The saved ``model_id`` is ``repo_id`` unless
        given: ``from_pretrained(repo_id)`` names the model by the id it was loaded from. ``dtype``:
        as in :meth:`save_pretrained` (``torch.float16`` halves the upload)."""
        from huggingface_hub import HfApi

        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True)
        with tempfile.TemporaryDirectory() as folder:
            self.save_pretrained(folder, model_id=model_id or repo_id, dtype=dtype)
            commit = api.upload_folder(repo_id=repo_id, folder_path=folder, revision=revision,
                                       commit_message=commit_message or f"Upload {model_id or repo_id} with audiotok")
        return str(commit.commit_url)

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None,
           decoder_dtype: torch.dtype | None = None) -> AudioTokenizer:
        """Move the model to ``device`` and/or cast it to ``dtype`` (the decoder to ``decoder_dtype``
        if given, else to ``dtype``), in place. On CPU the decoder runs channels-last (faster there,
        see :func:`~audiotok.nn.layers.use_channels_last`)."""
        if dtype is not None:
            self.dtype, self.decoder_dtype = dtype, decoder_dtype
        elif decoder_dtype is not None:
            self.decoder_dtype = decoder_dtype
        if device is not None:
            self.device = torch.device(device)
        if self.device.type == "cpu" and torch.bfloat16 in (self.dtype, self.decoder_dtype):
            warn_if_cpu_bf16_is_slow("AudioTokenizer", "use dtype=torch.float32 on this machine")
        self.model.to(self.device, self.dtype)
        self.model.decoder.to(dtype=self.decoder_dtype or self.dtype)
        use_channels_last(self.model.decoder, self.device.type == "cpu")
        for module in self.model.decoder.float32_tail():  # half precision there adds a noise floor
            module.float()
        return self

    def show_notice(self) -> None:
        """Log the model's notice (e.g. that it is an early checkpoint), if it has one, as one warning of the
        ``audiotok`` logger: once per process, in the main process of a torchrun job only, and not when
        the environment variable ``AUDIOTOK_NO_NOTICE`` is 1. :meth:`encode` calls it."""
        silenced = os.environ.get(NOTICE_ENV, "").strip().lower() in ("1", "true", "yes", "on")
        if not self.notice or silenced or not DistEnv.from_environ().is_main:
            return
        if (self.model_id, self.notice) not in _notices_shown:
            _notices_shown.add((self.model_id, self.notice))
            logger.warning("%s: %s", shown(self.model_id), shown(self.notice))

    # -- properties ------------------------------------------------------------------------------

    @property
    def config(self) -> DACConfig:
        return self.model.config

    @property
    def identity(self) -> CodecIdentity:
        """This model as the writer of codes: :attr:`model_id`, its architecture hash and :attr:`codes_fingerprint`."""
        return CodecIdentity.of(self.model_id, self.config, self.codes_fingerprint)

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

    def resolve_seconds(self, chunk_seconds: float | None = None,
                        batch_seconds: float | None = None) -> tuple[float, float]:
        """``(chunk_seconds, batch_seconds)`` per forward pass with this device's defaults filled in
        (:data:`DEFAULT_SECONDS`; the batch is never below the chunk); ``ValueError`` unless positive."""
        default_chunk, default_batch = DEFAULT_SECONDS.get(self.device.type, DEFAULT_SECONDS["cpu"])
        chunk_seconds = default_chunk if chunk_seconds is None else chunk_seconds
        batch_seconds = max(chunk_seconds, default_batch) if batch_seconds is None else batch_seconds
        for value in (chunk_seconds, batch_seconds):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or value <= 0:
                raise ValueError(f"chunk_seconds and batch_seconds must be positive numbers (inf: no limit), got "
                                 f"{chunk_seconds!r}, {batch_seconds!r}")
        return chunk_seconds, batch_seconds

    def frame_budgets(self, chunk_seconds: float | None = None,
                      batch_seconds: float | None = None) -> tuple[int | None, int]:
        """:meth:`resolve_seconds` in frames: ``(chunk, batch)``, ``chunk`` ``None`` for no chunking
        (``chunk_seconds=inf``); what :func:`audiotok.segments.plan_segments` and
        :func:`~audiotok.segments.make_batches` take."""
        chunk_seconds, batch_seconds = self.resolve_seconds(chunk_seconds, batch_seconds)
        chunk = None if chunk_seconds == float("inf") else max(1, round(chunk_seconds * self.frame_rate))
        batch = max(1, round(min(batch_seconds, 1e9) * self.frame_rate))
        return chunk, batch

    @property
    def bucketed(self) -> bool:
        """Whether forward passes are padded to fixed shapes: :attr:`buckets`, else the device's default."""
        return DEFAULT_BUCKETS.get(self.device.type, False) if self.buckets is None else self.buckets

    def plan_batches(self, frames: list[int], stack: str, chunk_seconds: float | None = None,
                     batch_seconds: float | None = None, chunked: bool = True) -> list[Batch]:
        """The forward passes of items of ``frames[i]`` frames through ``stack`` (``"encoder"`` or
        ``"decoder"``) under :meth:`frame_budgets`: cut into chunks with the stack's context
        (:func:`~audiotok.segments.plan_segments`; whole items unless ``chunked``) and grouped
        (:func:`~audiotok.segments.make_batches`). When :attr:`bucketed`, passes are padded on a
        :class:`~audiotok.segments.ShapeGrid` topped by the longest chunk with its context: a job sees
        a few dozen input shapes whatever its lengths (cuDNN autotunes, and compiled kernels
        specialize, once per shape) for about 5% more frames computed."""
        chunk, max_frames = self.frame_budgets(chunk_seconds, batch_seconds)
        context = self.model.context_frames[stack]
        grid = ShapeGrid(None if chunk is None else chunk + sum(context)) if self.bucketed else None
        return make_batches(plan_segments(frames, chunk if chunked else None, context), max_frames, grid)

    @contextlib.contextmanager
    def autotuning(self) -> Iterator[None]:
        """cuDNN autotuning (``torch.backends.cudnn.benchmark``) on inside the block when the model is
        on CUDA and its passes are :attr:`bucketed` (few shapes, each timed once), the previous setting
        restored after; what a bulk job runs under."""
        previous = torch.backends.cudnn.benchmark
        if self.device.type == "cuda" and self.bucketed:
            torch.backends.cudnn.benchmark = True
        try:
            yield
        finally:
            torch.backends.cudnn.benchmark = previous

    def num_frames(self, num_samples: int) -> int:
        """Code frames of ``num_samples`` samples at :attr:`sample_rate`: ``ceil(num_samples / hop_length)``."""
        return -(-num_samples // self.hop_length)

    def decoded_samples(self, num_samples: int, sample_rate: int, frames: int) -> int:
        """Samples (at :attr:`sample_rate`) that decoding ``frames`` code frames of a clip of ``num_samples``
        samples at ``sample_rate`` gives: the clip's duration, at most what the frames hold."""
        return min(round(num_samples * self.sample_rate / sample_rate), frames * self.hop_length)

    def prepare_audio(self, clip: np.ndarray, sample_rate: int, mono: bool = True,
                      name: str = "the clip") -> np.ndarray:
        """One ``[C, T]`` float32 clip as :meth:`encode` codes it: downmixed to ``[1, T]`` when ``mono``,
        resampled to :attr:`sample_rate` (:func:`audiotok.audio.to_model_rate`); ``ValueError`` naming
        it (``name``) when no samples are left."""
        out = audio_utils.to_model_rate(clip, sample_rate, self.sample_rate, mono)
        if out.shape[-1] == 0:
            raise ValueError(f"{name} is too short to resample from {sample_rate} to {self.sample_rate} Hz")
        return out

    def _prepare(self, audio: audio_utils.AudioInput, sample_rate: int | list[int],
                 mono: bool) -> tuple[list[np.ndarray], list[int], int, list[int]]:
        """-> (items ``[T]`` at the model rate, sample counts, the rate they count at, each clip's channels).

        ``sample_rate``: one rate, or one per clip; clips of mixed rates are counted at the model rate."""
        clips = audio_utils.split_clips(audio)
        rates = sample_rate if isinstance(sample_rate, list) else [sample_rate] * len(clips)
        channels = [c.shape[0] for c in clips]
        if not mono and len(set(channels)) > 1:
            raise ValueError(f"with mono=False every clip needs the same channel count, got {sorted(set(channels))}")
        items: list[np.ndarray] = []
        resampled: list[int] = []
        for i, (clip, rate) in enumerate(zip(clips, rates)):
            clip = self.prepare_audio(clip, rate, mono, name=f"clip {i}")
            items.extend(clip)
            resampled.append(clip.shape[-1])
        if len(set(rates)) == 1:
            return items, [c.shape[-1] for c in clips], rates[0], channels
        return items, resampled, self.sample_rate, channels

    @torch.inference_mode()
    def encode(self, audio: audio_utils.AudioInput, sample_rate: int | None = None, n_quantizers: int | None = None,
               *, sampling_rate: int | None = None, mono: bool = True, chunk_seconds: float | None = None,
               batch_seconds: float | None = None, progress: bool = False) -> EncodedAudio:
        """Encode audio to code indices.

        Clips of different lengths are batched with padding that never reaches any clip's codes, and
        long clips are encoded in chunks with enough context that their codes equal whole-clip
        encoding; in fp32 the codes are the same whatever the batch or chunk sizes.

        Args:
            audio: ``[T]``, ``[C, T]`` or ``[B, C, T]`` tensor or array (float, or int PCM), or a list
                of ``[T]`` / ``[C, T]`` clips of different lengths (tensors, arrays or lists of
                floats), or what ``datasets`` gives for an Audio column: a record
                ``{"array", "sampling_rate"}`` (or ``{"bytes", "path"}`` with ``Audio(decode=False)``)
                or a list of them (a batch of ``Dataset.map(batched=True)``), or the path of an audio
                file (``str`` or ``os.PathLike``; any format :func:`~audiotok.audio.load_audio` reads) or
                a list of paths. A path that is not a readable audio file raises ``FileNotFoundError``
                or ``ValueError`` naming it.
            sample_rate: rate of ``audio`` in Hz (``sampling_rate=`` as feature extractors name it;
                records and files carry their own); it is resampled to :attr:`sample_rate`. Records
                and files of different rates are each resampled, and counted at the model rate in the
                result.
            n_quantizers: code with the first K codebooks only (default: all).
            mono: average channels (default); ``False`` codes each channel on its own.
            chunk_seconds: longest stretch of audio per forward pass (default per device; ``inf``
                for none). Bounds peak memory; does not change the codes.
            batch_seconds: most audio (padding included) per forward pass (default per device).
            progress: show a progress bar over the forward passes (seconds of audio).

        Returns:
            :class:`EncodedAudio` with ``codes`` ``[B, K, F]`` (``[B, C, K, F]`` with ``mono=False``).

        The first encoding of a model with a notice logs it, once the input is read (:meth:`show_notice`).
        """
        if sample_rate is not None and sampling_rate is not None and sample_rate != sampling_rate:
            raise ValueError(f"sample_rate={sample_rate} and sampling_rate={sampling_rate} differ; give one")
        plan = self.plan_encode(audio, sampling_rate if sample_rate is None else sample_rate, n_quantizers,
                                mono=mono, chunk_seconds=chunk_seconds, batch_seconds=batch_seconds)
        return self.run_plan(plan, progress)

    def plan_encode(self, audio: audio_utils.AudioInput, sample_rate: int | None = None,
                    n_quantizers: int | None = None, *, mono: bool = True, chunk_seconds: float | None = None,
                    batch_seconds: float | None = None, pad: bool = False) -> EncodePlan:
        """The host side of :meth:`encode` (same arguments): the clips read and resampled to the model
        rate, cut and grouped into forward passes. :meth:`run_plan` runs them. With ``pad`` the passes'
        padded inputs are made now too (what a caller preparing its next plan while the model runs
        the current one wants); else :meth:`run_plan` makes them, one pass ahead of the model."""
        n_quantizers = check_n_quantizers(n_quantizers, self.n_codebooks)
        audio, rates = audio_utils.unpack_records(audio, sample_rate)
        items, num_samples, rate, channels = self._prepare(audio, rates, mono)
        frames = [self.num_frames(len(x)) for x in items]
        batches = self.plan_batches(frames, "encoder", chunk_seconds, batch_seconds)
        plan = EncodePlan(items, batches, frames, num_samples, rate, n_quantizers, mono, channels)
        if pad:
            plan.inputs = list(self.padded_inputs(plan))
        return plan

    def padded_inputs(self, plan: EncodePlan) -> Iterator[tuple[torch.Tensor, list[int]]]:
        """Each forward pass of ``plan``: its input ``[B, 1, T]`` float32, zero-padded to the pass's
        ``T = frames * hop_length`` (in pinned memory when the model is on CUDA, so the copy to the
        device does not block), and each row's length in samples."""
        hop, pin = self.hop_length, self.device.type == "cuda"
        for batch in plan.batches:
            lengths = [min(len(plan.items[s.item]), s.stop * hop) - s.start * hop for s in batch.segments]
            x = torch.zeros(len(batch.segments), 1, batch.frames * hop, pin_memory=pin)
            for j, (s, n) in enumerate(zip(batch.segments, lengths)):
                x[j, 0, :n] = torch.from_numpy(plan.items[s.item][s.start * hop: s.start * hop + n])
            yield x, lengths

    @torch.inference_mode()
    def run_plan(self, plan: EncodePlan, progress: bool = False) -> EncodedAudio:
        """Run the forward passes of ``plan`` (:meth:`plan_encode`): what :meth:`encode` returns. The
        next pass's input is padded in a background thread while the model runs the current one."""
        codes = torch.zeros(len(plan.items), plan.n_quantizers, max(plan.frames), dtype=torch.long)
        self.show_notice()
        inputs = prefetch(self.padded_inputs(plan)) if plan.inputs is None else (x for x in plan.inputs)
        with contextlib.closing(inputs):
            for batch, (x, lengths) in zip(_progress(plan.batches, progress, "encoding", self.frame_rate), inputs):
                padded = any(n != x.shape[-1] for n in lengths)
                x = x.to(self.device, non_blocking=True).to(self.dtype)
                q = self.model.encode(x, plan.n_quantizers, lengths if padded else None)
                if not torch.isfinite(q.latents).all():
                    raise ValueError("the encoder produced non-finite latents (NaN or Inf): the audio is far outside "
                                     "[-1, 1] or the model's weights are broken")
                out = q.codes.cpu()
                for j, s in enumerate(batch.segments):
                    codes[s.item, :, s.keep_start:s.keep_stop] = out[j, :, s.keep_start - s.start:s.keep_stop - s.start]
        if not plan.mono:
            codes = codes.reshape(len(plan.num_samples), plan.channels, *codes.shape[1:])
        return EncodedAudio(codes, torch.tensor(plan.frames[::plan.channels]), torch.tensor(plan.num_samples),
                            plan.sample_rate, self.identity, torch.tensor(plan.input_channels))

    def encode_each(self, clips: list[np.ndarray], n_quantizers: int | None = None, *,
                    chunk_seconds: float | None = None,
                    batch_seconds: float | None = None) -> list[torch.Tensor | Exception]:
        """Codes ``[K, F]`` of each clip (``[T]`` float32 at :attr:`sample_rate`), or what encoding it raised.

        Whole clips are grouped by the batch planner (:meth:`plan_batches`, unchunked: a group of clips
        no longer than a chunk is one forward pass) and each group is encoded as :meth:`encode` runs it
        (exact padded and chunked encoding), the next group planned and padded in a background thread
        while the model runs the current one. A group that fails (out of memory, odd inputs) is
        retried clip by clip."""
        results: dict[int, torch.Tensor | Exception] = {}
        frames = [self.num_frames(len(c)) for c in clips]
        batches = self.plan_batches(frames, "encoder", chunk_seconds, batch_seconds, chunked=False)
        groups = [[s.item for s in batch.segments] for batch in batches]

        def plan(group: list[int]) -> EncodePlan:
            return self.plan_encode([clips[j] for j in group], self.sample_rate, n_quantizers,
                                    chunk_seconds=chunk_seconds, batch_seconds=batch_seconds, pad=True)

        def planned() -> Iterator[tuple[list[int], EncodePlan | Exception]]:
            for group in groups:
                try:
                    yield group, plan(group)
                except Exception as e:  # noqa: BLE001 - the group's failure, handled where it is run
                    yield group, e

        def run(group: list[int], ready: EncodePlan | Exception) -> None:
            if isinstance(ready, Exception):
                raise ready
            enc = self.run_plan(ready)
            for b, j in enumerate(group):
                results[j] = enc.codes[b, :, : int(enc.lengths[b])]

        with contextlib.closing(prefetch(planned())) as ahead:
            for group, ready in ahead:
                try:
                    run(group, ready)
                    continue
                except Exception as e:  # noqa: BLE001 - retried clip by clip below
                    if isinstance(e, torch.cuda.OutOfMemoryError):
                        torch.cuda.empty_cache()
                    if len(group) == 1:
                        results[group[0]] = e
                        continue
                for j in group:
                    try:
                        run([j], plan([j]))
                    except Exception as e:  # noqa: BLE001
                        results[j] = e
        return [results[j] for j in range(len(clips))]

    def check_codec(self, codec: CodecIdentity | None, holds: str, allow_other_weights: bool = False,
                    override: str = "") -> None:
        """Raise :class:`~audiotok.identity.CodecMismatch` unless codes that ``codec`` wrote mean to this
        model what they meant to their writer (:meth:`CodecIdentity.check_codes_of
        <audiotok.identity.CodecIdentity.check_codes_of>`): the same architecture and, unless
        ``allow_other_weights``, this model's encoder and quantizer weights or weights it was rounded
        from (:attr:`decodes_codes_of`). ``holds`` and ``override`` word the message."""
        self.identity.check_codes_of(codec, holds, reads=self.decodes_codes_of, weights=not allow_other_weights,
                                     override=override)

    def check_encoded(self, encoded: EncodedAudio, allow_other_weights: bool = False) -> None:
        """Raise ``ValueError`` unless ``encoded`` is well formed and was written by this model: the same
        architecture, and the same encoder and quantizer weights (or weights it was rounded from, see
        :meth:`check_codec`) unless ``allow_other_weights``."""
        if not isinstance(encoded.codes, torch.Tensor) or encoded.codes.ndim not in (3, 4):
            raise ValueError("EncodedAudio.codes must be a [B, K, F] or [B, C, K, F] tensor")
        batch, frames = encoded.codes.shape[0], encoded.codes.shape[-1]
        for name in ("lengths", "num_samples"):
            value = getattr(encoded, name)
            if (not isinstance(value, torch.Tensor) or value.shape != (batch,) or value.dtype.is_floating_point
                    or value.dtype == torch.bool):
                raise ValueError(f"EncodedAudio.{name} must be an integer tensor [B] with B = {batch}")
            if batch and int(value.min()) < 1:
                raise ValueError(f"EncodedAudio.{name} must be positive, got {value.tolist()}")
        if batch and int(encoded.lengths.max()) > frames:
            raise ValueError(f"EncodedAudio.lengths {encoded.lengths.tolist()} exceed the {frames} frames of its codes")
        audio_utils.check_sample_rate(encoded.sample_rate)
        self.check_codec(encoded.codec, "EncodedAudio holds", allow_other_weights, ALLOW_OTHER_WEIGHTS)

    def _check_codes(self, codes: torch.Tensor | np.ndarray) -> torch.Tensor:
        if isinstance(codes, np.ndarray):
            codes = torch.from_numpy(codes)
        if not isinstance(codes, torch.Tensor):
            raise TypeError(f"decode takes EncodedAudio or a code tensor, got {type(codes).__name__}")
        if not is_integer_dtype(codes.dtype):
            raise ValueError(f"codes must be integers, got dtype {codes.dtype}")
        if codes.ndim == 2:
            codes = codes[None]
        if codes.ndim not in (3, 4):
            raise ValueError(f"codes must be [K, F], [B, K, F] or [B, C, K, F], got shape {tuple(codes.shape)}")
        k, f = codes.shape[-2:]
        if k < 1 or k > self.n_codebooks:
            raise ValueError(f"codes have {k} codebooks; this model has 1..{self.n_codebooks}")
        if codes.numel() == 0:
            raise ValueError(f"codes are empty (shape {tuple(codes.shape)})")
        lo, hi = int(codes.min()), int(codes.max())
        if lo < 0 or hi >= self.codebook_size:
            raise ValueError(f"code values must be in [0, {self.codebook_size}), found range [{lo}, {hi}]")
        return codes.long()

    @torch.inference_mode()
    def decode(self, codes: EncodedAudio | torch.Tensor | np.ndarray, *, chunk_seconds: float | None = None,
               batch_seconds: float | None = None, progress: bool = False,
               allow_other_weights: bool = False) -> torch.Tensor:
        """Decode codes to audio at :attr:`sample_rate`.

        Args:
            codes: :class:`EncodedAudio` (each item cropped to its original duration, zero past it),
                or a code tensor ``[K, F]``, ``[B, K, F]`` or ``[B, C, K, F]`` (all F frames decoded).
                K may be fewer than :attr:`n_codebooks`: the first K codebooks are used.
            chunk_seconds, batch_seconds: as in :meth:`encode`; long code sequences are decoded in
                chunks with context, and passes padded as :meth:`encode` pads them (:meth:`plan_batches`),
                equal to whole decoding within float rounding.
            progress: show a progress bar over the forward passes (seconds of audio).
            allow_other_weights: decode an :class:`EncodedAudio` written by a model with the same
                architecture but other weights (refused by default, see :meth:`check_encoded`).

        Returns:
            float32 audio ``[B, C, T]`` on the CPU (C = 1 unless coded per channel).
        """
        encoded: EncodedAudio | None = None
        raw: torch.Tensor | np.ndarray
        if isinstance(codes, EncodedAudio):
            self.check_encoded(codes, allow_other_weights)
            encoded, raw = codes, codes.codes
        else:
            raw = codes
        checked = self._check_codes(raw)
        batch, channels = checked.shape[0], checked.shape[1] if checked.ndim == 4 else 1
        codes = checked.reshape(batch * channels, *checked.shape[-2:])
        hop = self.hop_length
        if encoded is None:
            frames = [codes.shape[-1]] * codes.shape[0]
            n_out = [f * hop for f in frames]
        else:
            frames = [int(f) for f in encoded.lengths for _ in range(channels)]
            n_out = [self.decoded_samples(int(n), encoded.sample_rate, int(f))
                     for n, f in zip(encoded.num_samples, encoded.lengths) for _ in range(channels)]
        audio = torch.zeros(len(frames), max(n_out))
        batches = self.plan_batches(frames, "decoder", chunk_seconds, batch_seconds)
        for group in _progress(batches, progress, "decoding", self.frame_rate):
            x = torch.zeros(len(group.segments), codes.shape[1], group.frames, dtype=torch.long)
            for j, s in enumerate(group.segments):
                x[j, :, : s.size] = codes[s.item, :, s.start:s.stop]
            lengths = [s.size for s in group.segments]
            out = self.model.decode_codes(x.to(self.device), None if min(lengths) == group.frames else lengths)
            out = out[:, 0].float().cpu()
            if not torch.isfinite(out).all():
                raise ValueError(f"the decoder of {self.model_id!r} produced non-finite audio (NaN or Inf): its "
                                 f"weights are broken")
            for j, s in enumerate(group.segments):
                a, b = s.keep_start * hop, min(s.keep_stop * hop, n_out[s.item])
                if b > a:
                    audio[s.item, a:b] = out[j, a - s.start * hop: b - s.start * hop]
        return audio.reshape(batch, channels, -1)

    @property
    def stream_latency_frames(self) -> int:
        """Frames :meth:`decode_stream` waits for after a frame before it can give that frame's audio:
        the decoder's right context (10 frames for every published rate structure)."""
        return self.model.context_frames["decoder"][1]

    @property
    def stream_latency_ms(self) -> float:
        """:attr:`stream_latency_frames` in milliseconds of audio (133.3 ms for the 24 kHz default
        model, 116.1 ms at 44.1 kHz), not counting compute time."""
        return 1000.0 * self.stream_latency_frames / self.frame_rate

    @torch.inference_mode()
    def decode_stream(self, frames: Iterable[torch.Tensor | np.ndarray],
                      chunk_frames: int = 1) -> Iterator[torch.Tensor]:
        """Decode code frames as they arrive (e.g. from a language model), giving audio as soon as the
        decoder's right context is there.

        The audio of frame ``f`` comes out once frame ``f + stream_latency_frames`` has arrived (or the
        input ends); each piece is decoded with the decoder's exact receptive field around it, so the
        concatenated pieces equal :meth:`decode` of all the frames within float rounding.

        Args:
            frames: code chunks ``[K, f]`` or ``[B, K, f]`` (any ``f >= 1`` per chunk; the same ``B``
                and ``K`` throughout), or single frames ``[K]``.
            chunk_frames: decode once at least this many frames are ready: larger pieces cost less
                compute per frame (each piece decodes ``2 * stream_latency_frames`` frames of context)
                and add up to ``chunk_frames - 1`` frames of latency.

        Yields:
            float32 audio ``[B, 1, n * hop_length]`` on the CPU for the next ``n`` frames, in order.
        """
        if chunk_frames < 1:
            raise ValueError(f"chunk_frames must be >= 1, got {chunk_frames}")
        left, right = self.model.context_frames["decoder"]
        hop = self.hop_length
        buffer: torch.Tensor | None = None  # [B, K, n]: frames from `start` on, kept for context
        start = done = 0  # absolute indices: first buffered frame, first frame not yet decoded

        def piece(buffer: torch.Tensor, stop: int) -> torch.Tensor:
            """Audio of frames ``done:stop``, decoded with context from ``buffer`` (frames from ``start`` on)."""
            lo = max(done - left, start)
            hi = min(stop + right, start + buffer.shape[-1])
            out = self.model.decode_codes(buffer[..., lo - start: hi - start].to(self.device))
            return out[..., (done - lo) * hop: (stop - lo) * hop].float().cpu()

        for chunk in frames:
            chunk = torch.as_tensor(chunk)
            chunk = self._check_codes(chunk[:, None] if chunk.ndim == 1 else chunk)
            if chunk.ndim != 3:
                raise ValueError(f"decode_stream takes [K], [K, f] or [B, K, f] chunks, got shape {tuple(chunk.shape)}")
            if buffer is not None and chunk.shape[:2] != buffer.shape[:2]:
                raise ValueError(f"chunk of shape {tuple(chunk.shape)} does not continue frames of shape "
                                 f"{tuple(buffer.shape[:2])} x F")
            buffer = chunk if buffer is None else torch.cat([buffer, chunk], dim=-1)
            ready = start + buffer.shape[-1] - right
            if ready - done >= chunk_frames:
                yield piece(buffer, ready)
                done = ready
                keep = max(done - left, start)
                buffer, start = buffer[..., keep - start:], keep
        if buffer is not None and start + buffer.shape[-1] > done:
            yield piece(buffer, start + buffer.shape[-1])


def _progress(batches: list[Batch], show: bool, desc: str, frame_rate: float) -> Iterator[Batch]:
    """Yield ``batches``, with a tqdm bar in seconds of audio kept when ``show``."""
    if not show:
        yield from batches
        return
    from tqdm import tqdm

    def seconds(batch: Batch) -> float:
        return sum(s.keep_stop - s.keep_start for s in batch.segments) / frame_rate

    with tqdm(total=sum(map(seconds, batches)), desc=desc, unit="s", leave=False, bar_format=BAR_FORMAT) as bar:
        for batch in batches:
            yield batch
            bar.update(seconds(batch))


#: The format of the progress bars over seconds of audio (encoding and decoding).
BAR_FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {n:.1f}/{total:.1f} s of audio [{elapsed}<{remaining}]"

#: Default (chunk, batch) seconds of audio per forward pass, per device type: bounded activation memory.
#: On CPU small passes are fastest (activations stay in cache): 5 s runs 1.4x faster than 20 s
#: (benchmarks/bench_tokenize.py).
DEFAULT_SECONDS = {"cpu": (5.0, 5.0), "cuda": (60.0, 600.0), "mps": (20.0, 60.0)}
#: Whether forward passes are padded to a few fixed shapes by default, per device type
#: (:attr:`AudioTokenizer.buckets`): on CUDA, where every new shape is autotuned (cuDNN) and compiled
#: again; not on CPU, where the padding is all they cost (benchmarks/README.md); MPS not measured.
DEFAULT_BUCKETS = {"cpu": False, "cuda": True, "mps": False}
