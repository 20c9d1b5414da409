"""Train a prior (a language model) on a code dataset.

    python recipes/train_lm.py --config recipes/configs/prior/small.yml --save-path runs/prior data.train=codes/train
    python recipes/train_lm.py --config recipes/configs/prior/small.yml --save-path runs/prior prior.pattern=flatten
    torchrun --nproc_per_node 8 recipes/train_lm.py --config recipes/configs/prior/small.yml --save-path runs/prior

Running again with the same --save-path resumes from its latest checkpoint, with the run's config:
a change other than train.num_iters and the log/valid/save intervals is an error naming the settings.
Trailing ``section.key=value`` arguments override the config (values parsed as YAML).

--time-limit DURATION stops and saves in time to end within it (exit 0). SIGTERM or Ctrl-C: the current
step finishes, a checkpoint is saved and the exit status is 128 + the signal (143, 130).
"""

import argparse
import logging
import sys

from audiotok.lm.config import load_prior_config
from audiotok.lm.trainer import train_prior
from audiotok.train.stopping import TrainingInterrupted, add_time_limit_argument
from audiotok.utils.untrusted import number_arg, one_line


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="a YAML config, e.g. recipes/configs/prior/small.yml")
    p.add_argument("--save-path", required=True, help="run folder: checkpoints, logs; resumed if it holds a run")
    p.add_argument("--max-steps", type=number_arg(integer=True, minimum=1),
                   help="stop at this step (default: the config's num_iters)")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    add_time_limit_argument(p)
    p.add_argument("overrides", nargs="*", help="config overrides such as train.batch_size=32")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        train_prior(load_prior_config(args.config, args.overrides), args.save_path, args.max_steps, args.device,
                    args.time_limit)
    except TrainingInterrupted as e:
        print(f"train_lm: {e}", file=sys.stderr)
        return e.exit_code
    except (FileNotFoundError, ValueError) as e:  # missing or bad codes, config or run: one line that says what
        print(f"train_lm: error: {one_line(e)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
