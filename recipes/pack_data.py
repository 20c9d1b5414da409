"""Pack a real-audio manifest's split into Ogg/Opus parts small enough to carry to a GPU machine.

    python recipes/pack_data.py data/real-audio data/packed --sample-rate 24000 --part-mib 60

Each part (data/packed/part-000, ...) is a manifest folder of Opus files; manifest sources read
the parts present through a glob, as recipes/configs/default-packed.yml does:
    python recipes/train.py --config recipes/configs/default-packed.yml --save-path runs/default
"""

import argparse
import logging

from audiotok.data.pack import pack_manifest


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("manifest", help="manifest.csv or its folder (written by recipes/fetch_real_audio.py)")
    p.add_argument("out", help="new folder for part-000, part-001, ...")
    p.add_argument("--split", default="train")
    p.add_argument("--sample-rate", type=int, default=24000, help="8000, 12000, 16000, 24000 or 48000 (Opus)")
    p.add_argument("--excerpt-seconds", type=float, default=10.0)
    p.add_argument("--part-mib", type=float, default=60.0)
    p.add_argument("--max-parts", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--outside-root", action="store_true",
                   help="read files the manifest names outside its folder (absolute or ../ paths)")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    parts = pack_manifest(args.manifest, args.out, args.split, args.sample_rate, args.excerpt_seconds,
                          args.part_mib, args.max_parts, args.seed, args.outside_root)
    for part in parts:
        size = sum(f.stat().st_size for f in part.rglob("*") if f.is_file())
        print(f"{part}: {size / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
