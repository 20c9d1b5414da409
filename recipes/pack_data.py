"""Pack a real-audio manifest's split into Ogg/Opus parts small enough to carry to a GPU machine.

    python recipes/pack_data.py data/real-audio data/packed --part-mib 20 --bitrate 24

Each part (data/packed/part-000, ...) is a manifest folder of Opus files; manifest sources read
the parts present through a glob, as recipes/configs/default-packed.yml does:
    python recipes/train.py --config recipes/configs/default-packed.yml --save-path runs/default

Opus is coded at --bitrate kbps (a VBR target; default 24: about 26 kbps in the files, 0.09 h of 24 kHz
audio per MiB; see benchmarks/README.md, "Packing bitrate"; 'auto' is libopus's own choice, about 38
kbps).
Parts are numbered deterministically (the same manifest and settings give the same parts), so pack
once and rotate them between device calls: call k carries part-(k mod n), e.g. with 4 parts
    call 0: data/packed/part-000   call 1: data/packed/part-001   ...   call 4: data/packed/part-000
"""

import argparse
import csv
import logging

from audiotok.data.pack import DEFAULT_KBPS, pack_manifest
from audiotok.utils.workers import available_cpus


def _bitrate(text: str) -> float | None:
    if text == "auto":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a bitrate in kbps or 'auto': {text!r}") from None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("manifest", help="manifest.csv or its folder (written by recipes/fetch_real_audio.py)")
    p.add_argument("out", help="new folder for part-000, part-001, ...")
    p.add_argument("--split", default="train")
    p.add_argument("--sample-rate", type=int, default=24000, help="8000, 12000, 16000, 24000 or 48000 (Opus)")
    p.add_argument("--bitrate", type=_bitrate, default=DEFAULT_KBPS, metavar="KBPS",
                   help=f"Opus bitrate per channel, 6 to 256 kbps (VBR target), or 'auto' for libopus's choice "
                        f"(default: {DEFAULT_KBPS:g})")
    p.add_argument("--excerpt-seconds", type=float, default=10.0)
    p.add_argument("--part-mib", type=float, default=60.0)
    p.add_argument("--max-parts", type=int, help="stop after this many parts (the first parts of a full run)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--outside-root", action="store_true",
                   help="read files the manifest names outside its folder (absolute or ../ paths)")
    p.add_argument("--workers", type=int, default=available_cpus(),
                   help="processes decoding and coding files (default: every core; the parts are the same)")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    parts = pack_manifest(args.manifest, args.out, args.split, args.sample_rate, args.excerpt_seconds,
                          args.part_mib, args.max_parts, args.seed, args.outside_root, args.bitrate, args.workers)
    total_mib = total_hours = 0.0
    for part in parts:
        mib = sum(f.stat().st_size for f in part.rglob("*") if f.is_file()) / 2**20
        with open(part / "manifest.csv", newline="") as f:
            seconds = sum(float(row["seconds"]) for row in csv.DictReader(f))
        total_mib, total_hours = total_mib + mib, total_hours + seconds / 3600
        print(f"{part}: {mib:.1f} MiB, {seconds / 3600:.2f} h of audio, "
              f"{mib * 2**20 * 8 / 1000 / max(seconds, 1e-9):.1f} kbps")
    if parts:
        print(f"{len(parts)} parts: {total_mib:.1f} MiB, {total_hours:.2f} h ({total_hours / total_mib:.3f} h per MiB)")


if __name__ == "__main__":
    main()
