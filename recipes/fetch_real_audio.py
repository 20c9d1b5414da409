"""Fetch the real-audio set (recordings shipped in Debian packages, with their copyright files) and
write its manifest.csv, which the ``manifest`` source of the training configs reads.

    python recipes/fetch_real_audio.py data/real-audio core        # 3.2 GB download, 38 h of audio
    python recipes/fetch_real_audio.py data/real-audio ci          # 130 MB, 3.3 h (smoke tests)
    python recipes/fetch_real_audio.py data/real-audio --manifest-only   # re-index an existing tree

Needs a Debian or Ubuntu system with package lists (``sudo apt-get update`` once), dpkg-deb and
pip; nothing is installed. Running it again downloads and extracts only what is missing. The
packages, the licence of each and the train/eval split rules are in audiotok/data/real_audio.py.
"""

import argparse
import logging
import sys

from audiotok.data.real_audio import TIERS, fetch, summary, write_manifest


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dest", help="folder for the audio and manifest.csv, e.g. data/real-audio")
    p.add_argument("tier", nargs="?", default="core", choices=list(TIERS), help="what to fetch (default: core)")
    p.add_argument("--manifest-only", action="store_true", help="index the files already under DEST, fetch nothing")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if not args.manifest_only:
            fetch(args.dest, args.tier)
        rows = write_manifest(args.dest)
    except (OSError, ValueError, RuntimeError) as e:  # a missing tool, a failed download, a bad archive
        print(f"fetch_real_audio: error: {e}", file=sys.stderr)
        return 1
    print(summary(rows))
    print(f"wrote {args.dest}/manifest.csv ({len(rows)} files)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
