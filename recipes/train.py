"""Train or fine-tune the Improved RVQGAN codec.

    python recipes/train.py --config recipes/configs/ablations/baseline.yml --save-path runs/baseline
    python recipes/train.py --config recipes/configs/final/44khz.yml --save-path runs/44k --max-steps 1000 \\
        train.bf16=true
    torchrun --nproc_per_node 8 recipes/train.py --config recipes/configs/final/44khz.yml --save-path runs/44k
    python recipes/train.py --config recipes/configs/tiny.yml --save-path runs/ft --init-from descript/dac_44khz

Running again with the same --save-path resumes from its newest complete checkpoint. Trailing
``section.key=value`` arguments override the config (values parsed as YAML).
"""

import argparse
import logging
import sys

from audiotok.train.config import load_config
from audiotok.train.trainer import train


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="a YAML config, e.g. recipes/configs/final/44khz.yml")
    p.add_argument("--save-path", required=True, help="run folder: checkpoints, logs; resumed if it holds a run")
    p.add_argument("--max-steps", type=int, help="stop at this step (default: the config's num_iters)")
    p.add_argument("--init-from", help="fine-tune from anything AudioTokenizer.from_pretrained loads")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("overrides", nargs="*", help="config overrides such as train.batch_size=24")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        train(load_config(args.config, args.overrides), args.save_path, args.max_steps, args.init_from, args.device)
    except FileNotFoundError as e:  # missing data or config: one line that says what to do
        print(f"train: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
