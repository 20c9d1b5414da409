"""Quality against audio seen in training, from bench_quality.py's JSON: one point per state of a run
(a model row of a ``--out`` file, placed at the hours of audio it had seen), speech PESQ and STOI,
music ViSQOL and SI-SDR (all categories), with each Opus row of the files as a horizontal line and
the default model's goals (issue 23) as dotted ones. The model card's figure:

    python benchmarks/plot_training.py card.png --point 11.6 v0.3.json default \\
        --point 12.7 q2585.json step_2585 --point 12.9 q3000.json w1000-3000

Every point must come from the same excerpts (the same files of each category, excerpt length and
loudness); the script refuses files that measured others. Needs matplotlib.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import report  # noqa: E402

#: (category, metric, axis title, goal): the panels, in reading order.
PANELS = (("speech", "pesq", "speech: PESQ (wide-band)", 2.9), ("speech", "stoi", "speech: STOI", 0.94),
          ("music", "visqol", "music: ViSQOL (audio)", 3.9), ("all", "si_sdr", "all: SI-SDR (dB)", 0.0))
#: bench_quality settings that must agree between the files a figure draws from (besides the files).
SAME_SETTINGS = ("split", "seconds", "loudness", "seed")


def mean(payload: dict[str, Any], category: str, metric: str, codec: str) -> float | None:
    """The mean of ``metric`` over ``category``'s files for the row of ``codec`` (its fullest depth)."""
    rows = [r for r in report.plot_rows(payload, category) if r["codec"] == codec]
    if not rows:
        return None
    row = max(rows, key=lambda r: r["codebooks"] or 0)
    return row.get(metric, {}).get("mean")


def excerpts(payload: dict[str, Any]) -> tuple:
    """What a bench_quality JSON measured on: its settings that shape the excerpts, and each category's files."""
    files = {c: sorted(f["key"] for f in v["per_file"]) for c, v in payload["categories"].items()}
    return tuple(payload["settings"].get(k) for k in SAME_SETTINGS), files


def training_plot(points: list[tuple[float, dict[str, Any], str]]) -> bytes:
    """The PNG: ``points`` are (hours of audio seen, bench_quality JSON, codec name in it)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8.4, 6.0), dpi=80, layout="constrained")
    opus = next((p for _, p, _ in points if p.get("opus")), None)
    for ax, (category, metric, title, goal) in zip(fig.subplots(2, 2).ravel(), PANELS):
        xy = sorted((h, v) for h, p, c in points if (v := mean(p, category, metric, c)) is not None)
        ax.plot([h for h, _ in xy], [v for _, v in xy], marker="o", markersize=4, label="audiotok")
        for row in report.plot_rows(opus, category) if opus else []:
            if row["codebooks"] is None and row.get(metric, {}).get("mean") is not None:
                ax.axhline(row[metric]["mean"], linestyle="--", linewidth=1, color="grey")
                ax.annotate(f"Opus {row['kbps']:g} kbps", (0, row[metric]["mean"]),
                            xycoords=("axes fraction", "data"), xytext=(2, 2), textcoords="offset points", fontsize=6)
        ax.axhline(goal, linestyle=":", linewidth=1, color="green", label="goal")
        ax.set_xlabel("hours of audio seen in training", fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    first = points[0][1]
    fig.suptitle(f"{first['settings']['split']} split, up to {first['settings']['max_files']} files per category, "
                 f"{first['settings']['seconds']:g} s excerpts; means over files", fontsize=8)
    return report.figure_png(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="PNG to write")
    p.add_argument("--point", nargs=3, action="append", required=True, metavar=("HOURS", "JSON", "CODEC"),
                   help="a state: the hours of audio it had seen, a bench_quality.py --out file and its row name there")
    args = p.parse_args(argv)
    points = []
    for hours, path, codec in args.point:
        payload = json.loads(Path(path).read_text())
        if not any(r["codec"] == codec for r in report.plot_rows(payload, "all")):
            names = sorted({r["codec"] for r in report.plot_rows(payload, "all")})
            raise SystemExit(f"{path} has no row {codec!r}; its rows: {', '.join(names)}")
        points.append((float(hours), payload, codec))
    measured = [excerpts(p) for _, p, _ in points]
    if any(m != measured[0] for m in measured):
        raise SystemExit(f"the files measured different excerpts (files per category, {', '.join(SAME_SETTINGS)}): "
                         "their points would not be comparable")
    Path(args.out).write_bytes(training_plot(points))
    return 0


if __name__ == "__main__":
    sys.exit(main())
