"""The prior training loop: one readable function, top to bottom, built from the codec trainer's parts
(torchrun set-up, JSONL/TensorBoard logger, atomic run checkpoints, config loading).

The run folder holds ``latest`` and ``best`` (links to crash-safe checkpoint folders, see
:mod:`audiotok.train.state`: each a prior folder that :meth:`CodePrior.from_pretrained` loads, plus
``train_state.pt``), ``config.yml``, ``metrics.jsonl`` and TensorBoard logs. Running again with the same
folder resumes exactly from the newest complete checkpoint, with the run's configuration: a resume whose
``prior``, ``optim``, ``data`` or ``train`` settings differ from the run's is refused, naming them, except
for :data:`RESUME_MAY_CHANGE` (how long to train, how often to log, validate and save), and so is one
whose training codes come from another codec (architecture or weights). Only rank 0 logs, validates and
writes: a console line per logged step and per validation, a closing summary, and at each validation
two generated samples as audio in TensorBoard (:class:`~audiotok.train.media.PriorSamples`).
"""

from __future__ import annotations

import itertools
import logging
import math
import random
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
import yaml
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, IterableDataset

from ..codedataset import CodeDataset
from ..distributed import barrier, init_training, shutdown
from ..train.media import PRIOR_SAMPLES, PriorSamples, count, stop_reason, summary_line, train_line
from ..train.state import check_resumable, newest_checkpoint, save_checkpoint
from ..train.trainer import Logger
from ..untrusted import check_number, shown
from ..workers import worker_init
from .config import PriorTrainConfig
from .dataset import LMTokenDataset
from .prior import CodePrior, check_codes, prior_codec, read_prior_config
from .text import TextCodeDataset

log = logging.getLogger("audiotok.lm")

#: The settings a resumed run may change; any other difference from the run's config is refused.
RESUME_MAY_CHANGE = ("train.num_iters", "train.log_every", "train.valid_every", "train.save_every")


def examples(config: PriorTrainConfig, prior: CodePrior, codes: CodeDataset) -> IterableDataset:
    """Training (or validation) examples of ``codes`` for ``prior``: packed blocks, or one example per
    record with its text for a text-conditioned prior."""
    seq_len = config.train.seq_len
    if prior.text is not None:
        return TextCodeDataset(codes, prior.vocab, prior.pattern, prior.text, seq_len=seq_len,
                               text_key=config.data.text_key)
    return LMTokenDataset(codes, prior.vocab, prior.pattern, seq_len=seq_len, drop_remainder=True)


def _shuffled(items: Iterable[Any], buffer: int, rng: random.Random) -> Iterator[Any]:
    """Items drawn at random from a buffer of ``buffer`` (1: in order)."""
    pending: list[Any] = []
    for item in items:
        pending.append(item)
        if len(pending) >= buffer:
            yield pending.pop(rng.randrange(len(pending)))
    rng.shuffle(pending)
    yield from pending


def _batches(dataset: IterableDataset, config: PriorTrainConfig, rank: int, batch: int) -> Iterator[dict]:
    """Endless batches of ``batch`` examples: epoch after epoch, each shuffled with its own seed."""
    loop = config.train
    for epoch in itertools.count():
        seed = loop.seed * 1_000_003 + epoch * 7_919 + rank
        rng = random.Random(seed)
        # its own generator: starting an epoch must not draw from torch's global RNG (dropout), or a resumed
        # run would see other dropout masks than an uninterrupted one
        loader = DataLoader(dataset, batch_size=None, num_workers=loop.num_workers,
                            generator=torch.Generator().manual_seed(seed), worker_init_fn=worker_init())
        items = _shuffled(loader, loop.shuffle_blocks, rng)
        count = 0
        while chunk := list(itertools.islice(items, batch)):
            if len(chunk) < batch:
                break
            count += 1
            yield torch.utils.data.default_collate(chunk)
        if count == 0:
            raise ValueError(f"{config.data.train}: rank {rank} has too few codes for one batch of {batch} "
                             f"examples of {loop.seq_len} steps")


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
                device: str | None = None) -> dict[str, Any]:
    """Train (or resume, when ``save_path`` holds a run) a prior until ``min(num_iters, max_steps)`` steps.

    Returns the last logged training metrics (``loss``, ``loss/cb{k}``, ``lr``, ...).
    """
    if max_steps is not None:
        check_number(max_steps, "max_steps", minimum=1, integer=True)
    env, dev, batch_per_rank = init_training(device, config.train.batch_size)
    save_path = Path(save_path)
    loop = config.train
    end = min(loop.num_iters, max_steps or loop.num_iters)

    codes = CodeDataset(config.data.train)
    if len(codes.shards) < env.world_size:
        raise ValueError(f"{config.data.train}: {len(codes.shards)} shard(s) cannot feed {env.world_size} ranks")
    codec = codes.codec
    found = newest_checkpoint(save_path)  # the newest complete checkpoint, whatever a crash interrupted
    if found is not None:
        check_resumable(found[1].get("config") or {}, config.to_dict(), found[0], ("prior", "optim", "train", "data"),
                        RESUME_MAY_CHANGE)
        run_codec = prior_codec(read_prior_config(found[0]))[0]
        run_codec.check_codes_of(codec, f"data.train {config.data.train} (resuming {found[0]}) holds")
    valid_codes = CodeDataset(config.data.valid) if config.data.valid else None
    n_codebooks = config.prior.codebooks_of(codes.config)
    for data in (codes, valid_codes):  # on every rank, before anything is built: a refusal on one would hang the rest
        if data is not None:
            check_codes(codec, n_codebooks, data)
    torch.manual_seed(loop.seed)  # the same initial weights on every rank and every run
    prior = CodePrior(config.prior, codec, codes.config).to(dev)
    decay = [p for p in prior.parameters() if p.ndim >= 2]
    no_decay = [p for p in prior.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": config.optim.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=config.optim.lr,
                            betas=(config.optim.betas[0], config.optim.betas[1]))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(config, s))
    step, best = 0, math.inf
    if found is not None:
        state = found[1]
        prior.load_state_dict(state["prior"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        step, best = state["step"], state["best"]
    model = DDP(prior) if env.enabled else prior
    batches = _batches(examples(config, prior, codes.split_by_rank(env.rank, env.world_size)), config, env.rank,
                       batch_per_rank)
    batches = itertools.islice(batches, step, None)  # a resumed run continues where the data stopped

    logger = None  # rank 0 only
    val_blocks: list[dict[str, torch.Tensor]] = []
    samples: PriorSamples | None = None  # generated audio in TensorBoard at each validation
    if env.is_main:
        save_path.mkdir(parents=True, exist_ok=True)
        (save_path / "config.yml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
        logger = Logger(save_path, step)
        if valid_codes is not None:
            valid = examples(config, prior, valid_codes)
            val_blocks = list(itertools.islice(iter(valid), config.data.valid_blocks))
        if logger.tb is not None and val_blocks:
            texts = [str(r.meta.get(config.data.text_key, "")) for r in
                     itertools.islice(iter(valid_codes or codes), PRIOR_SAMPLES)] if prior.text is not None else []
            samples = PriorSamples(prior, loop.seed, dev, texts, log=log)
        log.info("%s at step %d of %d; %s prior, %.2fM parameters; %d rank(s) x batch %d of %d steps",
                 f"resuming from {found[0]}" if found else "starting", step, end, prior.pattern.value,
                 sum(p.numel() for p in prior.parameters()) / 1e6, env.world_size, batch_per_rank, loop.seq_len)

    def checkpoint(improved: bool) -> None:
        state = {"prior": prior.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                 "step": step, "best": best, "config": config.to_dict()}
        save_checkpoint(save_path, state, prior.save_pretrained, best=improved)

    metrics: dict[str, float] = {}
    started, first_step = time.perf_counter(), step
    # code tokens read per step (padding included): a position holds one (flatten) or K (delay, parallel)
    tokens_per_step = batch_per_rank * env.world_size * loop.seq_len * (prior.n_codebooks if prior.multi_stream else 1)
    prior.train()
    while step < end:
        torch.manual_seed(loop.seed * 1_000_003 + env.rank * 7_919 + step)  # dropout: a resume continues exactly
        batch = next(batches)
        labels = batch["labels"].to(dev)
        loss, cb_sums, cb_counts = prior.loss(_forward(model, batch, dev), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(prior.parameters(), config.optim.clip)
        opt.step()
        sched.step()
        step += 1

        if logger is not None:
            if step % loop.log_every == 0 or step == end:
                metrics = {"loss": float(loss.detach()), "grad_norm": float(grad_norm),
                           "lr": float(sched.get_last_lr()[0]),
                           "steps_per_s": (step - first_step) / max(time.perf_counter() - started, 1e-9)}
                metrics.update({f"loss/cb{k}": float(s / c) for k, (s, c) in enumerate(zip(cb_sums, cb_counts))
                                if c > 0})
                logger.write(step, "train", metrics)
                log.info("%s", train_line(step, end, {"loss": metrics["loss"]}, metrics["lr"], metrics["steps_per_s"],
                                          f"{count(step * tokens_per_step)} tokens"))
            improved = False
            if val_blocks and (step % loop.valid_every == 0 or step == end):
                val = validate(prior, val_blocks, dev, batch_per_rank)
                if samples is not None:
                    samples.write(logger.tb, step)
                logger.write(step, "val", val)
                improved = val["loss"] < best
                best = min(best, val["loss"])
                log.info("step %d validation | loss %.4f%s", step, val["loss"], " (best)" if improved else "")
            if improved or step % loop.save_every == 0 or step == end:
                checkpoint(improved)
        if step % loop.save_every == 0 or step == end:
            barrier(env)

    if logger is not None:
        logger.close()
        best_note = "no validation yet" if math.isinf(best) else (
            f"best validation loss {best:.4f}, checkpoint {shown((save_path / 'best').resolve())}")
        log.info("%s", summary_line(step, first_step, time.perf_counter() - started,
                                    f"{count(step * tokens_per_step)} tokens", best_note,
                                    stop_reason(step, end, loop.num_iters)))
    shutdown()
    return metrics
