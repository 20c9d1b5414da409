"""What shape buckets cost and buy, from the planner alone (no model runs): a bulk job's forward passes
with and without :class:`audiotok.segments.ShapeGrid`, planned as the job plans them.

Clips of a length mix are pooled as a bulk job pools them (``--pool-seconds`` of audio per
:meth:`AudioTokenizer.encode_each` call), grouped and cut by :meth:`AudioTokenizer.plan_batches` under
the chunk and batch budgets of ``--device`` (:data:`audiotok.tokenizer.DEFAULT_SECONDS`), and counted:
forward passes, distinct input shapes ``[B, 1, T]``, the share of the frames computed that are
computed in a pass of a shape not seen before (what cuDNN autotuning times, and compiled kernels
specialize for, again), and frames computed over frames of audio (the padding overhead; chunk
context included, the same with and without buckets).

    python benchmarks/bench_buckets.py                          # CUDA budgets, 44.1 kHz model, 100 h per mix
    python benchmarks/bench_buckets.py --device cpu --hours 10
"""

from __future__ import annotations

import argparse

import numpy as np

from audiotok import AudioTokenizer
from audiotok.segments import LENGTH_STEPS, SHORTEST
from audiotok.tokenizer import DEFAULT_SECONDS

#: Length mixes, seconds per clip: ``name -> rng -> one length``.
MIXES = {
    "corpus (7.5-52.5 s)": lambda rng: rng.uniform(7.5, 52.5),  # bench_tokenize's corpus, 30 s files
    "speech (log-normal, median 8 s)": lambda rng: min(60.0, rng.lognormal(np.log(8.0), 0.6)),
    "short clips (0.5-5 s)": lambda rng: rng.uniform(0.5, 5.0),
    "long files (1-10 min)": lambda rng: rng.uniform(60.0, 600.0),
    "anything (0.1 s-10 min, log-uniform)": lambda rng: float(np.exp(rng.uniform(np.log(0.1), np.log(600.0)))),
}


def plan_job(tok: AudioTokenizer, clips: list[int], pool_seconds: float) -> list[tuple[int, int, int]]:
    """``(rows, frames, frames of audio)`` of every forward pass of a bulk job over clips of these frame
    counts, pooled and planned as :meth:`AudioTokenizer.encode_each` plans them."""
    passes, pool = [], []
    for n in clips + [0]:
        pool.append(n)
        if n and sum(pool) < pool_seconds * tok.frame_rate:
            continue
        pool = [f for f in pool if f]
        for group in tok.plan_batches(pool, "encoder", chunked=False):
            for batch in tok.plan_batches([pool[s.item] for s in group.segments], "encoder"):
                kept = sum(s.keep_stop - s.keep_start for s in batch.segments)
                passes.append((len(batch.segments), batch.frames, kept))
        pool = []
    return passes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="44khz", help="the architecture (its frame rate and context)")
    p.add_argument("--device", default="cuda", choices=sorted(DEFAULT_SECONDS), help="whose budgets")
    p.add_argument("--hours", type=float, default=100.0, help="audio per length mix")
    p.add_argument("--pool-seconds", type=float, help="audio per encode_each call (default: the bulk job's)")
    args = p.parse_args()

    tok = AudioTokenizer.from_config(args.preset)
    tok.device = __import__("torch").device(args.device)  # budgets and defaults only: nothing runs
    chunk_seconds, batch_seconds = tok.resolve_seconds()
    pool_seconds = args.pool_seconds or max(4 * batch_seconds, 120.0)
    print(f"## Shape buckets: {args.preset} ({tok.frame_rate:.2f} frames/s), {args.device} budgets: chunk "
          f"{chunk_seconds:g} s, batch {batch_seconds:g} s, pools of {pool_seconds:g} s; {args.hours:g} h per mix; "
          f"lengths in steps of 1/{LENGTH_STEPS} from {SHORTEST} frames\n")
    print("| length mix | buckets | passes | distinct shapes | computed in a new shape | frames computed / audio |")
    print("|---|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    for name, draw in MIXES.items():
        clips, total = [], 0.0
        while total < args.hours * 3600:
            clips.append(tok.num_frames(max(1, round(draw(rng) * tok.sample_rate))))
            total += clips[-1] / tok.frame_rate
        for buckets in (False, True):
            tok.buckets = buckets
            passes = plan_job(tok, clips, pool_seconds)
            computed = sum(rows * frames for rows, frames, _ in passes)
            first = {shape[:2]: shape[0] * shape[1] for shape in reversed(passes)}  # each shape's first pass
            print(f"| {name} | {'on' if buckets else 'off'} | {len(passes)} | {len(first)} | "
                  f"{sum(first.values()) / computed:.1%} | {computed / sum(kept for *_, kept in passes):.3f} |")


if __name__ == "__main__":
    main()
