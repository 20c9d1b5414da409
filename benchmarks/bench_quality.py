"""Reconstruction quality on the real-audio eval set, per category, codec and bitrate.

Codecs, side by side in one run on the same excerpts: each --model (any number), decoded from its
first k codebooks for each k of --codebooks, libopus at each --opus bitrate (opusenc --hard-cbr,
decoded by opusdec at the first model's sample rate, or --sample-rate without a model; Debian/Ubuntu:
``apt-get install opus-tools``), and Opus as ``recipes/pack_data.py`` writes training parts at each
--pack bitrate (libsndfile, VBR target; ``auto``: libopus's own choice), with the bitrate it gave.

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

    python benchmarks/bench_quality.py --model default --data data/real-audio
    python benchmarks/bench_quality.py --model default runs/exp/best --codebooks 10 --max-files 20 --out q.json
    python benchmarks/bench_quality.py --model descript/dac_44khz --opus      # no Opus rows
    python benchmarks/bench_quality.py --opus 24 32 --pack 24 32 auto --skip-metrics visqol   # no model
    python benchmarks/bench_quality.py --model default --max-files 4 --seconds 5 --report q.html --plot q.png

Metrics are taken at each codec's own sample rate against the input normalized at that rate (Opus:
the first model's rate). Prints one markdown table per category (rows: codec and bitrate), then the
paper's DAC and EnCodec rows for reference (their own 44.1 kHz test set: not comparable one to
one), and writes all values, per-file ones included, to --out (JSON). --plot draws metrics against
kbps (PNG); --report writes one self-contained HTML page to listen and look: the tables, that
figure, and for the first --report-excerpts excerpts of each category the original and every codec
row as players (FLAC) with mel spectrograms (``benchmarks/report.py``; both need matplotlib).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import io
import json
import math
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import torch
from tqdm import tqdm

from audiotok import AudioTokenizer, metrics
from audiotok.audio import downmix, resample
from audiotok.data.config import sources_from_manifest
from audiotok.data.sources import DecodeError
from audiotok.data.transforms import loudness, normalize_loudness, peak_limit, salient_excerpt
from audiotok.tokenizer import EncodedAudio

sys.path.insert(0, str(Path(__file__).resolve().parent))
import report  # noqa: E402
from common import machine  # noqa: E402

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
    "kbps_measured": ("kbps measured", False),  # pack rows: the coded file's bytes per second
}


def _pack_bitrate(text: str) -> float | None:
    return None if text == "auto" else float(text)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", nargs="*", default=[],
                   help="models to compare: any AudioTokenizer.from_pretrained source (audiotok or transformers "
                        "folder, .pth, hub id; 'default' is the bundled model)")
    p.add_argument("--opus", type=float, nargs="*", default=[6.0, 8.0, 12.0],
                   help="libopus bitrates in kbps, decoded at the first model's rate (none: no Opus rows)")
    p.add_argument("--pack", type=_pack_bitrate, nargs="*", default=[], metavar="KBPS|auto",
                   help="Opus as pack_data writes training parts (libsndfile, VBR) at these bitrates")
    p.add_argument("--sample-rate", type=int, default=24000,
                   help="rate of the Opus rows when no --model is given (with models: the first model's)")
    p.add_argument("--data", default="data/real-audio", help="folder with the real-audio set's manifest.csv")
    p.add_argument("--split", default="eval", help="manifest split (speech8k files are read from SPLIT + '8k')")
    p.add_argument("--categories", nargs="+", default=["speech", "music", "general"], choices=CATEGORIES)
    p.add_argument("--codebooks", type=int, nargs="+",
                   help="numbers of codebooks to decode each model from (default: K/3, 2K/3 and all K)")
    p.add_argument("--max-files", type=int, default=50, help="files per category")
    p.add_argument("--seconds", type=float, default=10.0, help="excerpt length (the paper's test length: 10 s)")
    p.add_argument("--min-seconds", type=float, default=1.0, help="shorter files are skipped")
    p.add_argument("--loudness", type=float, default=-16.0, help="input loudness (LUFS) before coding")
    p.add_argument("--skip-metrics", nargs="*", default=[], choices=["visqol", "pesq", "stoi"],
                   help="leave out these (slow or optional) metrics")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0, help="excerpt positions")
    p.add_argument("--out", default="bench_quality.json", help="JSON results")
    p.add_argument("--report", metavar="OUT.html",
                   help="also write a listening page: the tables, the --plot figure, and for the first "
                        "--report-excerpts excerpts of each category the original and every codec row as FLAC "
                        "players with mel spectrograms (needs matplotlib)")
    p.add_argument("--report-excerpts", type=int, default=2, help="excerpts per category on the --report page")
    p.add_argument("--plot", metavar="OUT.png",
                   help="also draw the quality-against-bitrate figure (benchmarks/plot_quality.py redraws it "
                        "from --out; needs matplotlib)")
    return p.parse_args(argv)


# -- data --------------------------------------------------------------------------------------


def candidates(n: int, quota: int) -> list[int]:
    """Indices spread evenly over the (path-sorted) list first, then the others in order, so a
    small quota samples across packages and folders rather than the first folder."""
    spread = sorted({k * n // quota for k in range(min(quota, n))})
    taken = set(spread)
    return spread + [i for i in range(n) if i not in taken]


def load_excerpt(source, index: int, args: argparse.Namespace,
                 rates: list[int]) -> tuple[str, dict[int, np.ndarray], dict]:
    """-> (key, {rate: normalized mono ``[1, N]`` float32 at that rate for each of ``rates``}, info);
    raises ``Skip``. Info holds the source rate and the excerpt's seconds."""
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
    out = {}
    for rate in rates:
        y = resample(downmix(x), sr, rate)
        if loudness(y, rate) == -math.inf:
            raise Skip("silent", key)
        out[rate] = np.ascontiguousarray(peak_limit(normalize_loudness(y, rate, args.loudness)), dtype=np.float32)
    return key, out, {"source_sr": sr, "seconds": x.shape[-1] / sr}


class Skip(Exception):
    def __init__(self, reason: str, key: str, detail: str = ""):
        super().__init__(f"{key}: {reason}" + (f" ({detail})" if detail else ""))
        self.reason, self.key = reason, key


# -- codecs ------------------------------------------------------------------------------------


@dataclass
class Row:
    """One table row: a codec at one bitrate."""

    codec: str
    kbps: float
    codebooks: int | None = None

    @property
    def label(self) -> str:
        if self.codebooks:
            return f"{self.codec}@{self.codebooks}"
        return f"{self.codec}@{self.kbps:g}kbps" if self.kbps else f"{self.codec}@auto"


@dataclass
class Codec:
    """Rows of one codec and the function that reconstructs an excerpt for all of them:
    ``reconstruct(x [1, N] at sample_rate) -> {row label: [1, N]}``."""

    name: str
    sample_rate: int
    rows: list[Row]
    reconstruct: Callable[[np.ndarray], dict[str, np.ndarray]]
    tokenizer: AudioTokenizer | None = None  # models only (codebook utilization)
    codes: list[torch.Tensor] = field(default_factory=list)  # models: full-depth [K, F] codes per excerpt
    measured_kbps: dict[str, float] | None = None  # pack: each row's bytes per second in the last excerpt


def model_codec(name: str, tok: AudioTokenizer, ks: list[int]) -> Codec:
    """A model decoded from its first k codebooks for each k (one full-depth encoding per excerpt)."""
    rows = [Row(name, kbps(tok, k), k) for k in ks]
    codes: list[torch.Tensor] = []

    def reconstruct(x: np.ndarray) -> dict[str, np.ndarray]:
        encoded = tok.encode(x, tok.sample_rate)
        out = {}
        for row in rows:
            part = EncodedAudio(encoded.codes[:, : row.codebooks], encoded.lengths, encoded.num_samples,
                                encoded.sample_rate)
            out[row.label] = tok.decode(part)[0].numpy()
        codes.append(encoded.codes[0, :, : int(encoded.lengths[0])])
        return out

    return Codec(name, tok.sample_rate, rows, reconstruct, tok, codes)


def opus_roundtrip(x: np.ndarray, sample_rate: int, kbps: float) -> np.ndarray:
    """``[1, N]`` -> ``[1, N]``: libopus at ``kbps`` (hard CBR, ``opusenc`` defaults otherwise),
    decoded by ``opusdec`` at ``sample_rate`` and cut or zero-padded to N (opusdec already removes
    the encoder's pre-skip)."""
    with tempfile.TemporaryDirectory() as tmp:
        wav, ogg, out = Path(tmp) / "in.wav", Path(tmp) / "x.opus", Path(tmp) / "out.wav"
        sf.write(wav, x[0], sample_rate, subtype="PCM_24")
        subprocess.run(["opusenc", "--quiet", "--hard-cbr", "--bitrate", f"{kbps:g}", str(wav), str(ogg)],
                       check=True, capture_output=True)
        subprocess.run(["opusdec", "--quiet", "--float", "--rate", str(sample_rate), str(ogg), str(out)],
                       check=True, capture_output=True)
        y, rate = sf.read(out, dtype="float32", always_2d=True)
    if rate != sample_rate:
        raise RuntimeError(f"opusdec wrote {rate} Hz, asked for {sample_rate}")
    y = downmix(y.T)[:, : x.shape[-1]]
    return np.pad(y, ((0, 0), (0, x.shape[-1] - y.shape[-1])))


def opus_codec(bitrates: list[float], sample_rate: int) -> Codec:
    missing = [tool for tool in ("opusenc", "opusdec") if shutil.which(tool) is None]
    if missing:
        raise SystemExit(f"--opus needs {' and '.join(missing)} (opus-tools: apt-get install opus-tools); "
                         "pass --opus with no bitrates to leave Opus out")
    rows = [Row("opus", rate) for rate in bitrates]
    return Codec("opus", sample_rate, rows,
                 lambda x: {row.label: opus_roundtrip(x, sample_rate, row.kbps) for row in rows})


def pack_codec(bitrates: list[float | None], sample_rate: int) -> Codec:
    """Opus as ``audiotok.data.pack`` writes training parts (libsndfile, VBR target; ``None``: libopus's
    default), decoded by libsndfile. Each row's ``measured_kbps`` collects the files' bytes per second."""
    from audiotok.data.pack import opus_bytes

    rows = [Row("pack", 0.0 if rate is None else rate) for rate in bitrates]
    measured: dict[str, float] = {}

    def reconstruct(x: np.ndarray) -> dict[str, np.ndarray]:
        out = {}
        for row, rate in zip(rows, bitrates):
            data = opus_bytes(x, sample_rate, rate)
            measured[row.label] = len(data) * 8 / 1000 / (x.shape[-1] / sample_rate)
            y, sr = sf.read(io.BytesIO(data), dtype="float32")
            assert sr == sample_rate, (sr, sample_rate)
            y = y[None, : x.shape[-1]]
            out[row.label] = np.pad(y, ((0, 0), (0, x.shape[-1] - y.shape[-1])))
        return out

    return Codec("pack", sample_rate, rows, reconstruct, measured_kbps=measured)


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

#: ``listen(category, record, inputs, outputs)``, called after each excerpt's metrics: the file's
#: record (key, metrics per row label), the normalized input per rate, and per codec its
#: reconstructions per row label.
Listener = Callable[[str, dict[str, Any], dict[int, np.ndarray], list[tuple[Codec, dict[str, np.ndarray]]]], None]


def run_category(codecs: list[Codec], category: str, source, args: argparse.Namespace,
                 available: set[str], listen: Listener | None = None) -> dict[str, Any]:
    """Every codec on the same excerpts of one category -> rows (mean/std/median per metric),
    per-file values, codebook utilization per model, skips, failures and timing. ``listen`` sees
    each excerpt's audio (the --report page)."""
    fns = metric_functions(category, available)
    names = list(fns) + (["kbps_measured"] if any(c.measured_kbps is not None for c in codecs) else [])
    rates = sorted({c.sample_rate for c in codecs})
    rows = [row for c in codecs for row in c.rows]
    skipped: dict[str, int] = {}
    skip_examples: list[str] = []
    failures: dict[str, int] = {}
    failure_examples: list[str] = []
    files: list[dict[str, Any]] = []
    for codec in codecs:
        codec.codes.clear()  # this category's codes only
    timing: dict[str, Any] = {"read": 0.0, "code": {c.name: 0.0 for c in codecs},
                              "metrics": {name: 0.0 for name in fns}}
    bar = tqdm(total=min(args.max_files, len(source)), desc=category, unit="file", file=sys.stderr, dynamic_ncols=True)
    for index in candidates(len(source), args.max_files):
        if len(files) >= args.max_files:
            break
        start = time.perf_counter()
        try:
            key, excerpts, info = load_excerpt(source, index, args, rates)
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
        record: dict[str, Any] = {"key": key, **info, "metrics": {}}
        outputs = []
        for codec in codecs:
            x = excerpts[codec.sample_rate]
            start = time.perf_counter()
            decoded = codec.reconstruct(x)
            outputs.append((codec, decoded))
            timing["code"][codec.name] += time.perf_counter() - start
            for row in codec.rows:
                values: dict[str, float | None] = {}
                for name, fn in fns.items():
                    start = time.perf_counter()
                    try:
                        values[name] = float(fn(decoded[row.label], x, codec.sample_rate))
                    except Exception as e:  # e.g. PESQ finding no utterance
                        values[name] = None
                        failures[name] = failures.get(name, 0) + 1
                        if len(failure_examples) < 5:
                            failure_examples.append(f"{key} {row.label} {name}: {type(e).__name__}: {e}")
                    timing["metrics"][name] += time.perf_counter() - start
                if codec.measured_kbps is not None:
                    values["kbps_measured"] = codec.measured_kbps[row.label]
                record["metrics"][row.label] = values
        files.append(record)
        if listen is not None:
            listen(category, record, excerpts, outputs)
        bar.update(1)
    bar.close()
    result: dict[str, Any] = {
        "files": len(files),
        "seconds": sum(f["seconds"] for f in files),
        "skipped": skipped,
        "skip_examples": skip_examples,
        "metric_failures": failures,
        "failure_examples": failure_examples,
        "rows": summarize_rows(rows, files, names),
        "timing_s": timing,
        "per_file": files,
        "codebook_utilization": {},
        "_codes": {},
    }
    for codec in codecs:
        if codec.tokenizer is not None and codec.codes:
            per, overall = metrics.codebook_utilization(codec.codes, codec.tokenizer.codebook_size)
            result["codebook_utilization"][codec.name] = {
                "overall": overall, "per_codebook": per, "frames": sum(int(c.shape[-1]) for c in codec.codes)}
            result["_codes"][codec.name] = list(codec.codes)  # for the pooled utilization; dropped before writing
    return result


def summarize_rows(rows: list[Row], files: list[dict[str, Any]], names: list[str]) -> list[dict[str, Any]]:
    """One summary row per codec row: its identity and each metric's mean/std/median/n over ``files``."""
    out = []
    for row in rows:
        summary: dict[str, Any] = {"codec": row.codec, "kbps": row.kbps, "codebooks": row.codebooks}
        for name in names:
            summary[name] = summarize([f["metrics"][row.label].get(name) for f in files])
        out.append(summary)
    return out


def kbps(tok: AudioTokenizer, k: int) -> float:
    return k * tok.frame_rate * math.log2(tok.codebook_size) / 1000


# -- report ------------------------------------------------------------------------------------


def fmt(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def table(title: str, rows: list[dict[str, Any]], names: list[str], notes: list[str]) -> report.Table:
    """Summary rows as table cells: codec, kbps, codebooks, each metric's mean, files."""
    head = ["codec", "kbps", "codebooks"] + [COLUMNS[n][0] for n in names] + ["files"]
    body = []
    for row in rows:
        cells = [row["codec"], f"{row['kbps']:.2f}" if row["kbps"] else "auto", str(row["codebooks"] or "–")]
        cells += [fmt(row[n]["mean"], 3 if n == "stoi" else 2) for n in names]
        cells.append(str(max(row[n]["n"] for n in names)))
        body.append(cells)
    return report.Table(title, head, body, notes)


def markdown(table: report.Table) -> str:
    """A table as markdown: its title as a heading, the table, then its notes one per line."""
    lines = [f"### {table.title}", "", "| " + " | ".join(table.head) + " |", "|" + "---|" * len(table.head)]
    lines += ["| " + " | ".join(cells) + " |" for cells in table.body]
    return "\n".join(lines + ([""] + table.notes if table.notes else []))


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


def utilization_lines(utilization: dict[str, dict[str, Any]], per_codebook: bool = True) -> list[str]:
    return [f"Codebook utilization of {name} (full depth, {u['frames']} frames): overall {u['overall']:.3f}"
            + ("; per codebook " + " ".join(f"{v:.2f}" for v in u["per_codebook"]) if per_codebook else "")
            for name, u in utilization.items()]


def category_table(name: str, result: dict[str, Any]) -> report.Table:
    names = [n for n in COLUMNS if result["rows"] and n in result["rows"][0]]
    skipped = ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in sorted(result["skipped"].items())) or "none"
    notes = utilization_lines(result["codebook_utilization"])
    if result["metric_failures"]:
        notes.append("Metric failures (left out of the means): " + ", ".join(
            f"{k} {v}" for k, v in result["metric_failures"].items()) + "; e.g. " + result["failure_examples"][0])
    return table(f"{name}: {plural(result['files'], 'file')}, {result['seconds']:.1f} s (skipped: {skipped})",
                 result["rows"], names, notes)


def pooled(results: dict[str, dict[str, Any]], codecs: list[Codec]) -> dict[str, Any] | None:
    """All files of the wide-band categories together (the paper mixes its test set)."""
    cats = [c for c in results if c != "speech8k" and results[c]["files"]]
    if len(cats) < 2:
        return None
    names = [n for n in ("mel_distance", "stft_distance", "visqol", "si_sdr", "kbps_measured")
             if n in results[cats[0]]["rows"][0]]
    files = [f for c in cats for f in results[c]["per_file"]]
    utilization = {}
    for codec in codecs:
        codes = [c for cat in cats for c in results[cat]["_codes"].get(codec.name, [])]
        if codes and codec.tokenizer is not None:
            per, overall = metrics.codebook_utilization(codes, codec.tokenizer.codebook_size)
            utilization[codec.name] = {"overall": overall, "per_codebook": per,
                                       "frames": sum(int(c.shape[-1]) for c in codes)}
    return {"categories": cats, "files": len(files), "seconds": sum(f["seconds"] for f in files),
            "rows": summarize_rows([row for c in codecs for row in c.rows], files, names),
            "codebook_utilization": utilization}


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version(), "torch": torch.__version__}
    for dist in ["audiotok", "visqol-python", "pesq", "pystoi", "numba", "ai-edge-litert"]:
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    return out


def opus_versions() -> str:
    """``opusenc --version``'s first line (names the libopus it links)."""
    out = subprocess.run(["opusenc", "--version"], capture_output=True, text=True)
    return (out.stdout or out.stderr).splitlines()[0].strip()


def write_json(path: str, payload: dict[str, Any]) -> None:
    clean = {k: v for k, v in payload.items()}
    clean["categories"] = {c: {k: v for k, v in r.items() if k != "_codes"} for c, r in payload["categories"].items()}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(json.dumps(clean, indent=1))
    tmp.replace(path)


def model_name(source: str, others: list[str]) -> str:
    """A short table name for a model source: its last path part, unless two sources share it."""
    short = Path(source.rstrip("/")).name or source
    return short if sum(Path(o.rstrip("/")).name == short for o in others) == 1 else source


def quality_plot(payload: dict[str, Any]) -> bytes:
    """The quality-against-bitrate PNG (:func:`report.quality_plot`) of this script's JSON."""
    return report.quality_plot(payload, {name: title for name, (title, _) in COLUMNS.items()})


def keep_excerpt(kept: list[report.Excerpt], per_category: int, category: str, record: dict[str, Any],
                 inputs: dict[int, np.ndarray], outputs: list[tuple[Codec, dict[str, np.ndarray]]]) -> None:
    """The --report page's listener: the first ``per_category`` excerpts of each category become page
    rows, the original (the input at the highest codec rate) then every codec row in order of
    bitrate, each at its codec's rate and captioned with its metrics on this file."""
    if sum(e.category == category for e in kept) >= per_category:
        return
    rate = max(inputs)
    signals = [report.Signal("original", rate, inputs[rate], f"input, {rate} Hz")]
    rows = sorted(((row, codec, decoded) for codec, decoded in outputs for row in codec.rows), key=lambda t: t[0].kbps)
    for row, codec, decoded in rows:
        values = ", ".join(f"{COLUMNS[n][0]} {fmt(v, 3 if n == 'stoi' else 2)}"
                           for n, v in record["metrics"][row.label].items())
        signals.append(report.Signal(row.label, codec.sample_rate, decoded[row.label],
                                     f"{row.kbps:.2f} kbps, {codec.sample_rate} Hz; {values}"))
    kept.append(report.excerpt(category, record["key"], signals))


def write_report(args: argparse.Namespace, payload: dict[str, Any], tables: list[report.Table],
                 excerpts: list[report.Excerpt], plot: bytes) -> None:
    """The --report page of this run."""
    codecs = list(payload["models"]) + (["Opus"] if payload["opus"] else [])
    notes = [f"Data: {args.data}, split {args.split}; excerpts of up to {args.seconds:g} s, downmixed, "
             f"resampled to each codec's rate and normalized to {args.loudness:g} LUFS before coding.",
             f"Machine: {payload['machine']}, torch {torch.__version__}."]
    if payload["opus"]:
        opus = payload["opus"]
        notes.append(f"Opus: {opus['versions']}, --hard-cbr, decoded at {opus['sample_rate']} Hz.")
    excerpt_notes = [
        f"The first {plural(args.report_excerpts, 'excerpt')} of each category, every codec row in order of bitrate. "
        "Audio: lossless 16-bit FLAC, each codec at its own sample rate. Spectrograms: mel, "
        f"{report.N_MELS} bands up to half the highest rate, one colour scale per excerpt "
        f"({report.DYNAMIC_RANGE_DB:g} dB below its loudest band)."]
    text = report.page(f"Listening report: {', '.join(codecs)}", notes, tables, excerpts, plot, excerpt_notes)
    Path(args.report).parent.mkdir(parents=True, exist_ok=True)
    Path(args.report).write_text(text, encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.report or args.plot:
        try:
            importlib.import_module("matplotlib")
        except ImportError as e:
            raise SystemExit(f"--report and --plot need matplotlib ({e}): pip install matplotlib") from e
    started = time.perf_counter()
    codecs, model_info = [], {}
    for source in args.model:
        tok = AudioTokenizer.from_pretrained(None if source == "default" else source, device=args.device)
        K = tok.n_codebooks
        ks = sorted(set(args.codebooks or [max(1, round(K / 3)), max(1, round(2 * K / 3)), K]))
        if ks[0] < 1 or ks[-1] > K:
            raise SystemExit(f"--codebooks must be in 1..{K} for {source}, got {ks}")
        name = model_name(source, args.model)
        codecs.append(model_codec(name, tok, ks))
        model_info[name] = {"source": source, "sample_rate": tok.sample_rate, "n_codebooks": K,
                            "codebook_size": tok.codebook_size, "frame_rate": tok.frame_rate,
                            "model_id": tok.model_id, "codebooks": ks, "device": str(tok.device)}
        print(f"model {name} ({source}): {tok.sample_rate} Hz, {K} x {tok.codebook_size} codebooks, "
              f"{tok.frame_rate:.2f} frames/s, device {tok.device}; codebooks {ks}", file=sys.stderr)
    rate = codecs[0].sample_rate if codecs else args.sample_rate
    if args.opus:
        codecs.append(opus_codec(args.opus, rate))
    if args.pack:
        codecs.append(pack_codec(args.pack, rate))
    if not codecs:
        raise SystemExit("nothing to compare: give --model, --opus or --pack")
    groups = sources_from_manifest(args.data, split=[args.split, args.split + "8k"])
    available, missing = available_metrics(args.skip_metrics)
    for name, why in missing.items():
        print(f"note: {name} left out: {why}", file=sys.stderr)
    payload: dict[str, Any] = {
        "models": model_info,
        "opus": ({"kbps": args.opus, "sample_rate": rate, "versions": opus_versions()} if args.opus else None),
        "pack": ({"kbps": args.pack, "sample_rate": rate, "libsndfile": sf.__libsndfile_version__}
                 if args.pack else None),
        "settings": dict(vars(args)),
        "metrics_left_out": missing,
        "visqol_speech_mapper": metrics.visqol_speech_mapper() if "visqol" in available else None,
        "versions": versions(),
        "machine": machine(torch.device(args.device)),
        "categories": {},
        "paper_reference": {
            "note": PAPER_NOTE,
            "columns": ["codec", "kbps", "codebooks", "mel_distance", "stft_distance", "visqol", "si_sdr"],
            "rows": PAPER_ROWS,
        },
    }
    excerpts: list[report.Excerpt] = []
    listen = partial(keep_excerpt, excerpts, args.report_excerpts) if args.report else None
    for category in args.categories:
        source = groups.get(category)
        if source is None or len(source) == 0:
            print(f"note: no {category} files in {args.data} split {args.split}", file=sys.stderr)
            continue
        payload["categories"][category] = run_category(codecs, category, source, args, available, listen)
        write_json(args.out, payload)
    tables = [category_table(c, r) for c, r in payload["categories"].items()]
    all_files = pooled(payload["categories"], codecs)
    if all_files is not None:
        payload["all"] = all_files
        names = [n for n in COLUMNS if n in all_files["rows"][0]]
        title = (f"all ({' + '.join(all_files['categories'])}): {all_files['files']} files, "
                 f"{all_files['seconds']:.1f} s (pooled over files)")
        tables.append(table(title, all_files["rows"], names,
                            utilization_lines(all_files["codebook_utilization"], per_codebook=False)))
    payload["runtime_s"] = time.perf_counter() - started
    write_json(args.out, payload)
    print(f"\n## Quality on {args.data} split {args.split}, excerpts up to {args.seconds:g} s "
          f"at {args.loudness:g} LUFS\n")
    print(f"Machine: {payload['machine']}, torch {torch.__version__}\n")
    print("\n\n".join([markdown(t) for t in tables] + [paper_table()]))
    print(f"\n{PAPER_NOTE}")
    if args.opus:
        print(f"Opus: {payload['opus']['versions']}, --hard-cbr, decoded at {rate} Hz.")
    if args.pack:
        print(f"pack: Opus written as recipes/pack_data.py does (libsndfile {sf.__libsndfile_version__}, "
              f"VBR target; auto: libopus's default), decoded by libsndfile at {rate} Hz.")
    if "visqol" in available:
        print(f"ViSQOL speech mode uses the {payload['visqol_speech_mapper']} MOS mapper.")
    print(f"\nTotal {payload['runtime_s']:.0f} s; results in {args.out}")
    if not payload["categories"]:
        return 1
    if args.plot or args.report:
        plot = quality_plot(payload)
        if args.plot:
            Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
            Path(args.plot).write_bytes(plot)
            print(f"Quality against bitrate in {args.plot}")
        if args.report:
            write_report(args, payload, tables, excerpts, plot)
            print(f"Listening report in {args.report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
