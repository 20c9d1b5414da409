"""How often padded-batch codes equal per-clip codes, per dtype (fp32 is exact by construction).

    python benchmarks/bench_batch_match.py --dtype fp32 bf16 [--device cuda] [--model SRC]

Encodes clips of different lengths once as one padded batch and once one by one, and prints the
share of equal codes per codebook depth. Random full-size weights unless --model is given.
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import make_audio, random_tokenizer  # noqa: E402

from audiotok import AudioTokenizer  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model")
    p.add_argument("--preset", default="44khz")
    p.add_argument("--dtype", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seconds", type=float, nargs="+", default=[0.7, 1.3, 2.1, 2.9, 3.6])
    args = p.parse_args()
    tok = AudioTokenizer.from_pretrained(args.model) if args.model else random_tokenizer(args.preset)
    tok.to(args.device)
    sr = tok.sample_rate
    clips = [make_audio(int(s * sr), seed=i)[0] for i, s in enumerate(args.seconds)]
    print(f"{tok.model_id}: {len(clips)} clips of {args.seconds} s, device {args.device}\n")
    print("| dtype | codes equal, batch vs alone | first codebook | last codebook |")
    print("|-------|-----------------------------|----------------|---------------|")
    for name in args.dtype:
        tok.to(dtype=DTYPES[name])
        batch = tok.encode(clips, sr, batch_seconds=float("inf"))
        equal = total = 0
        first = last = 0.0
        for i, clip in enumerate(clips):
            n = int(batch.lengths[i])
            same = batch.codes[i, :, :n] == tok.encode(clip, sr).codes[0]
            equal, total = equal + int(same.sum()), total + same.numel()
            first += same[0].float().mean().item() / len(clips)
            last += same[-1].float().mean().item() / len(clips)
        print(f"| {name} | {100 * equal / total:.2f}% | {100 * first:.2f}% | {100 * last:.2f}% |")


if __name__ == "__main__":
    main()
