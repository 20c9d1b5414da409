"""The run harness of the codec and prior trainers (:mod:`audiotok.train.trainer`, :mod:`audiotok.lm.trainer`):
everything a training run does besides its step.

A trainer builds its networks, optimizers and data, resumed from :attr:`Run.found` (the run folder's newest
complete checkpoint), and hands :meth:`Run.train` a :class:`Task`: its step, its validation and what its
checkpoints hold. The loop, top to bottom as in nanoGPT's ``train.py``::

    while step < end:
        torch.manual_seed(step_seed(seed, rank, step))  # dropout, quantizer dropout: a resume continues exactly
        metrics = task.step(logged)                     # one optimizer step on the next batch
        step += 1
        log       every log_every steps and the last       metrics.jsonl, TensorBoard, a console line
        validate  every valid_every steps                  the lowest task.best_metric so far is the best
        save      improved, a milestone, every save_every steps and the last
        stop      a signal or the time limit (the ranks decide together), with a checkpoint
    a closing line

Only rank 0 logs, validates and saves; every rank gives its data position (:meth:`Task.data_state`) at each
step that may save. :func:`stop_control` sets up the stops (a time limit, SIGTERM and SIGINT; the rules are
:mod:`audiotok.train.stopping`'s). A checkpoint (:func:`~audiotok.train.state.save_checkpoint`, crash safe)
holds the task's state and ``data`` (the data position), ``step``, ``best`` (the best validation value so
far, ``inf`` before the first validation) and ``config``. The run folder also holds ``config.yml``,
``metrics.jsonl`` (a JSON row per logged step and per validation: ``step``, ``split``, the metrics) and, when
TensorBoard is installed, ``tensorboard/``.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

import torch
import yaml

from ..utils.distributed import DistEnv, barrier, shutdown
from ..utils.io import atomic_write
from ..utils.untrusted import check_number, shown
from .media import stop_reason, summary_line, train_line, validation_line
from .state import newest_checkpoint, save_checkpoint
from .stopping import StopControl, parse_duration


def step_seed(seed: int, rank: int, step: int) -> int:
    """The seed of torch's RNG for ``step`` on ``rank``: reseeded every step, so a resumed run continues exactly."""
    return (seed * 1_000_003 + rank * 7_919 + step) % (2**63)


@contextmanager
def stop_control(time_limit: float | str | None) -> Iterator[StopControl]:
    """The stops of a run started now: ``time_limit`` (seconds, or a duration such as ``"9m"``; ``ValueError``
    for a bad one), SIGTERM and SIGINT, whose handlers are installed meanwhile. On leaving, after a signal
    stopped the loop (with a checkpoint), :class:`~audiotok.train.stopping.TrainingInterrupted` is raised."""
    limit = None if time_limit is None else parse_duration(time_limit)
    with StopControl(limit) as stop:
        yield stop
    stop.raise_if_interrupted()


def _drop_rows_after(path: Path, step: int) -> None:
    """Keep the rows of ``metrics.jsonl`` up to ``step`` (the run resumes there, so the later ones come
    again); a last line a crash cut short is dropped too."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line + "\n")
        except (ValueError, KeyError, TypeError):
            continue
    with atomic_write(path, "w") as f:
        f.writelines(kept)


class Logger:
    """JSONL always; TensorBoard when installed. Rank 0 only. Rows (and TensorBoard events) after
    ``step``, where the run starts, are dropped: a resumed run logs them again."""

    def __init__(self, folder: Path, step: int):
        _drop_rows_after(folder / "metrics.jsonl", step)
        self.jsonl = open(folder / "metrics.jsonl", "a")
        self.tb: Any = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(folder / "tensorboard"), purge_step=step + 1)
        except ImportError:
            pass

    def write(self, step: int, split: str, metrics: dict[str, float]) -> None:
        self.jsonl.write(json.dumps({"step": step, "split": split, **metrics}) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for key, value in metrics.items():
                self.tb.add_scalar(f"{split}/{key}", value, step)

    def close(self) -> None:
        self.jsonl.close()
        if self.tb is not None:
            self.tb.close()


class LoopSettings(Protocol):
    """The ``train`` section settings the harness reads (the codec's and the prior's configs have them)."""

    num_iters: int
    seed: int
    log_every: int
    valid_every: int
    save_every: int


class Task(Protocol):
    """A trainer's part of a run: its step, its validation and what its checkpoints hold."""

    #: The start line's summary of the networks: ``"generator 9.53M, discriminator 42.5M parameters"``.
    description: str
    #: Parameters a checkpoint holds (as fp32 weights, two moments and a copy): the save estimate before
    #: a save is measured.
    n_params: int
    #: Validation items (0 on ranks other than 0, and when the run does not validate).
    validation_size: int
    #: The training metrics of the console line, and the validation metrics with their formats.
    train_shown: Sequence[str]
    validation_shown: Mapping[str, str]
    #: The validation metric whose lowest value makes the ``best`` checkpoint.
    best_metric: str

    def step(self, logged: bool) -> dict[str, float]:
        """One optimizer step on the next batch; its metrics (``lr`` among them) when ``logged``, else
        ``{}`` (reading them waits for the device)."""

    def validate(self, step: int, writer: Any) -> dict[str, float]:
        """Rank 0: the validation metrics of ``step``; media go to ``writer`` (TensorBoard's, or ``None``)."""

    def seen(self, step: int) -> str:
        """What ``step`` steps have trained on, for console lines: ``"1.2 h audio"``."""

    def data_state(self, step: int) -> Any:
        """Every rank, at each step that may save: the data position after ``step`` (rank 0's is saved)."""

    def state(self) -> dict[str, Any]:
        """Rank 0: the checkpoint's networks, optimizers and schedules (``state_dict()`` forms)."""

    def write(self, folder: Path) -> None:
        """Rank 0: the checkpoint's model files, in ``folder``."""

    def close(self) -> None:
        """End the data loading (its worker processes ignore SIGTERM and SIGINT), however the run ended."""


class Run:
    """A training run on this rank: where it starts (:attr:`found`, :attr:`step`, :attr:`best`), where it
    ends (:attr:`end`: ``min(num_iters, max_steps)``) and :meth:`train`, the loop."""

    def __init__(self, save_path: str | Path, loop: LoopSettings, max_steps: int | None, env: DistEnv,
                 stop: StopControl, log: logging.Logger):
        if max_steps is not None:
            check_number(max_steps, "max_steps", minimum=1, integer=True)
        self.save_path, self.loop, self.env, self.stop, self.log = Path(save_path), loop, env, stop, log
        self.end = min(loop.num_iters, max_steps or loop.num_iters)
        #: The newest complete checkpoint (whatever a crash interrupted) and its training state; ``None``
        #: for a new run.
        self.found = newest_checkpoint(self.save_path)
        self.step: int = self.found[1]["step"] if self.found else 0
        self.best: float = self.found[1]["best"] if self.found else math.inf

    def train(self, task: Task, config: dict[str, Any], batch_per_rank: int,
              milestones: Collection[int] = ()) -> dict[str, float]:
        """Train ``task`` from :attr:`step` to :attr:`end`, or to a stop; ``config`` (the training config,
        as a dict) is saved in ``config.yml`` and in every checkpoint, ``milestones`` are steps whose
        checkpoints are kept for good. Returns the last logged training metrics."""
        try:
            return self._loop(task, config, batch_per_rank, milestones)
        finally:
            task.close()

    def _loop(self, task: Task, config: dict[str, Any], batch_per_rank: int,
              milestones: Collection[int]) -> dict[str, float]:
        loop, stop, env, end = self.loop, self.stop, self.env, self.end
        logger = self._open(task, config, batch_per_rank) if env.is_main else None
        metrics: dict[str, float] = {}
        started, first_step = time.perf_counter(), self.step
        validates = task.validation_size > 0
        stop.start(checkpoint_bytes=16 * task.n_params, validation_excerpts=task.validation_size)
        while self.step < end:
            torch.manual_seed(step_seed(loop.seed, env.rank, self.step))
            logged = logger is not None and ((self.step + 1) % loop.log_every == 0 or self.step + 1 == end)
            out = task.step(logged)
            self.step += 1
            step = self.step

            if logger is not None and logged:
                metrics = {**out, "steps_per_s": (step - first_step) / max(time.perf_counter() - started, 1e-9)}
                logger.write(step, "train", metrics)
                self.log.info("%s", train_line(step, end, {k: metrics[k] for k in task.train_shown if k in metrics},
                                               metrics["lr"], metrics["steps_per_s"], task.seen(step)))
            improved = False
            if logger is not None and validates and step % loop.valid_every == 0:
                improved = self._validate(task, logger)
            milestone = step in milestones
            saves = step % loop.save_every == 0 or step == end
            may_save = saves or milestone or step % loop.valid_every == 0  # the same on every rank
            data = task.data_state(step) if may_save else None
            if logger is not None and (improved or milestone or saves):
                self._save(task, data, config, improved, milestone)
            if saves:
                barrier(env)
            if step < end and stop.should_stop(step, env, validates and (step + 1) % loop.valid_every == 0):
                data = task.data_state(step)
                if logger is not None and stop.saved_step != step:  # the checkpoint to resume from
                    self._save(task, data, config, False, False)
                barrier(env)
                break

        if logger is not None:
            self._close(task, logger, first_step, time.perf_counter() - started)
        shutdown()
        return metrics

    def _open(self, task: Task, config: dict[str, Any], batch_per_rank: int) -> Logger:
        """Rank 0, before the loop: the run folder, its ``config.yml``, the logger and the start line."""
        self.save_path.mkdir(parents=True, exist_ok=True)
        (self.save_path / "config.yml").write_text(yaml.safe_dump(config, sort_keys=False))
        logger = Logger(self.save_path, self.step)
        self.log.info("%s at step %d of %d; %s; %d rank(s) x batch %d",
                      f"resuming from {self.found[0]}" if self.found else "starting", self.step, self.end,
                      task.description, self.env.world_size, batch_per_rank)
        return logger

    def _validate(self, task: Task, logger: Logger) -> bool:
        """Validate, log it and keep the best value; whether this validation is the best so far."""
        with self.stop.timed("validate"):
            val = task.validate(self.step, logger.tb)
        logger.write(self.step, "val", val)
        improved = val[task.best_metric] < self.best
        self.best = min(self.best, val[task.best_metric])
        self.log.info("%s", validation_line(self.step, val, task.validation_shown, task.best_metric, improved))
        return improved

    def _save(self, task: Task, data: Any, config: dict[str, Any], improved: bool, milestone: bool) -> None:
        with self.stop.timed("save", self.step):
            state = {**task.state(), "data": data, "step": self.step, "best": self.best, "config": config}
            save_checkpoint(self.save_path, state, task.write, best=improved, milestone=milestone)

    def _close(self, task: Task, logger: Logger, first_step: int, wall_s: float) -> None:
        """Rank 0, after the loop: the logger closed and the closing line."""
        logger.close()
        best_note = "no validation yet" if math.isinf(self.best) else (
            f"best validation {task.best_metric} {self.best:.4f}, checkpoint "
            f"{shown((self.save_path / 'best').resolve())}")
        self.log.info("%s", summary_line(self.step, first_step, wall_s, task.seen(self.step), best_note,
                                         stop_reason(self.step, self.end, self.loop.num_iters, self.stop)))
