"""The Ray engine of bulk tokenization (``engine="ray"``, audiotok.bulk.ray_engine): on a local Ray
instance, its output is the torch engine's byte for byte; an interrupted job resumes, with either engine."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

import pytest
import test_bulk
from test_bulk import BAD, GOOD, Crash, _recipe, config, write_tars

from audiotok.bulk import InputSpec, tokenize_dataset
from audiotok.bulk.writer import PartWriter
from audiotok.lm import CodeDataset

ray = pytest.importorskip("ray")

# test_bulk's fixtures: the corpus, the tiny model, one torch thread
corpus, model_dir, one_thread = test_bulk.corpus, test_bulk.model_dir, test_bulk.one_thread

SETTINGS = {"shard_records": 2, "part_records": 4, "lease_seconds": 3.0}


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    """One local Ray instance for the module: 2 CPUs, one for the encoding actor, one for reading."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("RAY_AUTH_MODE", "disabled")  # no token written to ~/.ray for a throwaway instance
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR",
                 configure_logging=False)
        yield
        ray.shutdown()


def files(out: Path) -> dict[str, bytes]:
    """Every file of an output (the job's .bulk/ files included), the manifest without ``created``."""
    found = {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    manifest = json.loads(found.pop("manifest.json"))
    assert manifest.pop("created")
    found["manifest.json"] = json.dumps(manifest).encode()
    return found


def torch_job(spec: InputSpec, out: Path, model_dir: Path, **kw) -> dict[str, bytes]:
    tokenize_dataset(config(spec, out, model_dir, **{**SETTINGS, **kw}))
    return files(out)


def ray_config(spec: InputSpec, out: Path, model_dir: Path, **kw):
    return config(spec, out, model_dir, engine="ray", ray_actors=1, **{**SETTINGS, **kw})


@pytest.fixture(scope="module")
def folder_reference(corpus, model_dir, tmp_path_factory):
    """The corpus folder tokenized by the torch engine."""
    return torch_job(InputSpec("folder", str(corpus)), tmp_path_factory.mktemp("torch") / "out", model_dir)


def recipe_args(corpus: Path, out: Path, model_dir: Path) -> list[str]:
    """recipes/tokenize_dataset.py arguments for the job of :data:`SETTINGS` on the ray engine."""
    return ["--input", str(corpus), "--input-type", "folder", "--output", str(out), "--model", str(model_dir),
            "--no-progress", "--batch-seconds", "1", "--chunk-seconds", "0.5", "--part-records", "4",
            "--shard-records", "2", "--lease-seconds", "3", "--engine", "ray", "--ray-actors", "1"]


def test_folder_job_equals_the_torch_engines(corpus, model_dir, folder_reference, tmp_path, capsys):
    out = tmp_path / "out"
    assert _recipe().main(recipe_args(corpus, out, model_dir)) == 1  # 1: some records failed
    assert files(out) == folder_reference  # shards, done markers, progress, plan, manifest: same bytes
    assert f"{len(GOOD)} records" in capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    assert sorted(f["key"] for f in manifest["failures"]) == sorted(BAD)  # bad records listed, not coded
    assert sorted(r.meta["source_key"] for r in CodeDataset(out)) == sorted(GOOD)
    assert tokenize_dataset(ray_config(InputSpec("folder", str(corpus)), out, model_dir)).run_records == 0


@pytest.mark.parametrize("layout", ["pooled", "sidecar"])
def test_webdataset_job_equals_the_torch_engines(corpus, model_dir, tmp_path, layout):
    write_tars(tmp_path, corpus)
    spec = InputSpec("webdataset", str(tmp_path / "in-*.tar"), keep=["txt"])
    want = torch_job(spec, tmp_path / "torch", model_dir, layout=layout)
    tokenize_dataset(ray_config(spec, tmp_path / "ray", model_dir, layout=layout, num_workers=2))
    assert files(tmp_path / "ray") == want
    manifest = json.loads(want["manifest.json"])
    assert sorted(f["key"].rsplit(":", 1)[1] for f in manifest["failures"]) == ["s1/junk", "s1/notes"]


def test_the_driver_shows_the_models_notice_once_and_the_actors_do_not(corpus, model_dir, tmp_path, caplog):
    from audiotok.bulk.ray_engine import actor_options
    from audiotok.tokenizer import NOTICE_ENV
    from audiotok.weights.checkpoint import load_checkpoint, save_folder

    noted = load_checkpoint(model_dir)
    noted.notice = f"a notice for {tmp_path.name}"
    save_folder(noted, tmp_path / "noted")
    with caplog.at_level(logging.WARNING, logger="audiotok"):
        tokenize_dataset(ray_config(InputSpec("folder", str(corpus / "a")), tmp_path / "out", tmp_path / "noted"))
    assert [r.getMessage() for r in caplog.records].count(f"{noted.model_id}: {noted.notice}") == 1

    @ray.remote
    def notice_switch() -> str | None:
        return os.environ.get(NOTICE_ENV)

    assert ray.get(notice_switch.options(**actor_options("cpu")).remote()) == "1"  # as the actors start


def kill_the_actor_mid_part(out: Path, killed: list[int]) -> None:
    """SIGKILL the process that owns a claim on an unfinished part, once a shard is in place and recorded."""
    deadline = time.time() + 60
    while time.time() < deadline and not killed:
        recorded = list((out / ".bulk/progress").glob("*.json"))
        claims = list((out / ".bulk/claims").glob("*.json")) if recorded else []
        for claim in claims:
            try:
                pid = int(json.loads(claim.read_text())["owner"].split("/")[1])
            except (OSError, ValueError, KeyError):
                continue
            if pid != os.getpid() and not (out / ".bulk/done" / claim.name).exists():
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                return
        time.sleep(0.01)


def test_a_killed_actor_fails_the_job_and_a_rerun_finishes_it(corpus, model_dir, tmp_path):
    out = tmp_path / "out"
    small = {"shard_records": 1, "part_records": 2}  # six parts: the actor dies mid-job, not at its end
    cfg = ray_config(InputSpec("folder", str(corpus)), out, model_dir, **small)
    killed: list[int] = []
    watcher = threading.Thread(target=kill_the_actor_mid_part, args=(out, killed), daemon=True)
    watcher.start()
    with pytest.raises(RuntimeError, match="every Ray actor stopped"):  # the one actor died mid-part
        tokenize_dataset(cfg)
    watcher.join()
    assert killed and not (out / "manifest.json").exists()
    assert len(list((out / ".bulk/done").glob("*.json"))) < 6  # parts of two records: six of them

    summary = tokenize_dataset(cfg)  # the same command again: the dead actor's part is taken over at once
    assert 0 < summary.run_records < len(GOOD)  # resumed, not redone
    reference = tmp_path / "reference"  # the same job, uninterrupted, by the torch engine
    assert files(out) == torch_job(InputSpec("folder", str(corpus)), reference, model_dir, **small)


def test_a_job_begun_by_one_engine_is_finished_by_the_other(corpus, model_dir, folder_reference, tmp_path,
                                                              monkeypatch):
    out = tmp_path / "out"
    spec = InputSpec("folder", str(corpus))
    original = PartWriter.add_record

    def add_record(self, *args):  # the torch engine's process dies once a shard is in place
        if list(out.glob("part-*")):
            raise Crash()
        original(self, *args)

    monkeypatch.setattr(PartWriter, "add_record", add_record)
    with pytest.raises(Crash):
        tokenize_dataset(config(spec, out, model_dir, **SETTINGS))
    monkeypatch.undo()
    summary = tokenize_dataset(ray_config(spec, out, model_dir))
    assert 0 < summary.run_records < len(GOOD)
    assert files(out) == folder_reference


def test_the_ray_engine_without_ray_is_a_clear_error(corpus, model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # as if ray were not installed
    monkeypatch.delitem(sys.modules, "audiotok.bulk.ray_engine", raising=False)
    with pytest.raises(ImportError, match=r"pip install 'audiotok\[ray\]'"):
        tokenize_dataset(ray_config(InputSpec("folder", str(corpus)), tmp_path / "out", model_dir))
    assert _recipe().main(recipe_args(corpus, tmp_path / "out", model_dir)) == 2
    assert capsys.readouterr().err.endswith("error: ray needs the ray package: pip install 'audiotok[ray]'\n")
    assert not (tmp_path / "out").exists()  # checked before any work


def test_placement_one_actor_per_gpu_and_a_cpu_left_for_reading(corpus, tmp_path):
    from audiotok.bulk.ray_engine import placement

    def cfg(**kw):
        return config(InputSpec("folder", str(corpus)), tmp_path, "model", **{"engine": "ray", **kw})

    assert placement(cfg(), {"CPU": 2.0}) == ("cpu", 1)
    assert placement(cfg(), {"CPU": 16.0}) == ("cpu", 8)
    assert placement(cfg(), {"CPU": 32.0, "GPU": 4.0}) == ("cuda", 4)  # default device: the cluster's GPUs
    assert placement(cfg(device="cpu", ray_actors=3), {"CPU": 32.0, "GPU": 4.0}) == ("cpu", 3)
    with pytest.raises(ValueError, match="no GPU"):
        placement(cfg(device="cuda"), {"CPU": 8.0})
    with pytest.raises(ValueError, match="one GPU"):
        placement(cfg(device="cuda:1"), {"CPU": 8.0, "GPU": 2.0})
    with pytest.raises(ValueError, match="leaving none for the read tasks"):
        placement(cfg(ray_actors=2), {"CPU": 2.0})
    with pytest.raises(ValueError, match="engine must be one of"):
        cfg(engine="spark")


def test_an_unreachable_cluster_is_a_clear_error_not_minutes_of_retries(corpus, model_dir, tmp_path, monkeypatch,
                                                                         capsys):
    with socket.socket() as s:  # a port nothing listens on once this socket is closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # as a fresh process that must join a cluster
    start = time.perf_counter()
    assert _recipe().main([*recipe_args(corpus, tmp_path / "out", model_dir), "--ray-address",
                           f"127.0.0.1:{port}"]) == 2
    assert time.perf_counter() - start < 60
    err = capsys.readouterr().err
    assert f"error: no Ray cluster answers at 127.0.0.1:{port}" in err and "ray start --head" in err
