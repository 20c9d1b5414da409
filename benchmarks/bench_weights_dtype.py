"""What storing a model's weights in fp16 or bf16 changes: its codes and its decoding.

For each --dtype, the model's weights are rounded to it (as ``save_pretrained(dtype=...)`` stores
them; loading upcasts them to float32) and compared with the weights given, on examples/speech.flac
and --max-files files per category of the real-audio eval split (their first --seconds):

- codes: the share of identical codes, overall and per codebook (the rounded encoder and quantizer
  move codes that sit near a tie; the rounded model has another ``codes_fingerprint``);
- decoding the float32 model's codes with the rounded weights against the float32 decode: SNR (dB),
  largest sample difference, and mel distance between the two decodes;
- mel distance of each model's own encode-decode to the input.

The bundled model ships fp16 weights; to rerun the measurement of its model card, give it the
float32 weights of an earlier release:

    git show 42df683:audiotok/pretrained/default/model.safetensors > /tmp/v03/model.safetensors
    cp audiotok/weights/pretrained/default/{config.json,README.md} /tmp/v03/
    python benchmarks/bench_weights_dtype.py --model /tmp/v03 --data data/real-audio
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from audiotok import AudioTokenizer
from audiotok.audio import downmix, resample
from audiotok.data.config import sources_from_manifest
from audiotok.metrics import mel_distance
from audiotok.weights.checkpoint import STORAGE_DTYPES, Checkpoint, build_model, load_checkpoint
from audiotok.weights.hub import resolve

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_quality import candidates  # noqa: E402
from common import machine  # noqa: E402

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "speech.flac"


def snr_db(reference: torch.Tensor, other: torch.Tensor) -> float:
    return 10 * math.log10(float((reference ** 2).sum()) / max(float(((reference - other) ** 2).sum()), 1e-30))


def clips(args: argparse.Namespace, rate: int) -> list[tuple[str, np.ndarray]]:
    audio, sr = sf.read(EXAMPLE, dtype="float32")
    out = [("examples/speech.flac", resample(audio[None], sr, rate)[0])]
    groups = sources_from_manifest(args.data, split=args.split)
    for category in ("speech", "music", "general"):
        source, taken = groups.get(category), 0
        for index in candidates(len(source) if source else 0, args.max_files):
            if taken == args.max_files:
                break
            clip = source.clip(index)
            if clip.num_frames < 3 * clip.sample_rate:
                continue
            x = clip.read(0, min(clip.num_frames, round(args.seconds * clip.sample_rate)))
            out.append((f"{category}:{clip.key}", resample(downmix(x), clip.sample_rate, rate)[0]))
            taken += 1
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="the float32 weights: any from_pretrained source")
    p.add_argument("--dtype", nargs="+", default=["fp16", "bf16"], choices=["fp16", "bf16"])
    p.add_argument("--data", default="data/real-audio", help="folder with the real-audio set's manifest.csv")
    p.add_argument("--split", default="eval")
    p.add_argument("--max-files", type=int, default=3, help="files per category (at least 3 s long)")
    p.add_argument("--seconds", type=float, default=10.0, help="the first seconds of each file")
    args = p.parse_args(argv)
    checkpoint = load_checkpoint(resolve(args.model))
    reference = AudioTokenizer(build_model(checkpoint), checkpoint.model_id)
    rounded = {}
    for name in args.dtype:
        weights = {k: v.to(STORAGE_DTYPES[name]).float() for k, v in reference.model.state_dict().items()}
        rounded[name] = AudioTokenizer(build_model(Checkpoint(checkpoint.config, weights, name)), name)
    print(f"machine: {machine(torch.device('cpu'))}; fingerprints: float32 {reference.codes_fingerprint}, "
          + ", ".join(f"{n} {t.codes_fingerprint}" for n, t in rounded.items()))
    totals = {name: {"same": np.zeros(reference.n_codebooks), "frames": 0, "snr": []} for name in rounded}
    for key, x in clips(args, reference.sample_rate):
        encoded = reference.encode(x, reference.sample_rate)
        decoded = reference.decode(encoded)[0, 0]
        rate = reference.sample_rate
        line = f"{key[:48]:48s} {len(x) / rate:5.1f} s  mel {mel_distance(decoded, x, rate):.3f}"
        for name, tok in rounded.items():
            own = tok.encode(x, rate)
            same = (own.codes[0] == encoded.codes[0]).float()
            totals[name]["same"] += same.sum(-1).numpy()
            totals[name]["frames"] += same.shape[-1]
            other = tok.decode(encoded.codes)[0, 0, : decoded.shape[-1]]  # the float32 model's codes
            totals[name]["snr"].append(snr_db(decoded, other))
            line += (f" | {name}: codes {same.mean():.4f}, decode SNR {snr_db(decoded, other):5.1f} dB, max "
                     f"{(decoded - other).abs().max():.1e}, mel(dec) {mel_distance(other, decoded, rate):.4f}, "
                     f"mel {mel_distance(tok.decode(own)[0, 0], x, rate):.3f}")
        print(line, flush=True)
    for name, t in totals.items():
        per = t["same"] / t["frames"]
        print(f"{name}: identical codes {per.mean():.4f} (per codebook {' '.join(f'{v:.4f}' for v in per)}); "
              f"decode SNR {min(t['snr']):.1f} to {max(t['snr']):.1f} dB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
