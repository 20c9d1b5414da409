"""The input side of a bulk job: which source, how it is split, and decoding in DataLoader workers.

Partition. The source is cut into a fixed list of *parts* that depends only on the source (and, for
random-access sources, ``part_records``), never on the number of processes or workers:
``source.partition(part_records)`` (see :mod:`audiotok.data.sources`): one part per WebDataset
shard, ``part_records`` consecutive rows per part of a folder or saved / non-streaming Hugging Face
dataset, one part per shard (data file) of a streaming Hugging Face dataset. Parts never overlap
and together cover every record once. Each part is a deterministic, ordered stream; an item's
*position* is its index in that stream, counting both good records and
:class:`~audiotok.data.DecodeError` items (so failures are positions too).

Random-access parts resume at a position at no cost; streaming parts are read from their start and
the first ``start`` items are passed over without decoding their audio.

Workers. :class:`PartReader` takes ``(part, start)`` tasks from a queue that the job's main process
fills as it claims parts: each DataLoader worker reads whole parts, one at a time, so the split
among workers changes nothing in the output. Every reader (DataLoader worker, or Ray task of the
ray engine) reads a part with :func:`read_bundles`.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from torch.utils.data import IterableDataset

from ..audio import AUDIO_EXTENSIONS, audio_fault, to_model_rate
from ..data.config import build_sources
from ..data.sources import AudioSource, DecodeError, Record
from ..formats.codedataset import check_metadata_fields
from ..utils.urls import is_url, list_url, local_path

INPUT_TYPES = ("folder", "hf", "webdataset")


@dataclass
class InputSpec:
    """What to read.

    Attributes:
        type: ``folder`` (audio files under a folder, sorted by path), ``hf`` (a Hugging Face dataset:
            a ``save_to_disk`` folder, a folder of audio files read as ``audiofolder``, or a hub id /
            builder name) or ``webdataset`` (tar shards: paths, globs or brace patterns).
        path: the folder, dataset, or shard pattern(s) (a list for several patterns).
        split: dataset split (``hf``).
        audio_column: column holding the audio (``hf``).
        audio_keys: extensions of the audio member (``webdataset``) or of the files to list
            (``folder``); default :data:`audiotok.audio.AUDIO_EXTENSIONS`.
        streaming: read a Hugging Face dataset as an ``IterableDataset`` (``hf``).
        keep: fields stored next to the codes as each record's ``metadata``: columns (``hf``, e.g.
            ``text``, an id column), members (``webdataset``, e.g. ``txt``, ``json``) or sidecar file
            extensions (``folder``: ``clip.txt`` next to ``clip.wav`` for ``txt``).
        storage_options: options of the fsspec filesystem when ``path`` is a URL (``s3://``, ``gs://``,
            ``hf://``: a folder, a saved dataset or tar shards there; see :mod:`audiotok.utils.urls`);
            credentials, so not written anywhere (not in :meth:`to_dict`, not in the repr).
    """

    type: str
    path: str | list[str]
    split: str = "train"
    audio_column: str = "audio"
    audio_keys: list[str] | None = None
    streaming: bool = False
    keep: list[str] = field(default_factory=list)
    storage_options: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.type not in INPUT_TYPES:
            raise ValueError(f"input type must be one of {INPUT_TYPES}, got {self.type!r}")
        if isinstance(self.path, (list, tuple)):
            self.path = [str(p) for p in self.path]
            if len(self.path) == 1:
                self.path = self.path[0]
        else:
            self.path = str(self.path)
        if isinstance(self.path, list) and self.type != "webdataset":
            raise ValueError(f"a {self.type} input takes one path, got {len(self.path)}")
        if self.audio_keys is not None:
            keys = self.audio_keys.split(",") if isinstance(self.audio_keys, str) else self.audio_keys
            self.audio_keys = [k.strip().lower().lstrip(".") for k in keys if k.strip().strip(".")]
        keep = self.keep.split(",") if isinstance(self.keep, str) else self.keep
        self.keep = [k.strip() if self.type == "hf" else k.strip().lstrip(".") for k in keep if k.strip()]
        check_metadata_fields(self.keep)

    def source_spec(self) -> dict[str, Any]:
        """This input as a :func:`audiotok.data.build_sources` spec (the one source factory)."""
        if self.type == "folder":
            spec: dict[str, Any] = {"type": "folder", "root": self.path}
            if self.audio_keys:
                spec["extensions"] = ["." + k for k in self.audio_keys]
        elif self.type == "hf":
            spec = {"type": "hf", "path": self.path, "split": self.split, "audio_column": self.audio_column,
                    "streaming": self.streaming}
        else:
            spec = {"type": "webdataset", "urls": self.path}
            if self.audio_keys:
                spec["audio_keys"] = list(self.audio_keys)
        if self.keep:
            spec["keep"] = list(self.keep)
        paths = self.path if isinstance(self.path, list) else [self.path]
        if self.storage_options and any(is_url(local_path(p)) for p in paths):  # local inputs take none
            spec["storage_options"] = dict(self.storage_options)
        return spec

    def build(self) -> AudioSource:
        """The :class:`~audiotok.data.AudioSource` that reads this input."""
        (source,) = build_sources(self.source_spec())
        return source

    def unread_extensions(self) -> dict[str, int]:
        """For a folder: how many files of each extension the folder holds that are not read
        (not in ``audio_keys`` or :data:`~audiotok.audio.AUDIO_EXTENSIONS`), e.g. ``{".txt": 1}``.
        Hidden files and folders are left out, as the folder lister leaves them out."""
        if self.type != "folder":
            return {}
        listed = tuple("." + k for k in self.audio_keys) if self.audio_keys else AUDIO_EXTENSIONS
        path = local_path(str(self.path))
        if is_url(path):
            names = [posixpath.basename(f) for f in list_url(path, self.storage_options)]
        else:
            names = []
            for _, dirnames, files in os.walk(path, followlinks=True):
                dirnames[:] = [d for d in dirnames if not d.startswith(".")]
                names += [f for f in files if not f.startswith(".")]
        counts: dict[str, int] = {}
        for name in names:
            if not name.lower().endswith(listed):
                ext = os.path.splitext(name)[1].lower() or "(none)"
                counts[ext] = counts.get(ext, 0) + 1
        return dict(sorted(counts.items()))

    def _where(self, path: str) -> str:
        """Local paths made absolute (hub ids, URLs and ``pipe:`` commands as given)."""
        if "://" in path or path.startswith("pipe:"):
            return path
        if self.type == "hf" and not os.path.exists(path):
            return path
        return os.path.abspath(path)

    def to_dict(self) -> dict[str, Any]:
        """The settings that apply to this input type (written to the manifest's ``input``; a
        resumed job must have the same)."""
        path = [self._where(p) for p in self.path] if isinstance(self.path, list) else self._where(self.path)
        d: dict[str, Any] = {"type": self.type, "path": path}
        if self.type == "hf":
            d.update(split=self.split, audio_column=self.audio_column, streaming=self.streaming)
        if self.type != "hf" and self.audio_keys:
            d["audio_keys"] = list(self.audio_keys)
        if self.keep:
            d["keep"] = list(self.keep)
        return d


def source_fingerprint(source: AudioSource) -> dict[str, Any]:
    """What must not change between a job and its resumption for positions to mean the same records:
    the kind of source, its size and, for a folder (local or at a URL), ``listing``, a hash of its
    sorted file list (another file in place of one keeps the size, not the listing)."""
    fp: dict[str, Any] = {"kind": type(source).__name__, "random_access": bool(source.random_access)}
    if source.random_access:
        fp["size"] = len(source)
    files = getattr(source, "files", None)
    if files is not None:
        fp["listing"] = hashlib.sha256("\n".join(map(str, files)).encode()).hexdigest()[:16]
    return fp


# ---------------------------------------------------------------------------------------------
# One part of the source, as an ordered stream of (position, Record | DecodeError)


def part_stream(source: AudioSource, part: dict[str, Any],
                start: int = 0) -> Iterator[tuple[int, Record | DecodeError]]:
    """``(position, Record | DecodeError)`` for positions ``start, start + 1, ...`` of ``part`` (one
    of ``source.partition(...)``; the items before ``start`` are not decoded)."""
    yield from zip(itertools.count(start), source.read_part(part, start))


# ---------------------------------------------------------------------------------------------
# Worker-side items


@dataclass
class Decoded:
    """A good record, resampled to the model rate (``audio`` ``[C', T']`` float32, ``C' = 1`` when
    downmixed to mono), with what the output records about the source audio."""

    part: int
    position: int
    key: str
    audio: torch.Tensor
    num_samples: int
    sample_rate: int
    channels: int
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def seconds(self) -> float:
        return self.num_samples / self.sample_rate


@dataclass
class Failure:
    """A position that yields no record: ``reason`` is a :class:`DecodeError` reason, ``short``
    (shorter than ``min_seconds``, or no samples left after resampling), ``resample`` or ``encode``."""

    part: int
    position: int
    key: str
    reason: str
    detail: str = ""

    def to_dict(self) -> dict[str, str]:
        return {"key": self.key, "reason": self.reason, "detail": self.detail}


@dataclass
class Bundle:
    """Consecutive items of one part; ``end`` is the part's length once it is exhausted."""

    part: int
    items: list[Decoded | Failure] = field(default_factory=list)
    end: int | None = None


def prepare(part: int, position: int, item: Record | DecodeError, sample_rate: int, mono: bool,
            min_seconds: float = 0.0) -> Decoded | Failure:
    """A source item -> :class:`Decoded` (downmixed if ``mono``, resampled to ``sample_rate`` by
    :func:`audiotok.audio.to_model_rate`, what :meth:`AudioTokenizer.prepare_audio` runs for
    :meth:`AudioTokenizer.encode`) or :class:`Failure`."""
    if isinstance(item, DecodeError):
        return Failure(part, position, item.key, item.reason, item.detail)
    num_samples, channels = item.audio.shape[-1], item.audio.shape[0]
    seconds = num_samples / item.sample_rate
    if seconds < min_seconds:
        return Failure(part, position, item.key, "short", f"{seconds:.3f} s < {min_seconds} s")
    try:
        audio = to_model_rate(item.audio, item.sample_rate, sample_rate, mono)
    except Exception as e:  # soxr errors on odd rates
        return Failure(part, position, item.key, "resample", f"{type(e).__name__}: {e}")
    fault = audio_fault(audio)
    if fault == "empty":
        return Failure(part, position, item.key, "short",
                       f"{num_samples} samples at {item.sample_rate} Hz leave none at {sample_rate} Hz")
    if fault is not None:
        return Failure(part, position, item.key, fault, "after resampling")
    return Decoded(part, position, item.key, torch.from_numpy(np.ascontiguousarray(audio)), num_samples,
                   item.sample_rate, channels, item.metadata)


class TaskQueue(Protocol):
    """Where :class:`PartReader` takes its tasks: ``(part, start)``, or ``None`` to stop (a
    ``torch.multiprocessing.SimpleQueue`` made before the DataLoader starts its workers)."""

    def get(self) -> tuple[int, int] | None: ...


class PartReader(IterableDataset):
    """Parts of ``parts`` (``source.partition(...)``) as a stream of :class:`Bundle`, decoded in
    DataLoader workers.

    Each worker (or the main process without workers) takes a task ``(part, start)`` from ``tasks``,
    reads that part from position ``start`` to its end, and takes the next, until it gets ``None``.
    Bundles hold about ``bundle_seconds`` of audio (or ``bundle_items`` items) and come in position
    order; a part's last bundle has its ``end``.
    """

    def __init__(self, source: AudioSource, parts: list[dict[str, Any]], tasks: TaskQueue, sample_rate: int,
                 mono: bool = True, min_seconds: float = 0.0, bundle_seconds: float = 60.0, bundle_items: int = 256):
        self.source, self.parts, self.tasks = source, parts, tasks
        self.sample_rate, self.mono, self.min_seconds = sample_rate, mono, min_seconds
        self.bundle_seconds, self.bundle_items = bundle_seconds, bundle_items

    def __iter__(self) -> Iterator[Bundle]:
        while (task := self.tasks.get()) is not None:
            part, start = task
            yield from read_bundles(self.source, self.parts[part], part, start, self.sample_rate, self.mono,
                                    self.min_seconds, self.bundle_seconds, self.bundle_items)


def read_bundles(source: AudioSource, spec: dict[str, Any], part: int, start: int, sample_rate: int,
                 mono: bool = True, min_seconds: float = 0.0, bundle_seconds: float = 60.0,
                 bundle_items: int = 256) -> Iterator[Bundle]:
    """Part ``part`` (``spec`` = ``source.partition(...)[part]``) from position ``start`` to its end,
    read and :func:`prepare` d, as :class:`Bundle` s of about ``bundle_seconds`` of audio (or
    ``bundle_items`` items) in position order; the last one has the part's ``end``. What every
    engine's readers run (DataLoader workers, Ray tasks)."""
    bundle, seconds, position = Bundle(part), 0.0, start
    for position, item in part_stream(source, spec, start):
        out = prepare(part, position, item, sample_rate, mono, min_seconds)
        bundle.items.append(out)
        seconds += out.seconds if isinstance(out, Decoded) else 0.0
        if seconds >= bundle_seconds or len(bundle.items) >= bundle_items:
            yield bundle
            bundle, seconds = Bundle(part), 0.0
        position += 1
    bundle.end = position
    yield bundle


def identity_collate(x: Any) -> Any:
    return x
