"""The whole GPU measurement of issue 24 in one device call: every stage with its own time budget,
everything written to one folder.

1. ``inference.md``: ``bench_inference.py`` on the device, fp32, bf16 and ``compile=True``, both decoder
   layouts, side by side with ``transformers.DacModel`` (batch 1 and 16, 10 s clips, 44.1 kHz model);
   ``autotune.md``: the same at batch 16 with and without cuDNN autotuning (``--cudnn-benchmark``);
2. ``profile.md`` and ``profile_batch16.txt``: ``torch.profiler`` tables of one fp32 encode and decode
   of each implementation (top ops by device and host time, device idle share, synchronizations);
3. ``tokenize_44khz.md`` and ``tokenize_default.md``: ``bench_tokenize.py`` end to end in bf16 on a
   generated corpus of ``--minutes`` of audio, with its steady-state row and the device's idle time
   between model calls, for the 44.1 kHz architecture (random weights; its encode stage with shape
   buckets on and off) and the bundled model.

Each stage runs in a child process killed at its budget (its output so far is kept), so one slow stage
cannot take the others' time; ``summary.md`` lists what each stage did. A dry run on CPU checks the
commands in a minute or two:

    python benchmarks/gpu_session.py OUT                       # on the GPU machine, about 7.5 minutes
    python benchmarks/gpu_session.py /tmp/gpu-dry --dry-run    # CPU, tiny models and inputs
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent  # the repository: audiotok is imported from here, installed or not
NEEDED = ["torch", "transformers", "numpy", "safetensors", "yaml", "soundfile", "soxr", "webdataset"]

# (name, seconds, arguments) per stage; CORPUS is the generated corpus folder, OUT the output folder.
FULL = {
    "device": "cuda", "minutes": 120.0, "file_seconds": 30.0,
    "stages": [
        ("inference", 150, ["bench_inference.py", "--batch", "1", "16", "--dtype", "fp32", "bf16", "--compile",
                            "--swap-layout", "--repeats", "3"]),
        ("autotune", 45, ["bench_inference.py", "--batch", "16", "--dtype", "fp32", "bf16", "--cudnn-benchmark",
                          "--repeats", "3"]),
        ("profile", 60, ["bench_inference.py", "--batch", "16", "--dtype", "fp32", "--repeats", "1",
                         "--profile", "OUT"]),
        ("tokenize_44khz", 105, ["bench_tokenize.py", "--preset", "44khz", "--dtype", "bf16", "--folder", "CORPUS",
                                 "--num-workers", "15", "--batch-seconds", "600", "--buckets", "on", "off"]),
        ("tokenize_default", 70, ["bench_tokenize.py", "--model", "default", "--dtype", "bf16", "--folder", "CORPUS",
                                  "--num-workers", "15", "--batch-seconds", "600"]),
    ],
}
DRY_RUN = {
    "device": "cpu", "minutes": 0.5, "file_seconds": 5.0,
    "stages": [
        ("inference", 240, ["bench_inference.py", "--preset", "tiny-44khz", "--seconds", "1", "--batch", "1",
                            "--dtype", "fp32", "bf16", "--compile", "--swap-layout", "--repeats", "1"]),
        ("autotune", 120, ["bench_inference.py", "--preset", "tiny-44khz", "--seconds", "1", "--batch", "2",
                           "--dtype", "fp32", "--cudnn-benchmark", "--repeats", "1"]),
        ("profile", 120, ["bench_inference.py", "--preset", "tiny-44khz", "--seconds", "1", "--batch", "2",
                          "--dtype", "fp32", "--repeats", "1", "--profile", "OUT"]),
        ("tokenize_44khz", 180, ["bench_tokenize.py", "--preset", "tiny-44khz", "--dtype", "bf16", "--folder",
                                 "CORPUS", "--num-workers", "2", "--batch-seconds", "10", "--threads", "1",
                                 "--buckets", "on", "off"]),
        # fp32: on a CPU without bf16 kernels (no AVX-512) the bundled model in bf16 outlasts the budget
        ("tokenize_default", 180, ["bench_tokenize.py", "--model", "default", "--dtype", "fp32", "--folder",
                                   "CORPUS", "--num-workers", "2", "--batch-seconds", "10", "--threads", "1"]),
    ],
}


def environment() -> str:
    """Versions, the GPU (nvidia-smi) and the host CPU, as text."""
    import torch

    lines = [f"python {platform.python_version()}, torch {torch.__version__}, cuda {torch.version.cuda}, "
             f"{platform.platform()}"]
    for name in NEEDED[1:]:
        lines.append(f"{name} {getattr(importlib.import_module(name), '__version__', '?')}")
    for command in (["nvidia-smi"], ["lscpu"]):
        try:
            lines.append(subprocess.run(command, capture_output=True, text=True, timeout=30).stdout)
        except (OSError, subprocess.TimeoutExpired) as e:
            lines.append(f"{command[0]}: {e}")
    return "\n".join(lines)


# The benchmarks take their test signals and random models from tests/conftest.py, which needs pytest
# only to declare fixtures; pytest is not installed on the GPU machines, so this stands in for it.
PYTEST_STUB = '''"""A stand-in for pytest: declares fixtures as plain functions (gpu_session.py)."""
def fixture(*args, **kwargs):
    return args[0] if args and callable(args[0]) else (lambda function: function)
'''


def run_stage(name: str, argv: list[str], budget: float, out: Path, path: list[str]) -> str:
    """Run one benchmark script with a time limit and ``path`` first on its ``PYTHONPATH``; its stdout
    to ``out/name.md``, stderr to ``.log``. Returns the summary line."""
    start = time.perf_counter()
    with open(out / f"{name}.md", "w") as stdout, open(out / f"{name}.log", "w") as stderr:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([*path, os.environ.get("PYTHONPATH", "")])}
        child = subprocess.Popen([sys.executable, str(HERE / argv[0]), *argv[1:]], stdout=stdout, stderr=stderr,
                                 env=env)
        try:
            status = f"exit {child.wait(timeout=budget)}"
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
            status = f"killed at its budget of {budget:.0f} s (output so far kept)"
    return f"| {name} | {status} | {time.perf_counter() - start:.0f} s |"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path, help="folder for the results (created)")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny models and inputs: checks the commands")
    p.add_argument("--budget", type=float, default=450.0, help="seconds for everything; stages stop early to fit")
    args = p.parse_args()
    plan = DRY_RUN if args.dry_run else FULL
    t0 = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    missing = [name for name in NEEDED if importlib.util.find_spec(name) is None]
    if missing:
        sys.exit(f"missing modules {missing}: pip install --no-index --find-links .whl ... first")
    (args.out / "environment.txt").write_text(environment())

    rows = ["| stage | result | wall |", "|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "stub").mkdir()
        (Path(tmp) / "stub" / "pytest.py").write_text(PYTEST_STUB)
        path = [str(Path(tmp) / "stub"), str(ROOT)]
        sys.path[:0] = [*path, str(HERE)]
        from bench_tokenize import make_corpus

        corpus = Path(tmp) / "corpus"
        corpus.mkdir()
        start = time.perf_counter()
        make_corpus(corpus, plan["minutes"], plan["file_seconds"])
        rows.append(f"| corpus ({plan['minutes']:g} min) | made | {time.perf_counter() - start:.0f} s |")
        for name, seconds, argv in plan["stages"]:
            left = args.budget - (time.perf_counter() - t0)
            if left < 10:
                rows.append(f"| {name} | not run: the session budget is spent | |")
                continue
            argv = [str(args.out) if a == "OUT" else str(corpus) if a == "CORPUS" else a for a in argv]
            rows.append(run_stage(name, [*argv, "--device", plan["device"]], min(seconds, left), args.out, path))
            print(rows[-1], flush=True)
    rows.append(f"\ntotal {time.perf_counter() - t0:.0f} s")
    (args.out / "summary.md").write_text("\n".join(rows) + "\n")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
