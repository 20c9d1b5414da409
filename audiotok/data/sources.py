"""Raw audio sources for training: folders and file lists, Hugging Face datasets, WebDataset shards.

Every source yields :class:`Record` ``(key, audio [C, T] float32, sample_rate)``. Audio is
decoded with soundfile (libsndfile), or for m4a/AAC with FFmpeg through PyAV when it is installed
(:func:`audiotok.audio.load_audio`), never with torchcodec. A record that cannot be used
(unreadable or corrupt data, no samples, NaN/Inf samples, no audio member) is never fatal: it is
reported as a :class:`DecodeError`, skipped, and counted in the source's :class:`SkipCounter`.

Two access patterns:

* random access (``source.random_access`` is True): ``len(source)``, ``source.load(i)`` (full
  decode) and ``source.clip(i)`` (a :class:`~audiotok.data.transforms.Clip` that reads only the
  frames asked for, so an excerpt of a long file costs a seek, not a full decode);
* streaming: ``source.records(part, num_parts, epoch, seed)`` iterates one disjoint part of the
  data; parts ``0..num_parts-1`` together cover every record exactly once per epoch.
  ``start=N`` passes over the part's first N items without decoding them (resuming a job).

``records()`` exists for both kinds and yields ``Record`` or ``DecodeError`` items; iterating a
source (``for rec in source``) yields the good records of part 0 of 1 and counts the rest.

Fixed parts (bulk jobs): ``source.partition(rows_per_part)`` cuts a source into parts that depend
only on the source, described by small JSON dicts: ``{"rows": [start, stop]}`` for random-access
sources, ``{"shard": url}`` per WebDataset shard, ``{"shard": i, "of": n}`` per shard of a
streaming Hugging Face dataset. ``source.read_part(part, start)`` reads one of them in order.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import json
import logging
import os
import posixpath
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..audio import (
    AUDIO_EXTENSIONS,
    FFMPEG_EXTENSIONS,
    audio_fault,
    find_files,
    load_audio,
    read_audio_bytes,
    to_float_array,
)
from ..utils.urls import glob_url, is_url, list_url, local_path, scheme, url_to_fs
from .transforms import ArrayClip, Clip

logger = logging.getLogger(__name__)



@dataclass(frozen=True)
class Record:
    """One decoded item: ``audio`` is float32 ``[C, T]`` with ``C, T >= 1`` and finite samples;
    ``metadata`` holds the fields the source was asked to keep (``keep``), as JSON values."""

    key: str
    audio: np.ndarray
    sample_rate: int
    metadata: dict[str, Any] = field(default_factory=dict)


class DecodeError(Exception):
    """A record that cannot be used. ``reason`` is one of ``decode``, ``empty``, ``nonfinite``,
    ``missing``, ``noaudio``, ``shard`` (an unreadable WebDataset shard) or ``metadata`` (a field to
    keep is absent or unreadable)."""

    def __init__(self, key: str, reason: str, detail: str = ""):
        super().__init__(f"{key}: {reason}" + (f" ({detail})" if detail else ""))
        self.key, self.reason, self.detail = key, reason, detail

    def __reduce__(self) -> tuple[type, tuple[str, str, str]]:  # pickled by its fields (process pools)
        return type(self), (self.key, self.reason, self.detail)


class SkipCounter:
    """Counts skipped records per reason and keeps the first few keys of each.

    The first ``max_examples`` skips of each reason are logged as warnings, later ones at debug
    level. With DataLoader workers each worker process has its own counter.
    """

    def __init__(self, name: str, max_examples: int = 5):
        self.name = name
        self.max_examples = max_examples
        self.counts: collections.Counter[str] = collections.Counter()
        self.examples: dict[str, list[str]] = collections.defaultdict(list)

    def add(self, error: DecodeError) -> None:
        self.counts[error.reason] += 1
        examples = self.examples[error.reason]
        if len(examples) < self.max_examples:
            examples.append(error.key)
            logger.warning("%s: skipping %s", self.name, error)
        else:
            logger.debug("%s: skipping %s", self.name, error)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def __repr__(self) -> str:
        return f"SkipCounter({self.name!r}, {dict(self.counts)})"


def check_audio(key: str, audio: np.ndarray, sample_rate: int) -> Record:
    """Validate decoded ``[C, T]`` (or ``[T]``) audio into a :class:`Record`; raise :class:`DecodeError`."""
    try:
        audio = to_float_array(np.asarray(audio))
    except (TypeError, ValueError) as e:
        raise DecodeError(key, "decode", str(e)) from e
    if audio.ndim == 1:
        audio = audio[None]
    if audio.ndim != 2:
        raise DecodeError(key, "decode", f"audio has shape {audio.shape}, expected [T] or [C, T]")
    fault = audio_fault(audio)
    if fault is not None:
        raise DecodeError(key, fault)
    if int(sample_rate) <= 0:
        raise DecodeError(key, "decode", f"sample rate {sample_rate}")
    return Record(key, audio, int(sample_rate))


def decode_bytes(key: str, data: bytes) -> Record:
    """Decode an encoded audio file held in memory (any libsndfile format)."""
    if not data:
        raise DecodeError(key, "empty", "0 bytes")
    try:
        audio, sample_rate = read_audio_bytes(data)
    except ValueError as e:
        raise DecodeError(key, "decode", str(e)) from e
    return check_audio(key, audio, sample_rate)


def decode_file(key: str, path: str | os.PathLike) -> Record:
    """Decode an audio file with :func:`audiotok.audio.load_audio`."""
    try:
        if os.path.getsize(path) == 0:
            raise DecodeError(key, "empty", "0 bytes")
        audio, sample_rate = load_audio(path)
    except FileNotFoundError as e:
        raise DecodeError(key, "missing", str(e)) from e
    except ValueError as e:
        raise DecodeError(key, "decode", str(e)) from e
    return check_audio(key, audio, sample_rate)


def decode_member(key: str, name: str, data: bytes) -> Any:
    """A kept WebDataset member or sidecar file as a JSON value: ``name`` ending in ``json`` is
    parsed, anything else is UTF-8 text."""
    try:
        text = data.decode("utf-8")
        return json.loads(text) if name.rsplit(".", 1)[-1].lower() == "json" else text
    except ValueError as e:
        raise DecodeError(key, "metadata", f"{name}: {e}") from e


def _with_metadata(record: Record, metadata: dict[str, Any]) -> Record:
    return dataclasses.replace(record, metadata=metadata) if metadata else record


class FileClip:
    """An audio file read on demand: the header is parsed at construction, ``read`` seeks.

    Raises :class:`DecodeError` for missing, unreadable or empty files, and from ``read`` for
    corrupt data or NaN/Inf samples in the frames read.
    """

    def __init__(self, key: str, path: str | os.PathLike):
        import soundfile as sf

        self.key, self.path = key, str(path)
        try:
            if os.path.getsize(self.path) == 0:
                raise DecodeError(key, "empty", "0 bytes")
            info = sf.info(self.path)
        except FileNotFoundError as e:
            raise DecodeError(key, "missing", str(e)) from e
        except DecodeError:
            raise
        except Exception as e:
            raise DecodeError(key, "decode", str(e)) from e
        if info.frames <= 0 or info.channels <= 0:
            raise DecodeError(key, "empty")
        self.sample_rate, self.num_frames, self.num_channels = int(info.samplerate), int(info.frames), info.channels

    def read(self, start: int, frames: int) -> np.ndarray:
        """``[C, frames']`` float32 from frame ``start`` (fewer frames at the end of the file)."""
        import soundfile as sf

        try:
            with sf.SoundFile(self.path) as f:
                f.seek(start)
                audio = f.read(frames, dtype="float32", always_2d=True)
        except Exception as e:
            raise DecodeError(self.key, "decode", str(e)) from e
        return check_audio(self.key, audio.T, self.sample_rate).audio


class AudioSource:
    """Base class: see the module docstring. Subclasses set ``name`` and ``random_access`` and
    implement ``records`` (streaming) or ``__len__``/``load``/``clip`` (random access)."""

    name: str
    random_access: bool = False
    #: Number of records when known (``len`` for random-access sources); used for size weighting.
    size: int | None = None

    def __init__(self, name: str):
        self.name = name
        self.skipped = SkipCounter(name)

    def records(
        self, part: int = 0, num_parts: int = 1, epoch: int = 0, seed: int | None = None, start: int = 0
    ) -> Iterator[Record | DecodeError]:
        """Random-access default: indices ``part, part + num_parts, ...`` of the listed order
        (``seed=None``) or of a permutation drawn from ``(seed, epoch)``, from item ``start`` of
        the part on (a ``ValueError`` if the part has fewer items)."""
        order = np.arange(len(self)) if seed is None else np.random.default_rng([seed, epoch]).permutation(len(self))
        indices = order[part::num_parts]
        self._check_start(part, len(indices), start)
        for i in indices[start:]:
            try:
                yield self.load(int(i))
            except DecodeError as e:
                yield e

    def partition(self, rows_per_part: int = 1000) -> list[dict[str, Any]]:
        """Fixed parts (see the module docstring); random access: ``rows_per_part`` consecutive rows each."""
        if rows_per_part < 1:
            raise ValueError(f"rows_per_part must be >= 1, got {rows_per_part}")
        n = len(self)
        return [{"rows": [a, min(a + rows_per_part, n)]} for a in range(0, n, rows_per_part)]

    def read_part(self, part: dict[str, Any], start: int = 0) -> Iterator[Record | DecodeError]:
        """The items of ``part`` (from :meth:`partition`) in order, from item ``start`` on (the
        items before it are not decoded; a ``ValueError`` if the part has fewer)."""
        a, b = part["rows"]
        self._check_start(f"rows {a}:{b}", b - a, start)
        for i in range(a + start, b):
            try:
                yield self.load(i)
            except DecodeError as e:
                yield e

    def _check_start(self, part: int | str, count: int, start: int) -> None:
        if count < start:
            raise ValueError(f"{self.name}: part {part} has {count} items, fewer than start={start} "
                             "(the input changed since the positions were recorded?)")

    def __iter__(self) -> Iterator[Record]:
        for item in self.records():
            if isinstance(item, DecodeError):
                self.skipped.add(item)
            else:
                yield item

    def __len__(self) -> int:
        raise TypeError(f"{type(self).__name__} {self.name!r} is a streaming source without random access")

    def load(self, index: int) -> Record:
        raise TypeError(f"{type(self).__name__} {self.name!r} is a streaming source without random access")

    def clip(self, index: int) -> Clip:
        """A :class:`~audiotok.data.transforms.Clip` for record ``index`` (default: decoded fully)."""
        record = self.load(index)
        return ArrayClip(record.audio, record.sample_rate, record.key)

    def __repr__(self) -> str:
        n = f", {self.size} records" if self.size is not None else ""
        return f"{type(self).__name__}({self.name!r}{n})"


class AudioFileSource(AudioSource):
    """Random access over a list of audio files. Keys are paths relative to ``root`` when given.

    ``keep``: extensions of sidecar files (``clip.wav`` + ``clip.txt`` for ``txt``) whose contents
    become each record's ``metadata`` (:func:`decode_member`); a missing sidecar is a ``metadata`` error.
    """

    random_access = True

    def __init__(
        self, files: Sequence[str | os.PathLike], root: str | os.PathLike | None = None, name: str | None = None,
        keep: Sequence[str] = (),
    ):
        super().__init__(name or (str(root) if root is not None else "files"))
        self.root = Path(root) if root is not None else None
        self.files = [Path(f) if self.root is None else self.root / f for f in files]
        self.size = len(self.files)
        self.keep = tuple(keep)

    def key(self, index: int) -> str:
        path = self.files[index]
        return path.relative_to(self.root).as_posix() if self.root is not None else str(path)

    def __len__(self) -> int:
        return len(self.files)

    def load(self, index: int) -> Record:
        key, path = self.key(index), self.files[index]
        metadata = {}
        for ext in self.keep:
            sidecar = path.with_suffix("." + ext)
            if not sidecar.is_file():
                raise DecodeError(key, "metadata", f"no sidecar file {sidecar.name}")
            metadata[ext] = decode_member(key, sidecar.name, sidecar.read_bytes())
        return _with_metadata(decode_file(key, path), metadata)

    def clip(self, index: int) -> Clip:
        if self.files[index].suffix.lower() in FFMPEG_EXTENSIONS:  # no seeking: decoded whole
            return super().clip(index)
        return FileClip(self.key(index), self.files[index])


class AudioFolderSource(AudioFileSource):
    """The audio files under ``root`` (:func:`audiotok.audio.find_files`: recursive, sorted,
    hidden files left out, links followed) whose extension is in ``extensions``."""

    def __init__(self, root: str | os.PathLike, extensions: Sequence[str] = AUDIO_EXTENSIONS, name: str | None = None,
                 keep: Sequence[str] = ()):
        root = Path(local_path(root))
        files = [str(f.relative_to(root)) for f in find_files(root, extensions)]
        super().__init__(files, root=root, name=name or root.name, keep=keep)


class URLFolderSource(AudioSource):
    """The audio files under an fsspec URL (``s3://bucket/corpus``, see :mod:`audiotok.utils.urls`),
    listed once as :class:`AudioFolderSource` lists a folder (recursive, sorted, hidden files left
    out, by extension); each file is read whole and decoded in memory. Keys are paths relative to
    ``root``; ``keep``: sidecar extensions, as :class:`AudioFolderSource`.
    """

    random_access = True

    def __init__(self, root: str, extensions: Sequence[str] = AUDIO_EXTENSIONS, name: str | None = None,
                 keep: Sequence[str] = (), storage_options: dict[str, Any] | None = None):
        self.root = str(root).rstrip("/")
        super().__init__(name or posixpath.basename(self.root))
        self.storage_options = dict(storage_options or {})
        exts = tuple("." + e.lower().lstrip(".") for e in extensions)
        self.files = [f for f in list_url(self.root, self.storage_options) if f.lower().endswith(exts)]
        self.size = len(self.files)
        self.keep = tuple(keep)

    def key(self, index: int) -> str:
        return self.files[index]

    def __len__(self) -> int:
        return len(self.files)

    def _read(self, name: str) -> bytes:
        fs, base = url_to_fs(self.root, self.storage_options)  # per process: fsspec's instance cache
        return bytes(fs.cat_file(f"{base}/{name}"))

    def load(self, index: int) -> Record:
        key = self.files[index]
        metadata = {}
        for ext in self.keep:
            sidecar = posixpath.splitext(key)[0] + "." + ext
            try:
                data = self._read(sidecar)
            except FileNotFoundError:
                raise DecodeError(key, "metadata", f"no sidecar file {posixpath.basename(sidecar)}") from None
            metadata[ext] = decode_member(key, posixpath.basename(sidecar), data)
        try:
            data = self._read(key)
        except FileNotFoundError as e:
            raise DecodeError(key, "missing", str(e)) from e
        return _with_metadata(decode_bytes(key, data), metadata)


# ---------------------------------------------------------------------------------------------
# Hugging Face datasets


def _is_saved_dataset(location: str, storage_options: dict[str, Any] | None = None) -> bool:
    """Whether the folder or fsspec URL ``location`` holds a dataset written by ``save_to_disk``."""
    names = ("dataset_info.json", "state.json", "dataset_dict.json")
    if is_url(location):
        fs, base = url_to_fs(location, storage_options)
        return any(fs.isfile(f"{base}/{name}") for name in names)
    path = Path(location)
    return path.is_dir() and any((path / name).is_file() for name in names)


class HFDatasetSource(AudioSource):
    """A Hugging Face dataset, decoded with soundfile.

    ``path_or_name`` is a folder written by ``save_to_disk`` (read with ``load_from_disk``; also
    at an fsspec URL such as ``s3://bucket/saved``, which ``datasets`` first copies to a local
    temporary folder), a folder of audio files (``load_dataset("audiofolder", data_dir=...)``, labels
    and metadata dropped), or a dataset id / builder name for ``load_dataset`` (its configuration
    ``config``, and ``**load_kwargs``, passed on). ``storage_options`` go to the fsspec filesystem
    of a URL (``load_from_disk``, and ``load_dataset``'s remote data files).
    ``streaming=True`` gives an ``IterableDataset`` read through :meth:`records` only.

    The audio column is cast to ``datasets.Audio(decode=False)``, so rows give the stored
    ``{"bytes", "path"}`` and datasets never calls torchcodec; bytes are decoded in memory and
    local paths are read with soundfile (remote paths through ``datasets``' ``xopen``). A column
    of plain ``{"array", "sampling_rate"}`` dicts (array ``[T]`` or ``[C, T]``) or of path
    strings works as well. ``keep``: columns whose values become each record's ``metadata``.
    """

    def __init__(
        self,
        path_or_name: str | os.PathLike,
        split: str = "train",
        audio_column: str = "audio",
        streaming: bool = False,
        name: str | None = None,
        config: str | None = None,
        keep: Sequence[str] = (),
        storage_options: dict[str, Any] | None = None,
        **load_kwargs: Any,
    ):
        import datasets

        super().__init__(name or f"{path_or_name}{'/' + config if config else ''}:{split}")
        self.audio_column = audio_column
        self.streaming = streaming
        location = local_path(path_or_name)
        path = Path(location)
        if _is_saved_dataset(location, storage_options):
            if load_kwargs or config:
                raise ValueError(f"{location} is a saved dataset: load_dataset arguments "
                                 f"{sorted(load_kwargs) + (['config'] if config else [])} don't apply")
            ds = datasets.load_from_disk(location, storage_options=storage_options)
            if isinstance(ds, datasets.DatasetDict):
                ds = ds[split]
            if streaming:
                ds = ds.to_iterable_dataset()
        elif is_url(location):
            raise ValueError(f"{location} is not a dataset saved with save_to_disk, the one kind of hf input read "
                             "from a URL (audio files at a URL: a folder input; a hub dataset: its id)")
        elif path.is_dir():
            # The audiofolder builder encodes its rows through Audio.encode_example, which needs
            # torchcodec even for plain paths: declare the column as strings instead.
            features = datasets.Features({audio_column: datasets.Value("string")})
            ds = datasets.load_dataset(
                "audiofolder", data_dir=str(path), split=split, streaming=streaming,
                features=features, drop_labels=True, drop_metadata=True, **load_kwargs,
            )
        else:
            ds = datasets.load_dataset(location, config, split=split, streaming=streaming,
                                       storage_options=storage_options, **load_kwargs)
        self.keep = tuple(keep)
        for column in (audio_column, *self.keep):
            if column not in (ds.features or {}):
                raise ValueError(f"{self.name}: no column {column!r}; columns: {list(ds.features or {})}")
        if isinstance(ds.features[audio_column], datasets.Audio):
            ds = ds.cast_column(audio_column, datasets.Audio(decode=False))
        self.dataset = ds.select_columns([audio_column, *self.keep])
        self.random_access = not streaming
        if not streaming:
            self.size = len(self.dataset)
        elif ds.info.splits and split in ds.info.splits:
            self.size = ds.info.splits[split].num_examples or None

    def _decode(self, key: str, value: Any) -> Record:
        if value is None:
            raise DecodeError(key, "empty", "no audio")
        if isinstance(value, str):
            value = {"path": value, "bytes": None}
        if isinstance(value, dict) and value.get("array") is not None:
            if value.get("sampling_rate") is None:
                raise DecodeError(key, "decode", "array without sampling_rate")
            return check_audio(key, np.asarray(value["array"], dtype=np.float32), value["sampling_rate"])
        if not isinstance(value, dict):
            raise DecodeError(key, "decode", f"unsupported audio value of type {type(value).__name__}")
        if value.get("bytes"):
            return decode_bytes(key, value["bytes"])
        path = value.get("path")
        if not path:
            raise DecodeError(key, "empty", "neither bytes nor path")
        if os.path.exists(path):
            return decode_file(key, path)
        from datasets.utils.file_utils import xopen

        try:
            with xopen(path, "rb") as f:
                data = f.read()
        except Exception as e:
            raise DecodeError(key, "missing", str(e)) from e
        return decode_bytes(key, data)

    @staticmethod
    def _key(label: int | str, value: Any) -> str:
        path = value.get("path") if isinstance(value, dict) else value if isinstance(value, str) else None
        return f"{label}:{path}" if path else str(label)

    def __len__(self) -> int:
        if self.streaming:
            return super().__len__()
        return len(self.dataset)

    def load(self, index: int) -> Record:
        if self.streaming:
            return super().load(index)
        row = self.dataset[index]
        value = row[self.audio_column]
        return _with_metadata(self._decode(self._key(index, value), value), {k: row[k] for k in self.keep})

    def clip(self, index: int) -> Clip:
        value = self.dataset[index][self.audio_column]
        path = value if isinstance(value, str) else value.get("path") if isinstance(value, dict) else None
        in_memory = isinstance(value, dict) and (value.get("bytes") or value.get("array") is not None)
        if path and not in_memory and os.path.isfile(path):
            return FileClip(self._key(index, value), path)
        record = self._decode(self._key(index, value), value)
        return ArrayClip(record.audio, record.sample_rate, record.key)

    def records(
        self, part: int = 0, num_parts: int = 1, epoch: int = 0, seed: int | None = None, start: int = 0
    ) -> Iterator[Record | DecodeError]:
        """Map-style: see :meth:`AudioSource.records`. Streaming: ``split_dataset_by_node`` gives
        the part (whole shards when they divide evenly, else every ``num_parts``-th row); rows come
        in dataset order (``epoch`` and ``seed`` are not used)."""
        if not self.streaming:
            yield from super().records(part, num_parts, epoch, seed, start)
            return
        from datasets.distributed import split_dataset_by_node

        ds = split_dataset_by_node(self.dataset, rank=part, world_size=num_parts) if num_parts > 1 else self.dataset
        yield from self._stream_rows(ds, f"part{part}", part, start)

    def _stream_rows(self, ds: Any, prefix: str, part: int | str, start: int) -> Iterator[Record | DecodeError]:
        """The rows of a stream from row ``start`` on, keyed ``{prefix}.{row}[:{path}]``."""
        # ``iter`` rather than ``__iter__``: inside a DataLoader worker, ``__iter__`` splits the data
        # among the workers a second time, on top of our parts, and records would be lost.
        count = 0
        for count, batch in enumerate(ds.iter(batch_size=1), start=1):
            if count <= start:
                continue
            value = batch[self.audio_column][0]
            key = self._key(f"{prefix}.{count - 1}", value)
            try:
                yield _with_metadata(self._decode(key, value), {k: batch[k][0] for k in self.keep})
            except DecodeError as e:
                yield e
        self._check_start(part, count, start)

    def partition(self, rows_per_part: int = 1000) -> list[dict[str, Any]]:
        """Map-style: row ranges (:meth:`AudioSource.partition`); streaming: one part per shard of the
        stream (``IterableDataset.n_shards``: its data files), whatever ``rows_per_part``."""
        if not self.streaming:
            return super().partition(rows_per_part)
        n = self.dataset.n_shards
        return [{"shard": i, "of": n} for i in range(n)]

    def read_part(self, part: dict[str, Any], start: int = 0) -> Iterator[Record | DecodeError]:
        """Map-style: see :meth:`AudioSource.read_part`. Streaming: shard ``i`` of the stream's ``n``;
        keys are ``shard{i}.{row}[:{path}]`` (row within the shard)."""
        if not self.streaming:
            yield from super().read_part(part, start)
            return
        i, n = part["shard"], part["of"]
        if n != self.dataset.n_shards:
            raise ValueError(f"{self.name}: the stream has {self.dataset.n_shards} shards, the part is of {n}")
        ds = self.dataset.shard(num_shards=n, index=i) if n > 1 else self.dataset
        yield from self._stream_rows(ds, f"shard{i}", f"shard {i}", start)


# ---------------------------------------------------------------------------------------------
# WebDataset shards


#: URL schemes webdataset opens itself (``webdataset.gopen``: curl); other URLs are opened with fsspec.
GOPEN_SCHEMES = ("http", "https")


def _fsspec_shard(url: str) -> bool:
    return is_url(url) and scheme(url) not in GOPEN_SCHEMES


def expand_urls(urls: str | Iterable[str], storage_options: dict[str, Any] | None = None) -> list[str]:
    """Brace patterns (``data-{000..099}.tar``) and globs -> list of shards.

    Globs are expanded for local paths (``file://`` URLs become paths) and for fsspec URLs on their
    filesystem (``s3://bucket/train-*.tar``, made with ``storage_options``); not for ``http(s)://``
    and ``pipe:``. Lists are expanded item by item; glob matches are sorted; order is otherwise kept.
    """
    import braceexpand

    out: list[str] = []
    for pattern in [urls] if isinstance(urls, str) else urls:
        for url in braceexpand.braceexpand(local_path(str(pattern))):
            if not glob.has_magic(url) or url.startswith("pipe:") or scheme(url) in GOPEN_SCHEMES:
                out.append(url)
                continue
            matches = glob_url(url, storage_options) if is_url(url) else sorted(glob.glob(url))
            if not matches:
                raise FileNotFoundError(f"no files match {url}")
            out.extend(matches)
    return out


class WebDatasetSource(AudioSource):
    """Tar shards in WebDataset layout (members ``KEY.EXT`` grouped by key): local paths, ``pipe:``
    and ``http(s)://`` opened by ``webdataset.gopen``, other URLs (``s3://``, ``gs://``, ``hf://``
    ...) streamed with fsspec, made with ``storage_options`` (:mod:`audiotok.utils.urls`).

    The first member whose extension (last dotted part, lower case) is in ``audio_keys`` is
    decoded with soundfile. A sample without one is skipped as ``noaudio``; an unreadable shard
    (or the unreadable rest of one) is skipped as ``shard``. Streaming only; ``size`` (the number
    of samples, when known) is used for size weighting. ``keep``: members (by extension, e.g.
    ``txt``, ``json``) whose contents become each record's ``metadata`` (:func:`decode_member`); a
    sample without one is a ``metadata`` error.
    """

    def __init__(
        self,
        urls_or_glob: str | Sequence[str],
        audio_keys: Sequence[str] = AUDIO_EXTENSIONS,
        size: int | None = None,
        name: str | None = None,
        keep: Sequence[str] = (),
        storage_options: dict[str, Any] | None = None,
    ):
        self.storage_options = dict(storage_options or {})
        self.shards = expand_urls(urls_or_glob, self.storage_options)
        if not self.shards:
            raise ValueError("WebDatasetSource needs at least one shard")
        super().__init__(name or os.path.basename(os.path.dirname(self.shards[0])) or self.shards[0])
        self.audio_keys = tuple(k.lower().lstrip(".") for k in audio_keys)
        self.size = size
        self.keep = tuple(keep)

    def _stream(self, url: str, handler: Any) -> Iterator[dict[str, Any]]:
        """``{"url", "stream"}`` of an fsspec shard, for webdataset's tar reader (closed after)."""
        try:
            fs, path = url_to_fs(url, self.storage_options)
            stream = fs.open(path, "rb")
        except Exception as e:  # a missing or unreadable shard: an item of its own
            handler(e)
            return
        with stream:
            yield {"url": url, "stream": stream}

    def _samples(self, url: str) -> Iterator[dict | DecodeError]:
        from webdataset.tariterators import group_by_keys, tar_file_expander, url_opener

        errors: list[Exception] = []

        def handler(exn: Exception) -> bool:
            errors.append(exn)
            return True

        if _fsspec_shard(url):
            streams = self._stream(url, handler)
        else:
            streams = url_opener(iter([{"url": url}]), handler=handler)
        for sample in group_by_keys(tar_file_expander(streams, handler=handler), handler=handler):
            yield from (DecodeError(url, "shard", str(e)) for e in errors)
            errors.clear()
            yield sample
        yield from (DecodeError(url, "shard", str(e)) for e in errors)

    def _decode(self, sample: dict) -> Record:
        key = f"{sample['__url__']}:{sample['__key__']}"
        metadata = {}
        for ext in self.keep:
            if ext not in sample:
                raise DecodeError(key, "metadata", f"no {ext!r} member")
            metadata[ext] = decode_member(key, ext, sample[ext])
        for ext, value in sample.items():
            if not ext.startswith("__") and ext.rsplit(".", 1)[-1] in self.audio_keys:
                return _with_metadata(decode_bytes(key, value), metadata)
        raise DecodeError(key, "noaudio", f"members: {sorted(k for k in sample if not k.startswith('__'))}")

    def _item(self, sample: dict) -> Record | DecodeError:
        """A sample decoded, or the ``DecodeError`` that decoding it gave."""
        try:
            return self._decode(sample)
        except DecodeError as e:
            return e

    def records(
        self, part: int = 0, num_parts: int = 1, epoch: int = 0, seed: int | None = None, start: int = 0
    ) -> Iterator[Record | DecodeError]:
        """Shards in listed order (``seed=None``) or in an order drawn from ``(seed, epoch)``.

        With at least ``num_parts`` shards, part ``p`` reads shards ``p, p + num_parts, ...`` of
        that order; with fewer, every part reads all shards and keeps samples ``n`` with
        ``n % num_parts == p`` (shard-level errors are then reported by part 0 only). Shard-level
        errors count as items for ``start``.
        """
        n = len(self.shards)
        order = range(n) if seed is None else np.random.default_rng([seed, epoch]).permutation(n)
        shards = [self.shards[i] for i in order]
        by_shard = n >= num_parts
        count = 0  # samples read, every part's
        items = 0  # items of this part
        for url in shards[part::num_parts] if by_shard else shards:
            for sample in self._samples(url):
                if isinstance(sample, DecodeError):
                    if by_shard or part == 0:
                        items += 1
                        if items > start:
                            yield sample
                    continue
                count += 1
                if not by_shard and (count - 1) % num_parts != part:
                    continue
                items += 1
                if items > start:
                    yield self._item(sample)
        self._check_start(part, items, start)

    def partition(self, rows_per_part: int = 1000) -> list[dict[str, Any]]:
        """One part per shard, in listed order (whatever ``rows_per_part``)."""
        return [{"shard": url} for url in self.shards]

    def read_part(self, part: dict[str, Any], start: int = 0) -> Iterator[Record | DecodeError]:
        """The samples of shard ``part["shard"]`` in order (shard-level errors count as items); the
        first ``start`` are passed over without decoding."""
        url, items = part["shard"], 0
        for sample in self._samples(url):
            items += 1
            if items > start:
                yield sample if isinstance(sample, DecodeError) else self._item(sample)
        self._check_start(url, items, start)
