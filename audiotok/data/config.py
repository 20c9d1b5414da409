"""Data configuration from plain dicts (YAML recipes), source specs, and the real-audio manifest."""

from __future__ import annotations

import csv
import dataclasses
import glob
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import torch

from ..nn.config import check_keys
from ..utils.urls import is_url
from ..utils.workers import available_cpus
from .dataset import Excerpt, ExcerptDataset, SourceGroup, build_validation_set
from .resident import ResidentAudio, ResidentBatches
from .sources import (
    AudioFileSource,
    AudioFolderSource,
    AudioSource,
    HFDatasetSource,
    URLFolderSource,
    WebDatasetSource,
)

#: Manifest categories (``audiotok.data.real_audio``) -> groups. ``speech8k`` (8 kHz telephone speech,
#: eval only) stays apart so that it is not averaged with wide-band speech.
MANIFEST_GROUPS = {
    "speech": "speech", "music": "music", "instrument": "music", "general": "general", "speech8k": "speech8k",
}


def inside_path(value: str, where: str) -> str:
    """``value`` unchanged if it is a relative path that stays inside its folder (not empty, not
    absolute, no ``..`` part, no drive); else ``ValueError`` naming ``where``."""
    posix = PurePosixPath(value.replace("\\", "/"))
    if not value or posix.is_absolute() or ".." in posix.parts or PureWindowsPath(value).drive:
        raise ValueError(f"{where}: {value!r} is not a relative path inside the folder")
    return value


def read_manifest(path: str | os.PathLike, outside_root: bool = False) -> list[dict[str, str]]:
    """Rows of a ``manifest.csv`` written by ``recipes/fetch_real_audio.py`` (``path``: the file or its
    folder). A missing manifest is a ``FileNotFoundError`` that says how to fetch the set.

    Columns: split, category, source, license, path (relative to the manifest's folder), sr,
    channels, seconds, format, subtype. A ``path`` that is absolute or leaves the manifest's folder
    (``../``) is a ``ValueError`` unless ``outside_root``.
    """
    path = Path(path)
    if path.is_dir() or path.suffix != ".csv":
        path = path / "manifest.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such manifest; fetch the real-audio set with: "
                                f"python recipes/fetch_real_audio.py {path.parent} core")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    missing = {"split", "category", "path"} - set(rows[0] if rows else {"split", "category", "path"})
    if missing:
        raise ValueError(f"{path}: not a manifest, missing columns {sorted(missing)}")
    if not outside_root:
        for line, row in enumerate(rows, start=2):
            inside_path(row["path"], f"{path}:{line}: path (outside_root=True reads files outside its folder)")
    return rows


def sources_from_manifest(
    path: str | os.PathLike,
    split: str | Sequence[str] = "train",
    groups: Mapping[str, str] = MANIFEST_GROUPS,
    outside_root: bool = False,
) -> dict[str, AudioFileSource]:
    """Group name -> :class:`AudioFileSource` over the manifest's files of ``split`` (one split
    name or several). Categories are mapped to groups by ``groups``; others are left out. Files
    outside the manifest's folder are refused unless ``outside_root`` (see :func:`read_manifest`)."""
    path = Path(path)
    root = path if path.is_dir() else path.parent
    splits = {split} if isinstance(split, str) else set(split)
    files: dict[str, list[str]] = {}
    for row in read_manifest(path, outside_root):
        group = groups.get(row["category"])
        if row["split"] in splits and group is not None:
            files.setdefault(group, []).append(row["path"])
    label = "+".join(sorted(splits))
    return {g: AudioFileSource(f, root=root, name=f"manifest:{label}:{g}") for g, f in sorted(files.items())}


def build_sources(spec: Mapping[str, Any]) -> list[AudioSource]:
    """Sources from a spec dict; ``type`` selects the kind, other keys are its arguments:

    * ``{"type": "folder", "root": ..., "extensions": [...], "name": ...}`` (a ``root`` URL such as
      ``s3://bucket/corpus`` is a :class:`~audiotok.data.URLFolderSource`, with ``storage_options``)
    * ``{"type": "hf", "path": ..., "config": ..., "split": "train", "audio_column": "audio",
      "streaming": false, "storage_options": {...}, ...}`` (``config``: the dataset's configuration;
      further keys go to ``load_dataset``)
    * ``{"type": "webdataset", "urls": ..., "audio_keys": [...], "size": ..., "storage_options": {...}}``

    ``storage_options``: options of the fsspec filesystem of URL inputs (see :mod:`audiotok.utils.urls`).
    * ``{"type": "manifest", "path": ..., "split": "train", "group": "speech"}`` (``group``: one
      name or a list, of :data:`MANIFEST_GROUPS` values; ``path`` may be a glob over several
      manifest folders, such as the parts :func:`~audiotok.data.pack.pack_manifest` writes)
    """
    spec = dict(spec)
    kind = spec.pop("type", None)
    try:
        if kind == "folder":
            return [URLFolderSource(**spec) if is_url(spec.get("root", "")) else AudioFolderSource(**spec)]
        if kind == "hf":
            return [HFDatasetSource(spec.pop("path"), **spec)]
        if kind == "webdataset":
            return [WebDatasetSource(spec.pop("urls"), **spec)]
        if kind == "manifest":
            wanted = spec.pop("group")
            pattern = str(spec.pop("path"))
            paths = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
            if not paths:
                raise ValueError(f"no manifests match {pattern}")
            found = [sources_from_manifest(path, **spec) for path in paths]
            names = [wanted] if isinstance(wanted, str) else list(wanted)
            absent = [n for n in names if not any(n in f for f in found)]
            if absent:
                raise ValueError(f"{pattern}: no files for groups {absent}; it has {sorted(set().union(*found))}")
            return [f[n] for n in names for f in found if n in f]
    except (KeyError, TypeError) as e:
        raise ValueError(f"bad {kind} source spec {spec}: {e}") from e
    raise ValueError(f"source spec type must be folder, hf, webdataset or manifest, got {kind!r}")


@dataclass
class GroupConfig:
    """A group of sources: relative ``weight`` and a list of :func:`build_sources` specs."""

    weight: float = 1.0
    sources: list[dict[str, Any]] = field(default_factory=list)


def _groups(value: Mapping[str, Any]) -> dict[str, GroupConfig]:
    out = {}
    for name, group in value.items():
        if isinstance(group, GroupConfig):
            out[name] = group
        elif isinstance(group, Mapping) and set(group) <= {"weight", "sources"}:
            out[name] = GroupConfig(float(group.get("weight", 1.0)), [dict(s) for s in group.get("sources", [])])
        else:
            raise ValueError(f"group {name!r} must be a mapping with 'weight' and 'sources', got {group!r}")
        if not out[name].sources:
            raise ValueError(f"group {name!r} has no sources")
    return out


@dataclass
class DataConfig:
    """Training and validation data (defaults: the DAC recipe).

    ``groups`` / ``val_groups``: name -> ``{"weight": w, "sources": [spec, ...]}`` (see
    :func:`build_sources`); ``balance=False`` weights sources by size instead of group weights.
    ``resident=True``: training batches are cut on the training device from every record decoded
    once (:meth:`resident_batches`, :mod:`audiotok.data.resident`) instead of host DataLoader workers.
    """

    sample_rate: int = 44100
    duration: float = 0.38
    groups: dict[str, GroupConfig] = field(default_factory=dict)
    balance: bool = True
    seed: int = 0
    loudness_target: float = -16.0
    min_loudness: float = -40.0
    salient_tries: int = 8
    phase_shift: bool = True
    max_draws: int = 32
    val_groups: dict[str, GroupConfig] = field(default_factory=dict)
    val_duration: float = 5.0
    val_per_group: int = 16
    resident: bool = False

    def __post_init__(self) -> None:
        self.groups = _groups(self.groups)
        self.val_groups = _groups(self.val_groups)
        if self.sample_rate <= 0 or self.duration <= 0 or self.val_duration <= 0:
            raise ValueError("sample_rate, duration and val_duration must be positive")
        if not isinstance(self.resident, bool):
            raise ValueError(f"resident must be true or false, got {self.resident!r}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DataConfig:
        check_keys(cls, d, "data config")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def source_groups(self, validation: bool = False) -> dict[str, SourceGroup]:
        groups = self.val_groups if validation else self.groups
        return {
            name: SourceGroup(group.weight, [src for spec in group.sources for src in build_sources(spec)])
            for name, group in groups.items()
        }

    def train_dataset(self, rank: int = 0, world_size: int = 1, block_size: int = 1) -> ExcerptDataset:
        """The training stream of one rank; ``block_size``: the per-rank DataLoader batch size."""
        return ExcerptDataset(
            self.source_groups(), self.sample_rate, self.duration, balance=self.balance, seed=self.seed,
            rank=rank, world_size=world_size, block_size=block_size, min_loudness=self.min_loudness,
            salient_tries=self.salient_tries, loudness_target=self.loudness_target,
            phase_shift=self.phase_shift, max_draws=self.max_draws,
        )

    def resident_batches(self, device: torch.device | str, batch_size: int, rank: int = 0,
                         world_size: int = 1) -> ResidentBatches:
        """The training batches of one rank (``[batch_size, 1, N]``), cut on ``device`` from every
        training record decoded there once, by the available cores shared among ``world_size`` ranks."""
        audio = ResidentAudio.load(self.source_groups(), self.sample_rate, device, balance=self.balance,
                                   workers=max(1, available_cpus() // world_size))
        return ResidentBatches(
            audio, batch_size, self.duration, seed=self.seed, rank=rank, min_loudness=self.min_loudness,
            salient_tries=self.salient_tries, loudness_target=self.loudness_target, phase_shift=self.phase_shift,
        )

    def validation_set(self) -> list[Excerpt]:
        if not self.val_groups:
            raise ValueError("no val_groups configured")
        return build_validation_set(
            self.source_groups(validation=True), self.sample_rate, self.val_duration, self.val_per_group,
            seed=self.seed, min_loudness=self.min_loudness, salient_tries=self.salient_tries,
            loudness_target=self.loudness_target,
        )
