"""What bf16 costs on this CPU: one Conv1d ``[4, 64, 16000]``, kernel 7 (an encoder layer's shape) in
fp32 and under bf16 autocast, with whether oneDNN has bf16 kernels here
(:func:`audiotok.nn.layers.cpu_has_bf16_kernels`, which decides the tokenizer's and trainer's warning).

    OMP_NUM_THREADS=1 python benchmarks/bench_cpu_bf16.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine  # noqa: E402

from audiotok.nn.layers import cpu_has_bf16_kernels  # noqa: E402


def seconds(conv: torch.nn.Conv1d, x: torch.Tensor, bf16: bool, repeats: int = 3) -> float:
    """The fastest of ``repeats`` forward passes, after one warm-up."""
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            conv(x)
        times.append(time.perf_counter() - start)
    return min(times[1:])


def main() -> None:
    torch.manual_seed(0)
    conv, x = torch.nn.Conv1d(64, 64, 7, padding=3), torch.randn(4, 64, 16000)
    fp32, bf16 = seconds(conv, x, False), seconds(conv, x, True)
    print(f"{machine(torch.device('cpu'))}, torch {torch.__version__}; oneDNN bf16 kernels: {cpu_has_bf16_kernels()}\n")
    print("| precision | ms per pass | vs fp32 |\n|---|---|---|")
    print(f"| fp32 | {1e3 * fp32:.1f} | 1.00x |\n| bf16 autocast | {1e3 * bf16:.1f} | {bf16 / fp32:.2f}x slower |")


if __name__ == "__main__":
    main()
