"""Pack a manifest's audio into small Ogg/Opus parts, to carry a corpus to a remote machine.

Each part is a manifest folder of at most ``part_mib`` MiB (``manifest.csv`` plus mono Opus files
of at most ``excerpt_seconds``), readable by the ``manifest`` source spec; a glob reads several
parts as one corpus (``path: data/packed/part-*``). Files are taken in an order shuffled with
``seed``, so every part is a random sample of the whole split (speech, music and general sound
alike) and training on the first parts alone is already balanced.

At 24 kHz, Opus (about 35 kbps on the real-audio set) keeps about 3.7 hours of audio in 60 MiB,
against 22 minutes as 16-bit WAV.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import random
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ..audio import downmix, resample
from ..io import atomic_write
from .sources import DecodeError, SkipCounter, decode_file

log = logging.getLogger("audiotok.data")

#: Sample rates that Opus codes (libsndfile); pack a 44.1 kHz corpus at 48 kHz.
OPUS_RATES = (8000, 12000, 16000, 24000, 48000)
MANIFEST_COLUMNS = ["split", "category", "source", "license", "path", "sr", "channels", "seconds", "format", "subtype"]


_PLAIN_NAME = re.compile(r"[A-Za-z0-9][\w.-]*")


def _plain_name(value: str, where: str) -> None:
    """``ValueError`` unless ``value`` is a plain file name (letters, digits, ``_.-``; no separator, no ``..``)."""
    if not _PLAIN_NAME.fullmatch(value) or ".." in value:
        raise ValueError(f"{where}: {value!r} is not a plain name (letters, digits, '_', '.', '-')")


def _opus_bytes(audio: np.ndarray, sample_rate: int) -> bytes:
    import soundfile as sf

    buffer = io.BytesIO()
    sf.write(buffer, audio[0], sample_rate, format="OGG", subtype="OPUS")
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


def _pieces(rows: list[dict[str, str]], root: Path, sample_rate: int, step: int,
            skipped: SkipCounter) -> Iterator[tuple[dict[str, str], str, np.ndarray]]:
    """``(row, name, piece [1, <= step])`` for the pieces of at least 1 s of each readable file."""
    for row in rows:
        try:
            record = decode_file(row["path"], root / row["path"])
        except DecodeError as e:
            skipped.add(e)
            continue
        audio = resample(downmix(record.audio), record.sample_rate, sample_rate)
        parts = Path(row["path"]).with_suffix("").parts
        stem = "__".join(p for p in parts if p not in ("/", ".", ".."))  # one plain name, whatever the path
        for i, start in enumerate(range(0, audio.shape[1], step)):
            piece = audio[:, start:start + step]
            if piece.shape[1] >= sample_rate:
                yield row, f"{stem}-{i:04d}", piece


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
) -> list[Path]:
    """Pack ``split`` of ``manifest`` (a ``manifest.csv`` or its folder) into ``out/part-NNN`` folders.

    Audio is downmixed to mono, resampled to ``sample_rate`` (one of :data:`OPUS_RATES`) and cut into
    excerpts of ``excerpt_seconds`` (the last one of a file may be shorter; pieces under 1 s are
    dropped). Unreadable files are skipped and logged. Stops after ``max_parts`` parts when given.
    Returns the part folders written. Every file written stays inside ``out``: ``split`` and the
    manifest's ``category`` values must be plain names. Audio is read only inside the manifest's
    folder unless ``outside_root`` (see :func:`~audiotok.data.config.read_manifest`).
    """
    from .config import read_manifest

    if sample_rate not in OPUS_RATES:
        raise ValueError(f"Opus codes {OPUS_RATES} Hz only, not {sample_rate} (pack a 44.1 kHz corpus at 48000)")
    if excerpt_seconds < 1 or part_mib <= 0:
        raise ValueError("excerpt_seconds must be at least 1 and part_mib positive")
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
    for row, name, piece in _pieces(rows, root, sample_rate, int(excerpt_seconds * sample_rate), skipped):
        data = _opus_bytes(piece, sample_rate)
        if part is not None and part.bytes + len(data) > budget:
            part.close()
            part = None
            if max_parts is not None and len(parts) >= max_parts:
                break
        if part is None:
            part = _Part(out / f"part-{len(parts):03d}")
            parts.append(part.folder)
        part.add(f"{split}/{row['category']}/{name}.opus", data, {
            "split": split, "category": row["category"], "source": row.get("source", ""),
            "license": row.get("license", ""), "sr": str(sample_rate), "channels": "1",
            "seconds": f"{piece.shape[1] / sample_rate:.3f}", "format": "OGG", "subtype": "OPUS",
        })
    if part is not None:
        part.close()
    log.info("packed %d parts; %d files skipped", len(parts), skipped.total)
    return parts
