"""Encoding audio files to ``.atok`` code files and decoding them back, one file or a folder tree."""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..audio import (
    AUDIO_EXTENSIONS,
    AUDIO_WRITE_FORMATS,
    audio_writer,
    check_resample_ratio,
    check_sample_rate,
    check_samples,
    check_subtype,
    find_files,
    load_audio,
    resample_blocks,
)
from ..codes import check_10bit, check_n_quantizers
from ..formats.codefile import SUFFIX, CodeFile, CodeHeader, DisagreeingFields, read_header
from ..tokenizer import BAR_FORMAT, AudioTokenizer
from ..utils.io import StorageError, check_writable, storage_errors
from ..utils.untrusted import shown

logger = logging.getLogger("audiotok")

#: A model, or a function that loads one: :func:`encode_path` and :func:`decode_path` call it only once
#: the input and the output passed their checks, so that a wrong path is reported before a model loads.
ModelOrLoader = AudioTokenizer | Callable[[], AudioTokenizer]


@dataclass
class BatchReport:
    """What a file or folder run did: outputs written, outputs an earlier run wrote and that were kept
    (``kept``), inputs skipped (with the reason), and the seconds the run took, loading the model not
    included (``seconds``)."""

    done: list[tuple[Path, Path]] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    kept: list[tuple[Path, Path]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.skipped

    def summary(self, verb: str) -> str:
        total = len(self.done) + len(self.skipped) + len(self.kept)
        lines = [f"{verb} {len(self.done)} of {total} file{'s' if total != 1 else ''}"
                 + (f" ({len(self.kept)} already {verb} by an earlier run, kept)" if self.kept else "")
                 + (f"; skipped {len(self.skipped)}:" if self.skipped else "")]
        lines += [f"  {shown(path)}: {shown(reason)}" for path, reason in self.skipped]  # one line each
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Helpers


def parse_extensions(spec: str | Iterable[str] | None) -> tuple[str, ...]:
    """``"wav,flac"`` or ``["wav", ".FLAC"]`` -> ``(".wav", ".flac")``."""
    if spec is None:
        spec = AUDIO_EXTENSIONS
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    exts = tuple(sorted({"." + e.strip().lower().lstrip(".") for e in items if e.strip().strip(".")}))
    if not exts:
        raise ValueError(f"no file extensions given in {spec!r}")
    return exts


def mirror_paths(inputs: list[Path], in_root: Path, out_root: Path, suffix: str) -> list[tuple[Path, Path]]:
    """Map each input under ``in_root`` to the same relative path under ``out_root`` with ``suffix``.

    Inputs that would land on the same output (``a.wav`` and ``a.flac``) keep their full name:
    ``a.wav.atok`` and ``a.flac.atok``.
    """
    plain = [out_root / p.relative_to(in_root).with_suffix(suffix) for p in inputs]
    counts: dict[Path, int] = {}
    for out in plain:
        counts[out] = counts.get(out, 0) + 1
    pairs = []
    for src, out in zip(inputs, plain):
        if counts[out] > 1:
            out = out_root / _with_extra_suffix(src.relative_to(in_root), suffix)
        pairs.append((src, out))
    return pairs


def _loaded(tokenizer: ModelOrLoader) -> tuple[AudioTokenizer, float]:
    """The model (loaded now when ``tokenizer`` is a loader) and the seconds its loading took."""
    if isinstance(tokenizer, AudioTokenizer):
        return tokenizer, 0.0
    start = time.perf_counter()
    model = tokenizer()
    return model, time.perf_counter() - start


def _with_extra_suffix(path: Path, suffix: str) -> Path:
    return path.with_name(path.name + suffix)


def _single_output(src: Path, output: Path, suffixes: tuple[str, ...], kind: str) -> Path:
    """Output path for a single input: inside ``output`` when it is a folder, else ``output`` itself."""
    if output.is_dir():
        return output / (src.stem + suffixes[0])
    if output.suffix.lower() not in suffixes:
        raise ValueError(f"{output}: the output {kind} file must end with {' or '.join(suffixes)} "
                         f"(or be an existing folder)")
    return output


# ---------------------------------------------------------------------------------------------
# Encoding


def encode_file(tokenizer: AudioTokenizer, path: str | os.PathLike, n_quantizers: int | None = None,
                per_channel: bool = False, progress: bool = False) -> CodeFile:
    """Read and encode one audio file.

    By default the channels are averaged to mono (``C = 1``); ``per_channel=True`` codes each
    channel on its own (``C = channels``). ``progress``: a bar over the file's chunks. Raises
    ``ValueError`` naming the file for unreadable or empty audio and NaN / Inf samples.
    """
    return _encode_audio(tokenizer, path, *_read_input(path), n_quantizers, per_channel, progress)


def _read_input(path: str | os.PathLike) -> tuple[np.ndarray, int]:
    """An audio file's float32 ``[C, T]`` samples and rate; ``ValueError`` naming the file for unreadable or
    empty audio and NaN / Inf samples."""
    audio, sample_rate = load_audio(path)
    check_samples(audio, f"{path}: audio")
    return audio, sample_rate


def _encode_audio(tokenizer: AudioTokenizer, path: str | os.PathLike, audio: np.ndarray, sample_rate: int,
                  n_quantizers: int | None, per_channel: bool, progress: bool) -> CodeFile:
    """The code file of the audio ``[C, T]`` read from ``path`` (see :func:`encode_file`)."""
    channels = audio.shape[0]
    try:
        if per_channel and channels > 1:
            encoded = tokenizer.encode([audio[c: c + 1] for c in range(channels)], sample_rate, n_quantizers,
                                       progress=progress)
            return CodeFile.from_encoded(tokenizer, encoded, list(range(channels)))
        encoded = tokenizer.encode(audio, sample_rate, n_quantizers, progress=progress)
        return CodeFile.from_encoded(tokenizer, encoded, 0)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e


def _check_encode_args(tokenizer: AudioTokenizer, n_quantizers: int | None, pack_10bit: bool) -> None:
    check_n_quantizers(n_quantizers, tokenizer.n_codebooks)
    if pack_10bit:
        check_10bit(tokenizer.codebook_size)


def encode_path(tokenizer: ModelOrLoader, input: str | os.PathLike, output: str | os.PathLike,
                n_quantizers: int | None = None, per_channel: bool = False, pack_10bit: bool = False,
                extensions: str | Iterable[str] | None = None, progress: bool | None = None,
                overwrite: bool = False) -> BatchReport:
    """Encode an audio file to an ``.atok`` file, or a folder tree to a mirrored tree of them.

    ``tokenizer``: the model, or a function that loads it, called once the input and the output passed
    their checks (a missing input, a single file that is not readable audio, an output that cannot be
    written: ``FileNotFoundError`` or ``ValueError``, before the model loads). A single file that fails
    raises ``ValueError``. In a folder, files that fail (unreadable, empty, NaN) are logged, skipped
    and listed in the report; a folder without audio files is a ``ValueError``. An output that cannot
    be written (a full disk) stops the run: a :class:`~audiotok.utils.io.StorageError`. In a folder, outputs
    an earlier run wrote with the same model and settings, newer than their input, are kept
    (``report.kept``) unless ``overwrite``. ``progress``: show tqdm bars, over the files of a folder and
    over the chunks of each file (``None``: only on a terminal).
    """
    start = time.perf_counter()
    src, out = Path(input), Path(output)
    _check_input(src)
    chunks = _show_progress(progress)
    if src.is_file():
        dst = _single_output(src, out, (SUFFIX,), "code")
        check_writable(dst)
        audio, sample_rate = _read_input(src)
        model, loading = _loaded(tokenizer)
        _check_encode_args(model, n_quantizers, pack_10bit)
        _save(_encode_audio(model, src, audio, sample_rate, n_quantizers, per_channel, chunks), dst, pack_10bit)
        report = BatchReport(done=[(src, dst)])
    else:
        exts = parse_extensions(extensions)
        pairs = _folder_pairs(src, out, exts, SUFFIX, f"audio files ({','.join(exts)})")
        model, loading = _loaded(tokenizer)
        _check_encode_args(model, n_quantizers, pack_10bit)
        report = BatchReport()
        if not overwrite:
            settings = (n_quantizers or model.n_codebooks, per_channel, "10bit" if pack_10bit else "none")
            report.kept = [(a, b) for a, b in pairs if _encoded_before(model, a, b, *settings)]
            pairs = [pair for pair in pairs if pair not in report.kept]
        _run_batch(pairs, lambda a, b: _save(encode_file(model, a, n_quantizers, per_channel, chunks), b, pack_10bit),
                   report, "encoding", progress)
    report.seconds = time.perf_counter() - start - loading
    return report


def _save(code_file: CodeFile, path: Path, pack_10bit: bool) -> None:
    """Write ``code_file`` to ``path``; a failure of the storage is a :class:`~audiotok.utils.io.StorageError`."""
    with storage_errors(path):
        code_file.save(path, pack_10bit)


def _folder_pairs(src: Path, out: Path, extensions: tuple[str, ...], suffix: str,
                  what: str) -> list[tuple[Path, Path]]:
    """The inputs under the folder ``src`` with the given ``extensions`` and their outputs under ``out``
    with ``suffix`` (:func:`mirror_paths`); ``ValueError`` when ``out`` cannot be an output folder or
    there are no inputs (``what`` names them)."""
    if out.is_file():
        raise ValueError(f"{out}: is a file; the output for a folder must be a folder")
    check_writable(out, folder=True)
    return _listed(mirror_paths(find_files(src, extensions), src, out, suffix), src, what)


def _encoded_before(tokenizer: AudioTokenizer, src: Path, dst: Path, n_quantizers: int, per_channel: bool,
                    packing: str) -> bool:
    """Whether ``dst`` is a code file of ``src`` that an earlier run wrote with ``tokenizer`` and these
    settings: readable, newer than ``src``, of the same model and weights, codebooks, channels and packing.
    (Outputs are written atomically, so a file at ``dst`` is whole.)"""
    try:
        if dst.stat().st_mtime < src.stat().st_mtime:
            return False
        header = read_header(dst)
    except (OSError, ValueError):
        return False
    return (header.codec.config_hash == tokenizer.identity.config_hash
            and header.codec.codes_fingerprint == tokenizer.codes_fingerprint
            and header.shape[:2] == (header.channels if per_channel else 1, n_quantizers)
            and header.packing == packing)


def _listed(pairs: list[tuple[Path, Path]], src: Path, what: str) -> list[tuple[Path, Path]]:
    """``pairs`` (a folder's inputs and outputs), unless there are none: then ``ValueError`` naming
    the folder (a folder named ``x.wav``, a wrong folder, wrong ``--extensions``)."""
    if not pairs:
        raise ValueError(f"{src}: a folder without {what}: nothing to do")
    return pairs


def _show_progress(progress: bool | None) -> bool:
    """``progress``, with ``None`` meaning: when stderr is a terminal."""
    return progress if progress is not None else sys.stderr.isatty()


def _run_batch(pairs: list[tuple[Path, Path]], work: Callable[[Path, Path], None], report: BatchReport,
               desc: str, progress: bool | None) -> None:
    from tqdm import tqdm

    bar = tqdm(pairs, desc=desc, unit="file", disable=None if progress is None else not progress)
    for a, b in bar:
        try:
            work(a, b)
        except StorageError:  # the output's storage, not this input: every next file would fail too
            raise
        except (ValueError, OSError) as e:
            reason = str(e)
            prefix = f"{a}: "
            reason = reason[len(prefix):] if reason.startswith(prefix) else reason
            logger.warning("skipped %s: %s", a, reason)
            report.skipped.append((a, reason))
        else:
            report.done.append((a, b))


# ---------------------------------------------------------------------------------------------
# Decoding


def decode_code_file(tokenizer: AudioTokenizer, code_file: CodeFile, sample_rate: int | str | None = None,
                     progress: bool = False, allow_other_weights: bool = False) -> tuple[np.ndarray, int]:
    """Decode to float32 ``[C, T]``, cropped to the original duration: ``(audio, rate)``; the
    blocks of :func:`decoded_blocks` joined (whose arguments it takes)."""
    rate, blocks = decoded_blocks(tokenizer, code_file, sample_rate, progress, allow_other_weights)
    return np.concatenate(list(blocks), axis=1), rate


def decoded_blocks(tokenizer: AudioTokenizer, code_file: CodeFile, sample_rate: int | str | None = None,
                   progress: bool = False, allow_other_weights: bool = False) -> tuple[int, Iterator[np.ndarray]]:
    """Decode piece by piece, in memory bounded by the tokenizer's ``chunk_seconds`` whatever the
    file's length: ``(rate, blocks)``, float32 ``[C, n]`` blocks that together are the audio cropped
    to the original duration (equal to whole decoding within float rounding,
    :meth:`AudioTokenizer.decode_stream`).

    ``sample_rate``: ``None`` for the model's rate, ``"source"`` for the rate of the audio that was
    encoded, or a rate in Hz (resampled with soxr, as a stream). ``progress``: a bar over the frames.
    ``allow_other_weights``: decode codes written by a model of the same architecture with other weights.
    Whatever is wrong with the file or the model is raised before the first block.
    """
    code_file.check_compatible(tokenizer, allow_other_weights)
    encoded = code_file.to_encoded()
    tokenizer.check_encoded(encoded, allow_other_weights)
    rate = check_sample_rate(code_file.source_sample_rate if sample_rate == "source"
                             else sample_rate or tokenizer.sample_rate)
    check_resample_ratio(tokenizer.sample_rate, rate)
    codes = encoded.codes  # [C, K, F]: the channels decode as a batch
    total = tokenizer.decoded_samples(code_file.num_samples, code_file.source_sample_rate, codes.shape[-1])
    return rate, resample_blocks(_decoded(tokenizer, codes, total, progress), tokenizer.sample_rate, rate)


def _decoded(tokenizer: AudioTokenizer, codes: torch.Tensor, total: int, progress: bool) -> Iterator[np.ndarray]:
    """``[C, n]`` blocks of the first ``total`` samples of the audio of ``codes`` ``[C, K, F]``, at
    the model's rate, decoded ``chunk_seconds`` at a time."""
    from tqdm import tqdm

    frames = codes.shape[-1]
    chunk = tokenizer.frame_budgets()[0] or frames
    with tqdm(total=frames / tokenizer.frame_rate, desc="decoding", unit="s", leave=False, bar_format=BAR_FORMAT,
              disable=not progress) as bar:
        pieces = (codes[..., i: i + chunk] for i in range(0, frames, chunk))
        left = total
        for piece in tokenizer.decode_stream(pieces, chunk):
            block = piece[:, 0, :left].numpy()
            bar.update(piece.shape[-1] / tokenizer.sample_rate)
            left -= block.shape[-1]
            if block.shape[-1]:
                yield block
            if not left:
                return


def decode_path(input: str | os.PathLike, output: str | os.PathLike, tokenizer: ModelOrLoader | None = None,
                format: str | None = None, device: str | torch.device | None = None,
                progress: bool | None = None, sample_rate: int | str | None = None, subtype: str | None = None,
                allow_other_weights: bool = False, **load_kwargs) -> BatchReport:
    """Decode an ``.atok`` file to audio, or a folder tree of them to a mirrored tree of audio files.

    Audio is cropped to the original duration and written at the model's sample rate (or at
    ``sample_rate``: ``"source"`` or Hz, see :func:`decode_code_file`) with ``subtype`` (default
    per format, see :data:`~audiotok.audio.AUDIO_WRITE_FORMATS`). ``tokenizer``: the model to
    decode with, or a function that loads it; ``None`` uses the model that ships with the package
    (``load_kwargs``: dtype, compile); the ``model_id`` a code file records is never loaded: a file
    does not choose what runs. ``format``: ``"wav"`` or ``"flac"`` (for a single file, default: from
    the output's extension). ``allow_other_weights``: decode codes written by a model of the same
    architecture with other weights.

    The model is loaded once the input and the output passed their checks (a missing input, a single
    code file that cannot be read, an output that cannot be written: ``FileNotFoundError`` or
    ``ValueError``). Before anything is decoded, every file's header is checked against the model:
    another architecture or other weights raise ``ValueError``. Files that are corrupt are logged,
    skipped and listed in the report (for a single file: ``ValueError``); a folder without code files is
    a ``ValueError``. Audio is decoded and written piece by piece (:func:`decoded_blocks`), at a
    temporary name moved into place when complete; an output that cannot be written stops the run
    (:class:`~audiotok.utils.io.StorageError`).
    """
    start = time.perf_counter()
    src, out = Path(input), Path(output)
    if format is not None:
        format = format.lower().lstrip(".")
        if "." + format not in AUDIO_WRITE_FORMATS:
            raise ValueError(f"unknown audio format {format!r}; use one of "
                             f"{', '.join(e[1:] for e in AUDIO_WRITE_FORMATS)}")
    _check_input(src)
    if sample_rate is not None and sample_rate != "source":
        check_sample_rate(sample_rate)
    chunks = _show_progress(progress)
    chosen = tokenizer is not None
    load = tokenizer or (lambda: AudioTokenizer.from_pretrained(None, device=device, **load_kwargs))

    def write(model: AudioTokenizer, code_file: CodeFile, a: Path, b: Path) -> None:
        _check_fits(code_file, a, model, chosen, allow_other_weights)
        rate, blocks = decoded_blocks(model, code_file, sample_rate, chunks, allow_other_weights)
        with audio_writer(b, rate, code_file.shape[0], subtype) as put:
            for block in blocks:
                put(block)

    if src.is_file():
        suffixes = ("." + format,) if format else tuple(AUDIO_WRITE_FORMATS)
        dst = _single_output(src, out, suffixes, "audio")
        check_subtype(dst.suffix.lower(), subtype)
        check_writable(dst)
        code_file = CodeFile.load(src)
        model, loading = _loaded(load)
        write(model, code_file, src, dst)
        report = BatchReport(done=[(src, dst)])
    else:
        suffix = "." + (format or "wav")
        check_subtype(suffix, subtype)
        pairs = _folder_pairs(src, out, (SUFFIX,), suffix, f"{SUFFIX} files")
        model, loading = _loaded(load)
        _check_headers(pairs, model, chosen, allow_other_weights)
        report = BatchReport()
        _run_batch(pairs, lambda a, b: write(model, CodeFile.load(a), a, b), report, "decoding", progress)
    report.seconds = time.perf_counter() - start - loading
    return report


def _check_fits(codes: CodeHeader | CodeFile, path: Path, model: AudioTokenizer, chosen: bool,
                allow_other_weights: bool) -> None:
    """``ValueError`` naming ``path`` unless ``model`` decodes ``codes`` (``chosen``: the user chose the
    model; if not, the message says the bundled one was used); :class:`DisagreeingFields` for a damaged file."""
    try:
        codes.check_compatible(model, allow_other_weights)
    except DisagreeingFields as e:
        raise DisagreeingFields(f"{path}: {e}") from None
    except ValueError as e:
        hint = "" if chosen else (f" (no model was given, so the bundled {model.model_id!r} was used; give the "
                                  f"model that wrote the codes with --model)")
        raise ValueError(f"{path}: {e}{hint}") from None


def _check_headers(pairs: list[tuple[Path, Path]], model: AudioTokenizer, chosen: bool,
                   allow_other_weights: bool) -> None:
    """Check every readable header of a folder's code files against the model first, so that a wrong model
    decodes nothing: ``ValueError`` listing the files that do not fit (damaged files are skipped later)."""
    mismatched = []
    for a, _ in pairs:
        try:
            header = read_header(a)
        except (ValueError, OSError):
            continue  # reported as skipped when decoding
        try:
            _check_fits(header, a, model, chosen, allow_other_weights)
        except DisagreeingFields:
            continue  # a damaged file, not another model's: reported as skipped when decoding
        except ValueError as e:
            mismatched.append(str(e))
    if mismatched:
        listed = "\n".join(mismatched[:5]) + (f"\n... ({len(mismatched)} files in all)" if len(mismatched) > 5 else "")
        raise ValueError(f"refusing to decode: {len(mismatched)} file(s) do not fit the model:\n{listed}")


def _check_input(src: Path) -> None:
    """``FileNotFoundError`` for a missing input, ``ValueError`` for one that is neither a file nor a folder
    (a FIFO, a device)."""
    if not src.exists():
        raise FileNotFoundError(f"{src}: no such file or folder")
    if not src.is_file() and not src.is_dir():
        raise ValueError(f"{src}: not a regular file or folder")
