"""Train or fine-tune the Improved RVQGAN codec.

    python recipes/train.py --config recipes/configs/ablations/baseline.yml --save-path runs/baseline
    python recipes/train.py --config recipes/configs/final/44khz.yml --save-path runs/44k --max-steps 1000 \\
        train.bf16=true
    torchrun --nproc_per_node 8 recipes/train.py --config recipes/configs/final/44khz.yml --save-path runs/44k
    python recipes/train.py --config recipes/configs/tiny.yml --save-path runs/ft --init-from descript/dac_44khz

Running again with the same --save-path resumes from its newest complete checkpoint. Trailing
``section.key=value`` arguments override the config (values parsed as YAML).

Time budgets and moving machines:

    python recipes/train.py --config CONFIG --save-path runs/44k --time-limit 3.5h   # saves, exits 0 in time
    python recipes/train.py --save-path runs/44k --export-state 44k.safetensors      # [--no-moments]
    python recipes/train.py --config CONFIG --save-path runs/44k-b --resume-from 44k.safetensors

SIGTERM or Ctrl-C: the current step finishes, a checkpoint is saved and the exit status is 128 + the
signal (143, 130); a second Ctrl-C aborts at once. Exit status 2: a user error (one line).
"""

import argparse
import logging
import sys

from audiotok.train.config import load_config
from audiotok.train.state import export_state
from audiotok.train.stopping import TrainingInterrupted, add_time_limit_argument
from audiotok.train.trainer import train
from audiotok.utils.untrusted import one_line


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="a YAML config, e.g. recipes/configs/final/44khz.yml (required to train)")
    p.add_argument("--save-path", required=True, help="run folder: checkpoints, logs; resumed if it holds a run")
    p.add_argument("--max-steps", type=int, help="stop at this step (default: the config's num_iters)")
    start = p.add_mutually_exclusive_group()
    start.add_argument("--init-from", help="fine-tune from anything AudioTokenizer.from_pretrained loads")
    start.add_argument("--resume-from", metavar="FILE",
                       help="start --save-path from a state export (ignored once --save-path holds a checkpoint)")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    add_time_limit_argument(p)
    p.add_argument("--export-state", metavar="FILE",
                   help="write the resumable state of --save-path's newest checkpoint to FILE and exit")
    p.add_argument("--no-moments", action="store_true",
                   help="with --export-state: leave the optimizer moments out (smaller; the optimizer restarts)")
    p.add_argument("overrides", nargs="*", help="config overrides such as train.batch_size=24")
    args = p.parse_args(argv)
    if args.no_moments and not args.export_state:
        p.error("--no-moments goes with --export-state")
    if args.export_state is None and args.config is None:
        p.error("--config is required to train")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        if args.export_state:
            out = export_state(args.save_path, args.export_state, moments=not args.no_moments)
            logging.getLogger("audiotok.train").info("wrote %s (%.1f MB)", out, out.stat().st_size / 1e6)
            return 0
        train(load_config(args.config, args.overrides), args.save_path, args.max_steps, args.init_from, args.device,
              args.time_limit, args.resume_from)
    except TrainingInterrupted as e:
        print(f"train: {e}", file=sys.stderr)
        return e.exit_code
    except (FileNotFoundError, ValueError) as e:  # missing data or config, bad settings or files: one line
        print(f"train: error: {one_line(e)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
