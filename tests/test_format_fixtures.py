"""Files written by an earlier audiotok read the same: ``tests/data/format-fixtures``.

The fixtures were written by audiotok at commit 7d0b821 with the tiny-16khz model of
``conftest.random_tokenizer``: two ``.atok`` files (``CodeFile.from_encoded(...).save``, one mono, one
coded per channel and packed in 10 bits) and two code datasets (``tokenize_dataset`` of a folder of
three clips with ``.txt`` sidecars and an unreadable file: ``codes-tar`` mono in tar shards,
``codes-parquet`` per channel in Parquet shards; their ``.bulk/`` folders removed and the manifests'
``input.path`` shortened to ``corpus``), and a tiny prior of the delay pattern on the codes of
``codes-tar`` (``CodePrior(...).save_pretrained``: ``prior-delay``). ``expected.json`` holds what that
audiotok read from them: each code file's metadata and codes, each dataset's model, codebooks and
records, the prior's codec, vocabulary and weight sums.

Written by the commit that adds them, before the modules moved into subpackages: a codec training run
(``train`` of ``recipes/configs/tiny.yml`` for 2 steps on two tones in ``corpus/``, without the GAN, with a
smaller model: ``train-run``, its ``tensorboard/`` removed) and its state export (``export_state``:
``train-state.safetensors``). ``expected.json`` holds (under ``training``) what that audiotok read from
them and from the bundled ``default`` weights: steps, data positions, schedules, configurations, codec
identities, weight and optimizer-moment sums. The bundled model's identity there is changed by hand
when a new bundled model ships (now ``audiotok-24khz-v0.6``: a deliberate change; the rest is as written).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from audiotok import AudioTokenizer, CodeDataset, CodeFile
from audiotok.formats.codedataset import SHARD_WRITERS, Manifest
from audiotok.utils.store import LocalStore

FIXTURES = Path(__file__).parent / "data" / "format-fixtures"
EXPECTED = json.loads((FIXTURES / "expected.json").read_text())


@pytest.mark.parametrize("name", sorted(EXPECTED["code_files"]))
def test_code_files_read_the_same(tmp_path, name):
    want = EXPECTED["code_files"][name]
    code_file = CodeFile.load(FIXTURES / name)
    assert code_file._metadata(code_file.packing) == want["header"]
    assert code_file.codes.tolist() == want["codes"]
    # written again (safetensors orders the metadata its own way: the bytes may differ), it reads the same
    again = CodeFile.load(code_file.save(tmp_path / name, pack_10bit=code_file.packing == "10bit"))
    assert again._metadata(again.packing) == want["header"] and again.codes.tolist() == want["codes"]


@pytest.mark.parametrize("name", sorted(EXPECTED["code_datasets"]))
def test_code_datasets_read_the_same(name):
    want = EXPECTED["code_datasets"][name]
    dataset = CodeDataset(FIXTURES / name)
    assert (dataset.model_id, dataset.config.to_dict(), dataset.n_codebooks, dataset.codes_fingerprint, len(dataset)) \
        == (want["model_id"], want["config"], want["n_codebooks"], want["codes_fingerprint"], want["records"])
    read = [{"key": r.key, "meta": r.meta, "metadata": r.metadata, "dtype": str(r.codes.dtype),
             "codes": r.codes.tolist()} for r in dataset]
    assert read == want["records_read"]


@pytest.mark.parametrize("name", sorted(EXPECTED["code_datasets"]))
def test_shards_written_again_hold_the_same(tmp_path, name):
    """Records read from a shard and written again with today's writer: a tar shard is the same bytes,
    a Parquet shard reads back the same records with the same key-value metadata."""
    dataset = CodeDataset(FIXTURES / name)
    manifest = dataset.manifest
    fmt = "webdataset" if name.endswith("tar") else "parquet"
    for i, shard in enumerate(dataset.shards):
        with SHARD_WRITERS[fmt](tmp_path / shard.path, manifest.shard_metadata(), manifest.metadata) as writer:
            for record in dataset.split_by_rank(i, len(dataset.shards)):
                writer.add({**record.meta, "metadata": record.metadata}, record.codes)
        if fmt == "webdataset":
            assert (tmp_path / shard.path).read_bytes() == (FIXTURES / name / shard.path).read_bytes()
        else:
            import pyarrow.parquet as pq

            old, new = (pq.ParquetFile(root / shard.path) for root in (FIXTURES / name, tmp_path))
            assert new.schema_arrow.equals(old.schema_arrow, check_metadata=True)
            assert new.read().equals(old.read())
    manifest.write(LocalStore(tmp_path))
    assert (tmp_path / "manifest.json").read_text() == (FIXTURES / name / "manifest.json").read_text()
    again = [(r.key, r.meta, r.metadata, r.codes.tolist()) for r in CodeDataset(tmp_path)]
    assert again == [(r.key, r.meta, r.metadata, r.codes.tolist()) for r in dataset]
    assert all(np.asarray(r.codes).dtype == np.uint16 for r in CodeDataset(tmp_path))


def test_priors_read_the_same(tmp_path):
    from audiotok.lm import CodePrior

    want = EXPECTED["priors"]["prior-delay"]
    prior = CodePrior.from_pretrained(FIXTURES / "prior-delay")
    assert {**prior.codec.to_dict(), "config": prior.codec_config.to_dict()} == want["codec"]
    prior.save_pretrained(tmp_path)  # saved again: the same config.json
    assert json.loads((tmp_path / "config.json").read_text()) == \
        json.loads((FIXTURES / "prior-delay" / "config.json").read_text())
    assert (prior.vocab.to_dict(), prior.pattern.value, prior.n_codebooks) == \
        (want["vocabulary"], want["pattern"], want["n_codebooks"])
    assert {k: round(float(v.double().sum()), 6) for k, v in prior.state_dict().items()} == want["weights"]
    prior.check_dataset(CodeDataset(FIXTURES / "codes-tar"))  # the codes it was made for


@pytest.mark.parametrize("name", sorted(EXPECTED["code_datasets"]))
def test_manifests_read_and_written_again_are_the_same(name):
    data = json.loads((FIXTURES / name / "manifest.json").read_text())
    manifest = Manifest.from_dict(data, name)
    assert manifest.to_dict() == data and list(manifest.to_dict()) == list(data)  # the same entries, in order
    assert manifest.codec.to_dict() == {k: data[k] for k in ("model_id", "config_hash", "codes_fingerprint")}
    assert (manifest.records, manifest.n_quantizers, manifest.mono, manifest.metadata) == \
        (data["records"], data["n_quantizers"], data["mono"], tuple(data["metadata"]))


def _sums(tensors):
    return {k: round(float(v.double().sum()), 6) for k, v in tensors.items()}


def _training_state(state):
    """What ``expected.json`` records of a training state (see the module docstring), as JSON reads it."""
    moments = {str(i): [round(float(e[n].double().sum()), 9) for n in ("exp_avg", "exp_avg_sq")] + [float(e["step"])]
               for i, e in state["opt_g"]["state"].items()}
    return json.loads(json.dumps({
        "step": state["step"], "best": str(state["best"]), "data": state["data"], "sched_g": state["sched_g"],
        "config": state["config"], "generator": _sums(state["generator"]), "moments": moments,
        "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in state["opt_g"]["param_groups"]]}))


def test_training_checkpoints_and_weights_read_the_same():
    from audiotok.train.state import newest_checkpoint

    want = EXPECTED["training"]
    run = FIXTURES / "train-run"
    folder, state = newest_checkpoint(run)
    assert {"folder": folder.relative_to(run).as_posix(), **_training_state(state)} == want["checkpoint"]
    model = AudioTokenizer.from_pretrained(run / "latest")
    assert (model.identity.to_dict(), model.config.to_dict(), _sums(model.model.state_dict())) == \
        (want["model"]["codec"], want["model"]["config"], want["model"]["weights"])
    bundled = AudioTokenizer.from_pretrained("default")
    assert (bundled.identity.to_dict(), bundled.config.to_dict()) == \
        (want["bundled"]["codec"], want["bundled"]["config"])


def test_state_exports_read_the_same_and_start_a_run(tmp_path):
    from audiotok.train.config import TrainConfig
    from audiotok.train.state import load_train_state, read_state_export
    from audiotok.train.trainer import import_state

    want = EXPECTED["training"]["export"]
    state = read_state_export(FIXTURES / "train-state.safetensors")
    assert _training_state(state) == want
    started = load_train_state(import_state(FIXTURES / "train-state.safetensors", tmp_path / "run",
                                            TrainConfig.from_dict(state["config"])))
    assert _training_state(started) == want
