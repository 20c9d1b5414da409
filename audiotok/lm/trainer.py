"""Prior training: the prior's step, validation and checkpoint contents; the loop, its logs, checkpoints
and stops are the run harness's (:mod:`audiotok.train.harness`), as for the codec.

The run folder holds ``latest`` and ``best`` (links to crash-safe checkpoint folders, see
:mod:`audiotok.train.state`: each a prior folder that :meth:`CodePrior.from_pretrained` loads, plus
``train_state.pt``), ``config.yml``, ``metrics.jsonl`` and TensorBoard logs. Running again with the same
folder resumes exactly from the newest complete checkpoint, with the run's configuration: a resume whose
``prior``, ``optim``, ``data`` or ``train`` settings differ from the run's is refused, naming them, except
for :data:`RESUME_MAY_CHANGE` (how long to train, how often to log, validate and save), and so is one
whose training codes come from another codec (architecture or weights). The data continues from the
position the checkpoint holds (:mod:`audiotok.lm.stream`). Only rank 0 logs, validates and writes: a
console line per logged step and per validation, a closing summary, and at each validation two generated
samples as audio in TensorBoard (:class:`~audiotok.lm.samples.PriorSamples`).
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from ..formats.codedataset import CodeDataset
from ..train.harness import Run, stop_control
from ..train.media import count
from ..train.state import check_resumable
from ..utils.distributed import init_training
from .config import PriorTrainConfig
from .dataset import LMTokenDataset
from .prior import CodePrior, check_codes, prior_codec, read_prior_config
from .samples import PRIOR_SAMPLES, PriorSamples
from .stream import ExampleBatches
from .text import TextCodeDataset

log = logging.getLogger("audiotok.lm")

#: The settings a resumed run may change; any other difference from the run's config is refused.
RESUME_MAY_CHANGE = ("train.num_iters", "train.log_every", "train.valid_every", "train.save_every")


def examples(config: PriorTrainConfig, prior: CodePrior, codes: CodeDataset) -> LMTokenDataset | TextCodeDataset:
    """Training (or validation) examples of ``codes`` for ``prior``: packed blocks, or one example per
    record with its text for a text-conditioned prior."""
    seq_len = config.train.seq_len
    if prior.text is not None:
        return TextCodeDataset(codes, prior.vocab, prior.pattern, prior.text, seq_len=seq_len,
                               text_key=config.data.text_key)
    return LMTokenDataset(codes, prior.vocab, prior.pattern, seq_len=seq_len, drop_remainder=True)


def _forward(model: torch.nn.Module, batch: dict[str, torch.Tensor], device: torch.device) -> torch.Tensor:
    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    logits, _ = model(batch["input_ids"], batch["attention_mask"], batch.get("text_ids"), batch.get("text_mask"))
    return logits


@torch.no_grad()
def validate(prior: CodePrior, blocks: list[dict[str, torch.Tensor]], device: torch.device,
             batch_size: int = 8) -> dict[str, float]:
    """Next-token loss (nats) of the code targets of ``blocks``: over all codebooks (``loss``) and per
    codebook (``loss/cb{k}``)."""
    training = prior.training
    prior.eval()
    sums = torch.zeros(prior.n_codebooks)
    counts = torch.zeros(prior.n_codebooks)
    for i in range(0, len(blocks), batch_size):
        batch = torch.utils.data.default_collate(blocks[i:i + batch_size])
        _, cb_sums, cb_counts = prior.loss(_forward(prior, batch, device), batch["labels"].to(device))
        sums += cb_sums.cpu()
        counts += cb_counts.cpu()
    prior.train(training)
    metrics = {"loss": float(sums.sum() / counts.sum().clamp(min=1))}
    metrics.update({f"loss/cb{k}": float(s / c) for k, (s, c) in enumerate(zip(sums, counts)) if c > 0})
    return metrics


def _lr_factor(config: PriorTrainConfig, step: int) -> float:
    """Linear warm-up to 1, then cosine decay to ``min_lr_ratio`` at ``num_iters``."""
    optim, end = config.optim, config.train.num_iters
    if step < optim.warmup:
        return (step + 1) / optim.warmup
    progress = min(1.0, (step - optim.warmup) / max(1, end - optim.warmup))
    return optim.min_lr_ratio + (1 - optim.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def train_prior(config: PriorTrainConfig, save_path: str | Path, max_steps: int | None = None,
                device: str | None = None, time_limit: float | str | None = None) -> dict[str, Any]:
    """Train (or resume, when ``save_path`` holds a run) a prior until ``min(num_iters, max_steps)`` steps.

    ``time_limit``, SIGTERM and SIGINT stop training early with a checkpoint, as for the codec
    (:func:`audiotok.train.trainer.train`). Returns the last logged training metrics (``loss``,
    ``loss/cb{k}``, ``lr``, ...).
    """
    with stop_control(time_limit) as stop:
        env, dev, batch_per_rank = init_training(device, config.train.batch_size)
        run = Run(save_path, config.train, max_steps, env, stop, log)
        task = _PriorTask(config, run, dev, batch_per_rank)
        return run.train(task, config.to_dict(), batch_per_rank)


class _PriorTask:
    """The prior's part of a run (a :class:`~audiotok.train.harness.Task`): the prior, its optimizer and
    data, built and resumed from ``run.found``, and its step. Rank 0 writes two generated samples as audio
    in TensorBoard at each validation (:class:`~audiotok.lm.samples.PriorSamples`)."""

    train_shown: Sequence[str] = ("loss",)
    validation_shown: Mapping[str, str] = {"loss": "{:.4f}"}
    best_metric = "loss"

    def __init__(self, config: PriorTrainConfig, run: Run, dev: torch.device, batch_per_rank: int):
        env, loop = run.env, config.train
        self.config, self.dev, self.batch_per_rank = config, dev, batch_per_rank
        codes = CodeDataset(config.data.train)
        if len(codes.shards) < env.world_size:
            raise ValueError(f"{config.data.train}: {len(codes.shards)} shard(s) cannot feed {env.world_size} ranks")
        codec = codes.codec
        if run.found is not None:
            check_resumable(run.found[1].get("config") or {}, config.to_dict(), run.found[0],
                            ("prior", "optim", "train", "data"), RESUME_MAY_CHANGE)
            run_codec = prior_codec(read_prior_config(run.found[0]))[0]
            run_codec.check_codes_of(codec, f"data.train {config.data.train} (resuming {run.found[0]}) holds")
        self.valid_codes = CodeDataset(config.data.valid) if config.data.valid else None
        n_codebooks = config.prior.codebooks_of(codes.config)
        for data in (codes, self.valid_codes):  # on every rank, before anything is built: a refusal on one would hang
            if data is not None:
                check_codes(codec, n_codebooks, data)
        torch.manual_seed(loop.seed)  # the same initial weights on every rank and every run
        self.prior = prior = CodePrior(config.prior, codec, codes.config).to(dev)
        decay = [p for p in prior.parameters() if p.ndim >= 2]
        no_decay = [p for p in prior.parameters() if p.ndim < 2]
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": config.optim.weight_decay},
                                      {"params": no_decay, "weight_decay": 0.0}], lr=config.optim.lr,
                                     betas=(config.optim.betas[0], config.optim.betas[1]))
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: _lr_factor(config, s))
        self.model = DDP(prior) if env.enabled else prior
        self.codes = codes.split_by_rank(env.rank, env.world_size)
        self.batches = ExampleBatches(self.codes, examples(config, prior, self.codes), batch_per_rank, seed=loop.seed,
                                      window=loop.shuffle_blocks, num_workers=loop.num_workers, env=env)
        if run.found is not None:
            self._load(run.found[1])

        self.val_blocks: list[dict[str, torch.Tensor]] = []
        if env.is_main and self.valid_codes is not None:
            valid = examples(config, prior, self.valid_codes)
            self.val_blocks = list(itertools.islice(iter(valid), config.data.valid_blocks))
        self.samples: PriorSamples | None = None  # made at the first validation that has TensorBoard
        # code tokens read per step (padding included): a position holds one (flatten) or K (delay, parallel)
        self.tokens_per_step = (batch_per_rank * env.world_size * loop.seq_len
                                * (prior.n_codebooks if prior.multi_stream else 1))
        self.n_params = sum(p.numel() for p in prior.parameters())
        self.description = (f"{prior.pattern.value} prior, {self.n_params / 1e6:.2f}M parameters, examples of "
                            f"{loop.seq_len} steps")
        self.validation_size = len(self.val_blocks)
        prior.train()

    def _load(self, state: dict[str, Any]) -> None:
        """Continue from a checkpoint's training state."""
        self.prior.load_state_dict(state["prior"])
        self.opt.load_state_dict(state["opt"])
        self.sched.load_state_dict(state["sched"])
        if "data" in state:
            self.batches.load_state_dict(state["data"])
        else:  # a checkpoint written before data positions were saved
            log.warning("the checkpoint has no data position (written by an earlier version): the data starts "
                        "again from its first batch at step %d", state["step"])

    def step(self, logged: bool) -> dict[str, float]:
        batch = next(self.batches)
        loss, cb_sums, cb_counts = self.prior.loss(_forward(self.model, batch, self.dev), batch["labels"].to(self.dev))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.prior.parameters(), self.config.optim.clip)
        self.opt.step()
        self.sched.step()
        if not logged:
            return {}
        metrics = {"loss": float(loss.detach()), "grad_norm": float(grad_norm),
                   "lr": float(self.sched.get_last_lr()[0])}
        metrics.update({f"loss/cb{k}": float(s / c) for k, (s, c) in enumerate(zip(cb_sums, cb_counts)) if c > 0})
        return metrics

    def validate(self, step: int, writer: Any) -> dict[str, float]:
        val = validate(self.prior, self.val_blocks, self.dev, self.batch_per_rank)
        if writer is not None:
            self.samples = self.samples or self._samples()
            self.samples.write(writer, step)
        return val

    def _samples(self) -> PriorSamples:
        texts: list[str] = []
        if self.prior.text is not None:
            records = itertools.islice(iter(self.valid_codes or self.codes), PRIOR_SAMPLES)
            texts = [str(r.meta.get(self.config.data.text_key, "")) for r in records]
        return PriorSamples(self.prior, self.config.train.seed, self.dev, texts, log=log)

    def seen(self, step: int) -> str:
        return f"{count(step * self.tokens_per_step)} tokens"

    def data_state(self, step: int) -> dict[str, Any]:
        return self.batches.state_dict()

    def state(self) -> dict[str, Any]:
        return {"prior": self.prior.state_dict(), "opt": self.opt.state_dict(), "sched": self.sched.state_dict()}

    def write(self, folder: Path) -> None:
        self.prior.save_pretrained(folder)

    def close(self) -> None:
        self.batches.close()
