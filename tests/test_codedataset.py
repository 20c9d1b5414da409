"""The code-dataset format package (audiotok.formats.codedataset): writers as context managers, the typed
manifest, the one reader through the store."""

from __future__ import annotations

import numpy as np
import pytest

from audiotok import CodecIdentity, CodeDataset, DACConfig
from audiotok.formats.codedataset import SHARD_WRITERS, Manifest, ShardEntry, dataset_metadata, is_code_dataset
from audiotok.utils.store import LocalStore

CONFIG = DACConfig.preset("tiny-16khz")  # 4 codebooks of 64 entries, hop 320
CODEC = CodecIdentity("tiny", CONFIG.architecture_hash(), "0123456789abcdef")


def record(i: int, frames: int = 5) -> tuple[dict, np.ndarray]:
    meta = {"key": f"r{i}", "source_key": f"{i}.wav", "num_samples": frames * 320, "sample_rate": 16000,
            "n_frames": frames, "channels": 1, "model_id": CODEC.model_id}
    return meta, np.full((4, frames), i, np.uint16)


@pytest.mark.parametrize("fmt", sorted(SHARD_WRITERS))
def test_a_shard_writer_publishes_at_the_end_of_its_block_and_drops_the_shard_on_an_error(tmp_path, fmt):
    writer = SHARD_WRITERS[fmt]
    metadata = dataset_metadata(CODEC, CONFIG, 4, True)
    with writer(tmp_path / f"a{writer.suffix}", metadata) as shard:
        for i in range(3):
            shard.add(*record(i))
        assert list(tmp_path.iterdir()) != [] and not (tmp_path / f"a{writer.suffix}").exists()  # a temporary file
    with pytest.raises(RuntimeError, match="stop"), writer(tmp_path / f"b{writer.suffix}", metadata) as failed:
        failed.add(*record(0))
        raise RuntimeError("stop")
    assert [p.name for p in tmp_path.iterdir()] == [f"a{writer.suffix}"]  # nothing left of the failed one

    assert not is_code_dataset(tmp_path)
    Manifest(CODEC, CONFIG, (ShardEntry(f"a{writer.suffix}", shard.records, shard.frames),), n_quantizers=4,
             mono=True).write(LocalStore(tmp_path))
    assert is_code_dataset(tmp_path) and not is_code_dataset(tmp_path / "nowhere")
    dataset = CodeDataset(tmp_path)
    assert dataset.codec == CODEC and len(dataset) == 3 and dataset.manifest.records == 3
    assert [(r.key, int(r.codes[0, 0])) for r in dataset] == [("r0", 0), ("r1", 1), ("r2", 2)]


def test_a_manifest_without_the_later_entries_reads_with_them_unset(tmp_path):
    data = {"format": "audiotok-code-dataset", "format_version": 1, "model_id": "tiny", "config": CONFIG.to_dict(),
            "config_hash": CONFIG.architecture_hash(), "hop_length": 320, "frame_rate": 50.0,
            "shards": [{"path": "./a.tar", "records": 2, "frames": 9}]}
    manifest = Manifest.from_dict(data, "old")
    assert manifest.codec == CodecIdentity("tiny", CONFIG.architecture_hash(), None)
    assert (manifest.records, manifest.n_quantizers, manifest.mono, manifest.metadata, manifest.failures) == \
        (2, None, None, None, ())
    assert manifest.to_dict() == {**data, "codes_fingerprint": None, "records": 2, "failures": []}
    for change, message in (({"layout": 3}, "layout must be"), ({"config_hash": CODEC.codes_fingerprint},
                                                                  "config_hash '0123456789abcdef' \\(expected")):
        with pytest.raises(ValueError, match=message):
            Manifest.from_dict({**data, **change}, "old")
