"""Redraw the quality-against-bitrate figure (``bench_quality.py --plot``) from bench_quality's JSON:
metric means against kbps, each model over its numbers of codebooks next to the Opus rows.

    python benchmarks/plot_quality.py quality.json quality-vs-bitrate.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_quality import quality_plot  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", help="bench_quality.py --out JSON")
    p.add_argument("out", help="PNG to write")
    args = p.parse_args(argv)
    Path(args.out).write_bytes(quality_plot(json.loads(Path(args.results).read_text())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
