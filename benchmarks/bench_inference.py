"""Inference speed and memory: audiotok against transformers.DacModel, side by side in one run.

Same weights (random, full-size architecture unless --model is given), same inputs. Prints, for
encode and decode at each batch size: median wall time over the rounds, real-time factor (seconds
of audio coded per second), peak memory growth during the call, minor page faults per call (fresh
memory the kernel zero-fills: load-independent, unlike time) and whether the codes equal the
reference's. The implementations take turns (each round times every one once, after a warm-up
round), so load that comes and goes on a shared machine falls on all of them alike.

    python benchmarks/bench_inference.py                      # CPU, 10 s of 44.1 kHz audio
    python benchmarks/bench_inference.py --device cuda --batch 1 16 --dtype bf16 --compile
    python benchmarks/bench_inference.py --long 60 120 240    # chunked encode: memory vs length
    python benchmarks/bench_inference.py --swap-layout --profile prof  # decoder layouts; profiler tables
    python benchmarks/bench_inference.py --device cuda --batch 16 --cudnn-benchmark  # cuDNN autotuning too
"""

from __future__ import annotations

import argparse
import functools
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from common import PeakMemory, machine, profile_summary  # noqa: E402
from conftest import make_audio, random_tokenizer  # noqa: E402  (weights with realistic scale)

from audiotok import AudioTokenizer  # noqa: E402
from audiotok.nn.layers import use_channels_last, use_fused_snake  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ENCODE_GFLOP_PER_S = 61.0  # 44.1 kHz encoder, dac-spec.md
DECODE_GFLOP_PER_S = 137.0


def minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def measure(fn, device: torch.device, clock=time.perf_counter):
    """(seconds, peak bytes, minor page faults, result) of one call."""
    with PeakMemory(device) as mem:
        faults = minor_faults()
        start = clock()
        result = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = clock() - start
    return seconds, mem.bytes, minor_faults() - faults, result


def time_in_turns(setups: dict, device: torch.device, repeats: int, clock) -> dict:
    """``setups``: name -> a function that readies an implementation and returns its (encode, decode)
    calls. Each round readies and times every implementation in turn, after a warm-up round; returns
    name -> ((median seconds, peak bytes, median faults, result) of encode, the same of decode)."""
    runs: dict = {}
    for round_ in range(repeats + 1):
        for name, setup in setups.items():
            for i, call in enumerate(setup()):
                t, peak, faults, result = measure(call, device, clock)
                if round_ > 0:
                    runs.setdefault(name, ([], []))[i].append((t, peak, faults, result))
    return {name: [(statistics.median(t for t, *_ in op), max(p for _, p, *_ in op),
                    statistics.median(f for *_, f, _ in op), op[-1][-1]) for op in ops]
            for name, ops in runs.items()}


def row(name, op, batch, seconds, t, peak, faults, codes_note, gflop_per_s):
    rtf = batch * seconds / t
    tflops = gflop_per_s * batch * seconds / t / 1000
    print(f"| {name:<32} | {op:<6} | {batch:>5} | {t:8.3f} | {rtf:8.1f}x | {tflops:7.2f} | {peak / 2**20:9.0f} "
          f"| {faults / 1000:8.0f} | {codes_note} |")


def write_profiles(path: Path, reference, ours: AudioTokenizer, x: torch.Tensor, codes: torch.Tensor,
                   device: torch.device) -> None:
    """Profiler tables of one fp32 encode and decode of each implementation, the calls that are timed."""
    calls = [("transformers fp32 encode", lambda: reference.encode(x.to(device)).audio_codes.cpu()),
             ("audiotok fp32 encode", lambda: ours.encode(x, ours.sample_rate)),
             ("transformers fp32 decode", lambda: reference.decode(audio_codes=codes.to(device)).audio_values.cpu()),
             ("audiotok fp32 decode", lambda: ours.decode(codes))]
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.inference_mode():
        path.write_text(f"# batch {x.shape[0]}, {machine(device)}, torch {torch.__version__}\n\n" + "\n".join(
            profile_summary(fn, device, title) for title, fn in calls))
    print(f"\nprofiles: {path}")


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
    p.add_argument("--cpu-time", action="store_true",
                   help="time by the process's CPU time, not wall time: with one torch thread on a CPU that other "
                        "jobs share, the work this process did, without its waits for a core")
    p.add_argument("--swap-layout", action="store_true",
                   help="also run audiotok with the decoder in the other layout than the device's default "
                        "(channels-last on CPU, channels-first elsewhere)")
    p.add_argument("--cudnn-benchmark", action="store_true",
                   help="CUDA: also run both implementations with cuDNN autotuning (torch.backends.cudnn.benchmark: "
                        "each input shape's convolution algorithms timed once, in the warm-up round)")
    p.add_argument("--profile", type=Path, metavar="DIR",
                   help="write torch.profiler tables of one fp32 encode and decode per batch size, both "
                        "implementations, to DIR/profile_batch<B>.txt")
    args = p.parse_args()

    import transformers

    transformers.logging.set_verbosity_error()
    device = torch.device(args.device)
    clock = time.process_time if args.cpu_time else time.perf_counter
    ours = AudioTokenizer.from_pretrained(args.model) if args.model else random_tokenizer(args.preset)
    with tempfile.TemporaryDirectory() as tmp:
        ours.export_transformers(tmp)
        reference = transformers.DacModel.from_pretrained(tmp).eval().to(device)
    ours.to(device)
    sr, hop = ours.sample_rate, ours.hop_length
    num_samples = int(args.seconds * sr) // hop * hop  # the reference does not pad: whole frames only
    seconds = num_samples / sr
    print(f"## {ours.model_id} ({args.preset}), {seconds:.2f} s clips at {sr} Hz, {machine(device)}, "
          f"torch {torch.__version__}{', process CPU time' if args.cpu_time else ''}, load average "
          f"{os.getloadavg()[0]:.1f}\n")
    print("| implementation                   | op     | batch | time (s) |   x real | TFLOP/s | peak MiB "
          "| faults k | codes |")
    print("|----------------------------------|--------|-------|----------|----------|---------|----------|----------|-------|")
    default_layout = device.type == "cpu"  # AudioTokenizer's choice: a channels-last decoder on CPU only
    layouts = [default_layout, not default_layout] if args.swap_layout else [default_layout]
    swapped = " dec cl" if not default_layout else " dec cf"
    variants = [(f"audiotok {d}" + ("" if cl == default_layout else swapped), DTYPES[d], False, cl)
                for cl in layouts for d in args.dtype]
    if args.compile:
        variants += [(f"audiotok {d} compile", DTYPES[d], True, default_layout) for d in args.dtype]
    autotuned = [False, True] if args.cudnn_benchmark else [False]
    weights = {k: v.clone() for k, v in ours.model.state_dict().items()}  # fp32, restored after each cast
    for batch in args.batch:
        x = torch.from_numpy(make_audio(num_samples, batch=batch, seed=batch))
        with torch.inference_mode():
            ref_codes = reference.encode(x.to(device)).audio_codes.cpu()

        @torch.inference_mode()
        def reference_encode():
            return reference.encode(x.to(device)).audio_codes.cpu()

        @torch.inference_mode()
        def reference_decode():
            return reference.decode(audio_codes=ref_codes.to(device)).audio_values

        def reference_calls(autotune):
            torch.backends.cudnn.benchmark = autotune
            return reference_encode, reference_decode

        def our_calls(dtype, compiled, channels_last, autotune):
            torch.backends.cudnn.benchmark = autotune
            ours.to(dtype=dtype)
            ours.model.load_state_dict(weights)  # a cast to half precision and back rounds the weights
            use_fused_snake(ours.model, compiled)
            use_channels_last(ours.model.decoder, channels_last)
            return lambda: ours.encode(x, sr).codes, lambda: ours.decode(ref_codes)

        setups = {}
        for autotune in autotuned:
            tag = " autotune" if autotune else ""
            setups[f"transformers fp32{tag}"] = functools.partial(reference_calls, autotune)
            setups.update({name + tag: functools.partial(our_calls, *variant, autotune) for name, *variant in variants})
        medians = time_in_turns(setups, device, args.repeats, clock)
        for name, ((t_enc, peak_enc, faults_enc, codes), (t_dec, peak_dec, faults_dec, _)) in medians.items():
            same = (codes == ref_codes).float().mean().item()
            note = "ref" if name == "transformers fp32" else "identical" if same == 1.0 else f"{100 * same:.2f}% equal"
            row(name, "encode", batch, seconds, t_enc, peak_enc, faults_enc, note, ENCODE_GFLOP_PER_S)
            row(name, "decode", batch, seconds, t_dec, peak_dec, faults_dec, "", DECODE_GFLOP_PER_S)
        torch.backends.cudnn.benchmark = False
        ours.to(dtype=torch.float32)
        ours.model.load_state_dict(weights)
        use_fused_snake(ours.model, False)
        if args.profile:
            write_profiles(args.profile / f"profile_batch{batch}.txt", reference, ours, x, ref_codes, device)

    if args.long:
        print(f"\n### Chunked encode of long audio (chunk_seconds = batch_seconds = {args.chunk}): memory vs length\n")
        print("| audio (s) | time (s) | x real | peak MiB (model work, input excluded) |")
        print("|-----------|----------|--------|----------------------------------------|")
        for length in args.long:
            x = make_audio(int(length * sr), seed=7)[0]
            t, peak, _, _ = measure(lambda: ours.encode(x, sr, chunk_seconds=args.chunk, batch_seconds=args.chunk),
                                 device)
            print(f"| {length:9.0f} | {t:8.2f} | {length / t:6.1f} | {peak / 2**20:38.0f} |")


if __name__ == "__main__":
    main()
