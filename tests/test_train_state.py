"""Crash-safe run checkpoints: a crash injected at every operation of a save loses nothing complete."""

import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import audiotok.train.state as state_mod
from audiotok import DACConfig
from audiotok.nn.model import DAC
from audiotok.train.state import (
    CODEC_RESUME_MAY_CHANGE,
    CODEC_RESUME_SETTINGS,
    STATE_FILE,
    check_resumable,
    newest_checkpoint,
    save_checkpoint,
)
from audiotok.weights.checkpoint import Checkpoint, load_checkpoint, save_folder


class Crash(BaseException):
    """A kill: no ``except Exception`` catches it and no cleanup of the code under test runs."""


GENERATOR = Checkpoint(DACConfig.preset("tiny-44khz"), DAC(DACConfig.preset("tiny-44khz")).state_dict(), "run")


def _write_generator(folder: Path) -> None:
    save_folder(GENERATOR, folder)


def _state(step: int) -> dict:
    return {"step": step, "best": 1.0 / step, "payload": torch.full((1000,), float(step))}


class Faults:
    """Counts the filesystem operations of a save and raises :class:`Crash` at operation ``at``.

    A crash in the middle of writing the training state leaves half the file, as a kill would."""

    def __init__(self, monkeypatch, at: int | None = None):
        self.count, self.at, self.names = 0, at, []
        real_os, real_shutil = state_mod.os, state_mod.shutil

        def hook(name, fn):
            def wrapped(*args, **kwargs):
                self.names.append(name)
                self.count += 1
                if self.count - 1 == self.at:
                    if name == "torch.save":  # half a file
                        Path(args[1]).write_bytes(b"PK\x03\x04" + b"\0" * 100)
                    raise Crash(name)
                return fn(*args, **kwargs)
            return wrapped

        fake_os = SimpleNamespace(path=real_os.path, readlink=real_os.readlink, PathLike=real_os.PathLike,
                                  replace=hook("os.replace", real_os.replace),
                                  symlink=hook("os.symlink", real_os.symlink))
        fake_shutil = SimpleNamespace(rmtree=hook("rmtree", real_shutil.rmtree))
        monkeypatch.setattr(state_mod, "os", fake_os)
        monkeypatch.setattr(state_mod, "shutil", fake_shutil)
        self.write = hook("write", _write_generator)
        monkeypatch.setattr(state_mod, "_save_state", hook("torch.save", state_mod._save_state))
        # counted, not run: durability against power loss is the kernel's part, and fsync is slow
        monkeypatch.setattr(state_mod, "fsync_file", hook("fsync_file", lambda path: None))
        monkeypatch.setattr(state_mod, "fsync_dir", hook("fsync_dir", lambda path: None))


def _steps_on_disk(run: Path) -> set[int]:
    return {int(p.name[5:]) for p in (run / "checkpoints").iterdir() if not p.name.startswith(".")}


def _assert_whole(folder: Path, step: int) -> None:
    assert torch.load(folder / STATE_FILE, weights_only=True)["step"] == step
    assert load_checkpoint(folder).config == GENERATOR.config


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


def _save_with_crash(monkeypatch, run: Path, at: int | None, step: int, **kwargs) -> Faults:
    """Save step ``step`` with a crash at operation ``at`` (``None``: no crash); the faults seen."""
    with monkeypatch.context() as m:
        faults = Faults(m, at)
        if at is None:
            save_checkpoint(run, _state(step), faults.write, **kwargs)
        else:
            with pytest.raises(Crash):
                save_checkpoint(run, _state(step), faults.write, **kwargs)
    return faults


def _linked_step(path: Path) -> int:
    return int(path.resolve().name[len("step_"):])


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """A run with a best checkpoint at step 2, a milestone at 3 and latest at 4."""
    run = tmp_path_factory.mktemp("base") / "run"
    save_checkpoint(run, _state(2), _write_generator, best=True)
    save_checkpoint(run, _state(3), _write_generator, milestone=True)
    save_checkpoint(run, _state(4), _write_generator)
    assert _steps_on_disk(run) == {2, 3, 4}
    assert [_linked_step(run / n) for n in ("best", "step_3", "latest")] == [2, 3, 4]
    return run


@pytest.mark.parametrize("best, milestone", [(False, False), (True, True)])
def test_a_crash_at_every_operation_of_a_save_loses_no_complete_checkpoint(base_run, tmp_path, monkeypatch,
                                                                            best, milestone):
    names = _save_with_crash(monkeypatch, _copy(base_run, tmp_path / "probe"), None, 6, best=best,
                             milestone=milestone).names
    commit = names.index("os.replace")  # renaming the finished folder: step 6 is complete from here on
    durable = len(names) - 1 - names[::-1].index("fsync_dir")  # the run folder's links are durable
    assert 5 < commit < durable < len(names)
    for at, name in enumerate(names):
        run = _copy(base_run, tmp_path / f"crash{at}")
        _save_with_crash(monkeypatch, run, at, 6, best=best, milestone=milestone)
        folder, state = newest_checkpoint(run)
        assert state["step"] == (6 if at > commit else 4), (at, name)
        _assert_whole(folder, state["step"])
        on_disk = _steps_on_disk(run)
        if at <= durable:  # nothing complete is deleted before the new checkpoint and its links are durable
            assert {2, 3, 4} <= on_disk, (at, name)
        assert 3 in on_disk and _linked_step(run / "step_3") == 3 and _linked_step(run / "best") in on_disk
        # the next save (a resumed run's) recovers from whatever was left and cleans up
        _save_with_crash(monkeypatch, run, None, 8)
        best_step = _linked_step(run / "best")
        milestone_6 = {6} if (run / "step_6").exists() else set()
        assert _steps_on_disk(run) == {3, 8, best_step} | milestone_6, (at, name)
        assert best_step == (6 if best and at > durable else best_step)
        assert not [p.name for p in [*run.iterdir(), *(run / "checkpoints").iterdir()] if p.name.startswith(".")]
        _assert_whole(run / "latest", 8)
        _assert_whole(run / "best", best_step)


def _legacy_folder(folder: Path, step: int) -> None:
    save_folder(GENERATOR, folder)
    torch.save(_state(step), folder / STATE_FILE)


def test_a_run_of_the_earlier_layout_resumes_from_its_newest_complete_folder(tmp_path, monkeypatch):
    """The earlier layout killed between its two renames: no latest/, .latest.old (step 10) and a finished
    .latest.tmp (step 15); best/ at 5, a milestone step_10/ and a half-written .step_20.tmp."""
    base = tmp_path / "legacy"
    for name, step in [(".latest.old", 10), (".latest.tmp", 15), ("best", 5), ("step_10", 10)]:
        _legacy_folder(base / name, step)
    (base / ".step_20.tmp").mkdir()
    (base / ".step_20.tmp" / STATE_FILE).write_bytes(b"PK\x03\x04 half")
    folder, state = newest_checkpoint(base)
    assert folder.name == ".latest.tmp" and state["step"] == 15
    only_milestone = tmp_path / "only_milestone"  # latest/ gone, step_30/ there: resumes at 30, not 0
    _legacy_folder(only_milestone / "step_30", 30)
    assert newest_checkpoint(only_milestone)[1]["step"] == 30
    assert newest_checkpoint(tmp_path / "no-run-yet") is None
    names = _save_with_crash(monkeypatch, _copy(base, tmp_path / "probe"), None, 16).names
    for at in [*range(len(names)), None]:
        run = _copy(base, tmp_path / f"crash{at}")
        _save_with_crash(monkeypatch, run, at, 16)
        assert newest_checkpoint(run)[1]["step"] in (15, 16)
        _save_with_crash(monkeypatch, run, None, 17)
        _assert_whole(run / "latest", 17)
        _assert_whole(run / "best", 5)  # the earlier best/ is kept, now under checkpoints/
        _assert_whole(run / "step_10", 10)  # earlier milestones stay where they were
        assert _steps_on_disk(run) == {5, 17}
        assert sorted(p.name for p in run.iterdir()) == ["best", "checkpoints", "latest", "step_10"]


def test_resuming_with_another_architecture_names_the_settings():
    saved = {"model": {"n_codebooks": 4, "codebook_size": 64, "quantizer_dropout": 0.5},
             "discriminator": {"periods": [2]}, "train": {"freeze": []}}
    rules = (CODEC_RESUME_SETTINGS, CODEC_RESUME_MAY_CHANGE)
    ok = {**saved, "model": {**saved["model"], "quantizer_dropout": 1.0}}
    check_resumable(saved, ok, Path("run"), *rules)
    newer = {**saved, "discriminator": {"periods": [2], "mpd_channels": [32, 128]}}  # added since the run
    check_resumable(saved, newer, Path("run"), *rules)
    changed = {"model": {"n_codebooks": 8, "codebook_size": 64, "quantizer_dropout": 0.5},
               "discriminator": {"periods": [2, 3]}, "train": {"freeze": ["encoder"]}}
    with pytest.raises(ValueError, match=r"model.n_codebooks: 4 in the run, 8 now; discriminator.periods: .*"
                                         r"train.freeze: \[\] in the run, \['encoder'\] now"):
        check_resumable(saved, changed, Path("run"), *rules)
    with pytest.raises(ValueError) as e:  # no discriminator to load: not compared
        check_resumable(saved, changed, Path("run"), ["model", "train.freeze"], CODEC_RESUME_MAY_CHANGE)
    assert "discriminator" not in str(e.value) and "quantizer_dropout" not in str(e.value)
    with pytest.raises(ValueError, match="model.quantizer_dropout: 0.5 in the run, 1.0 now"):
        check_resumable(saved, ok, Path("run"), ["model"])  # may change only where the rules say so


def _trained_state(step: int = 7) -> dict:
    """A training state as the codec trainer saves one: a tiny generator after a few AdamW steps (moments
    set), its schedule, a discriminator-like second module, and the plain values."""
    torch.manual_seed(0)
    generator = DAC(DACConfig.preset("tiny-44khz"))
    other = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(generator.parameters(), lr=1e-3, betas=(0.8, 0.99))
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, 0.99)
    for _ in range(3):
        for p in generator.parameters():
            p.grad = torch.randn_like(p)
        opt.step()
        sched.step()
    return {"generator": generator.state_dict(), "opt_g": opt.state_dict(), "sched_g": sched.state_dict(),
            "discriminator": other.state_dict(), "data": {"position": 14, "seed": 0, "world_size": 1, "block_size": 2},
            "step": step, "best": float("inf"), "config": {"model": {"n_codebooks": 4}, "train": {"freeze": []}}}


def test_a_state_export_keeps_what_a_resume_needs_at_half_precision(tmp_path):
    from audiotok.train.state import export_state, read_state_export

    state = _trained_state()
    run = tmp_path / "run"
    save_checkpoint(run, state, _write_generator)
    for moments in (True, False):
        out = export_state(run, tmp_path / f"state-{moments}.safetensors", moments=moments)
        back = read_state_export(out)
        assert back.keys() == state.keys()
        assert {k: back[k] for k in ("data", "step", "best", "config", "sched_g")} == \
               {k: state[k] for k in ("data", "step", "best", "config", "sched_g")}
        for module in ("generator", "discriminator"):
            assert back[module].keys() == state[module].keys()
            for key, value in state[module].items():  # float16 on the way, float32 back
                assert back[module][key].dtype == torch.float32
                assert torch.equal(back[module][key], value.half().float()), key
        assert not all(torch.equal(back["generator"][k], v) for k, v in state["generator"].items())  # rounded
        groups = back["opt_g"]["param_groups"]
        assert [g["lr"] for g in groups] == [g["lr"] for g in state["opt_g"]["param_groups"]]  # exact
        assert [g["params"] for g in groups] == [g["params"] for g in state["opt_g"]["param_groups"]]
        if not moments:
            assert back["opt_g"]["state"] == {}  # the optimizer restarts
            continue
        assert back["opt_g"]["state"].keys() == state["opt_g"]["state"].keys()
        for index, entry in state["opt_g"]["state"].items():
            got = back["opt_g"]["state"][index]
            assert torch.equal(got["step"], entry["step"]) and got["step"].dtype == entry["step"].dtype
            for name in ("exp_avg", "exp_avg_sq"):  # bfloat16 on the way, float32 back
                assert got[name].dtype == torch.float32
                assert torch.equal(got[name], entry[name].bfloat16().float()), (index, name)
        model = DAC(DACConfig.preset("tiny-44khz"))  # a model and an optimizer load it and step on
        model.load_state_dict(back["generator"])
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.8, 0.99))
        opt.load_state_dict(back["opt_g"])
        for p in model.parameters():
            p.grad = torch.ones_like(p)
        opt.step()
        assert float(opt.state_dict()["state"][0]["step"]) == 4
    sizes = {m: (tmp_path / f"state-{m}.safetensors").stat().st_size for m in (True, False)}
    weights = sum(v.numel() for v in state["generator"].values())
    assert 2 * weights < sizes[False] < 2 * weights + 200_000 and sizes[True] - sizes[False] > 4 * weights
    # a checkpoint folder exports as its run does; a folder without a checkpoint is an error
    assert read_state_export(export_state(run / "latest", tmp_path / "folder.safetensors"))["step"] == 7
    with pytest.raises(ValueError, match="no complete checkpoint to export"):
        export_state(tmp_path / "empty", tmp_path / "none.safetensors")


def _rewritten(export: Path, out: Path, text: str) -> Path:
    """A copy of ``export`` with the metadata JSON ``text``."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from audiotok.train.state import EXPORT_KEY

    with safe_open(str(export), "pt") as f:
        save_file({k: f.get_tensor(k) for k in f.keys()}, out, metadata={EXPORT_KEY: text})
    return out


def test_an_export_before_the_first_validation_is_json_and_reads_back_through_the_bounded_parser(tmp_path):
    import json
    import math

    from safetensors import safe_open

    from audiotok.train.state import EXPORT_KEY, export_state, read_state_export

    state = _trained_state()  # best is inf: the run has not validated yet
    save_checkpoint(tmp_path / "run", state, _write_generator)
    out = export_state(tmp_path / "run", tmp_path / "state.safetensors")
    with safe_open(str(out), "pt") as f:
        text = f.metadata()[EXPORT_KEY]

    def refuse(name):
        raise AssertionError(f"{name} is not JSON")

    meta = json.loads(text, parse_constant=refuse)
    assert meta["version"] == 2 and meta["values"]["best"] is None
    back = read_state_export(out)
    assert back["best"] == math.inf and back["step"] == state["step"] and back["data"] == state["data"]
    # version 1 wrote Python's Infinity: still read
    legacy = json.dumps({**meta, "version": 1, "values": {**meta["values"], "best": math.inf}})
    assert "Infinity" in legacy
    assert read_state_export(_rewritten(out, tmp_path / "v1.safetensors", legacy))["best"] == math.inf
    # metadata of the wrong shape or version, NaN, or nested too deep: one error naming the file
    for name, bad, message in [
        ("shape", json.dumps({**meta, "modules": "generator"}), "modules must be an array of strings"),
        ("version", json.dumps({**meta, "version": 3}), "version 3; this version of audiotok reads versions 1, 2"),
        ("nan", json.dumps({**meta, "values": {"best": math.nan}}), "NaN is not a number JSON allows"),
        ("deep", text[:-1] + ', "x": ' + "[" * 100 + "]" * 100 + "}", "JSON nested 101 deep"),
    ]:
        path = _rewritten(out, tmp_path / f"{name}.safetensors", bad)
        with pytest.raises(ValueError, match=message) as e:
            read_state_export(path)
        assert str(e.value).startswith(f"{path}: ") and "\n" not in str(e.value), name


RUN_STATE = Path(__file__).resolve().parents[1] / "recipes" / "state" / "default-phase.safetensors"


@pytest.mark.parametrize("config", ["default-phase-gpu.yml", "default-phase-cpu.yml"])
def test_the_default_models_run_in_progress_resumes(config, tmp_path):
    """The committed state of the default model's training run (recipes/state/) starts a run of either
    of its configs at its step, its generator the default architecture with finite weights."""
    from audiotok.train.config import load_config
    from audiotok.train.state import read_state_export
    from audiotok.train.trainer import import_state

    state = read_state_export(RUN_STATE)
    cfg = load_config(RUN_STATE.parents[1] / "configs" / config, [])
    assert import_state(RUN_STATE, tmp_path / "run", cfg) == tmp_path / "run" / "checkpoints" / f"step_{state['step']}"
    assert state["step"] > 0 and all(torch.isfinite(w).all() for w in state["generator"].values())
