"""Issue 26, round three: workers that end with their parent, failures reported with their meaning,
codes of another model, bounded memory, partial results that say so, and resumes that notice changes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}


def alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie, ended but not yet reaped, counts as ended)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return not sys.platform.startswith("linux")


def children(pid: int) -> list[int]:
    """The child processes of ``pid`` (Linux ``/proc``)."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def wait_until(condition, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"after {seconds} s: {what}")
        time.sleep(0.1)


def run_script(code: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args], env=ENV, stdout=subprocess.PIPE,
                            text=True)


def kill_and_check_workers_end(proc: subprocess.Popen, workers: list[int]) -> None:
    try:
        assert workers and all(alive(w) for w in workers)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        wait_until(lambda: not any(alive(w) for w in workers), 20, f"workers {workers} outlived their parent")
    finally:
        for w in workers:
            if alive(w):
                os.kill(w, signal.SIGKILL)
        proc.kill()


# ---------------------------------------------------------------------------------------------
# Class 4: processes left behind


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="lists child processes through /proc")
def test_bulk_readers_end_when_the_job_is_killed(tmp_path):
    import numpy as np
    import soundfile as sf

    sf.write(tmp_path / "a.wav", np.zeros(1600, np.float32), 16000)
    proc = run_script("""
        import sys, time
        from types import SimpleNamespace
        from audiotok.bulk import InputSpec
        from audiotok.bulk.job import LoaderReads
        source = InputSpec("folder", sys.argv[1]).build()
        config = SimpleNamespace(num_workers=2, mono=True, min_seconds=0.0)
        job = SimpleNamespace(config=config, source=source, parts=source.partition(10),
                              tokenizer=SimpleNamespace(sample_rate=16000))
        reads = LoaderReads(job, 10.0)  # two workers, blocked on their task queue
        print("ready", flush=True)
        time.sleep(600)
    """, str(tmp_path))
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    wait_until(lambda: len(children(proc.pid)) >= 2, 60, "the DataLoader workers did not start")
    kill_and_check_workers_end(proc, children(proc.pid))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="lists child processes through /proc")
def test_the_watchdog_thread_ends_a_worker_without_the_parent_death_signal():
    """What ends workers on macOS, where there is no PR_SET_PDEATHSIG."""
    proc = run_script("""
        import multiprocessing, os, time
        from audiotok import workers

        def child(parent):
            workers._set_parent_death_signal = lambda: None
            workers.die_with_parent(parent, poll=0.1)
            time.sleep(600)

        if __name__ == "__main__":
            multiprocessing.get_context("fork").Process(target=child, args=(os.getpid(),)).start()
            print("ready", flush=True)
            time.sleep(600)
    """)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    wait_until(lambda: len(children(proc.pid)) >= 1, 30, "the worker did not start")
    kill_and_check_workers_end(proc, children(proc.pid))
