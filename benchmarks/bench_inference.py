"""Inference speed and memory: audiotok against transformers.DacModel, side by side in one run.

Same weights (random, full-size architecture unless --model is given), same inputs. Prints, for
encode and decode at each batch size: best wall time, real-time factor (seconds of audio coded
per second), peak memory growth during the call, and whether the codes equal the reference's.

    python benchmarks/bench_inference.py                      # CPU, 10 s of 44.1 kHz audio
    python benchmarks/bench_inference.py --device cuda --batch 1 16 --dtype bf16 --compile
    python benchmarks/bench_inference.py --long 60 120 240    # chunked encode: memory vs length
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from common import PeakMemory, machine  # noqa: E402
from conftest import make_audio, random_tokenizer  # noqa: E402  (weights with realistic scale)

from audiotok import AudioTokenizer  # noqa: E402
from audiotok.layers import use_fused_snake  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ENCODE_GFLOP_PER_S = 61.0  # 44.1 kHz encoder, dac-spec.md
DECODE_GFLOP_PER_S = 137.0


def measure(fn, device: torch.device, repeats: int):
    """(best seconds, peak bytes, result) over ``repeats`` runs after one warm-up."""
    result = fn()
    best, peak = float("inf"), 0
    for _ in range(repeats):
        with PeakMemory(device) as mem:
            start = time.perf_counter()
            result = fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - start)
        peak = max(peak, mem.bytes)
    return best, peak, result


def row(name, op, batch, seconds, t, peak, codes_note, gflop_per_s):
    rtf = batch * seconds / t
    tflops = gflop_per_s * batch * seconds / t / 1000
    print(f"| {name:<26} | {op:<6} | {batch:>5} | {t:8.3f} | {rtf:8.1f}x | {tflops:7.2f} | {peak / 2**20:9.0f} "
          f"| {codes_note} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="a model source (default: random weights of --preset)")
    p.add_argument("--preset", default="44khz")
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", nargs="+", default=["fp32"], choices=list(DTYPES))
    p.add_argument("--compile", action="store_true", help="also run audiotok with compile=True")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--long", type=float, nargs="*", default=[],
                   help="audio lengths (s) for the chunked-encode memory table")
    p.add_argument("--chunk", type=float, default=10.0, help="chunk_seconds for --long")
    args = p.parse_args()

    import transformers

    transformers.logging.set_verbosity_error()
    device = torch.device(args.device)
    ours = AudioTokenizer.from_pretrained(args.model) if args.model else random_tokenizer(args.preset)
    with tempfile.TemporaryDirectory() as tmp:
        ours.export_transformers(tmp)
        reference = transformers.DacModel.from_pretrained(tmp).eval().to(device)
    ours.to(device)
    sr, hop = ours.sample_rate, ours.hop_length
    num_samples = int(args.seconds * sr) // hop * hop  # the reference does not pad: whole frames only
    seconds = num_samples / sr
    print(f"## {ours.model_id} ({args.preset}), {seconds:.2f} s clips at {sr} Hz, {machine(device)}, "
          f"torch {torch.__version__}\n")
    print("| implementation             | op     | batch | time (s) |   x real | TFLOP/s | peak MiB | codes |")
    print("|----------------------------|--------|-------|----------|----------|---------|----------|-------|")
    variants = [(f"audiotok {d}", DTYPES[d], False) for d in args.dtype]
    if args.compile:
        variants += [(f"audiotok {d} compile", DTYPES[d], True) for d in args.dtype]
    for batch in args.batch:
        x = torch.from_numpy(make_audio(num_samples, batch=batch, seed=batch))
        with torch.inference_mode():
            t, peak, ref_codes = measure(lambda: reference.encode(x.to(device)).audio_codes.cpu(), device, args.repeats)
            row("transformers fp32", "encode", batch, seconds, t, peak, "ref", ENCODE_GFLOP_PER_S)
            t, peak, _ = measure(lambda: reference.decode(audio_codes=ref_codes.to(device)).audio_values, device,
                                 args.repeats)
            row("transformers fp32", "decode", batch, seconds, t, peak, "", DECODE_GFLOP_PER_S)
        for name, dtype, compiled in variants:
            ours.to(dtype=dtype)
            use_fused_snake(ours.model, compiled)
            t, peak, enc = measure(lambda: ours.encode(x, sr), device, args.repeats)
            same = (enc.codes == ref_codes).float().mean().item()
            note = "identical" if same == 1.0 else f"{100 * same:.2f}% equal"
            row(name, "encode", batch, seconds, t, peak, note, ENCODE_GFLOP_PER_S)
            t, peak, _ = measure(lambda: ours.decode(ref_codes), device, args.repeats)
            row(name, "decode", batch, seconds, t, peak, "", DECODE_GFLOP_PER_S)
        ours.to(dtype=torch.float32)
        use_fused_snake(ours.model, False)

    if args.long:
        print(f"\n### Chunked encode of long audio (chunk_seconds = batch_seconds = {args.chunk}): memory vs length\n")
        print("| audio (s) | time (s) | x real | peak MiB (model work, input excluded) |")
        print("|-----------|----------|--------|----------------------------------------|")
        for length in args.long:
            x = make_audio(int(length * sr), seed=7)[0]
            t, peak, _ = measure(lambda: ours.encode(x, sr, chunk_seconds=args.chunk, batch_seconds=args.chunk),
                                 device, 1)
            print(f"| {length:9.0f} | {t:8.2f} | {length / t:6.1f} | {peak / 2**20:38.0f} |")


if __name__ == "__main__":
    main()
