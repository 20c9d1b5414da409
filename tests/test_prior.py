"""Priors on codes: training for each pattern, legal sampling that inverts exactly, saving, the codec tie."""

from __future__ import annotations

import dataclasses
import importlib.util
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import make_audio, random_tokenizer
from test_lm import CONFIG, write_dataset

from audiotok import DACConfig
from audiotok.lm import (
    CodecIdentity,
    CodePrior,
    CodeRecord,
    CodeVocabulary,
    PriorConfig,
    Sampler,
    TextTokenizer,
    generate,
    sample_to_wav,
)
from audiotok.lm.config import load_prior_config
from audiotok.lm.sampling import filter_logits, sample_ids
from audiotok.lm.trainer import train_prior

pytest.importorskip("transformers")

PATTERNS = ["flatten", "delay", "parallel"]
TINY = "recipes/configs/prior/tiny.yml"
CODEC = CodecIdentity("tiny", CONFIG.architecture_hash())  # tiny-16khz (CONFIG): 4 codebooks of 64 codes
BACKBONE = {"model_type": "gpt2", "n_layer": 1, "n_head": 2, "n_embd": 32, "n_positions": 512}
WORDS = ["one", "two", "three", "four"]


def learnable_records(prefix: str, n: int, seed: int) -> list[CodeRecord]:
    """Codes that count up by one per frame from a random start (codebook k offset by 5k), with a text
    naming the start: a prior can learn them quickly."""
    rng = np.random.default_rng(seed)
    records = []
    for i in range(n):
        start, frames = int(rng.integers(0, 64)), int(rng.integers(12, 30))
        codes = (start + np.arange(frames)[None] + 5 * np.arange(4)[:, None]) % 64
        key = f"{prefix}/{i:03d}"
        meta = dict(key=key, source_key=key, num_samples=frames * 320, sample_rate=16000, n_frames=frames,
                    channels=1, model_id="tiny", text=f"{WORDS[start % 4]} {start}")
        records.append(CodeRecord(key, codes.astype(np.uint16), meta))
    return records


@pytest.fixture(scope="module")
def codec_tok():
    """The codec whose codes the test datasets say they are (its ``codes_fingerprint`` is in their manifests)."""
    return random_tokenizer("tiny-16khz")


@pytest.fixture(scope="module")
def code_sets(tmp_path_factory, codec_tok):
    root = tmp_path_factory.mktemp("prior-codes")
    fingerprint = codec_tok.codes_fingerprint
    write_dataset(root / "train", [("shard-00000.tar", learnable_records("t", 40, 0)),
                                   ("shard-00001.tar", learnable_records("u", 40, 1))], fingerprint)
    write_dataset(root / "valid", [("shard-00000.tar", learnable_records("v", 12, 2))], fingerprint)
    return root


def tiny_config(code_sets, *overrides: str):
    return load_prior_config(TINY, [f"data.train={code_sets / 'train'}", f"data.valid={code_sets / 'valid'}",
                                    *overrides])


def val_losses(run) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["split"] == "val"]


def tiny_prior(pattern: str, text: TextTokenizer | None = None, seed: int = 0,
               codec: CodecIdentity = CODEC) -> CodePrior:
    torch.manual_seed(seed)
    config = PriorConfig(pattern=pattern, backbone=BACKBONE, text=None if text is None else "bytes",
                         max_text_len=text.max_len if text is not None else 64)
    return CodePrior(config, codec, CONFIG, text).eval()


# -- training ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("pattern", PATTERNS)
def test_prior_trains_for_each_pattern(code_sets, codec_tok, tmp_path, pattern):
    run = tmp_path / "run"
    metrics = train_prior(tiny_config(code_sets, f"prior.pattern={pattern}"), run, max_steps=40)
    assert {f"loss/cb{k}" for k in range(4)} <= set(metrics)
    val = val_losses(run)
    assert [r["step"] for r in val] == [10, 20, 30, 40]
    assert val[-1]["loss"] < val[0]["loss"] - 0.5
    for k in range(4):
        assert val[-1][f"loss/cb{k}"] < val[0][f"loss/cb{k}"]
    prior = CodePrior.from_pretrained(run)  # the run folder loads its latest checkpoint
    assert prior.pattern.value == pattern
    assert prior.codec == dataclasses.replace(CODEC, codes_fingerprint=codec_tok.codes_fingerprint)
    assert (run / "best" / "model.safetensors").exists() and (run / "tensorboard").is_dir()
    codes = generate(prior, 2, max_frames=10, seed=0).codes
    assert all(c.shape[0] == 4 and 1 <= c.shape[1] <= 10 for c in codes)


@pytest.fixture(scope="module")
def codec_code_sets(tmp_path_factory, codec_tok):
    """Code sets like ``code_sets`` whose manifests name a folder holding their codec: it loads offline."""
    root = tmp_path_factory.mktemp("prior-codec-codes")
    codec_tok.save_pretrained(root / "codec")
    codec_id = str(root / "codec")
    for name, records in (("train", learnable_records("t", 40, 0)), ("valid", learnable_records("v", 12, 2))):
        for record in records:  # each record names the model that wrote it, as the manifest does
            record.meta["model_id"] = codec_id
        write_dataset(root / name, [("shard-00000.tar", records)], codec_tok.codes_fingerprint)
        manifest = json.loads((root / name / "manifest.json").read_text())
        (root / name / "manifest.json").write_text(json.dumps({**manifest, "model_id": codec_id}))
    return root


def _audio_events(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"audio": 0})
    events.Reload()
    return events


def test_prior_run_logs_decoded_samples_and_console_lines(codec_code_sets, codec_tok, tmp_path, caplog):
    pytest.importorskip("tensorboard")
    from audiotok.lm.samples import PRIOR_SAMPLE_SECONDS
    from audiotok.lm.sampling import max_frames_for

    run = tmp_path / "run"
    with caplog.at_level("INFO", logger="audiotok.lm"):
        train_prior(tiny_config(codec_code_sets), run, max_steps=10)
    lines = [r.getMessage() for r in caplog.records if r.name == "audiotok.lm"]
    assert not [r for r in caplog.records if r.levelname == "WARNING"]
    assert [line.split(" |")[0] for line in lines if line.startswith("step ")] == \
           [f"step {k}/10" for k in range(1, 11)] + ["step 10 validation"]
    steps = [line for line in lines if line.startswith("step ") and "validation" not in line]
    assert "| loss " in steps[0] and "| lr 3.00e-03 |" in steps[0] and "steps/s eta" in steps[0]
    assert steps[0].endswith("| 512 tokens") and steps[-1].endswith("| 5.12k tokens")  # 4 x 32 steps x 4 codes
    assert lines[-1].startswith("training stopped at step 10 (reached max_steps 10): 10 steps this launch in ")
    assert "5.12k tokens seen; best validation loss" in lines[-1] and str((run / "best").resolve()) in lines[-1]

    events = _audio_events(run)
    assert sorted(events.Tags()["audio"]) == ["samples/0", "samples/1"]
    prior = CodePrior.from_pretrained(run)  # step 10: the prior that sampled them
    frames = min(round(PRIOR_SAMPLE_SECONDS * codec_tok.frame_rate), max_frames_for(prior))
    for i in range(2):
        (event,) = events.Audio(f"samples/{i}")
        written, rate = sf.read(io.BytesIO(event.encoded_audio_string), dtype="float32")
        codes = generate(prior, 1, max_frames=frames, seed=i).codes[0]  # the training seed, 0, plus i
        expected = codec_tok.decode(codes)[0, 0].clamp(-1, 1).numpy()
        assert (event.step, rate, written.shape) == (10, 16000, expected.shape)
        assert np.abs(written - expected).max() < 1e-3 and np.abs(expected).max() > 0.05


def test_prior_run_without_its_codec_warns_once_and_trains(code_sets, tmp_path, caplog):
    pytest.importorskip("tensorboard")
    run = tmp_path / "run"
    with caplog.at_level("INFO", logger="audiotok.lm"):
        train_prior(tiny_config(code_sets, "train.valid_every=5"), run, max_steps=10)  # its codec "tiny": no such model
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 1 and warned[0].startswith("no audio samples in TensorBoard: the codec 'tiny' does not load")
    assert _audio_events(run).Tags()["audio"] == [] and [r["step"] for r in val_losses(run)] == [5, 10]


def test_resumed_run_equals_uninterrupted(code_sets, tmp_path):
    config = tiny_config(code_sets, "train.save_every=6", "train.valid_every=100")
    train_prior(config, tmp_path / "whole", max_steps=12)
    train_prior(config, tmp_path / "split", max_steps=6)
    train_prior(config, tmp_path / "split", max_steps=12)
    whole = CodePrior.from_pretrained(tmp_path / "whole").state_dict()
    split = CodePrior.from_pretrained(tmp_path / "split").state_dict()
    assert whole.keys() == split.keys()
    for key in whole:
        assert torch.equal(whole[key], split[key]), key


# -- stops: signals, time limits and runs of the earlier layout, with DataLoader workers -------------

STOPS = ("train.save_every=1000", "train.valid_every=5", "train.num_workers=2")  # 2 readers: 40 examples each
STEPS = 20  # 4 examples a step, 80 in all: each reader ends an epoch (about 31 blocks) and starts another


@pytest.fixture(scope="module")
def prior_straight(code_sets, tmp_path_factory):
    """An uninterrupted run of STEPS steps."""
    run = tmp_path_factory.mktemp("prior-straight") / "run"
    train_prior(tiny_config(code_sets, *STOPS), run, max_steps=STEPS)
    return run


def _assert_same_end(run, straight):
    """``run`` ended bit for bit as ``straight``: weights, optimizer, data position, logs."""
    from audiotok.train.state import load_train_state

    a, b = load_train_state(straight / "latest"), load_train_state(run / "latest")
    assert a["step"] == b["step"] == STEPS and a["data"] == b["data"] and a["best"] == b["best"]
    assert all(torch.equal(a["prior"][k], b["prior"][k]) for k in a["prior"])
    for index, entry in a["opt"]["state"].items():
        assert all(torch.equal(entry[k], b["opt"]["state"][index][k]) for k in entry), index
    rows = lambda r: [json.loads(line) for line in (r / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert rows(run) == [{**r, "steps_per_s": r2["steps_per_s"]} if "steps_per_s" in r else r
                         for r, r2 in zip(rows(straight), rows(run))]


def test_a_prior_run_stopped_by_sigterm_resumes_exactly_and_an_earlier_layout_resumes(code_sets, prior_straight,
                                                                                      tmp_path, monkeypatch, caplog):
    from audiotok.lm.stream import ExampleBatches
    from audiotok.train.state import STATE_FILE, load_train_state
    from audiotok.train.stopping import TrainingInterrupted

    config, run, taken = tiny_config(code_sets, *STOPS), tmp_path / "run", []
    next_batch = ExampleBatches.__next__

    def signalled(batches):
        taken.append(1)
        if len(taken) == 7:  # during step 7
            os.kill(os.getpid(), signal.SIGTERM)
        return next_batch(batches)

    with monkeypatch.context() as m:
        m.setattr(ExampleBatches, "__next__", signalled)
        with pytest.raises(TrainingInterrupted) as stopped:
            train_prior(config, run, max_steps=STEPS)
    assert (stopped.value.step, stopped.value.exit_code) == (7, 143)
    state = load_train_state(run / "latest")
    assert state["step"] == 7 and set(state) == {"prior", "opt", "sched", "data", "step", "best", "config"}
    legacy = tmp_path / "legacy"  # a checkpoint written before the data position was saved
    shutil.copytree(run, legacy, symlinks=True)
    torch.save({k: v for k, v in state.items() if k != "data"}, legacy / "latest" / STATE_FILE)
    train_prior(config, run, max_steps=STEPS)
    _assert_same_end(run, prior_straight)
    with caplog.at_level("WARNING", logger="audiotok.lm"):
        train_prior(config, legacy, max_steps=STEPS)
    assert "no data position (written by an earlier version): the data starts again" in caplog.text
    assert load_train_state(legacy / "latest")["step"] == STEPS


def test_a_prior_run_stopped_by_its_time_limit_resumes_exactly(code_sets, prior_straight, tmp_path, monkeypatch):
    import audiotok.train.stopping as stopping

    readings = []

    def clock():  # a second passes at every reading
        readings.append(float(len(readings)))
        return readings[-1]

    config, run = tiny_config(code_sets, *STOPS), tmp_path / "run"
    with monkeypatch.context() as m:
        m.setattr(stopping, "monotonic", clock)
        train_prior(config, run, max_steps=STEPS, time_limit="12s")  # returns normally
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert 1 <= steps[-1] < STEPS and (run / "checkpoints" / f"step_{steps[-1]}").is_dir() and readings[-1] <= 12
    train_prior(config, run, max_steps=STEPS)
    _assert_same_end(run, prior_straight)


def test_train_lm_takes_a_time_limit(code_sets, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("train_lm", REPO / "recipes" / "train_lm.py")
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    options = ["--config", TINY, "--save-path", str(tmp_path / "run"), "--device", "cpu",
               f"data.train={code_sets / 'train'}"]
    assert recipe.main([*options, "--time-limit", "0.01s"]) == 0
    assert [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()] == [1]
    with pytest.raises(SystemExit) as e:
        recipe.main([*options, "--time-limit", "soon"])
    assert e.value.code == 2 and "argument --time-limit: invalid duration 'soon'" in capsys.readouterr().err


def test_resuming_with_another_config_names_the_differences(code_sets, tmp_path):
    run = tmp_path / "run"
    train_prior(tiny_config(code_sets, "train.save_every=2"), run, max_steps=2)
    changed = tiny_config(code_sets, "prior.pattern=flatten", "optim.lr=0.1", "train.seq_len=16",
                          "data.valid_blocks=2", "train.save_every=3")
    with pytest.raises(ValueError, match="another configuration") as err:
        train_prior(changed, run, max_steps=4)
    message = str(err.value)
    for part in ("prior.pattern: 'delay' in the run, 'flatten' now", "optim.lr: 0.003 in the run, 0.1 now",
                 "train.seq_len: 32 in the run, 16 now", "data.valid_blocks: 8 in the run, 2 now"):
        assert part in message
    assert "save_every" not in message
    # how long to train and how often to log, validate and save may change
    safe = tiny_config(code_sets, "train.num_iters=50", "train.log_every=2", "train.valid_every=4",
                       "train.save_every=4")
    train_prior(safe, run, max_steps=4)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["split"]) for r in rows] == [(1, "train"), (2, "train"), (4, "train"), (4, "val")]


def test_the_recipe_refuses_a_changed_config_and_bad_overrides_in_one_line(code_sets, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("train_lm", REPO / "recipes" / "train_lm.py")
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    options = ["--config", TINY, "--save-path", str(tmp_path / "run"), "--device", "cpu"]
    overrides = [f"data.train={code_sets / 'train'}", f"data.valid={code_sets / 'valid'}", "train.save_every=2"]
    assert recipe.main([*options, "--max-steps", "2", *overrides]) == 0
    capsys.readouterr()
    for override, message in [("prior.pattern=flatten", "another configuration, so its state cannot be resumed: "
                                                        "prior.pattern: 'delay' in the run, 'flatten' now"),
                              ("train.seq_len={16", "override 'train.seq_len={16': the value is not YAML")]:
        assert recipe.main([*options, "--max-steps", "4", *overrides, override]) == 2
        err = capsys.readouterr().err
        assert err.startswith("train_lm: error: ") and message in err and err.count("\n") == 1, err


def test_training_records_and_checks_the_codec_weights(code_sets, codec_tok, tmp_path):
    twin = random_tokenizer("tiny-16khz", seed=1)  # the same architecture with other weights
    write_dataset(tmp_path / "twin", [("shard-00000.tar", learnable_records("w", 12, 3))], twin.codes_fingerprint)
    with pytest.raises(ValueError, match="other weights") as err:  # validation codes of another codec
        train_prior(tiny_config(code_sets, f"data.valid={tmp_path / 'twin'}"), tmp_path / "refused", max_steps=2)
    assert codec_tok.codes_fingerprint in str(err.value) and twin.codes_fingerprint in str(err.value)
    assert not (tmp_path / "refused").exists()

    train = tmp_path / "train"
    write_dataset(train, [("shard-00000.tar", learnable_records("t", 20, 0))], codec_tok.codes_fingerprint)
    config = tiny_config(code_sets, f"data.train={train}", "train.save_every=2")
    train_prior(config, tmp_path / "run", max_steps=2)
    assert CodePrior.from_pretrained(tmp_path / "run").codec.codes_fingerprint == codec_tok.codes_fingerprint
    # the same folder written again by the other weights: the run does not go on with those codes
    write_dataset(train, [("shard-00000.tar", learnable_records("t", 20, 0))], twin.codes_fingerprint)
    with pytest.raises(ValueError, match="resuming") as err:
        train_prior(config, tmp_path / "run", max_steps=4)
    assert codec_tok.codes_fingerprint in str(err.value) and twin.codes_fingerprint in str(err.value)


def test_text_conditioned_prior_trains(code_sets, tmp_path):
    run = tmp_path / "tts"
    train_prior(tiny_config(code_sets, "prior.text=bytes", "prior.pattern=parallel"), run, max_steps=30)
    val = val_losses(run)
    assert val[-1]["loss"] < val[0]["loss"] - 0.5
    prior = CodePrior.from_pretrained(run)
    assert prior.text is not None and prior.text.kind == "bytes"
    codes = generate(prior, 1, text="two 33", max_frames=6, seed=0).codes[0]
    assert codes.shape[0] == 4


def test_text_conditioning_needs_text_metadata(tmp_path):
    records = learnable_records("x", 8, 0)
    for r in records:
        del r.meta["text"]
    write_dataset(tmp_path / "codes", [("shard-00000.tar", records)])
    config = load_prior_config(TINY, [f"data.train={tmp_path / 'codes'}", "prior.text=bytes"])
    with pytest.raises(ValueError, match="no 'text' metadata"):
        train_prior(config, tmp_path / "run", max_steps=2)


def test_config_errors(code_sets):
    with pytest.raises(ValueError, match="unknown keys"):
        tiny_config(code_sets, "prior.patern=delay")
    with pytest.raises(ValueError, match="not a valid CodebookPattern"):
        tiny_config(code_sets, "prior.pattern=zigzag")
    with pytest.raises(ValueError, match="model_type"):
        tiny_config(code_sets, "prior.backbone={n_layer: 1}")
    with pytest.raises(ValueError, match="n_codebooks"):
        CodePrior(PriorConfig(n_codebooks=5, backbone=BACKBONE), CODEC, CONFIG)


# -- sampling ---------------------------------------------------------------------------------------


def legal_ids(vocab: CodeVocabulary, pattern: str, ids: torch.Tensor) -> None:
    """Every id is what the pattern allows at its place: checked position by position."""
    k_all, size = vocab.n_codebooks, vocab.codebook_size
    if pattern == "flatten":
        assert ids[0] == vocab.bos_id and ids[-1] == vocab.eos_id and (len(ids) - 2) % k_all == 0
        for t, token in enumerate(ids[1:-1].tolist()):
            assert (t % k_all) * size <= token < (t % k_all + 1) * size
        return
    frames = ids.shape[1] - 2 - (k_all - 1 if pattern == "delay" else 0)
    assert (ids[:, 0] == vocab.bos_id).all() and (ids[:, -1] == vocab.eos_id).all()
    for k in range(k_all):
        for t, token in enumerate(ids[k, 1:-1].tolist()):
            frame = t - k if pattern == "delay" else t
            assert (0 <= token < size) if 0 <= frame < frames else token == vocab.pad_id


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("options", [{}, {"temperature": 0.7, "top_k": 5}, {"top_p": 0.5}, {"temperature": 0}])
def test_sampling_is_legal_and_inverts(pattern, options):
    prior = tiny_prior(pattern)
    samples = generate(prior, 6, max_frames=9, min_frames=2, seed=3, **options)
    for codes, ids in zip(samples.codes, samples.ids):
        legal_ids(prior.vocab, pattern, ids)
        assert 2 <= codes.shape[1] <= 9 and codes.shape[0] == 4
        assert torch.equal(prior.vocab.encode(codes, pattern), ids)  # the pattern inverted exactly


@pytest.mark.parametrize("pattern", PATTERNS)
def test_sampling_ends_early_when_eos_is_likely(pattern):
    """A prior whose ending id dominates stops at min_frames: the end decision is legal in every pattern."""
    prior = tiny_prior(pattern)
    ending = prior.vocab.pad_id if pattern == "delay" else prior.vocab.eos_id
    forward = prior.forward

    def biased(*args, **kwargs):
        logits, cache = forward(*args, **kwargs)
        logits = logits.clone()
        if pattern == "flatten":
            logits[..., ending] += 50.0
        else:
            logits[:, 0, :, ending] += 50.0  # row 0 decides where a multi-stream sample ends
        return logits, cache

    prior.forward = biased
    samples = generate(prior, 3, max_frames=9, min_frames=3, seed=0)
    for codes, ids in zip(samples.codes, samples.ids):
        legal_ids(prior.vocab, pattern, ids)
        assert codes.shape[1] == 3


@pytest.mark.parametrize("pattern", PATTERNS)
def test_prompt_is_continued_and_frames_stream_in_order(pattern):
    prior = tiny_prior(pattern)
    prompt = torch.randint(0, 64, (4, 5), generator=torch.Generator().manual_seed(0))
    sampler = Sampler(prior, 3, prompt=prompt, max_frames=11, min_frames=6, seed=1)
    streamed: dict[int, list[torch.Tensor]] = {0: [], 1: [], 2: []}
    for i, frame in sampler.frames():
        streamed[i].append(frame)
    for i, ids in enumerate(sampler.ids):
        codes = prior.vocab.decode(ids, pattern)
        assert torch.equal(codes[:, :5], prompt) and 6 <= codes.shape[1] <= 11
        assert torch.equal(torch.stack(streamed[i], dim=1), codes)


@pytest.mark.parametrize("pattern", PATTERNS)
def test_cached_steps_equal_full_forward(pattern):
    """Sampling's key-value cache gives the logits of a full forward pass (positions and text mask agree)."""
    text = TextTokenizer(None, max_len=6)
    prior = tiny_prior(pattern, text)
    codes = torch.randint(0, 64, (4, 7), generator=torch.Generator().manual_seed(0))
    ids = prior.vocab.encode(codes, pattern)[None]
    text_ids, text_mask = prior.text_prefix(["hi"])
    with torch.no_grad():
        full, _ = prior(ids, None, text_ids, text_mask)
        logits, cache = prior(ids[..., :3], None, text_ids, text_mask, use_cache=True)
        steps = [logits]
        mask = torch.cat([text_mask, torch.ones(1, 3, dtype=torch.long)], dim=1)
        for t in range(3, ids.shape[-1]):
            mask = torch.cat([mask, torch.ones(1, 1, dtype=torch.long)], dim=1)
            logits, cache = prior(ids[..., t:t + 1], mask, cache=cache)
            steps.append(logits)
    torch.testing.assert_close(torch.cat(steps, dim=-2), full, atol=1e-5, rtol=1e-4)


def test_filter_logits():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    assert torch.isinf(filter_logits(logits, top_k=2)).tolist() == [[True, False, False, True]]
    probs = logits.softmax(-1)[0].tolist()  # 0.09, 0.64, 0.24, 0.03
    assert probs[1] < 0.7
    assert torch.isinf(filter_logits(logits, top_p=0.7)).tolist() == [[True, False, False, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.5)).tolist() == [[True, False, True, True]]
    allowed = torch.tensor([[True, False, True, True]])
    assert sample_ids(logits, allowed, temperature=0).tolist() == [2]
    picks = {int(sample_ids(logits, allowed, generator=torch.Generator().manual_seed(s))) for s in range(50)}
    assert 1 not in picks and len(picks) > 1


def test_sampling_errors():
    prior = tiny_prior("delay")
    with pytest.raises(ValueError, match="not text-conditioned"):
        generate(prior, text="hello", max_frames=4)
    with pytest.raises(ValueError, match="positions"):
        generate(prior, max_frames=1000)
    with pytest.raises(ValueError, match="prompt"):
        generate(prior, prompt=torch.zeros(2, 3, dtype=torch.long), max_frames=4)
    with pytest.raises(ValueError, match="min_frames"):
        generate(prior, max_frames=4, min_frames=5)
    with pytest.raises(ValueError, match="top_p"):
        generate(prior, max_frames=4, top_p=0)


# -- saving and the codec tie ---------------------------------------------------------------------


def local_text_tokenizer(max_len: int = 8) -> TextTokenizer:
    """A word-level ``transformers`` tokenizer trained here, nothing downloaded."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(["one two three four", "hello there"],
                                  trainers.WordLevelTrainer(special_tokens=["[UNK]"]))
    return TextTokenizer(PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]"), max_len)


@pytest.mark.parametrize("pattern", PATTERNS)
def test_save_and_load_round_trip(tmp_path, pattern):
    text = local_text_tokenizer()
    prior = tiny_prior(pattern, text)
    prior.config.text = "a-local-folder"  # where it came from; the saved copy is what loads
    prior.save_pretrained(tmp_path / "prior")
    back = CodePrior.from_pretrained(tmp_path / "prior")
    assert back.vocab == prior.vocab and back.pattern == prior.pattern and back.codec == prior.codec
    assert back.text.kind == "transformers" and back.text.encode("two hello") == text.encode("two hello")
    meta = json.loads((tmp_path / "prior" / "config.json").read_text())
    assert meta["codec"]["model_id"] == "tiny" and meta["codec"]["config_hash"] == CONFIG.architecture_hash()
    assert meta["vocabulary"] == prior.vocab.to_dict()
    ids = prior.vocab.encode(torch.randint(0, 64, (4, 5)), pattern)[None]
    prefix = prior.text_prefix(["one two"])
    with torch.no_grad():
        torch.testing.assert_close(back(ids, None, *prefix)[0], prior(ids, None, *prefix)[0], atol=0, rtol=0)


def test_prior_refuses_another_codec(tmp_path, codec_tok):
    prior = tiny_prior("delay", codec=dataclasses.replace(CODEC, codes_fingerprint=codec_tok.codes_fingerprint))
    prior.check_codec(codec_tok)
    other = random_tokenizer("tiny-24khz")
    with pytest.raises(ValueError) as err:
        prior.check_codec(other)
    for part in ("tiny", CONFIG.architecture_hash(), other.config.architecture_hash()):
        assert part in str(err.value)
    with pytest.raises(ValueError, match="config hash"):
        sample_to_wav(prior, other, tmp_path / "x.wav", max_frames=4)
    assert not (tmp_path / "x.wav").exists()
    with pytest.raises(ValueError, match="not a prior"):
        CodePrior.from_pretrained(tmp_path)


def test_prior_refuses_a_codec_with_other_weights(tmp_path, codec_tok):
    twin = random_tokenizer("tiny-16khz", seed=1)
    codec = dataclasses.replace(CODEC, codes_fingerprint=codec_tok.codes_fingerprint)
    torch.manual_seed(0)
    CodePrior(PriorConfig(pattern="delay", backbone=BACKBONE), codec, CONFIG).save_pretrained(tmp_path / "prior")
    prior = CodePrior.from_pretrained(tmp_path / "prior")
    assert prior.codec == codec
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prior.check_codec(codec_tok)
    with pytest.raises(ValueError, match="same architecture with other weights") as err:
        prior.check_codec(twin)
    for part in ("'tiny'", codec_tok.codes_fingerprint, twin.codes_fingerprint):
        assert part in str(err.value)
    with pytest.raises(ValueError, match="other weights"):
        sample_to_wav(prior, twin, tmp_path / "x.wav", max_frames=4)
    assert not (tmp_path / "x.wav").exists()

    meta = json.loads((tmp_path / "prior" / "config.json").read_text())
    (tmp_path / "prior" / "config.json").write_text(json.dumps({**meta, "codec": {**meta["codec"],
                                                                                  "codes_fingerprint": "x"}}))
    with pytest.raises(ValueError, match="codes_fingerprint"):
        CodePrior.from_pretrained(tmp_path / "prior")
    # a prior saved before priors recorded the fingerprint loads, and says once that the weights go unchecked
    del meta["codec"]["codes_fingerprint"]
    (tmp_path / "prior" / "config.json").write_text(json.dumps(meta))
    old = CodePrior.from_pretrained(tmp_path / "prior")
    assert old.codec == CODEC
    with pytest.warns(UserWarning, match="does not record the weights fingerprint") as record:
        old.check_codec(twin)
        old.check_codec(twin)
    assert len([w for w in record if "weights fingerprint" in str(w.message)]) == 1


def test_sample_to_wav_streams_the_decoded_sample(tmp_path, codec_tok):
    tok = codec_tok
    prior = tiny_prior("delay", codec=dataclasses.replace(CODEC, codes_fingerprint=tok.codes_fingerprint))
    codes = sample_to_wav(prior, tok, tmp_path / "s.wav", chunk_frames=3, max_frames=20, min_frames=15, seed=0)
    audio, sr = sf.read(tmp_path / "s.wav", dtype="float32")
    assert sr == tok.sample_rate and len(audio) == codes.shape[1] * tok.hop_length
    torch.testing.assert_close(torch.from_numpy(audio), tok.decode(codes)[0, 0], atol=1e-5, rtol=1e-4)


# -- recipes ---------------------------------------------------------------------------------------

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted((REPO / "recipes" / "configs" / "prior").glob("*.yml")), ids=lambda p: p.name)
def test_every_prior_config_loads(path):
    config = load_prior_config(path)
    CodePrior(config.prior, *((CODEC, CONFIG) if config.prior.n_codebooks is None or config.prior.n_codebooks <= 4
                              else _default_codec()))


def _default_codec() -> tuple[CodecIdentity, DACConfig]:
    from audiotok import AudioTokenizer

    tok = AudioTokenizer.from_pretrained()
    return tok.identity, tok.config


def test_two_process_gloo_run_and_sample_recipe(code_sets, tmp_path, capsys):
    """train_lm.py under torchrun (2 ranks, one shard each), then sample_lm.py continuing an audio prompt."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "recipes" / "train_lm.py"), "--config", str(REPO / TINY), "--save-path", str(tmp_path / "ddp"),
           "--max-steps", "3", "--device", "cpu", f"data.train={code_sets / 'train'}", "train.save_every=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(s) for s in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]  # one writer: rank 0

    tok = random_tokenizer("tiny-16khz")
    tok.save_pretrained(tmp_path / "codec")
    sf.write(tmp_path / "prompt.wav", make_audio(16000)[0], 16000)
    spec = importlib.util.spec_from_file_location("sample_lm", REPO / "recipes" / "sample_lm.py")
    sample_lm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sample_lm)
    argv = ["--prior", str(tmp_path / "ddp"), "--codec", str(tmp_path / "codec"), "--out", str(tmp_path / "out.wav"),
            "--prompt", str(tmp_path / "prompt.wav"), "--prompt-seconds", "0.2", "--seconds", "0.5",
            "--num-samples", "2", "--seed", "0", "--top-k", "8"]
    sample_lm.main(argv)
    prompt = tok.encode(make_audio(16000)[0][:3200], 16000).codes[0]
    for i in range(2):
        audio, sr = sf.read(tmp_path / f"out-{i}.wav", dtype="float32")
        frames = len(audio) // tok.hop_length
        assert sr == 16000 and len(audio) % tok.hop_length == 0 and prompt.shape[1] < frames <= 25
        head = tok.decode(prompt)[0, 0, : (prompt.shape[1] - tok.stream_latency_frames) * tok.hop_length]
        torch.testing.assert_close(torch.from_numpy(audio[: len(head)]), head, atol=1e-5, rtol=1e-4)
    random_tokenizer("tiny-24khz").save_pretrained(tmp_path / "other")
    argv[argv.index("--codec") + 1] = str(tmp_path / "other")
    capsys.readouterr()
    assert sample_lm.main(argv) == 2
    assert "config hash" in capsys.readouterr().err


def test_train_lm_missing_codes_is_one_line_that_says_what_to_run(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "recipes" / "train_lm.py"), "--config",
                           str(REPO / "recipes" / "configs" / "prior" / "small.yml"), "--save-path",
                           str(tmp_path / "run"), f"data.train={tmp_path / 'nowhere'}", "--max-steps", "1"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert errors == [f"train_lm: error: {tmp_path / 'nowhere'}: no code dataset (manifest.json missing; a bulk job "
                      f"writes it last); write one with: python recipes/tokenize_dataset.py --output "
                      f"{tmp_path / 'nowhere'} ..."]


# -- issue 26: prior folders of the wrong shape, unbounded or non-finite settings ---------------------


def _sample_lm():
    spec = importlib.util.spec_from_file_location("sample_lm", REPO / "recipes" / "sample_lm.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("edit, message", [
    (lambda m: [1], "config.json: the top level must be an object, got an array"),
    (lambda m: "[" * 3000 + "]" * 3000, "config.json: JSON nested 3000 deep"),
    (lambda m: {k: v for k, v in m.items() if k != "codec"}, "config.json: the file has no 'codec' entry"),
    (lambda m: {**m, "vocabulary": {**m["vocabulary"], "n_codebooks": "4"}}, "vocabulary.n_codebooks must be an"),
    (lambda m: {**m, "text": {"kind": "bytes"}}, "config.json: text has no 'vocab_size' entry"),
    (lambda m: {**m, "prior": {**m["prior"], "n_codebooks": True}}, "prior.n_codebooks must be an integer"),
    (lambda m: {**m, "prior": {**m["prior"], "layers": 2}}, r"config.json: prior: unknown keys \['layers'\]"),
    (lambda m: {**m, "prior": {**m["prior"], "backbone": {**BACKBONE, "n_embd": 1 << 20}}}, "billion weights"),
    (lambda m: {**m, "prior": {**m["prior"], "backbone": {**BACKBONE, "n_positions": -5}}}, "cannot build"),
    (lambda m: {**m, "prior": {**m["prior"], "backbone": {**BACKBONE, "n_embd": 64}}}, "weights do not fit"),
])
def test_prior_folders_of_the_wrong_shape_or_size_are_refused(tmp_path, edit, message):
    tiny_prior("delay").save_pretrained(tmp_path)
    value = edit(json.loads((tmp_path / "config.json").read_text()))
    (tmp_path / "config.json").write_text(value if isinstance(value, str) else json.dumps(value))
    start = time.perf_counter()
    with pytest.raises(ValueError, match=message):
        CodePrior.from_pretrained(tmp_path)
    assert time.perf_counter() - start < 60  # counted on the meta device: nothing of that size is allocated


@pytest.mark.parametrize("overrides, message", [
    (["optim.lr=.nan"], "optim.lr must be a number, got nan"),
    (["optim.lr=0"], "optim.lr must be a number > 0"),
    (["optim.betas=[0.9, 1.5]"], "optim.betas must be a number >= 0 and <= 0.9999"),
    (["optim.clip=.inf"], "optim.clip must be a number, got inf"),
    (["train.batch_size=0"], "train.batch_size must be an integer >= 1"),
    (["train.seq_len=1"], "train.seq_len must be an integer >= 2"),
    (["train.log_every=0"], "train.log_every must be an integer >= 1"),
    (["prior.max_text_len=0"], "prior.max_text_len must be an integer >= 1"),
    (["prior.backbone={model_type: gpt2, n_embd: .nan}"], "prior.backbone.n_embd must be a number"),
])
def test_prior_training_settings_are_bounded(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        load_prior_config(TINY, [f"data.train={tmp_path}", *overrides])


def test_codes_with_fewer_codebooks_than_the_prior_are_refused_at_start(code_sets, codec_tok, tmp_path):
    records = [dataclasses.replace(r, codes=r.codes[:2]) for r in learnable_records("f", 12, 5)]
    write_dataset(tmp_path / "two", [("shard-00000.tar", records)], codec_tok.codes_fingerprint)
    manifest = json.loads((tmp_path / "two" / "manifest.json").read_text())
    (tmp_path / "two" / "manifest.json").write_text(json.dumps({**manifest, "n_quantizers": 2}))
    for data in (f"data.train={tmp_path / 'two'}", f"data.valid={tmp_path / 'two'}"):
        with pytest.raises(ValueError, match="holds 2 codebooks per record, the prior models 4"):
            train_prior(tiny_config(code_sets, data), tmp_path / "run", max_steps=2)
        assert not (tmp_path / "run").exists()
    with pytest.raises(ValueError, match="max_steps must be an integer >= 1"):
        train_prior(tiny_config(code_sets), tmp_path / "run", max_steps=-1)


@pytest.mark.parametrize("options, message", [
    ({"temperature": float("nan")}, "temperature .* must be a number, got nan"),
    ({"temperature": 1e-9}, "temperature .* must be a number >= 0.001"),
    ({"top_p": float("nan")}, "top_p must be a number"),
    ({"top_k": 1.5}, "top_k must be an integer"),
    ({"max_frames": 0}, r"max_frames \(at least min_frames=1 .*\) must be an integer >= 1"),
    ({"min_frames": 5, "max_frames": 3}, "max_frames .* must be an integer >= 5"),
])
def test_sampling_settings_are_checked(options, message):
    with pytest.raises(ValueError, match=message):
        Sampler(tiny_prior("delay"), 1, **options)
    with pytest.raises(ValueError, match="n_samples must be an integer >= 1"):
        Sampler(tiny_prior("delay"), 0)


@pytest.mark.parametrize("args, message", [
    (["--temperature", "nan"], "must be a number, got nan"),
    (["--temperature", "1e-9"], "temperature .* must be a number >= 0.001"),
    (["--seconds", "0"], "--seconds: the value must be a number > 0"),
    (["--seconds", "inf"], "--seconds: the value must be a number, got inf"),
    (["--num-samples", "0"], "--num-samples: the value must be an integer >= 1"),
    (["--prompt", "x.wav", "--prompt-seconds", "-1"], "--prompt-seconds: the value must be a number > 0"),
    (["--prompt", "x.wav", "--prompt-seconds", "9"], "--prompt-seconds 9.0 is longer than the output"),
    (["--prompt-seconds", "1"], "--prompt-seconds needs --prompt"),
    (["--top-p", "0"], "--top-p: the value must be a number > 0"),
    (["--top-k", "-1"], "--top-k: the value must be an integer >= 0"),
])
def test_sample_lm_checks_every_setting_before_loading(tmp_path, capsys, args, message):
    argv = ["--prior", str(tmp_path / "no-prior"), "--out", str(tmp_path / "x.wav"), *args]
    with pytest.raises(SystemExit) as exit_:
        _sample_lm().main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and re.search(message, err), err
    assert "not a prior" not in err and not (tmp_path / "x.wav").exists()


def test_sample_lm_refuses_less_than_a_frame_and_bad_priors_in_one_line(tmp_path, capsys):
    tiny_prior("delay").save_pretrained(tmp_path / "prior")
    sample_lm = _sample_lm()
    for prior, seconds, message in ((tmp_path / "prior", "0.001", "less than one code frame"),
                                    (tmp_path / "nowhere", "1", "not a prior folder")):
        argv = ["--prior", str(prior), "--out", str(tmp_path / "x.wav"), "--seconds", seconds]
        assert sample_lm.main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("sample_lm: error:") and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "x.wav").exists()
