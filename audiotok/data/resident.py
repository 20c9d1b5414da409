"""Training batches cut on the device from audio decoded once: no per-step host work.

:class:`ResidentAudio` decodes every record of the training groups once (host, a process pool),
downmixes and resamples it to the model rate, and keeps all of it in one flat tensor on the
device. :class:`ResidentBatches` cuts each step's ``[B, 1, N]`` float32 batch there, following
the host path (:class:`~audiotok.data.dataset.ExcerptDataset` and
:func:`~audiotok.data.transforms.process_excerpt`) in spirit:

* source drawn with the :func:`~audiotok.data.dataset.mixture` probabilities (the same group
  balance), record uniform within the source, offsets uniform within the record;
* salient excerpt: ``salient_tries`` candidate offsets per excerpt, all measured, the first louder
  than ``min_loudness`` kept (else the last); a record no longer than ``N`` is taken whole,
  zero-padded at the end;
* loudness normalization to ``loudness_target``, the random global phase rotation
  (``phase_shift``, the host path's Hilbert rotation; a polarity flip is its ``phi = pi`` case),
  peak limiting to ``max|x| <= 1``.

Storage: int16 with one float32 scale per record (the record's peak maps to full scale), 2 bytes a
sample like bf16 or fp16 but more exact: on the example speech the signal-to-quantization-noise
ratio is 83 dB at any level (bf16: 56 dB, fp16: 74 dB; int16 without a scale: 73 dB at a 0.3 peak,
33 dB at a 40 dB quieter one). Memory: 2 x 3600 x ``sample_rate`` bytes per hour of audio
(317.5 MB, 303 MiB, at 44.1 kHz; 172.8 MB at 24 kHz), plus 28 bytes per record. The host holds the
decoded corpus twice while it is laid out, then none of it.

Differences from the host path:

* loudness is BS.1770's K-weighted mean power of the excerpt taken as periodic (Parseval over its
  FFT, with the power response of pyloudnorm's K-weighting biquads), without the 400 ms gating
  blocks. pyloudnorm runs the filters from rest over the excerpt tiled to one 0.4 s block: on
  0.38 s excerpts of the real-audio set the two agree within 0.2-0.5 dB (95th percentile of
  music, instruments, general sound) to 1.4 dB (speech), at most 2.8 dB where an excerpt starts
  on strong low frequencies (the filters' start-up transient), while the device measure equals
  the steady-state K-weighted power to 1e-4 dB. Excerpts longer than 0.4 s with quiet stretches
  read lower than the gated measure (no relative gate), so they get more gain (up to 3 dB at 1 s);
* candidates are cut at the model rate from resampled audio (host: at the source rate, then
  resampled); unusable records are left out once, before training, and a source is drawn among
  the usable ones (host: a draw that hits one is counted and redrawn, ``max_draws`` times at most);
* random numbers come from a ``torch.Generator`` on the device seeded from ``(seed, rank, step)``:
  batch ``k`` is a pure function of them (and of the device type: CPU and CUDA generators differ),
  so an exact resume needs only the step. Excerpts differ from the host path's.

Still to do on the GPU (not measured here): the throughput against the host path with
``benchmarks/bench_train.py --resident`` (bf16 autocast is ``train.bf16``); the decode at start-up
runs on the host's cores once per rank (a multi-GPU node decodes the corpus once per GPU: decoding
on one rank and broadcasting would save that); the corpus must fit the device next to the model
(no sharding); CUDA graphs or ``torch.compile`` of the batch cut, whose shapes are fixed, would
remove the launch overhead of its few dozen small kernels. The cut holds ``[B, salient_tries, N]``
int64 indices and float32 candidates (about 0.3 GB at batch 72 of 0.38 s at 44.1 kHz).
"""

from __future__ import annotations

import concurrent.futures
import logging
import math
import multiprocessing
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..audio import audio_fault, downmix, resample
from ..utils.workers import available_cpus, die_with_parent
from .dataset import SourceGroup, mixture
from .sources import AudioSource, DecodeError
from .transforms import ABSOLUTE_GATE

log = logging.getLogger("audiotok.data")

#: BS.1770 loudness of a mean K-weighted power ``z``: ``LOUDNESS_OFFSET + 10 log10(z)``.
LOUDNESS_OFFSET = -0.691
#: Records per decoding task of the process pool.
CHUNK = 16
_INT16_MAX = 32767


# ---------------------------------------------------------------------------------------------
# Decoding, on the host, once


def quantize(audio: np.ndarray) -> tuple[np.ndarray, float]:
    """``[T]`` float -> ``([T] int16, scale)`` with ``audio ~= q * scale``; the peak maps to full scale."""
    peak = float(np.max(np.abs(audio))) if audio.size else 0.0
    scale = peak / _INT16_MAX if peak > 0 else 1.0
    return np.round(audio / scale).astype(np.int16), scale


def decode_record(source: AudioSource, index: int, sample_rate: int) -> tuple[np.ndarray, float]:
    """Record ``index`` of ``source``: mono, at ``sample_rate``, quantized (:func:`quantize`).
    Raises :class:`DecodeError` when it is unusable."""
    record = source.load(index)
    audio = resample(downmix(record.audio), record.sample_rate, sample_rate)[0]
    fault = audio_fault(audio)
    if fault is not None:
        raise DecodeError(record.key, fault, f"at {sample_rate} Hz")
    return quantize(audio)


Decoded = tuple[np.ndarray, float] | DecodeError

_worker_sources: list[AudioSource] = []
_worker_rate = 0


def _init_worker(parent: int, sources: list[AudioSource], sample_rate: int) -> None:
    global _worker_sources, _worker_rate
    die_with_parent(parent)  # a killed trainer leaves no decoders behind
    _worker_sources, _worker_rate = sources, sample_rate


def _decode_task(task: tuple[int, range]) -> list[Decoded]:
    """A pool worker's task: ``(source number, indices)`` -> one result per index."""
    number, indices = task
    return [_decode_or_error(_worker_sources[number], i, _worker_rate) for i in indices]


def _decode_or_error(source: AudioSource, index: int, sample_rate: int) -> Decoded:
    try:
        return decode_record(source, index, sample_rate)
    except DecodeError as e:
        return e


def decode_sources(sources: Sequence[AudioSource], sample_rate: int, workers: int = 1) -> list[list[Decoded]]:
    """Every record of every source (random access), :func:`decode_record` or its error, in index
    order. ``workers > 1``: a pool of spawned processes (safe after CUDA or OpenMP threads started)
    decodes tasks of :data:`CHUNK` records; a single task is decoded here."""
    tasks = [(n, range(a, min(a + CHUNK, len(s)))) for n, s in enumerate(sources) for a in range(0, len(s), CHUNK)]
    if workers <= 1 or len(tasks) <= 1:
        results = [[_decode_or_error(sources[n], i, sample_rate) for i in indices] for n, indices in tasks]
    else:
        pool = concurrent.futures.ProcessPoolExecutor(
            min(workers, len(tasks)), mp_context=multiprocessing.get_context("spawn"),
            initializer=_init_worker, initargs=(os.getpid(), list(sources), sample_rate))
        with pool:
            results = list(pool.map(_decode_task, tasks))
    out: list[list[Decoded]] = [[] for _ in sources]
    for (n, _), items in zip(tasks, results):
        out[n].extend(items)
    return out


# ---------------------------------------------------------------------------------------------
# The audio on the device


@dataclass
class ResidentAudio:
    """Every usable training record, mono at ``sample_rate``, in one flat tensor on one device.

    ``audio``: ``[S]`` int16, the records one after another; record ``r`` is
    ``audio[offsets[r] : offsets[r] + lengths[r]] * scales[r]``. ``offsets``, ``lengths``: ``[R]``
    int64; ``scales``: ``[R]`` float32; ``groups``: ``[R]`` int64 index into ``group_names``.
    Records are laid out by source, in ``entries`` order (:func:`~audiotok.data.dataset.mixture`'s,
    sources without usable records left out); the records of source ``e`` are ``first[e]`` to
    ``first[e] + counts[e] - 1`` (``[E]`` int64), drawn with probability ``probs[e]`` (``[E]``
    float32).
    """

    audio: torch.Tensor
    offsets: torch.Tensor
    lengths: torch.Tensor
    scales: torch.Tensor
    groups: torch.Tensor
    first: torch.Tensor
    counts: torch.Tensor
    probs: torch.Tensor
    sample_rate: int
    group_names: list[str]
    entries: list[tuple[str, AudioSource]]

    @classmethod
    def load(cls, groups: Mapping[str, SourceGroup], sample_rate: int, device: torch.device | str = "cpu", *,
             balance: bool = True, workers: int | None = None) -> ResidentAudio:
        """Decode every record of ``groups`` (:func:`decode_sources`, ``workers`` processes; default:
        every available core) onto ``device``.

        Unusable records are counted in their source's ``skipped`` and left out; a source with none
        usable is left out of its group. ``ValueError`` when a source is not random-access (the host
        path reads streaming sources) or a group ends up without records.
        """
        entries, _ = mixture(groups, balance)  # checks the groups and weights
        streaming = [src.name for _, src in entries if not src.random_access]
        if streaming:
            which = "none of the sources is" if len(streaming) == len(entries) else f"{streaming} are not"
            raise ValueError(f"resident data decodes every record by index, and {which} random-access "
                             "(streaming Hugging Face or WebDataset sources): use data.resident: false for them")
        workers = workers or available_cpus()
        log.info("resident data: decoding %d records of %d sources at %d Hz with %d process(es)",
                 sum(len(src) for _, src in entries), len(entries), sample_rate, workers)
        decoded = decode_sources([src for _, src in entries], sample_rate, workers)
        kept: dict[str, list[tuple[AudioSource, list[tuple[np.ndarray, float]]]]] = {name: [] for name in groups}
        for (name, src), items in zip(entries, decoded):
            good = _count_skipped(src, items)
            if good:
                kept[name].append((src, good))
            else:
                log.warning("%s: no usable records, left out of group %r (skipped: %s)", src.name, name,
                            dict(src.skipped.counts))
        empty = [name for name, found in kept.items() if not found]
        if empty:
            skipped = {src.name: dict(src.skipped.counts) for _, src in entries if src.skipped.total}
            raise ValueError(f"groups {empty} have no usable records after decoding; skipped: {skipped}")
        usable = {name: SourceGroup(groups[name].weight, [src for src, _ in found]) for name, found in kept.items()}
        entries, probs = mixture(usable, balance)
        records = [(name, items) for name, found in kept.items() for _, items in found]
        return cls._build(records, entries, probs, list(groups), sample_rate, torch.device(device))

    @classmethod
    def _build(cls, records: list[tuple[str, list[tuple[np.ndarray, float]]]], entries: list[tuple[str, AudioSource]],
               probs: np.ndarray, group_names: list[str], sample_rate: int, device: torch.device) -> ResidentAudio:
        """Lay out ``records`` (group name, per-source ``[(int16 [T], scale), ...]``) on ``device``."""
        counts = [len(items) for _, items in records]
        lengths = np.array([len(q) for _, items in records for q, _ in items], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        group_of = [group_names.index(name) for name, items in records for _ in items]
        flat = np.concatenate([q for _, items in records for q, _ in items])

        def put(array: np.ndarray | list, dtype: torch.dtype) -> torch.Tensor:
            return torch.as_tensor(np.asarray(array)).to(device=device, dtype=dtype)

        audio = cls(
            audio=put(flat, torch.int16), offsets=put(offsets, torch.int64), lengths=put(lengths, torch.int64),
            scales=put([s for _, items in records for _, s in items], torch.float32),
            groups=put(group_of, torch.int64), first=put(np.cumsum([0, *counts[:-1]]), torch.int64),
            counts=put(counts, torch.int64), probs=put(probs, torch.float32), sample_rate=sample_rate,
            group_names=group_names, entries=entries,
        )
        log.info("resident data: %d records, %.2f h of audio at %d Hz, %.1f MiB on %s", len(lengths), audio.hours,
                 sample_rate, audio.nbytes / 2**20, device)
        return audio

    @property
    def hours(self) -> float:
        """Hours of audio held."""
        return self.audio.numel() / self.sample_rate / 3600

    @property
    def nbytes(self) -> int:
        """Device bytes held: the samples and the per-record and per-source tables."""
        tensors = (self.audio, self.offsets, self.lengths, self.scales, self.groups, self.first, self.counts,
                   self.probs)
        return sum(t.numel() * t.element_size() for t in tensors)

    def __len__(self) -> int:
        return self.lengths.numel()

    def draw_records(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """``[n]`` int64 record numbers: a source by ``probs``, then a record uniformly within it."""
        entry = torch.multinomial(self.probs, n, replacement=True, generator=generator)
        u = torch.rand(n, generator=generator, device=self.audio.device, dtype=torch.float64)
        return self.first[entry] + (u * self.counts[entry]).long()

    def windows(self, records: torch.Tensor, starts: torch.Tensor, n: int) -> torch.Tensor:
        """``[B, T, n]`` float32: ``n`` samples of record ``records[b]`` ([B]) from each of ``starts[b]``
        (``[B, T]``), zeros past the record's end."""
        pos = starts[..., None] + torch.arange(n, device=self.audio.device)  # [B, T, n]
        length = self.lengths[records][:, None, None]
        index = self.offsets[records][:, None, None] + torch.minimum(pos, length - 1)
        x = self.audio[index].float() * self.scales[records][:, None, None]
        return x.masked_fill(pos >= length, 0.0)


def _count_skipped(source: AudioSource, items: list[Decoded]) -> list[tuple[np.ndarray, float]]:
    """The decoded records of ``items``; each error is counted in ``source.skipped``."""
    good = []
    for item in items:
        if isinstance(item, DecodeError):
            source.skipped.add(item)
        else:
            good.append(item)
    return good


# ---------------------------------------------------------------------------------------------
# Excerpt processing on the device


def k_weighting_power(n: int, sample_rate: int) -> np.ndarray:
    """``[n // 2 + 1]`` power response ``|H(f)|^2`` of the BS.1770 K-weighting (pyloudnorm's two
    biquads, with their passband gains) at the ``rfft`` bins of ``n`` samples."""
    import pyloudnorm
    from scipy.signal import freqz

    freqs = np.fft.rfftfreq(n, 1 / sample_rate)
    power = np.ones_like(freqs)
    for stage in pyloudnorm.Meter(sample_rate)._filters.values():
        _, h = freqz(stage.b, stage.a, worN=freqs, fs=sample_rate)
        power *= (stage.passband_gain * np.abs(h)) ** 2
    return power


def loudness_weights(n: int, sample_rate: int) -> torch.Tensor:
    """``[n // 2 + 1]`` float32 ``w`` with ``sum_k w_k |X_k|^2`` the mean K-weighted power of the
    ``n`` samples whose ``rfft`` is ``X`` (Parseval: bins other than DC and Nyquist count twice)."""
    fold = np.full(n // 2 + 1, 2.0)
    fold[0] = 1.0
    if n % 2 == 0:
        fold[-1] = 1.0
    return torch.from_numpy(k_weighting_power(n, sample_rate) * fold / n**2).float()


def spectral_loudness(spectra: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``[..., F]`` complex ``rfft`` -> ``[...]`` loudness (LUFS, ``-inf`` for silence) of the excerpts
    taken as periodic, ungated; ``weights`` from :func:`loudness_weights`."""
    power = (spectra.real.square() + spectra.imag.square()) @ weights
    return LOUDNESS_OFFSET + 10.0 * torch.log10(power)


def first_loud(loudness: torch.Tensor, threshold: float) -> torch.Tensor:
    """``[B, T]`` -> ``[B]`` int64: the first candidate louder than ``threshold``, else the last."""
    loud = loudness > threshold
    last = torch.full_like(loud[:, 0], loud.shape[1] - 1, dtype=torch.int64)
    return torch.where(loud.any(dim=1), loud.float().argmax(dim=1), last)


def rotate_phase(spectra: torch.Tensor, phi: torch.Tensor) -> torch.Tensor:
    """``[B, F]`` ``rfft`` -> ``[B, F]`` with every bin turned by ``phi`` (``[B]``): its ``irfft`` is
    ``x cos(phi) - H(x) sin(phi)``, :func:`~audiotok.data.transforms.random_phase_shift`'s rotation
    (``irfft`` keeps the real part of the DC and Nyquist bins: ``cos(phi)`` times theirs)."""
    return spectra * torch.polar(torch.ones_like(phi), phi)[:, None]


def peak_limit(x: torch.Tensor, peak: float = 1.0) -> torch.Tensor:
    """``[B, N]`` scaled down per row (one gain each) to ``max|x| <= peak``, as
    :func:`~audiotok.data.transforms.peak_limit` does for one excerpt."""
    return x * (peak / x.abs().amax(dim=-1, keepdim=True).clamp(min=peak))


def step_seed(seed: int, rank: int, step: int) -> int:
    """A 63-bit generator seed for ``(seed, rank, step)`` (``numpy.random.SeedSequence``)."""
    high, low = np.random.SeedSequence([seed, rank, step]).generate_state(2)
    return (int(high) << 31) ^ int(low)


class ResidentBatches:
    """Infinite stream of ``[B, 1, N]`` float32 training batches cut on ``audio``'s device,
    ``N = round(duration * audio.sample_rate)`` (see the module docstring).

    Batch ``k`` of a rank is :meth:`batch` ``(k)``, a pure function of ``(seed, rank, k)``;
    iterating yields batches :attr:`step`, ``step + 1``, ... and advances :attr:`step`.
    """

    def __init__(self, audio: ResidentAudio, batch_size: int, duration: float = 0.38, *, seed: int = 0,
                 rank: int = 0, min_loudness: float = -40.0, salient_tries: int = 8, loudness_target: float = -16.0,
                 phase_shift: bool = True):
        self.length = round(duration * audio.sample_rate)
        if batch_size < 1 or self.length < 1:
            raise ValueError(f"batch_size ({batch_size}) and excerpt samples ({self.length}) must be >= 1")
        self.audio, self.batch_size, self.seed, self.rank = audio, batch_size, seed, rank
        self.min_loudness, self.tries = min_loudness, max(1, salient_tries)
        self.loudness_target, self.phase_shift = loudness_target, phase_shift
        self.device = audio.audio.device
        self.weights = loudness_weights(self.length, audio.sample_rate).to(self.device)
        self.generator = torch.Generator(device=self.device)
        self.step = 0

    def batch(self, step: int) -> torch.Tensor:
        """Batch ``step``: ``[B, 1, N]`` float32 on the device."""
        g = self.generator.manual_seed(step_seed(self.seed, self.rank, step))
        b, n = self.batch_size, self.length
        records = self.audio.draw_records(b, g)  # [B]
        room = (self.audio.lengths[records] - n + 1).clamp(min=1)  # [B] possible offsets
        u = torch.rand(b, self.tries, generator=g, device=self.device, dtype=torch.float64)
        starts = (u * room[:, None]).long()  # [B, T]
        candidates = self.audio.windows(records, starts, n)  # [B, T, N]
        spectra = torch.fft.rfft(candidates)  # [B, T, F]
        loudness = spectral_loudness(spectra, self.weights)  # [B, T]
        rows = torch.arange(b, device=self.device)
        pick = first_loud(loudness, self.min_loudness)  # [B]
        level = loudness[rows, pick].clamp(min=ABSOLUTE_GATE)
        gain = (10.0 ** ((self.loudness_target - level) / 20.0))[:, None]  # [B, 1]
        if self.phase_shift:
            phi = (2.0 * torch.rand(b, generator=g, device=self.device) - 1.0) * math.pi
            x = torch.fft.irfft(rotate_phase(spectra[rows, pick] * gain, phi), n=n)
        else:
            x = candidates[rows, pick] * gain
        return peak_limit(x)[:, None]

    def __iter__(self) -> Iterator[torch.Tensor]:
        while True:
            x = self.batch(self.step)
            self.step += 1
            yield x

    # -- resume ---------------------------------------------------------------------------------

    def state_dict(self, consumed: int | None = None) -> dict[str, int]:
        """Resume point: the next batch's step (default :attr:`step`; ``consumed``: the excerpts this
        rank has taken, whole batches, as for :meth:`ExcerptDataset.state_dict`)."""
        if consumed is not None and consumed % self.batch_size:
            raise ValueError(f"consumed={consumed} is not a whole number of batches of {self.batch_size}")
        step = self.step if consumed is None else consumed // self.batch_size
        return {"step": step, "seed": self.seed, "batch_size": self.batch_size}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        """Continue from ``state`` (:meth:`state_dict`; seed and batch size must match). The state of a
        run begun on the host path (:meth:`ExcerptDataset.state_dict`) continues at its step."""
        if "step" not in state:
            log.info("continuing a run of the host data path at its step: the excerpts drawn from here on differ")
            state = {"step": state["position"] // state["block_size"], "seed": state["seed"],
                     "batch_size": state["block_size"]}
        for name in ("seed", "batch_size"):
            if int(state[name]) != getattr(self, name):
                raise ValueError(f"cannot resume: state has {name}={state[name]}, these batches {getattr(self, name)}")
        self.step = int(state["step"])
