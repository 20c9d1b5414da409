"""Training speed and memory: steps per second of the real training loop, per variant, side by side.

Runs ``audiotok.train.train`` (data loading, generator and discriminator steps, all losses) for
``--warmup + --steps`` steps per variant, each in a fresh process, and times the last ``--steps``
from the loop's own log. Variants are the product of ``--precision`` (fp32, bf16 autocast),
``--snake`` (eager, fused: one compiled kernel per Snake), ``--gan`` (on: the paper's
discriminators and losses, off: mel + VQ losses only) and ``--batch``. The first variant of each
(GAN, batch) group, fp32 eager by default, is the reference the others are compared with. Peak
memory: the CUDA allocator's peak, or the training process's RSS growth on CPU.

    python benchmarks/bench_train.py --config recipes/configs/default.yml          # CPU, batch 4
    python benchmarks/bench_train.py --config recipes/configs/final/44khz.yml --device cuda --batch 12 72
    python benchmarks/bench_train.py --config recipes/configs/tiny.yml --steps 3 --warmup 1

Without ``--data``, a folder of synthetic tones and noise at the model's sample rate is used.
``--resident``: every file is decoded once onto the device and batches are cut there
(``data.resident: true``, :mod:`audiotok.data.resident`) instead of by ``--num-workers`` DataLoader
workers; the decode at start-up is outside the timed steps, and the peak memory includes the audio.

    python benchmarks/bench_train.py --config recipes/configs/1gpu.yml --device cuda --gan off --resident
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import subprocess
import sys
import tempfile
from pathlib import Path

import soundfile as sf
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from common import PeakMemory, machine  # noqa: E402
from conftest import make_audio  # noqa: E402

from audiotok.train.config import load_config  # noqa: E402
from audiotok.train.trainer import train  # noqa: E402


def synthetic_audio(root: Path, sample_rate: int, files: int = 8, seconds: float = 4.0) -> None:
    """``files`` clips of the tests' tones and noise (``conftest.make_audio``)."""
    for i in range(files):
        sf.write(root / f"synth{i}.wav", make_audio(int(sample_rate * seconds), seed=i)[0], sample_rate)


def variant_overrides(precision: str, snake: str, gan: str, batch: int, base_gan: tuple[float, float]) -> list[str]:
    adversarial, feature = (0.0, 0.0) if gan == "off" else base_gan
    return [f"train.bf16={'true' if precision == 'bf16' else 'false'}",
            f"train.fused_snake={'true' if snake == 'fused' else 'false'}",
            f"loss.adversarial={adversarial}", f"loss.feature={feature}", f"train.batch_size={batch}"]


def run_one(args: argparse.Namespace, overrides: list[str]) -> dict[str, float]:
    """Train ``warmup + steps`` steps in this process; -> steps/s over the last ``steps``, peak MiB."""
    end = args.warmup + args.steps
    config = load_config(args.config, [*args.set, *overrides, "train.log_every=1", "train.milestones=[]",
                                       f"train.save_every={end + 1}", f"train.num_workers={args.num_workers}"])
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(args.data) if args.data else Path(tmp) / "audio"
        if not args.data:
            data.mkdir()
            synthetic_audio(data, config.model.sample_rate)
        config.data["groups"] = {"all": {"weight": 1, "sources": [{"type": "folder", "root": str(data)}]}}
        config.data["val_groups"] = {}
        config.data["resident"] = args.resident
        device = torch.device(args.device)
        with PeakMemory(device) as memory:
            train(config, Path(tmp) / "run", max_steps=end, device=args.device)
        rows = [json.loads(line) for line in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
    # The loop logs its cumulative rate k / t_k at every step k: t_k = k / rate_k.
    elapsed = {r["step"]: r["step"] / r["steps_per_s"] for r in rows if r["split"] == "train"}
    return {"steps_per_s": args.steps / (elapsed[end] - elapsed[args.warmup]), "peak_mib": memory.bytes / 2**20}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="recipes/configs/default.yml")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    p.add_argument("--snake", nargs="+", default=["eager", "fused"], choices=["eager", "fused"])
    p.add_argument("--gan", nargs="+", default=["on", "off"], choices=["on", "off"])
    p.add_argument("--batch", type=int, nargs="+", default=[4])
    p.add_argument("--steps", type=int, default=20, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation, allocator)")
    p.add_argument("--num-workers", type=int, default=1)
    p.add_argument("--data", help="a folder of audio files to train on (default: synthetic)")
    p.add_argument("--resident", action="store_true", help="decode the data once onto the device, cut batches there")
    p.add_argument("--set", nargs="*", default=[], help="more config overrides, e.g. data.duration=1.0")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one variant, print its JSON
    args = p.parse_args()
    logging.disable(logging.WARNING)

    if args.one:
        print(json.dumps(run_one(args, json.loads(args.one))))
        return

    config = load_config(args.config, args.set)
    paper_gan = (config.loss.adversarial, config.loss.feature) if config.loss.gan else (1.0, 2.0)
    seconds = config.data.get("duration", 0.38)
    print(f"## training speed: {args.config} ({config.model.sample_rate} Hz, {seconds:g} s excerpts), "
          f"{args.device}, {machine(torch.device(args.device))}, torch {torch.__version__}")
    data = "data resident on the device" if args.resident else f"{args.num_workers} data worker(s)"
    print(f"{args.steps} timed steps after {args.warmup} warm-up steps, {data}\n")
    print("| GAN | batch | precision | snake | steps/s | vs reference | audio s / s | peak MiB |")
    print("|-----|-------|-----------|-------|---------|--------------|-------------|----------|")
    for gan, batch in itertools.product(args.gan, args.batch):
        reference = None
        for precision, snake in itertools.product(args.precision, args.snake):
            overrides = variant_overrides(precision, snake, gan, batch, paper_gan)
            command = [sys.executable, __file__, "--one", json.dumps(overrides), *sys.argv[1:]]
            stdout = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            result = json.loads(stdout.splitlines()[-1])
            if reference is None:
                reference, speedup = result["steps_per_s"], "reference"
            else:
                speedup = f"{result['steps_per_s'] / reference:.2f}x"
            print(f"| {gan:<3} | {batch:>5} | {precision:<9} | {snake:<5} | {result['steps_per_s']:7.2f} | "
                  f"{speedup:>12} | {result['steps_per_s'] * batch * seconds:11.1f} | {result['peak_mib']:8.0f} |",
                  flush=True)


if __name__ == "__main__":
    main()
