"""Pack a manifest's audio into small Ogg/Opus parts, to carry a corpus to a remote machine.

Each part is a manifest folder of at most ``part_mib`` MiB (``manifest.csv`` plus mono Opus files
of at most ``excerpt_seconds``), readable by the ``manifest`` source spec; a glob reads several
parts as one corpus (``path: data/packed/part-*``). Files are taken in an order shuffled with
``seed``, so every part is a random sample of the whole split (speech, music and general sound
alike) and training on the first parts alone is already balanced. The numbering is deterministic
(the same manifest and settings give the same parts), so parts can be carried one per call and
rotated: call ``k`` carries ``part-{k mod n:03d}``.

Opus is coded at :data:`DEFAULT_KBPS` (24 kbps, a VBR target; ``bitrate_kbps`` sets it): at 24 kHz
the real-audio set's files come out at about 26 kbps, 0.09 hours of audio per MiB (5.4 hours per 60
MiB), against 22 minutes as 16-bit WAV and 3.7 hours at libopus's own default (about 38 kbps).
"""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import multiprocessing
import os
import random
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ..audio import downmix, resample
from ..utils.io import atomic_write
from ..utils.workers import die_with_parent
from .sources import DecodeError, SkipCounter, decode_file

log = logging.getLogger("audiotok.data")

#: Sample rates that Opus codes (libsndfile); pack a 44.1 kHz corpus at 48 kHz.
OPUS_RATES = (8000, 12000, 16000, 24000, 48000)
#: Opus bitrates (kbps per channel) that libsndfile sets, and the packing default: at 24 kHz it keeps
#: speech at PESQ 4.3 (STOI 0.985) and the mel distance at 0.79, 0.4 times the bundled codec's
#: (benchmarks/README.md, "Packing bitrate"), where 16 kbps falls to PESQ 3.85.
OPUS_KBPS = (6.0, 256.0)
DEFAULT_KBPS = 24.0
MANIFEST_COLUMNS = ["split", "category", "source", "license", "path", "sr", "channels", "seconds", "format", "subtype"]


_PLAIN_NAME = re.compile(r"[A-Za-z0-9][\w.-]*")


def _plain_name(value: str, where: str) -> None:
    """``ValueError`` unless ``value`` is a plain file name (letters, digits, ``_.-``; no separator, no ``..``)."""
    if not _PLAIN_NAME.fullmatch(value) or ".." in value:
        raise ValueError(f"{where}: {value!r} is not a plain name (letters, digits, '_', '.', '-')")


def opus_compression_level(kbps: float) -> float:
    """libsndfile's ``compression_level`` for an Opus target bitrate of ``kbps`` per channel.

    libsndfile's Ogg/Opus encoder (verified with 1.2.2) turns the level into libopus's bitrate as
    ``6000 + (1 - level) * 250000`` bits/s per channel, truncated to an integer: 0.0 is 256 kbps, 1.0 is
    6 kbps. libopus then codes in its default (unconstrained) VBR mode, so a file's bytes per second
    follow the target on average and vary with the content."""
    if not OPUS_KBPS[0] <= kbps <= OPUS_KBPS[1]:
        raise ValueError(f"Opus bitrates through libsndfile are {OPUS_KBPS[0]} to {OPUS_KBPS[1]} kbps, got {kbps}")
    return min(1.0, max(0.0, 1.0 - (kbps * 1000 - 6000 + 0.5) / 250000))  # +0.5: survive the truncation


def opus_bytes(audio: np.ndarray, sample_rate: int, kbps: float | None = DEFAULT_KBPS) -> bytes:
    """Mono ``audio`` ``[1, N]`` (or ``[N]``) as an Ogg/Opus file at ``kbps`` (VBR target; ``None``:
    libopus's own choice, about 38 kbps on the real-audio set at 24 kHz)."""
    import soundfile as sf

    level = None if kbps is None else opus_compression_level(kbps)
    buffer = io.BytesIO()
    sf.write(buffer, audio.reshape(-1), sample_rate, format="OGG", subtype="OPUS", compression_level=level)
    return buffer.getvalue()


class _Part:
    """A part folder being filled; ``close`` writes its manifest (the part is complete once it exists)."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.rows: list[dict[str, str]] = []
        self.bytes = 0

    def add(self, relpath: str, data: bytes, row: dict[str, str]) -> None:
        path = self.folder / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        self.rows.append({**row, "path": relpath})
        self.bytes += len(data)

    def close(self) -> None:
        with atomic_write(self.folder / "manifest.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=MANIFEST_COLUMNS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(self.rows)


#: A file to pack: ``(manifest row, root, sample_rate, samples per piece, kbps)``.
PackTask = tuple[dict[str, str], Path, int, int, float | None]
#: What packing a file gives: ``(name, Opus bytes, seconds)`` of each piece, or why it is skipped.
Coded = list[tuple[str, bytes, float]] | DecodeError


def _coded_pieces(task: PackTask) -> Coded:
    """One manifest row ``(row, root, sample_rate, step, kbps)`` -> ``(name, Opus bytes, seconds)`` of
    each piece of at least 1 s (of ``step`` samples, the last one shorter), or why the file is skipped.
    A pool worker's task, run in the calling process too."""
    row, root, sample_rate, step, kbps = task
    try:
        record = decode_file(row["path"], root / row["path"])
    except DecodeError as e:
        return e
    audio = resample(downmix(record.audio), record.sample_rate, sample_rate)
    parts = Path(row["path"]).with_suffix("").parts
    stem = "__".join(p for p in parts if p not in ("/", ".", ".."))  # one plain name, whatever the path
    return [(f"{stem}-{i:04d}", opus_bytes(piece, sample_rate, kbps), piece.shape[1] / sample_rate)
            for i, start in enumerate(range(0, audio.shape[1], step))
            if (piece := audio[:, start:start + step]).shape[1] >= sample_rate]


@contextlib.contextmanager
def _coded_files(tasks: list[PackTask], workers: int) -> Iterator[Iterator[Coded]]:
    """:func:`_coded_pieces` of each task, in order: here, or in ``workers`` spawned processes
    (terminated, with what they had left, when the block is left)."""
    if workers <= 1:
        yield map(_coded_pieces, tasks)
        return
    with multiprocessing.get_context("spawn").Pool(workers, die_with_parent, (os.getpid(),)) as pool:
        yield pool.imap(_coded_pieces, tasks, chunksize=2)


def pack_manifest(
    manifest: str | os.PathLike,
    out: str | os.PathLike,
    split: str = "train",
    sample_rate: int = 24000,
    excerpt_seconds: float = 10.0,
    part_mib: float = 60.0,
    max_parts: int | None = None,
    seed: int = 0,
    outside_root: bool = False,
    bitrate_kbps: float | None = DEFAULT_KBPS,
    workers: int = 1,
) -> list[Path]:
    """Pack ``split`` of ``manifest`` (a ``manifest.csv`` or its folder) into ``out/part-NNN`` folders.

    Audio is downmixed to mono, resampled to ``sample_rate`` (one of :data:`OPUS_RATES`) and cut into
    excerpts of ``excerpt_seconds`` (the last one of a file may be shorter; pieces under 1 s are
    dropped), coded as Opus at ``bitrate_kbps`` (VBR target, see :func:`opus_bytes`; ``None``:
    libopus's default, about 38 kbps). Unreadable files are skipped and logged. Stops after
    ``max_parts`` parts when given. Returns the part folders written. ``workers > 1``: files are
    decoded and coded in that many spawned processes: the same parts (the same audio and manifests;
    libsndfile gives each Ogg stream a random serial number, in one process or several).

    Parts are numbered in the order they fill, and the same manifest packed with the same settings
    (and libsndfile) gives the same parts: part ``k`` of a run with ``max_parts`` is part ``k`` of a run
    without.

    Every file written stays inside ``out``: ``split`` and the manifest's ``category`` values must be
    plain names. Audio is read only inside the manifest's
    folder unless ``outside_root`` (see :func:`~audiotok.data.config.read_manifest`).
    """
    from .config import read_manifest

    if sample_rate not in OPUS_RATES:
        raise ValueError(f"Opus codes {OPUS_RATES} Hz only, not {sample_rate} (pack a 44.1 kHz corpus at 48000)")
    if excerpt_seconds < 1 or part_mib <= 0:
        raise ValueError("excerpt_seconds must be at least 1 and part_mib positive")
    if bitrate_kbps is not None:
        opus_compression_level(bitrate_kbps)  # checks the range before any work
    manifest = Path(manifest)
    root = manifest if manifest.is_dir() else manifest.parent
    out = Path(out)
    if out.exists() and any(out.glob("part-*")):
        raise FileExistsError(f"{out} already holds parts: pack into a new folder")
    _plain_name(split, "split")
    rows = [r for r in read_manifest(manifest, outside_root) if r["split"] == split]
    if not rows:
        raise ValueError(f"{manifest}: no files in split {split!r}")
    for row in rows:
        _plain_name(row["category"], f"{manifest}: category of {row['path']}")
    random.Random(seed).shuffle(rows)

    budget = int(part_mib * 2**20)
    skipped = SkipCounter(f"pack:{root}")
    parts: list[Path] = []
    part = None
    coded_bytes = coded_seconds = 0.0
    full = False  # max_parts parts written
    tasks = [(row, root, sample_rate, int(excerpt_seconds * sample_rate), bitrate_kbps) for row in rows]
    with _coded_files(tasks, workers) as coded:
        for row, pieces in zip(rows, coded):
            if isinstance(pieces, DecodeError):
                skipped.add(pieces)
                continue
            for name, data, seconds in pieces:
                coded_bytes, coded_seconds = coded_bytes + len(data), coded_seconds + seconds
                if part is not None and part.bytes + len(data) > budget:
                    part.close()
                    part = None
                    if max_parts is not None and len(parts) >= max_parts:
                        full = True
                        break
                if part is None:
                    part = _Part(out / f"part-{len(parts):03d}")
                    parts.append(part.folder)
                part.add(f"{split}/{row['category']}/{name}.opus", data, {
                    "split": split, "category": row["category"], "source": row.get("source", ""),
                    "license": row.get("license", ""), "sr": str(sample_rate), "channels": "1",
                    "seconds": f"{seconds:.3f}", "format": "OGG", "subtype": "OPUS",
                })
            if full:
                break
    if part is not None:
        part.close()
    kbps = coded_bytes * 8 / 1000 / max(coded_seconds, 1e-9)
    log.info("packed %d parts; %d files skipped; Opus at %.1f kbps (bytes per second of the files)",
             len(parts), skipped.total, kbps)
    if bitrate_kbps is not None and coded_seconds >= 10 and kbps > 1.5 * bitrate_kbps + 2:
        import soundfile as sf

        log.warning("the packed files hold %.1f kbps where %g was asked: this libsndfile (%s) does not set the "
                    "Opus bitrate (1.2.2 does)", kbps, bitrate_kbps, sf.__libsndfile_version__)
    return parts
