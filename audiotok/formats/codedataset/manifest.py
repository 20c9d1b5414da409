"""A code dataset's manifest, typed: what the folder holds and which codec wrote it (see
:mod:`audiotok.formats.codedataset`)."""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...identity import CodecIdentity
from ...nn.config import DACConfig
from ...utils.store import Store
from ...utils.untrusted import OptionalEntry, check_shape, parse_json

FORMAT_NAME = "audiotok-code-dataset"
FORMAT_VERSION = 3
#: The manifest's file name in the dataset folder (written last: a folder without it is no dataset yet).
MANIFEST_NAME = "manifest.json"

#: The entries of the manifest a reader uses (see :mod:`audiotok.formats.codedataset`; other entries are not read).
MANIFEST_SHAPE = {
    "format": str, "format_version": int, "model_id": str, "config": dict, "config_hash": str,
    "codes_fingerprint": OptionalEntry((str, type(None))), "hop_length": int, "frame_rate": float,
    "shards": [{"path": str, "records": int, "frames": int}], "records": OptionalEntry(int),
    "audio_hours": OptionalEntry(float), "failures": OptionalEntry([{"key": str, "reason": str}]),
    "input": OptionalEntry(dict), "n_quantizers": OptionalEntry(int), "mono": OptionalEntry(bool),
    "metadata": OptionalEntry([str]), "layout": OptionalEntry(str), "created": OptionalEntry(str),
}


def dataset_metadata(codec: CodecIdentity, config: DACConfig, n_quantizers: int | None,
                     mono: bool | None) -> dict[str, Any]:
    """What a reader needs to interpret a shard's codes without the manifest: the model (``model_id``,
    ``config_hash``, ``codes_fingerprint``), the rates (``sample_rate``, ``hop_length``, ``frame_rate``)
    and the codes (``n_quantizers``, ``codebook_size``, ``mono``); stored in the shards
    (:class:`~audiotok.formats.codedataset.records.ShardWriter`). ``None``: a value the manifest does not record."""
    return {**codec.to_dict(), "sample_rate": config.sample_rate, "hop_length": config.hop_length,
            "frame_rate": config.frame_rate, "n_quantizers": n_quantizers, "codebook_size": config.codebook_size,
            "mono": mono}


@dataclass(frozen=True)
class ShardEntry:
    """A shard of the dataset: its ``path`` relative to the folder, its ``records`` and their ``frames``."""

    path: str
    records: int
    frames: int


@dataclass(frozen=True)
class Manifest:
    """A code dataset's manifest (:data:`MANIFEST_NAME`; the format is :mod:`audiotok.formats.codedataset`).

    Attributes:
        codec: the model that wrote the codes; ``config`` its configuration (``hop_length`` and
            ``frame_rate`` are the config's).
        shards: the shards, in reading order.
        audio_hours: the duration of the source audio of all records.
        failures: the source items without codes: ``{"key", "reason", "detail"}`` each.
        n_quantizers: the codebooks every record holds; ``mono``: records ``[K, F]`` (``True``) or
            ``[C, K, F]``; ``metadata``: the fields kept with every record (format 3).
        input, layout, created: how and when the bulk tokenizer wrote the dataset (not read).
        format_version: the version it was written in.

    Entries older manifests do not record are ``None``.
    """

    codec: CodecIdentity
    config: DACConfig
    shards: tuple[ShardEntry, ...]
    audio_hours: float | None = None
    failures: tuple[dict[str, Any], ...] = ()
    input: dict[str, Any] | None = None
    n_quantizers: int | None = None
    mono: bool | None = None
    metadata: tuple[str, ...] | None = None
    layout: str | None = None
    created: str | None = None
    format_version: int = FORMAT_VERSION

    @property
    def records(self) -> int:
        """Records in all shards."""
        return sum(s.records for s in self.shards)

    def shard_metadata(self) -> dict[str, Any]:
        """The :func:`dataset_metadata` the manifest states, which every shard must agree with."""
        return dataset_metadata(self.codec, self.config, self.n_quantizers, self.mono)

    def to_dict(self) -> dict[str, Any]:
        """The manifest's JSON object (entries that are ``None`` left out, but for ``codes_fingerprint``)."""
        data = {"format": FORMAT_NAME, "format_version": self.format_version, "model_id": self.codec.model_id,
                "config": self.config.to_dict(), "config_hash": self.codec.config_hash,
                "codes_fingerprint": self.codec.codes_fingerprint, "hop_length": self.config.hop_length,
                "frame_rate": self.config.frame_rate,
                "shards": [{"path": s.path, "records": s.records, "frames": s.frames} for s in self.shards],
                "records": self.records, "audio_hours": self.audio_hours, "failures": list(self.failures),
                "input": self.input, "n_quantizers": self.n_quantizers, "mono": self.mono,
                "metadata": None if self.metadata is None else list(self.metadata), "layout": self.layout,
                "created": self.created}
        return {k: v for k, v in data.items() if v is not None or k == "codes_fingerprint"}

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str) -> Manifest:
        """The manifest ``data`` (read from ``where``), checked (:func:`check_manifest`)."""
        config = check_manifest(data, where)
        return cls(CodecIdentity.from_dict(data, where), config,
                   tuple(ShardEntry(s["path"], s["records"], s["frames"]) for s in data["shards"]),
                   data.get("audio_hours"), tuple(data.get("failures", ())), data.get("input"),
                   data.get("n_quantizers"), data.get("mono"),
                   None if data.get("metadata") is None else tuple(data["metadata"]), data.get("layout"),
                   data.get("created"), data["format_version"])

    @classmethod
    def read(cls, store: Store) -> Manifest:
        """The manifest of the dataset in ``store``; ``FileNotFoundError`` if it has none."""
        where = f"{store.url}/{MANIFEST_NAME}"
        return cls.from_dict(parse_json(store.read_bytes(MANIFEST_NAME), where, dict), where)

    def write(self, store: Store) -> None:
        """Write the manifest to the dataset in ``store``, atomically."""
        store.write_json(MANIFEST_NAME, self.to_dict())


def check_manifest(manifest: dict[str, Any], where: str | os.PathLike) -> DACConfig:
    """The config of ``manifest``; ``ValueError`` unless it is a code-dataset manifest this reader knows
    (:data:`MANIFEST_SHAPE`) whose shard paths stay inside the dataset folder (a manifest never makes
    a reader open other files), whose entries agree with each other: ``config_hash``, ``hop_length`` and
    ``frame_rate`` with ``config``, ``n_quantizers`` within its codebooks, ``records`` with the shards'
    records; and which lists no shard twice."""
    if manifest.get("format") != FORMAT_NAME:
        raise ValueError(f"{where}: format is {manifest.get('format')!r}, expected {FORMAT_NAME!r}")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(f"{where}: code dataset format_version {version!r} is not supported "
                         f"(this reader knows up to {FORMAT_VERSION})")
    shards = manifest.get("shards")
    for path in (s.get("path") for s in (shards if isinstance(shards, list) else []) if isinstance(s, dict)):
        if not isinstance(path, str) or not path or os.path.isabs(path) or ".." in Path(path).parts:
            raise ValueError(f"{where}: shard path {path!r} is not a relative path inside the dataset folder")
    check_shape(manifest, MANIFEST_SHAPE, where)
    try:
        config = DACConfig.from_dict(manifest["config"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: invalid config: {e}") from None
    stated = {"config_hash": (manifest["config_hash"], config.architecture_hash()),
              "hop_length": (manifest["hop_length"], config.hop_length),
              "frame_rate": (manifest["frame_rate"], config.frame_rate)}
    if "records" in manifest:
        stated["records"] = (manifest["records"], sum(s["records"] for s in manifest["shards"]))
    wrong = [f"{k} {ours!r} (expected {theirs!r})" for k, (ours, theirs) in stated.items() if ours != theirs]
    if wrong:
        raise ValueError(f"{where}: entries disagree with its config and shards: {', '.join(wrong)}")
    if not 1 <= manifest.get("n_quantizers", 1) <= config.n_codebooks:
        raise ValueError(f"{where}: n_quantizers {manifest['n_quantizers']} is not within the config's "
                         f"{config.n_codebooks} codebooks")
    negative = [s["path"] for s in manifest["shards"] if s["records"] < 0 or s["frames"] < 0]
    if negative:
        raise ValueError(f"{where}: shard {negative[0]!r} has a negative record or frame count")
    listed = Counter(os.path.normpath(s["path"]) for s in manifest["shards"])
    twice = sorted(path for path, count in listed.items() if count > 1)
    if twice:
        raise ValueError(f"{where}: shard {twice[0]!r} is listed {listed[twice[0]]} times: its records would "
                         "be read as many times")
    return config
