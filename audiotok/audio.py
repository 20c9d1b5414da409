"""Turning user audio (tensors, arrays, PCM, lists of clips) into float clips at the model rate."""

from __future__ import annotations

import io
import math
import os
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, cast

import numpy as np
import torch

AudioLike = torch.Tensor | np.ndarray | Sequence[float]
#: What ``AudioTokenizer.encode`` takes: a tensor or array, a list of clips (tensors, arrays or lists of
#: floats), audio records as ``datasets`` gives them: ``{"array", "sampling_rate"}`` (decoded) or
#: ``{"bytes", "path"}`` (``Audio(decode=False)``), one or a list, or paths of audio files, one or a list.
AudioPath = str | os.PathLike
AudioInput = (AudioLike | Sequence[AudioLike] | Mapping[str, Any] | Sequence[Mapping[str, Any]] | AudioPath
              | Sequence[AudioPath])

_PCM_SCALE = {np.dtype("int16"): 2.0**15, np.dtype("int32"): 2.0**31, np.dtype("int8"): 2.0**7}


def to_float_array(audio: AudioLike) -> np.ndarray:
    """One tensor or array -> float32 numpy with integer PCM scaled to [-1, 1)."""
    if isinstance(audio, torch.Tensor):
        audio = audio.detach().cpu()
        if audio.dtype in (torch.bfloat16, torch.float16):
            audio = audio.float()
        audio = audio.numpy()
    elif isinstance(audio, (list, tuple)):  # a clip as Python numbers, [T] or [C, T]
        try:
            audio = np.asarray(audio, dtype=np.float32)
        except (TypeError, ValueError) as e:
            raise ValueError(f"a clip given as a list must be numbers, [T] or [C, T] of equal rows: {e}") from None
    elif not isinstance(audio, np.ndarray):
        raise TypeError(f"audio must be a torch.Tensor, a numpy array or a list of them, got {type(audio).__name__}")
    if audio.dtype in _PCM_SCALE:
        return (audio.astype(np.float64) / _PCM_SCALE[audio.dtype]).astype(np.float32)
    if audio.dtype == np.uint8:  # 8-bit WAV is unsigned, centred on 128
        return ((audio.astype(np.float32) - 128.0) / 128.0).astype(np.float32)
    if not np.issubdtype(audio.dtype, np.floating):
        raise ValueError(f"unsupported audio dtype {audio.dtype}: use float, int16, int32, int8 or uint8 PCM")
    return audio.astype(np.float32, copy=False)


#: Why audio cannot be coded, as :func:`audio_fault` names it (the reason codes that skipped records
#: and bulk failure records carry), and what each means.
AUDIO_FAULTS = {"empty": "is empty (no samples)", "nonfinite": "contains NaN or Inf samples"}


def audio_fault(audio: np.ndarray) -> str | None:
    """The one audio validity check: ``"empty"`` when ``audio`` has no samples, ``"nonfinite"`` when
    any is NaN or Inf, else ``None``. :func:`check_samples` raises on it; readers that skip bad
    records keep the reason."""
    return _fault_and_peak(audio)[0]


def check_samples(audio: np.ndarray, name: str) -> float:
    """``ValueError`` naming ``audio`` (``name``) when :func:`audio_fault` finds a fault; else the
    peak amplitude (the largest absolute sample), found in the same pass."""
    fault, peak = _fault_and_peak(audio)
    if fault is not None:
        raise ValueError(f"{name} {AUDIO_FAULTS[fault]} (shape {tuple(audio.shape)})")
    return peak


def _fault_and_peak(audio: np.ndarray) -> tuple[str | None, float]:
    """:func:`audio_fault`'s reason and the peak amplitude, from one min and one max pass (NaN
    propagates through both; no temporary array as ``isfinite`` or ``abs`` would make)."""
    if audio.size == 0:
        return "empty", 0.0
    lo, hi = float(audio.min()), float(audio.max())
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return "nonfinite", math.nan
    return None, max(-lo, hi)


def split_clips(audio: AudioInput) -> list[np.ndarray]:
    """Audio ``[T]``, ``[C, T]``, ``[B, C, T]`` or a list of ``[T]``/``[C, T]`` clips -> list of ``[C, T]`` float32.

    A flat list of numbers is one ``[T]`` clip; a list of lists is a list of clips (as feature
    extractors take a batch). Raises ``ValueError`` for wrong ranks, empty clips, NaN or Inf, and a
    clip with more channels than samples (audio ``[T, C]``, as ``soundfile.read`` returns it, passed
    without transposing). Warns when the peak amplitude is above 1 (naming integer PCM stored in a
    float array).
    """
    if isinstance(audio, (list, tuple)) and audio and isinstance(audio[0], (int, float, np.number)):
        audio = [audio]
    if isinstance(audio, (list, tuple)):
        if not audio:
            raise ValueError("got an empty list of clips")
        clips = []
        for i, item in enumerate(audio):
            x = to_float_array(cast(AudioLike, item))
            if x.ndim not in (1, 2):
                raise ValueError(f"clip {i} has shape {tuple(x.shape)}; each clip in a list must be [T] or [C, T]")
            clips.append(x[None] if x.ndim == 1 else x)
    else:
        x = to_float_array(cast(AudioLike, audio))  # raises TypeError for anything but an array
        if x.ndim == 1:
            clips = [x[None]]
        elif x.ndim == 2:
            clips = [x]
        elif x.ndim == 3:
            clips = list(x)
        else:
            raise ValueError(f"audio has shape {tuple(x.shape)}; expected [T], [C, T] or [B, C, T]")
        if not clips:
            raise ValueError("audio has an empty batch dimension")
    for i, clip in enumerate(clips):
        peak = check_samples(clip, f"clip {i}")
        if clip.shape[0] > clip.shape[1]:
            raise ValueError(
                f"clip {i} has shape {tuple(clip.shape)}: {clip.shape[0]} channels of {clip.shape[1]} samples. Audio "
                f"is [C, T] (channels first); this looks like [T, C], as soundfile.read returns it: pass audio.T")
        _warn_if_loud(clip, i, peak)
    return clips


def _warn_if_loud(clip: np.ndarray, index: int, peak: float) -> None:
    """Warn when the peak amplitude is above 1: the codec expects float audio in [-1, 1]."""
    if peak <= 1.0:
        return
    if peak <= 2.0**31 and np.array_equal(clip, np.round(clip)):
        bits = 16 if peak <= 2.0**15 else 32
        hint = (f"its samples are whole numbers up to {peak:.0f}: integer PCM in a float array? Divide by "
                f"{2**(bits - 1)} (or pass the int{bits} array itself)")
    else:
        hint = "scale it into [-1, 1]"
    warnings.warn(f"clip {index} has peak amplitude {peak:.4g}, above 1: the codes will not represent it well; "
                  f"{hint}", UserWarning, stacklevel=4)


#: Sample rates in Hz that audio may have, and the largest resampling factor either way: a rate of
#: 1 Hz would be resampled to the model rate for minutes, and rates of 2**50 never finish.
MIN_SAMPLE_RATE, MAX_SAMPLE_RATE, MAX_RESAMPLE_RATIO = 1000, 768_000, 64


def unpack_records(audio: AudioInput, sample_rate: int | None) -> tuple[AudioInput, int | list[int]]:
    """Audio records as ``datasets`` gives them, or paths of audio files -> ``(clips, rate of each)``;
    other audio passes through as ``(audio, sample_rate)``.

    A record is ``{"array": [T] or [C, T], "sampling_rate": sr}`` (a decoded ``datasets.Audio``
    value) or ``{"bytes": ..., "path": ...}`` (``Audio(decode=False)``, read with
    :func:`read_audio_bytes` or :func:`load_audio`); a path (``str`` or ``os.PathLike``) is the record
    ``{"path": path}``. ``sample_rate``, when given with records, must be the rate of every record.
    Plain audio needs ``sample_rate``.
    """
    audio = _path_records(audio)
    records = [audio] if isinstance(audio, Mapping) else audio
    if not (isinstance(records, (list, tuple)) and records and all(isinstance(r, Mapping) for r in records)):
        if sample_rate is None:
            raise ValueError("give the audio's sample_rate (or a path of an audio file, or records with 'array' "
                             "and 'sampling_rate')")
        return audio, check_sample_rate(sample_rate)
    clips, rates = [], []
    for i, record in enumerate(records):
        if record.get("array") is not None:
            if record.get("sampling_rate") is None:
                raise ValueError(f"audio record {i} has an 'array' but no 'sampling_rate'")
            clip, rate = record["array"], check_sample_rate(record["sampling_rate"])
        elif record.get("bytes") or record.get("path"):
            clip, rate = read_audio_bytes(record["bytes"]) if record.get("bytes") else load_audio(record["path"])
        else:
            raise ValueError(f"audio record {i} has neither 'array' and 'sampling_rate' nor 'bytes' or 'path': "
                             f"keys {sorted(record)}")
        if sample_rate is not None and rate != check_sample_rate(sample_rate):
            raise ValueError(f"{record.get('path') or f'audio record {i}'} is at {rate} Hz, not "
                             f"sample_rate={sample_rate}")
        clips.append(clip)
        rates.append(rate)
    return (clips[0], rates[0]) if isinstance(audio, Mapping) else (clips, rates)


def _path_records(audio: AudioInput) -> AudioInput:
    """A path of an audio file as the record ``{"path": path}``, a list of paths as a list of records;
    other audio unchanged."""
    if isinstance(audio, (str, os.PathLike)):
        return {"path": audio}
    if isinstance(audio, (list, tuple)) and audio and all(isinstance(a, (str, os.PathLike)) for a in audio):
        return [{"path": a} for a in audio]
    return audio


def check_sample_rate(sample_rate: object) -> int:
    """``sample_rate`` as an int; ``ValueError`` unless it is a whole number of Hz in
    ``[MIN_SAMPLE_RATE, MAX_SAMPLE_RATE]``."""
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, float, np.integer, np.floating)):
        raise ValueError(f"sample_rate must be a positive number, got {sample_rate!r}")
    if not np.isfinite(sample_rate) or sample_rate <= 0 or int(sample_rate) != sample_rate:
        raise ValueError(f"sample_rate must be a positive whole number of Hz, got {sample_rate!r}")
    if not MIN_SAMPLE_RATE <= sample_rate <= MAX_SAMPLE_RATE:
        raise ValueError(f"sample_rate {sample_rate!r} Hz is outside the supported {MIN_SAMPLE_RATE}.."
                         f"{MAX_SAMPLE_RATE} Hz")
    return int(sample_rate)


def check_resample_ratio(orig_sr: int, target_sr: int) -> None:
    """``ValueError`` when resampling from ``orig_sr`` to ``target_sr`` is a factor above :data:`MAX_RESAMPLE_RATIO`."""
    if max(orig_sr / target_sr, target_sr / orig_sr) > MAX_RESAMPLE_RATIO:
        raise ValueError(f"resampling from {orig_sr} to {target_sr} Hz is a factor above {MAX_RESAMPLE_RATIO}: "
                         f"resample the audio to a nearer rate first")


def resample_blocks(blocks: Iterable[np.ndarray], orig_sr: int, target_sr: int) -> Iterator[np.ndarray]:
    """Resample a stream of ``[C, n]`` float32 blocks with soxr's streaming resampler (the filter of
    :func:`resample`): the blocks out together are the whole stream resampled; the same blocks when
    the rates match."""
    if orig_sr == target_sr:
        yield from blocks
        return
    check_resample_ratio(orig_sr, target_sr)
    import soxr

    stream, channels = None, 0
    for block in blocks:
        if stream is None:
            channels = block.shape[0]
            stream = soxr.ResampleStream(orig_sr, target_sr, channels, dtype="float32", quality="VHQ")
        out = stream.resample_chunk(np.ascontiguousarray(block.T, dtype=np.float32))
        if len(out):
            yield np.ascontiguousarray(out.reshape(len(out), channels).T)
    if stream is not None:
        out = stream.resample_chunk(np.zeros((0, channels), np.float32), last=True)
        if len(out):
            yield np.ascontiguousarray(out.reshape(len(out), channels).T)


def resample(clip: np.ndarray, orig_sr: int, target_sr: int) -> np.ndarray:
    """Resample ``[C, T]`` float32 with soxr (very high quality); a no-op when the rates match."""
    if orig_sr == target_sr:
        return clip
    check_resample_ratio(orig_sr, target_sr)
    import soxr

    out = soxr.resample(np.ascontiguousarray(clip.T), orig_sr, target_sr, quality="VHQ")
    if out.ndim == 1:
        out = out[:, None]
    return np.ascontiguousarray(out.T, dtype=np.float32)


def downmix(clip: np.ndarray) -> np.ndarray:
    """``[C, T]`` -> ``[1, T]`` by averaging channels."""
    return clip if clip.shape[0] == 1 else clip.mean(axis=0, keepdims=True)


def to_model_rate(clip: np.ndarray, sample_rate: int, model_rate: int, mono: bool = True) -> np.ndarray:
    """A ``[C, T]`` clip as a model at ``model_rate`` codes it: downmixed to ``[1, T]`` when ``mono``,
    then resampled (``[C', T']``, possibly no samples). The one implementation behind
    :meth:`audiotok.AudioTokenizer.prepare_audio`, and what the bulk job's readers run (they hold no model)."""
    return resample(downmix(clip) if mono else clip, sample_rate, model_rate)


# ---------------------------------------------------------------------------------------------
# Audio files

import re  # noqa: E402
from collections.abc import Callable  # noqa: E402
from contextlib import AbstractContextManager, contextmanager  # noqa: E402
from pathlib import Path  # noqa: E402

from .utils.io import replace_durably, storage_errors, temp_path  # noqa: E402

#: File extensions :func:`save_audio` writes, and the libsndfile format and default subtype used.
#: WAV is written as 16-bit PCM, what every player and tool takes (its quantization noise, about
#: -98 dBFS, is far below any codec's error; ``subtype="FLOAT"`` keeps the model's output exactly);
#: FLAC is written as 24-bit PCM.
AUDIO_WRITE_FORMATS = {".wav": ("WAV", "PCM_16"), ".flac": ("FLAC", "PCM_24")}
#: Subtypes :func:`save_audio` takes (libsndfile names; FLAC holds the PCM ones up to 24 bits).
AUDIO_SUBTYPES = ("PCM_16", "PCM_24", "PCM_32", "FLOAT")


def check_subtype(suffix: str, subtype: str | None) -> None:
    """``ValueError`` unless ``subtype`` (``None``: the default) can be written to a ``suffix`` file."""
    import soundfile as sf

    if subtype is not None and not sf.check_format(AUDIO_WRITE_FORMATS[suffix][0], subtype.upper()):
        supported = [s for s in AUDIO_SUBTYPES if sf.check_format(AUDIO_WRITE_FORMATS[suffix][0], s)]
        raise ValueError(f"cannot write {suffix} files as {subtype}; use one of {', '.join(supported)}")


#: Extensions of audio that libsndfile does not read (AAC in MP4 containers), decoded with FFmpeg
#: through PyAV, the optional ``ffmpeg`` extra.
FFMPEG_EXTENSIONS = (".m4a", ".mp4", ".aac")
_FFMPEG_HINT = "FFmpeg through PyAV, which is not installed: pip install 'audiotok[ffmpeg]'"


def _load_with_ffmpeg(file: str | io.BytesIO, name: str) -> tuple[np.ndarray, int]:
    """Decode the first audio stream of ``file`` with PyAV: ``(float32 [C, T], sample_rate)``, in the
    bounds of :func:`_read_with_soundfile` (a declared duration checked first, a partial stream warned about)."""
    try:
        import av
    except ImportError:
        raise ValueError(f"{name}: reading this audio needs {_FFMPEG_HINT}") from None
    try:
        with av.open(file, "r") as container:
            if not container.streams.audio:
                raise ValueError(f"{name}: no audio stream")
            stream = container.streams.audio[0]
            rate, channels = int(stream.rate), int(stream.channels)
            declared = (round(float(stream.duration * stream.time_base) * rate)
                        if stream.duration and stream.time_base else None)
            _check_declared(name, declared or 0, channels, rate)
            planar = av.AudioResampler(format="fltp", layout=stream.layout, rate=stream.rate)
            chunks: list[np.ndarray] = []
            for frame in container.decode(stream):
                chunks += [f.to_ndarray() for f in planar.resample(frame)]
                _check_read(name, sum(c.shape[-1] for c in chunks), channels, rate)
            chunks += [f.to_ndarray() for f in planar.resample(None)]
    except av.FFmpegError as e:
        raise ValueError(f"{name}: cannot read audio file: {e}") from e
    audio = (np.ascontiguousarray(np.concatenate(chunks, axis=1), dtype=np.float32) if chunks
             else np.zeros((channels, 0), np.float32))
    # AAC and MP3 streams may end a frame (1024 or 1152 samples) short of the duration their container states
    if declared is not None and audio.shape[-1] + _CODEC_FRAME_SLACK < declared:
        _warn_partial(name, audio.shape[-1], rate, f"its container declares {declared} frames")
    return audio, rate


#: Most samples (frames x channels) an audio file may hold to be read into memory: 2**29, 2 GiB of
#: float32 (about 3 h of 48 kHz stereo, 6 h of 24 kHz mono). A file whose header declares more is
#: refused before anything is read; reading stops there whatever the header says. Split longer recordings.
MAX_AUDIO_SAMPLES = 1 << 29
#: Frames read at a time: memory follows what a file holds, not what its header declares.
_READ_FRAMES = 1 << 16
#: Frames a stream may end short of its declared length without being called partial (an MP3 or AAC
#: encoder's delay and padding, counted or not in what the header states).
_CODEC_FRAME_SLACK = 4096


def _check_declared(name: str, frames: int, channels: int, rate: int) -> None:
    """``ValueError`` naming the file when its header declares more than :data:`MAX_AUDIO_SAMPLES`."""
    if frames * channels > MAX_AUDIO_SAMPLES:
        raise ValueError(f"{name}: its header declares {frames} frames of {channels} channels ({frames / rate:.0f} s "
                         f"at {rate} Hz), more than the {MAX_AUDIO_SAMPLES} samples audiotok reads into memory: "
                         f"split the recording")


def _check_read(name: str, frames: int, channels: int, rate: int) -> None:
    """``ValueError`` once more than :data:`MAX_AUDIO_SAMPLES` were read, whatever the header declared."""
    if frames * channels > MAX_AUDIO_SAMPLES:
        raise ValueError(f"{name}: holds more than {MAX_AUDIO_SAMPLES} samples ({frames / rate:.0f} s of "
                         f"{channels} channels at {rate} Hz read so far), more than audiotok reads into memory: "
                         "split the recording")


def _warn_partial(name: str, frames: int, rate: int, why: str) -> None:
    warnings.warn(f"{name}: partial audio: {why}; {frames} frames ({frames / rate:.2f} s) were read",
                  UserWarning, stacklevel=3)


def _ogg_unfinished(file: str | io.BytesIO) -> bool:
    """Whether the Ogg file ``file`` (a path, or bytes in memory) does not end with a whole page
    flagged end-of-stream (``header_type & 4``): the file was cut."""
    if isinstance(file, str):
        with open(file, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - 65_536 - 27 - 255))  # the largest page, with its header and segment table
            tail = f.read()
    else:
        tail = file.getbuffer()[-(65_536 + 27 + 255):].tobytes()
    at = tail.find(b"OggS")
    while at >= 0:
        if at + 27 <= len(tail) and tail[at + 4] == 0:
            segments = tail[at + 26]
            table = tail[at + 27: at + 27 + segments]
            if len(table) == segments and at + 27 + segments + sum(table) == len(tail):
                return not tail[at + 5] & 4  # the last page
        at = tail.find(b"OggS", at + 1)
    return True  # no page ends where the file ends: cut inside a page


class _Unreadable(ValueError):
    """libsndfile cannot decode the file (its format, or damage at its start)."""


def _read_with_soundfile(file: str | io.BytesIO, name: str) -> tuple[np.ndarray, int]:
    """Decode ``file`` (a path, or bytes in memory) with libsndfile: ``(float32 [C, T], rate)``.

    Read block by block, so memory follows what the file holds: a header declaring more than
    :data:`MAX_AUDIO_SAMPLES` is refused before reading, and reading stops with a ``ValueError`` past
    it. A file that holds less than it declares (a WAV whose data chunk is cut, an MP3 or FLAC whose
    decoding stops early, an Ogg stream without its end-of-stream page) is read as far as it goes,
    with a ``UserWarning`` naming what was read. ``_Unreadable`` when libsndfile cannot open it.
    """
    import soundfile as sf

    try:
        f = sf.SoundFile(file)
    except Exception as e:  # soundfile.LibsndfileError, RuntimeError, struct errors on odd headers
        raise _Unreadable(f"{name}: cannot read audio file: {e}") from e
    blocks: list[np.ndarray] = []
    read, stopped = 0, ""
    with f:
        rate, channels, declared = int(f.samplerate), int(f.channels), int(f.frames)
        _check_declared(name, declared, channels, rate)
        while True:
            try:
                block = f.read(_READ_FRAMES, dtype="float32", always_2d=True)
            except Exception as e:  # damage in the middle: what came before is kept
                if not blocks:
                    raise _Unreadable(f"{name}: cannot read audio file: {e}") from e
                stopped = f"decoding stopped ({e})"
                break
            if not len(block):
                break
            blocks.append(block)
            read += len(block)
            _check_read(name, read, channels, rate)
        wav_cut = re.search(r"data\s*:\s*(\d+) \(should be (\d+)\)", f.extra_info)
        is_ogg = f.format == "OGG"
    if wav_cut and int(wav_cut[2]) < int(wav_cut[1]):
        _warn_partial(name, read, rate,
                      f"its header announces {wav_cut[1]} bytes of audio, the file holds {wav_cut[2]}")
    elif stopped or read + _CODEC_FRAME_SLACK < declared:
        _warn_partial(name, read, rate, stopped or f"its header declares {declared} frames")
    elif is_ogg and _ogg_unfinished(file):
        _warn_partial(name, read, rate, "the Ogg stream ends without its end-of-stream page (the file was cut)")
    data = np.concatenate(blocks) if blocks else np.zeros((0, channels), np.float32)
    return np.ascontiguousarray(data.T), rate


#: Extensions (lower case, with the dot) of the audio files a folder is listed for, by default,
#: wherever a folder is read (``audiotok encode DIR``, folder training sources, bulk folder inputs,
#: WebDataset audio members): the formats libsndfile >= 1.1 reads, and m4a/aac, read with FFmpeg
#: through PyAV (the ``ffmpeg`` extra; without it such a file fails with a message saying so).
AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aif", ".aiff", ".m4a", ".aac")


def find_files(root: str | os.PathLike, extensions: Sequence[str] = AUDIO_EXTENSIONS) -> list[Path]:
    """The files under ``root`` (default: audio files), recursively, sorted by their path relative
    to ``root``: the one folder lister of the package.

    A file is listed when its extension is in ``extensions`` (case-insensitive, with or without the
    dot). Hidden files and folders (names starting with ``.``, such as macOS ``._x.wav`` resource
    forks) are left out. Symbolic links to files and folders are followed; a folder reached a second
    time (a link cycle) is not read again. Raises ``FileNotFoundError`` unless ``root`` is a folder.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such folder")
    exts = tuple("." + e.lower().lstrip(".") for e in extensions)
    found, seen = [], set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found += [os.path.join(dirpath, f) for f in filenames if not f.startswith(".") and f.lower().endswith(exts)]
    return [root / rel for rel in sorted(os.path.relpath(f, root) for f in found)]


def load_audio(path: str | os.PathLike) -> tuple[np.ndarray, int]:
    """Read an audio file: ``(float32 array [C, T], sample_rate)``.

    Any format libsndfile reads (WAV, FLAC, OGG/Vorbis, Opus, MP3, AIFF, ...) with soundfile;
    :data:`FFMPEG_EXTENSIONS` (m4a/AAC/MP4) with FFmpeg through PyAV (``pip install
    'audiotok[ffmpeg]'``). Raises ``FileNotFoundError`` for a missing file and ``ValueError`` naming
    the file when it cannot be decoded (or PyAV is needed and missing) or declares or holds more than
    :data:`MAX_AUDIO_SAMPLES`; warns when the file holds less than its header or container declares
    (a truncated WAV, MP3, FLAC or Ogg file), naming how much was read. The samples are returned as
    stored: empty files and NaN samples are not rejected here.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    if Path(path).suffix.lower() in FFMPEG_EXTENSIONS:
        return _load_with_ffmpeg(str(path), str(path))
    return _read_with_soundfile(str(path), str(path))


def read_audio_bytes(data: bytes) -> tuple[np.ndarray, int]:
    """Decode an audio file held in memory: ``(float32 [C, T], sample_rate)``. Any libsndfile
    format, or, when PyAV is installed, any format FFmpeg reads (m4a/AAC/MP4, ...); in the bounds
    of :func:`load_audio`.

    Raises ``ValueError`` when the bytes are not readable audio."""
    try:
        return _read_with_soundfile(io.BytesIO(data), "audio bytes")
    except _Unreadable as e:
        try:
            import av  # noqa: F401
        except ImportError:
            raise ValueError(f"cannot read audio bytes: {e} (formats libsndfile does not read, such as "
                             f"m4a/AAC, need {_FFMPEG_HINT})") from e
        return _load_with_ffmpeg(io.BytesIO(data), "audio bytes")


def audio_writer(path: str | os.PathLike, sample_rate: int, channels: int,
                 subtype: str | None = None) -> AbstractContextManager[Callable[[AudioLike], None]]:
    """Write an audio file piece by piece: ``with audio_writer(path, rate, 2) as write: write(block)``
    for float ``[C, n]`` (or ``[n]``) blocks.

    The format follows the extension (see :data:`AUDIO_WRITE_FORMATS`; ``subtype`` overrides the
    default); samples are clipped to [-1, 1] for PCM subtypes; NaN or Inf samples are a ``ValueError``.
    The file is built at a temporary name beside ``path`` (:func:`audiotok.utils.io.temp_path`) and moved to
    ``path`` only when the block ends without an error: a writer that fails or is killed leaves no
    partial file at ``path``. A failure of the storage (a full disk) is a :class:`audiotok.utils.io.StorageError`.
    """
    path = Path(path)
    ext = path.suffix.lower()
    if ext not in AUDIO_WRITE_FORMATS:
        raise ValueError(f"{path}: cannot write audio with extension {ext!r}; use one of {sorted(AUDIO_WRITE_FORMATS)}")
    check_subtype(ext, subtype)
    subtype = (subtype or AUDIO_WRITE_FORMATS[ext][1]).upper()
    return _audio_writer(path, check_sample_rate(sample_rate), channels, subtype)


@contextmanager
def _audio_writer(path: Path, sample_rate: int, channels: int, subtype: str) -> Iterator[Callable[[AudioLike], None]]:
    import soundfile as sf

    errors = (OSError, sf.SoundFileRuntimeError)  # libsndfile reports a full disk as its own error
    tmp = temp_path(path)
    with storage_errors(path, errors):
        path.parent.mkdir(parents=True, exist_ok=True)
        out = sf.SoundFile(str(tmp), "w", sample_rate, channels, subtype,
                           format=AUDIO_WRITE_FORMATS[path.suffix.lower()][0])

    def write(block: AudioLike) -> None:
        x = to_float_array(block)
        x = x[None] if x.ndim == 1 else x
        if x.ndim != 2 or x.shape[0] != channels:
            raise ValueError(f"{path}: audio to write must be [{channels}, T], got shape {tuple(x.shape)}")
        if x.size:  # a stream may write empty blocks
            check_samples(x, f"{path}: audio")
        if subtype.startswith("PCM"):
            x = np.clip(x, -1.0, 1.0)
        with storage_errors(path, errors):
            out.write(np.ascontiguousarray(x.T))

    try:
        yield write
        with storage_errors(path, errors):
            out.close()
            replace_durably(tmp, path)
    finally:
        out.close()
        tmp.unlink(missing_ok=True)


def save_audio(path: str | os.PathLike, audio: AudioLike, sample_rate: int, subtype: str | None = None) -> None:
    """Write float audio ``[C, T]`` (or ``[T]``) to ``path`` in one piece with :func:`audio_writer`
    (format from the extension, atomic, parent folders created). Raises ``ValueError`` for other
    extensions, bad shapes and NaN or Inf samples."""
    x = to_float_array(audio)
    x = x[None] if x.ndim == 1 else x
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"audio to write must be [C, T] or [T], got shape {tuple(x.shape)}")
    with audio_writer(path, sample_rate, x.shape[0], subtype) as write:
        write(x)
