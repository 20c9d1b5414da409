"""Reconstruction quality on the real-audio eval set, per category and bitrate.

For each category (speech; music = music + instrument; general; optionally speech8k, reported on
its own) up to --max-files files of the manifest's eval split are read; from each, one salient
excerpt of --seconds (the paper's 10 s test length; shorter files of at least --min-seconds are
taken whole), downmixed, resampled to the model rate and loudness-normalized to -16 LUFS (then
peak-limited), as the paper does before coding. Each excerpt is encoded once at full depth and
decoded from its first k codebooks for every k of --codebooks (residual VQ: the first k codes of
a full-depth encoding are the codes of a k-codebook encoding).

Metrics, against the normalized input at the model rate: mel distance and STFT distance (the
paper's, lower is better), SI-SDR (dB), ViSQOL audio mode at 48 kHz (all categories); for speech
also ViSQOL speech mode at 16 kHz, wide-band PESQ (narrow-band for speech8k) and STOI; and the
codebook utilization of the full-depth codes (normalized entropy, the paper's codebook usage).
ViSQOL, PESQ and STOI need `pip install 'audiotok[eval]'` (visqol-python, pesq, pystoi; numba
makes ViSQOL about 7x faster); without them those columns are left out.

    python benchmarks/bench_quality.py --model descript/dac_44khz --data data/real-audio
    python benchmarks/bench_quality.py --model runs/exp/best --codebooks 2 4 8 12 --max-files 20 --out q.json

Prints one markdown table per category (rows: bitrates), then the paper's DAC and EnCodec rows for
reference (their own 44.1 kHz test set: not comparable one to one), and writes all values,
per-file ones included, to --out (JSON).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import platform
import sys
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from audiotok import AudioTokenizer, metrics
from audiotok.audio import downmix, resample
from audiotok.data.config import sources_from_manifest
from audiotok.data.sources import DecodeError
from audiotok.data.transforms import loudness, normalize_loudness, peak_limit, salient_excerpt
from audiotok.tokenizer import EncodedAudio

#: Reporting categories -> manifest groups (``audiotok.data.config.MANIFEST_GROUPS`` maps
#: instrument to music already).
CATEGORIES = ("speech", "music", "general", "speech8k")
SPEECH = {"speech", "speech8k"}

#: The paper's Table (dac-spec.md): one 44.1 kHz DAC model decoded from 9/6/3 codebooks, and
#: EnCodec, on the paper's own test set. (codec, kbps, codebooks, mel, STFT, ViSQOL, SI-SDR)
PAPER_ROWS = [
    ("DAC (paper)", 8.0, 9, 0.93, 1.60, 4.18, 10.75),
    ("DAC (paper)", 5.33, 6, 1.07, 1.69, 4.09, 8.13),
    ("DAC (paper)", 2.67, 3, 1.28, 1.85, 3.90, 4.41),
    ("EnCodec (paper)", 24.0, None, 1.61, 3.97, 3.16, 9.59),
    ("EnCodec (paper)", 6.0, None, 1.83, 4.10, 3.05, 5.99),
]

#: metric key -> (column title, higher is better)
COLUMNS = {
    "mel_distance": ("mel dist ↓", False),
    "stft_distance": ("STFT dist ↓", False),
    "visqol": ("ViSQOL ↑", True),
    "si_sdr": ("SI-SDR dB ↑", True),
    "visqol_speech": ("ViSQOL speech ↑", True),
    "pesq": ("PESQ ↑", True),
    "stoi": ("STOI ↑", True),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True,
                   help="any AudioTokenizer.from_pretrained source: audiotok or transformers folder, .pth, hub id")
    p.add_argument("--data", default="data/real-audio", help="folder with manifest.csv (fetch_real_audio.sh + make_manifest.py)")
    p.add_argument("--split", default="eval", help="manifest split (speech8k files are read from SPLIT + '8k')")
    p.add_argument("--categories", nargs="+", default=["speech", "music", "general"], choices=CATEGORIES)
    p.add_argument("--codebooks", type=int, nargs="+",
                   help="numbers of codebooks to decode from (default: K/3, 2K/3 and all K)")
    p.add_argument("--max-files", type=int, default=50, help="files per category")
    p.add_argument("--seconds", type=float, default=10.0, help="excerpt length (the paper's test length: 10 s)")
    p.add_argument("--min-seconds", type=float, default=1.0, help="shorter files are skipped")
    p.add_argument("--loudness", type=float, default=-16.0, help="input loudness (LUFS) before coding")
    p.add_argument("--skip-metrics", nargs="*", default=[], choices=["visqol", "pesq", "stoi"],
                   help="leave out these (slow or optional) metrics")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0, help="excerpt positions")
    p.add_argument("--out", default="bench_quality.json", help="JSON results")
    return p.parse_args(argv)


# -- data --------------------------------------------------------------------------------------


def candidates(n: int, quota: int) -> list[int]:
    """Indices spread evenly over the (path-sorted) list first, then the others in order, so a
    small quota samples across packages and folders rather than the first folder."""
    spread = sorted({k * n // quota for k in range(min(quota, n))})
    taken = set(spread)
    return spread + [i for i in range(n) if i not in taken]


def load_excerpt(source, index: int, args: argparse.Namespace, sample_rate: int) -> tuple[str, np.ndarray, dict]:
    """-> (key, normalized mono ``[1, N]`` float32 at ``sample_rate``, info); raises ``Skip``."""
    try:
        clip = source.clip(index)
        key = clip.key
        sr, total = clip.sample_rate, clip.num_frames
        if total < args.min_seconds * sr:
            raise Skip("too_short", key)
        n = round(args.seconds * sr)
        if total <= n:
            x = clip.read(0, total)
        else:
            rng = np.random.default_rng([args.seed, zlib.crc32(key.encode())])
            x = salient_excerpt(clip, sr, args.seconds, rng)
    except DecodeError as e:
        raise Skip("unreadable", e.key, str(e)) from e
    x = resample(downmix(x), sr, sample_rate)
    if loudness(x, sample_rate) == -math.inf:
        raise Skip("silent", key)
    x = peak_limit(normalize_loudness(x, sample_rate, args.loudness))
    return key, np.ascontiguousarray(x, dtype=np.float32), {"source_sr": sr, "seconds": x.shape[-1] / sample_rate}


class Skip(Exception):
    def __init__(self, reason: str, key: str, detail: str = ""):
        super().__init__(f"{key}: {reason}" + (f" ({detail})" if detail else ""))
        self.reason, self.key = reason, key


# -- metrics -----------------------------------------------------------------------------------


def metric_functions(category: str, available: set[str]) -> dict[str, Any]:
    fns: dict[str, Any] = {
        "mel_distance": metrics.mel_distance,
        "stft_distance": metrics.stft_distance,
        "si_sdr": lambda y, x, sr: metrics.si_sdr(y, x),
    }
    if "visqol" in available:
        fns["visqol"] = lambda y, x, sr: metrics.visqol(y, x, sr, mode="audio")
    if category in SPEECH:
        if "visqol" in available:
            fns["visqol_speech"] = lambda y, x, sr: metrics.visqol(y, x, sr, mode="speech")
        if "pesq" in available:
            mode = "nb" if category == "speech8k" else "wb"
            fns["pesq"] = lambda y, x, sr: metrics.pesq_score(y, x, sr, mode=mode)
        if "stoi" in available:
            fns["stoi"] = metrics.stoi_score
    return fns


def available_metrics(skip: list[str]) -> tuple[set[str], dict[str, str]]:
    """Optional metric names whose packages import, and why the others are left out."""
    found, missing = set(), {}
    for name, module in [("visqol", "visqol"), ("pesq", "pesq"), ("stoi", "pystoi")]:
        if name in skip:
            missing[name] = "--skip-metrics"
            continue
        try:
            importlib.import_module(module)
            found.add(name)
        except ImportError as e:
            missing[name] = f"not installed ({e}); pip install 'audiotok[eval]'"
    return found, missing


def summarize(values: list[float | None]) -> dict[str, float | int | None]:
    v = np.array([x for x in values if x is not None and math.isfinite(x)], dtype=np.float64)
    if v.size == 0:
        return {"mean": None, "std": None, "median": None, "n": 0}
    return {"mean": float(v.mean()), "std": float(v.std()), "median": float(np.median(v)), "n": int(v.size)}


# -- one category ------------------------------------------------------------------------------


def run_category(tok: AudioTokenizer, category: str, source, ks: list[int], args: argparse.Namespace,
                 available: set[str]) -> dict[str, Any]:
    sr = tok.sample_rate
    fns = metric_functions(category, available)
    skipped: dict[str, int] = {}
    skip_examples: list[str] = []
    failures: dict[str, int] = {}
    failure_examples: list[str] = []
    files, codes = [], []
    timing = {"read": 0.0, "code": 0.0, "metrics": {name: 0.0 for name in fns}}
    bar = tqdm(total=min(args.max_files, len(source)), desc=category, unit="file", file=sys.stderr, dynamic_ncols=True)
    for index in candidates(len(source), args.max_files):
        if len(files) >= args.max_files:
            break
        start = time.perf_counter()
        try:
            key, x, info = load_excerpt(source, index, args, sr)
        except Skip as e:
            skipped[e.reason] = skipped.get(e.reason, 0) + 1
            if len(skip_examples) < 5:
                skip_examples.append(str(e))
            continue
        except Exception as e:  # anything else a broken file can raise (soxr, pyloudnorm)
            skipped["error"] = skipped.get("error", 0) + 1
            if len(skip_examples) < 5:
                skip_examples.append(f"{source.key(index)}: {type(e).__name__}: {e}")
            continue
        timing["read"] += time.perf_counter() - start
        start = time.perf_counter()
        encoded = tok.encode(x, sr)
        codes.append(encoded.codes[0, :, : int(encoded.lengths[0])])
        decoded = {}
        for k in ks:
            part = EncodedAudio(encoded.codes[:, :k], encoded.lengths, encoded.num_samples, encoded.sample_rate)
            decoded[k] = tok.decode(part)[0].numpy()
        timing["code"] += time.perf_counter() - start
        record: dict[str, Any] = {"key": key, **info, "metrics": {}}
        for k in ks:
            row = {}
            for name, fn in fns.items():
                start = time.perf_counter()
                try:
                    row[name] = float(fn(decoded[k], x, sr))
                except Exception as e:  # e.g. PESQ finding no utterance
                    row[name] = None
                    failures[name] = failures.get(name, 0) + 1
                    if len(failure_examples) < 5:
                        failure_examples.append(f"{key} k={k} {name}: {type(e).__name__}: {e}")
                timing["metrics"][name] += time.perf_counter() - start
            record["metrics"][str(k)] = row
        files.append(record)
        bar.update(1)
    bar.close()
    rows = []
    for k in ks:
        row = {"codebooks": k, "kbps": kbps(tok, k)}
        for name in fns:
            row[name] = summarize([f["metrics"][str(k)][name] for f in files])
        rows.append(row)
    result: dict[str, Any] = {
        "files": len(files),
        "seconds": sum(f["seconds"] for f in files),
        "skipped": skipped,
        "skip_examples": skip_examples,
        "metric_failures": failures,
        "failure_examples": failure_examples,
        "rows": rows,
        "timing_s": timing,
        "per_file": files,
    }
    if codes:
        per, overall = metrics.codebook_utilization(codes, tok.codebook_size)
        result["codebook_utilization"] = {
            "overall": overall, "per_codebook": per, "frames": sum(int(c.shape[-1]) for c in codes)}
    result["_codes"] = codes  # for the pooled utilization; dropped before writing
    return result


def kbps(tok: AudioTokenizer, k: int) -> float:
    return k * tok.frame_rate * math.log2(tok.codebook_size) / 1000


# -- report ------------------------------------------------------------------------------------


def fmt(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def table(title: str, rows: list[dict[str, Any]], names: list[str]) -> str:
    head = ["kbps", "codebooks"] + [COLUMNS[n][0] for n in names] + ["files"]
    lines = [f"### {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [f"{row['kbps']:.2f}", str(row["codebooks"])]
        cells += [fmt(row[n]["mean"], 3 if n == "stoi" else 2) for n in names]
        cells.append(str(max(row[n]["n"] for n in names)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paper_table() -> str:
    names = ["mel_distance", "stft_distance", "visqol", "si_sdr"]
    head = ["codec (paper)†", "kbps", "codebooks"] + [COLUMNS[n][0] for n in names]
    lines = ["### Reference: the paper's results†", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for codec, rate, k, *values in PAPER_ROWS:
        cells = [codec.replace(" (paper)", ""), f"{rate:g}", str(k) if k else "–"] + [f"{v:.2f}" for v in values]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


PAPER_NOTE = ("† The paper's numbers (arXiv 2306.06546; DAC: one 44.1 kHz model decoded from 9, 6 and 3 "
              "codebooks), on its own 10 s test set (speech, music and general sound mixed), not on this data: "
              "for orientation only, not comparable one to one.")


def plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def category_report(name: str, result: dict[str, Any]) -> str:
    names = [n for n in COLUMNS if result["rows"] and n in result["rows"][0]]
    skipped = ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in sorted(result["skipped"].items())) or "none"
    out = [table(f"{name}: {plural(result['files'], 'file')}, {result['seconds']:.1f} s (skipped: {skipped})",
                 result["rows"], names)]
    if "codebook_utilization" in result:
        u = result["codebook_utilization"]
        out.append(f"\nCodebook utilization (full depth, {u['frames']} frames): overall {u['overall']:.3f}; "
                   "per codebook " + " ".join(f"{v:.2f}" for v in u["per_codebook"]))
    if result["metric_failures"]:
        out.append("Metric failures (left out of the means): " + ", ".join(
            f"{k} {v}" for k, v in result["metric_failures"].items()) + "; e.g. " + result["failure_examples"][0])
    return "\n".join(out)


def pooled(results: dict[str, dict[str, Any]], ks: list[int], tok: AudioTokenizer) -> dict[str, Any] | None:
    """All files of the wide-band categories together (the paper mixes its test set)."""
    cats = [c for c in results if c != "speech8k" and results[c]["files"]]
    if len(cats) < 2:
        return None
    names = [n for n in ("mel_distance", "stft_distance", "visqol", "si_sdr") if n in results[cats[0]]["rows"][0]]
    files = [f for c in cats for f in results[c]["per_file"]]
    rows = []
    for k in ks:
        row = {"codebooks": k, "kbps": kbps(tok, k)}
        for n in names:
            row[n] = summarize([f["metrics"][str(k)].get(n) for f in files])
        rows.append(row)
    codes = [c for cat in cats for c in results[cat]["_codes"]]
    per, overall = metrics.codebook_utilization(codes, tok.codebook_size)
    return {"categories": cats, "files": len(files), "seconds": sum(f["seconds"] for f in files), "rows": rows,
            "codebook_utilization": {"overall": overall, "per_codebook": per,
                                     "frames": sum(int(c.shape[-1]) for c in codes)}}


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version(), "torch": torch.__version__}
    for dist in ["audiotok", "visqol-python", "pesq", "pystoi", "numba", "ai-edge-litert"]:
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    return out


def write_json(path: str, payload: dict[str, Any]) -> None:
    clean = {k: v for k, v in payload.items()}
    clean["categories"] = {c: {k: v for k, v in r.items() if k != "_codes"} for c, r in payload["categories"].items()}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(json.dumps(clean, indent=1))
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    tok = AudioTokenizer.from_pretrained(args.model, device=args.device)
    K = tok.n_codebooks
    ks = sorted(set(args.codebooks or [max(1, round(K / 3)), max(1, round(2 * K / 3)), K]))
    if ks[0] < 1 or ks[-1] > K:
        raise SystemExit(f"--codebooks must be in 1..{K} for this model, got {ks}")
    groups = sources_from_manifest(args.data, split=[args.split, args.split + "8k"])
    available, missing = available_metrics(args.skip_metrics)
    for name, why in missing.items():
        print(f"note: {name} left out: {why}", file=sys.stderr)
    print(f"model {args.model}: {tok.sample_rate} Hz, {K} x {tok.codebook_size} codebooks, "
          f"{tok.frame_rate:.2f} frames/s, device {tok.device}; codebooks {ks}", file=sys.stderr)
    payload: dict[str, Any] = {
        "model": args.model,
        "model_info": {"sample_rate": tok.sample_rate, "n_codebooks": K, "codebook_size": tok.codebook_size,
                       "frame_rate": tok.frame_rate, "model_id": tok.model_id},
        "settings": {k: v for k, v in vars(args).items()} | {"codebooks": ks},
        "metrics_left_out": missing,
        "visqol_speech_mapper": metrics.visqol_speech_mapper() if "visqol" in available else None,
        "versions": versions(),
        "device": str(tok.device),
        "categories": {},
        "paper_reference": {
            "note": PAPER_NOTE,
            "columns": ["codec", "kbps", "codebooks", "mel_distance", "stft_distance", "visqol", "si_sdr"],
            "rows": PAPER_ROWS,
        },
    }
    for category in args.categories:
        source = groups.get(category)
        if source is None or len(source) == 0:
            print(f"note: no {category} files in {args.data} split {args.split}", file=sys.stderr)
            continue
        payload["categories"][category] = run_category(tok, category, source, ks, args, available)
        write_json(args.out, payload)
    reports = [category_report(c, r) for c, r in payload["categories"].items()]
    all_files = pooled(payload["categories"], ks, tok)
    if all_files is not None:
        payload["all"] = all_files
        u = all_files["codebook_utilization"]
        names = [n for n in COLUMNS if n in all_files["rows"][0]]
        reports.append(table(f"all ({' + '.join(all_files['categories'])}): {all_files['files']} files, "
                             f"{all_files['seconds']:.1f} s (pooled over files)", all_files["rows"], names)
                       + f"\n\nCodebook utilization (full depth, {u['frames']} frames): overall {u['overall']:.3f}")
    payload["runtime_s"] = time.perf_counter() - started
    write_json(args.out, payload)
    print(f"\n## Quality: {args.model} ({tok.sample_rate} Hz, {K} x {tok.codebook_size}) on {args.data} "
          f"split {args.split}, excerpts up to {args.seconds:g} s at {args.loudness:g} LUFS\n")
    print("\n\n".join(reports + [paper_table()]))
    print(f"\n{PAPER_NOTE}")
    if "visqol" in available:
        print(f"ViSQOL speech mode uses the {payload['visqol_speech_mapper']} MOS mapper.")
    print(f"\nTotal {payload['runtime_s']:.0f} s; results in {args.out}")
    return 0 if payload["categories"] else 1


if __name__ == "__main__":
    sys.exit(main())
