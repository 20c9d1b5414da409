"""Reading a code dataset: :class:`CodeDataset`, the one reader every caller uses (see
:mod:`audiotok.formats.codedataset`)."""

from __future__ import annotations

import copy
import os
import posixpath
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from ...identity import CodecIdentity
from ...nn.config import DACConfig
from ...utils.store import Store, open_store
from ...utils.untrusted import shown
from .manifest import MANIFEST_NAME, Manifest, ShardEntry
from .records import CodeRecord
from .shards import read_shard

if TYPE_CHECKING:
    from ...tokenizer import AudioTokenizer


def is_code_dataset(location: str | os.PathLike, storage_options: dict[str, Any] | None = None) -> bool:
    """Whether ``location`` (a folder or an fsspec URL) holds a code dataset: its manifest is there."""
    return open_store(location, storage_options).exists(MANIFEST_NAME)


class CodeDataset:
    """The records of a code dataset, streamed shard by shard in manifest order, each checked against
    the manifest.

    Args:
        path: the dataset folder, or its fsspec URL (``s3://bucket/codes``, see :mod:`audiotok.utils.urls`;
            shards are streamed from there).
        storage_options: options of the fsspec filesystem of a URL (credentials, ``endpoint_url`` ...).

    Attributes:
        store: where the dataset is (:mod:`audiotok.utils.store`).
        manifest: its :class:`~audiotok.formats.codedataset.manifest.Manifest`.
        shards: the shards this dataset reads (all, or one part after :meth:`split_by_rank`).
    """

    def __init__(self, path: str | os.PathLike, storage_options: dict[str, Any] | None = None):
        self.store: Store = open_store(path, storage_options)
        try:
            self.manifest = Manifest.read(self.store)
        except FileNotFoundError:
            raise FileNotFoundError(f"{self.root}: no code dataset ({MANIFEST_NAME} missing; a bulk job writes it "
                                    "last); write one with: python recipes/tokenize_dataset.py --output "
                                    f"{self.root} ...") from None
        self.shards: list[ShardEntry] = list(self.manifest.shards)

    @property
    def root(self) -> str:
        """The folder, or the URL."""
        return self.store.url

    @property
    def codec(self) -> CodecIdentity:
        """The model that wrote the codes."""
        return self.manifest.codec

    @property
    def config(self) -> DACConfig:
        """The configuration of the model that wrote the codes."""
        return self.manifest.config

    @property
    def model_id(self) -> str:
        """The name of the model that wrote the codes."""
        return self.codec.model_id

    @property
    def n_codebooks(self) -> int:
        """The codebooks every record holds: the manifest's ``n_quantizers`` (all of the model's in
        datasets that do not record it)."""
        return self.manifest.n_quantizers or self.config.n_codebooks

    @property
    def codes_fingerprint(self) -> str | None:
        """The :func:`~audiotok.weights.checkpoint.codes_fingerprint` of the weights that wrote the codes;
        ``None`` for datasets written before the manifest recorded it."""
        return self.codec.codes_fingerprint

    def check_codec(self, tokenizer: AudioTokenizer) -> None:
        """Raise ``ValueError`` (naming both models) unless ``tokenizer`` can decode these codes: the
        architecture that wrote them and, when the dataset records it, the same encoder and quantizer
        weights (:meth:`AudioTokenizer.check_codec <audiotok.tokenizer.AudioTokenizer.check_codec>`)."""
        tokenizer.check_codec(self.codec, f"code dataset {self.root} holds")

    def split_by_rank(self, rank: int, world_size: int) -> CodeDataset:
        """The part of this dataset that process ``rank`` of ``world_size`` reads: shards ``rank``,
        ``rank + world_size``, ... Parts do not overlap and together cover every shard; a part is
        empty when there are fewer shards than processes."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        part = copy.copy(self)
        part.shards = self.shards[rank::world_size]
        return part

    def __len__(self) -> int:
        """Records in this dataset's shards, as the manifest counts them."""
        return sum(shard.records for shard in self.shards)

    def _read(self, name: str) -> Iterator[CodeRecord]:
        """The records of the shard ``name``, opened through this process's store (each DataLoader
        worker its own filesystem)."""
        with self.store.open(posixpath.normpath(name)) as f:
            yield from read_shard(f"{self.root}/{name}", f, self.manifest)

    def __iter__(self) -> Iterator[CodeRecord]:
        for shard in self.shards:
            count = frames = 0
            for record in self._read(shard.path):
                count += 1
                frames += record.codes.shape[-1]
                yield record
            if (count, frames) != (shard.records, shard.frames):
                raise ValueError(f"{self.root}/{shown(shard.path)}: read {count} records of {frames} frames, "
                                 f"the manifest lists {shard.records} of {shard.frames}")

    def __repr__(self) -> str:
        return f"CodeDataset({self.root!r}, shards={len(self.shards)}, records={len(self)})"
