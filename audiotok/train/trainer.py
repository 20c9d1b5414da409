"""The Improved RVQGAN training loop: one readable function, top to bottom.

Each step: the generator reconstructs a batch of excerpts; the discriminator takes a step on the
detached reconstruction (least-squares GAN); then the generator takes a step on
mel + adversarial + feature-matching + VQ losses. Only rank 0 logs, validates and writes.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import yaml
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader

from ..checkpoint import Checkpoint, load_checkpoint, load_weights, save_folder
from ..config import DACConfig
from ..distances import ComplexSTFTLoss, MelSpectrogramLoss, MultiScaleSTFTLoss, si_sdr
from ..distributed import barrier, init_training, shutdown
from ..hub import resolve
from ..io import atomic_write
from ..layers import use_fused_snake
from ..metrics import codebook_utilization
from ..model import DAC
from ..untrusted import shown
from ..workers import worker_init
from .config import TrainConfig
from .discriminator import Discriminator, FeatureMaps
from .losses import discriminator_loss, feature_matching_loss, generator_adversarial_loss
from .media import MelImage, duration, media_excerpts, stop_reason, summary_line, train_line, write_reconstructions
from .state import (
    CODEC_RESUME_MAY_CHANGE,
    check_moments,
    check_resumable,
    check_weights,
    codec_resume_settings,
    newest_checkpoint,
    read_state_export,
    save_checkpoint,
)
from .stopping import StopControl, parse_duration

if TYPE_CHECKING:
    from ..data.dataset import Excerpt, ExcerptDataset

log = logging.getLogger("audiotok.train")

#: The losses of the console line of a logged step (all of them are in metrics.jsonl).
MAIN_LOSSES = ("loss", "mel", "adversarial", "feature", "disc")


def _step_seed(seed: int, rank: int, step: int) -> int:
    """Torch's RNG (quantizer dropout) is reseeded every step, so a resumed run continues exactly."""
    return (seed * 1_000_003 + rank * 7_919 + step) % (2**63)


@dataclass
class _GAN:
    """The discriminator side of training (none when the GAN is off): the discriminator, the module
    that runs it (DDP-wrapped under torchrun), its optimizer and schedule."""

    discriminator: Discriminator
    run: torch.nn.Module
    opt: torch.optim.AdamW
    sched: torch.optim.lr_scheduler.ExponentialLR


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


def discriminate(disc: torch.nn.Module, fake: torch.Tensor,
                 real: torch.Tensor) -> tuple[list[FeatureMaps], list[FeatureMaps]]:
    """One discriminator pass over fake and real audio together (``[2B, 1, N]``: half the calls, larger
    convolutions) -> (feature maps of ``fake``, feature maps of ``real``), each ``[B, ...]`` per map."""
    maps = disc(torch.cat([fake, real]))
    n = fake.shape[0]
    return [[f[:n] for f in sub] for sub in maps], [[f[n:] for f in sub] for sub in maps]


def build_generator(config: TrainConfig, init_from: str | None) -> DAC:
    """A generator with trainable weight norm: fresh, or initialised from any loadable checkpoint
    (its architecture wins over the config's; quantizer dropout comes from the config)."""
    if init_from is None:
        return DAC(config.model)
    checkpoint = load_checkpoint(resolve(init_from))
    checkpoint.config.quantizer_dropout = config.model.quantizer_dropout
    if checkpoint.config != config.model:
        log.warning("fine-tuning %s: using its architecture %s", init_from, checkpoint.config)
        config.model = checkpoint.config
    return load_weights(DAC(config.model), checkpoint.state_dict)


def trainable_parameters(generator: DAC, freeze: list[str]) -> list[torch.nn.Parameter]:
    """The generator's parameters outside the ``freeze`` parts (``train.freeze``), in the optimizer's order."""
    frozen = {id(p) for part in freeze for p in getattr(generator, part).parameters()}
    return [p for p in generator.parameters() if id(p) not in frozen]


def import_state(path: str | Path, save_path: str | Path, config: TrainConfig | None = None) -> Path | None:
    """Start the run ``save_path`` from a state export (:func:`~audiotok.train.state.export_state`): its
    first checkpoint, which ``train`` then resumes from. Nothing is written when ``save_path`` already holds
    a checkpoint (a restarted job resumes its own run); returns the checkpoint written, or ``None``.

    The export is checked against the networks and optimizers its training config describes, and against
    ``config`` (the settings a resume must share, as for any resume); ``ValueError`` naming ``path`` when
    it does not fit. An export without moments restarts the optimizers (logged).
    """
    found = newest_checkpoint(save_path)
    if found is not None:
        log.info("%s already holds a run (%s): resuming it, not %s", save_path, found[0], path)
        return None
    state = read_state_export(path)
    gan = "discriminator" in state
    entries = ["config", "step", "best", "data", "generator", "opt_g", "sched_g"]
    entries += ["opt_d", "sched_d"] if gan else []
    missing = [key for key in entries if key not in state]
    if missing:
        raise ValueError(f"{path}: the export has no {', '.join(missing)}: not a codec training state")
    saved = TrainConfig.from_dict(state["config"])
    generator = DAC(saved.model)
    check_weights(state["generator"], generator.state_dict(), f"{path}: generator")
    check_moments(state["opt_g"], trainable_parameters(generator, saved.train.freeze), f"{path}: opt_g")
    if gan:
        discriminator = saved.discriminator.build(saved.model.sample_rate)
        check_weights(state["discriminator"], discriminator.state_dict(), f"{path}: discriminator")
        check_moments(state["opt_d"], list(discriminator.parameters()), f"{path}: opt_d")
    if config is not None:
        check_resumable(state["config"], config.to_dict(), Path(path), codec_resume_settings(gan and config.loss.gan),
                        CODEC_RESUME_MAY_CHANGE, "Resume with the exported run's settings")
    if not state["opt_g"]["state"]:
        log.info("%s has no optimizer moments: the optimizers restart (zero moments) at step %d; the learning "
                 "rate schedule continues", path, state["step"])
    inference = Checkpoint(saved.model, state["generator"], Path(save_path).name)
    folder = save_checkpoint(save_path, state, lambda folder: save_folder(inference, folder))
    log.info("%s: started from %s at step %d", save_path, path, state["step"])
    return folder


@torch.no_grad()
def validate(generator: DAC, excerpts: list[Excerpt], mel_loss, stft_loss, device: torch.device,
             batch_size: int = 4) -> dict[str, float]:
    """Mel distance, STFT distance and SI-SDR of reconstructions of held-out excerpts (audio ``[1, N]``),
    overall and the mel distance per validation group (``mel_distance/<group>``), and the codebook
    utilization of their codes (near 0 means the codebooks have collapsed) with the perplexity of each
    codebook (``perplexity/q<k>``, from 1 to ``codebook_size``)."""
    generator.eval()
    totals = {"mel_distance": 0.0, "stft_distance": 0.0, "si_sdr": 0.0}
    group_mel: dict[str, float] = {}
    codes = []
    for group in dict.fromkeys(e.group for e in excerpts):
        audio = [e.audio for e in excerpts if e.group == group]
        for i in range(0, len(audio), batch_size):
            x = torch.stack(audio[i:i + batch_size]).to(device)
            y, q = generator(x)
            n = x.shape[0]
            mel = mel_loss(y, x).item() * n
            group_mel[group] = group_mel.get(group, 0.0) + mel / len(audio)
            totals["mel_distance"] += mel
            totals["stft_distance"] += stft_loss(y, x).item() * n
            totals["si_sdr"] += si_sdr(y, x).sum().item()
            codes.append(q.codes.cpu())
    generator.train()
    metrics = {k: v / len(excerpts) for k, v in totals.items()}
    metrics.update({f"mel_distance/{g}": v for g, v in group_mel.items()})
    size = generator.config.codebook_size
    usage = codebook_utilization(torch.cat(codes), size)
    metrics["codebook_utilization"] = usage.overall
    metrics.update({f"perplexity/q{k}": p for k, p in enumerate(usage.perplexity(size))})
    return metrics


def train(config: TrainConfig, save_path: str | Path, max_steps: int | None = None, init_from: str | None = None,
          device: str | None = None, time_limit: float | str | None = None,
          resume_from: str | Path | None = None) -> dict[str, Any]:
    """Train (or resume, when ``save_path`` holds a run) until ``min(num_iters, max_steps)`` steps.

    ``time_limit`` (seconds, or a duration such as ``"9m"`` or ``"1.5h"``, counted from this call) stops
    training early enough that the checkpoint saved at the stop is written before the limit
    (:mod:`audiotok.train.stopping` has the rule). SIGTERM and SIGINT stop it after the current step,
    with a checkpoint, and raise :class:`~audiotok.train.stopping.TrainingInterrupted`.
    ``resume_from`` starts a new run at ``save_path`` from a state export (:func:`import_state`).

    Returns the last logged training metrics.
    """
    if init_from is not None and resume_from is not None:
        raise ValueError("init_from and resume_from exclude each other: a run starts from one or the other")
    limit = None if time_limit is None else parse_duration(time_limit)
    with StopControl(limit) as stop:
        metrics = _train(config, Path(save_path), max_steps, init_from, device, resume_from, stop)
    stop.raise_if_interrupted()
    return metrics


def _train(config: TrainConfig, save_path: Path, max_steps: int | None, init_from: str | None, device: str | None,
           resume_from: str | Path | None, stop: StopControl) -> dict[str, Any]:
    """:func:`train`'s body, with the stop conditions of ``stop``."""
    from ..data import DataConfig, ResidentBatches

    env, dev, batch_per_rank = init_training(device, config.train.batch_size)
    if resume_from is not None:
        if env.is_main:
            import_state(resume_from, save_path, config)
        barrier(env)
    loop, weights = config.train, config.loss
    end = min(loop.num_iters, max_steps or loop.num_iters)

    # -- state: fresh, fine-tuned, or resumed -------------------------------------------------
    found = newest_checkpoint(save_path)  # the newest complete checkpoint, whatever a crash interrupted
    if found is not None:
        folder, state = found
        saved = state.get("config")
        if init_from is not None and saved:  # a fine-tune has the architecture of the model it started from
            config.model = DACConfig.from_dict({**saved["model"], "quantizer_dropout": config.model.quantizer_dropout})
        if saved:
            compared = codec_resume_settings(weights.gan and "discriminator" in state)
            check_resumable(saved, config.to_dict(), folder, compared, CODEC_RESUME_MAY_CHANGE,
                            "Resume with the run's settings, or start a new --save-path (with --init-from to keep "
                            "its weights)")
    torch.manual_seed(loop.seed)  # the same initial networks on every rank and every run
    generator = build_generator(config, None if found else init_from).to(dev)
    use_fused_snake(generator, loop.fused_snake)
    trainable = trainable_parameters(generator, loop.freeze)
    for part in loop.freeze:
        getattr(generator, part).requires_grad_(False)
    b1, b2 = config.optim.betas
    opt_g = torch.optim.AdamW(trainable, lr=config.optim.lr, betas=(b1, b2))
    sched_g = torch.optim.lr_scheduler.ExponentialLR(opt_g, config.optim.gamma)
    gan = None  # no GAN (mel + VQ losses only): no discriminator at all
    if weights.gan:
        discriminator = config.discriminator.build(config.model.sample_rate).to(dev)
        opt_d = torch.optim.AdamW(discriminator.parameters(), lr=config.optim.lr, betas=(b1, b2))
        gan = _GAN(discriminator, DDP(discriminator) if env.enabled else discriminator, opt_d,
                   torch.optim.lr_scheduler.ExponentialLR(opt_d, config.optim.gamma))
    data_config = DataConfig.from_dict({**config.data, "sample_rate": config.model.sample_rate})
    dataset: ExcerptDataset | ResidentBatches
    if data_config.resident:  # every record decoded once onto the device; batches cut there
        dataset = data_config.resident_batches(dev, batch_per_rank, env.rank, env.world_size)
    else:
        dataset = data_config.train_dataset(env.rank, env.world_size, block_size=batch_per_rank)
    step, best = 0, math.inf
    if found is not None:
        generator.load_state_dict(state["generator"])
        opt_g.load_state_dict(state["opt_g"])
        sched_g.load_state_dict(state["sched_g"])
        if gan is not None and "discriminator" in state:
            gan.discriminator.load_state_dict(state["discriminator"])
            gan.opt.load_state_dict(state["opt_d"])
            gan.sched.load_state_dict(state["sched_d"])
        elif gan is not None:  # a GAN stage continuing a run trained without one
            log.info("the run has no discriminator yet: it starts fresh at step %d", state["step"])
        dataset.load_state_dict(state["data"])
        step, best = state["step"], state["best"]
    gen = DDP(generator) if env.enabled else generator

    mel_loss = MelSpectrogramLoss(config.model.sample_rate, weights.mel_window_lengths, weights.mel_n_mels,
                                  clamp_eps=weights.mel_clamp_eps, pow=weights.mel_pow,
                                  mag_weight=weights.mel_mag_weight).to(dev)
    stft_loss = MultiScaleSTFTLoss(weights.stft_window_lengths).to(dev)
    complex_loss = ComplexSTFTLoss(weights.complex_stft_window_lengths, weights.complex_stft_pow,
                                   weights.complex_stft_mag_weight).to(dev) if weights.complex_stft > 0 else None
    loader = dataset if isinstance(dataset, ResidentBatches) else DataLoader(
        dataset, batch_size=batch_per_rank, num_workers=loop.num_workers, persistent_workers=loop.num_workers > 0,
        worker_init_fn=worker_init())  # workers end with this process, even when it is killed
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=loop.bf16)

    logger: Logger | None = None
    val_set = None
    if env.is_main:
        save_path.mkdir(parents=True, exist_ok=True)
        (save_path / "config.yml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
        logger = Logger(save_path, step)
        if data_config.val_groups:
            val_set = data_config.validation_set()
        log.info("%s at step %d of %d; generator %.2fM, discriminator %.2fM parameters; %d rank(s) x batch %d",
                 f"resuming from {found[0]}" if found else "starting", step, end,
                 sum(p.numel() for p in generator.parameters()) / 1e6,
                 sum(p.numel() for p in gan.discriminator.parameters()) / 1e6 if gan else 0.0,
                 env.world_size, batch_per_rank)

    def checkpoint(improved: bool, milestone: bool) -> None:
        state = {"generator": generator.state_dict(), "opt_g": opt_g.state_dict(), "sched_g": sched_g.state_dict(),
                 "data": dataset.state_dict(consumed=step * batch_per_rank), "step": step, "best": best,
                 "config": config.to_dict()}
        if gan is not None:
            state.update(discriminator=gan.discriminator.state_dict(), opt_d=gan.opt.state_dict(),
                         sched_d=gan.sched.state_dict())
        inference = Checkpoint(config.model, generator.state_dict(), save_path.name)
        save_checkpoint(save_path, state, lambda folder: save_folder(inference, folder), best=improved,
                        milestone=milestone)

    # -- the loop -------------------------------------------------------------------------------
    # rank 0 shows: a console line per logged step (no progress bar: the line has the step, speed and eta),
    # and in TensorBoard at each validation a few excerpts as audio and mel images (inputs once per launch)
    audio_per_step = batch_per_rank * env.world_size * data_config.duration  # seconds of audio a step trains on
    media_set = media_excerpts(val_set or [])  # the excerpts shown in TensorBoard
    mel_image = MelImage(config.model.sample_rate) if media_set and getattr(logger, "tb", None) is not None else None
    metrics: dict[str, float] = {}
    batches = iter(loader)
    started, first_step, inputs_due = time.perf_counter(), step, True
    nets = [generator] + ([gan.discriminator] if gan else [])
    n_params = sum(p.numel() for net in nets for p in net.parameters())  # saved as fp32 weights, 2 moments, a copy
    stop.start(checkpoint_bytes=16 * n_params, validation_excerpts=len(val_set or ()) + len(media_set))
    generator.train()
    while step < end:
        torch.manual_seed(_step_seed(loop.seed, env.rank, step))
        x = next(batches).to(dev, non_blocking=True)  # [B, 1, N]
        with autocast:
            y, q = gen(x)

        out: dict[str, torch.Tensor] = {}
        if gan is not None:  # discriminator step on the detached reconstruction
            with autocast:
                out["disc"] = discriminator_loss(*discriminate(gan.run, y.detach(), x))
            gan.opt.zero_grad(set_to_none=True)
            out["disc"].backward()
            clip = config.optim.clip_discriminator
            out["grad_norm_d"] = torch.nn.utils.clip_grad_norm_(gan.discriminator.parameters(), clip)
            gan.opt.step()
            gan.sched.step()

        with autocast:  # generator step
            out["mel"] = mel_loss(y, x)
            out["stft"] = stft_loss(y, x)
            out["waveform"] = torch.nn.functional.l1_loss(y.float(), x.float())
            if complex_loss is not None:
                out["complex_stft"] = complex_loss(y, x)
            out["commitment"] = q.commitment_loss
            out["codebook"] = q.codebook_loss
            if gan is not None:  # gradients for y only: the unwrapped discriminator, its weights held fixed
                gan.discriminator.requires_grad_(False)
                d_fake, d_real = discriminate(gan.discriminator, y, x)
                gan.discriminator.requires_grad_(True)
                out["adversarial"] = generator_adversarial_loss(d_fake)
                out["feature"] = feature_matching_loss(d_fake, d_real)
            out["loss"] = sum(getattr(weights, k) * out[k] for k in
                              ("mel", "waveform", "complex_stft", "commitment", "codebook", "adversarial", "feature")
                              if k in out)
        opt_g.zero_grad(set_to_none=True)
        out["loss"].backward()
        out["grad_norm"] = torch.nn.utils.clip_grad_norm_(trainable, config.optim.clip_generator)
        opt_g.step()
        sched_g.step()
        step += 1

        if logger is not None:  # rank 0
            if step % loop.log_every == 0 or step == end:
                metrics = {k: float(v.detach()) for k, v in out.items()}
                metrics["lr"] = float(sched_g.get_last_lr()[0])
                metrics["steps_per_s"] = (step - first_step) / max(time.perf_counter() - started, 1e-9)
                logger.write(step, "train", metrics)
                log.info("%s", train_line(step, end, {k: metrics[k] for k in MAIN_LOSSES if k in metrics},
                                          metrics["lr"], metrics["steps_per_s"],
                                          f"{duration(step * audio_per_step)} audio"))
            improved = False
            if val_set and step % loop.valid_every == 0:
                with stop.timed("validate"):
                    val = validate(generator, val_set, mel_loss, stft_loss, dev)
                    if mel_image is not None:
                        write_reconstructions(logger.tb, generator, media_set, step, mel_image, inputs_due, dev)
                        inputs_due = False
                logger.write(step, "val", val)
                improved = val["mel_distance"] < best
                best = min(best, val["mel_distance"])
                log.info("step %d validation | mel_distance %.4f%s | stft_distance %.4f | si_sdr %.2f dB | "
                         "codebook_utilization %.3f", step, val["mel_distance"], " (best)" if improved else "",
                         val["stft_distance"], val["si_sdr"], val["codebook_utilization"])
            milestone = step in loop.milestones
            if improved or milestone or step % loop.save_every == 0 or step == end:
                with stop.timed("save", step):
                    checkpoint(improved, milestone)
        if step % loop.save_every == 0 or step == end:
            barrier(env)
        if step < end and stop.should_stop(step, env, bool(val_set) and (step + 1) % loop.valid_every == 0):
            if logger is not None and stop.saved_step != step:  # the checkpoint to resume from
                with stop.timed("save", step):
                    checkpoint(False, False)
            barrier(env)
            break

    if logger is not None:
        logger.close()
        best_note = "no validation yet" if math.isinf(best) else (
            f"best validation mel_distance {best:.4f}, checkpoint {shown((save_path / 'best').resolve())}")
        log.info("%s", summary_line(step, first_step, time.perf_counter() - started,
                                    f"{duration(step * audio_per_step)} audio", best_note,
                                    stop_reason(step, end, loop.num_iters, stop)))
    shutdown()
    return metrics
