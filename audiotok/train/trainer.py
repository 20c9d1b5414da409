"""Improved RVQGAN training: the codec's step, validation and checkpoint contents; the loop, its logs,
checkpoints and stops are the run harness's (:mod:`audiotok.train.harness`).

Each step: the generator reconstructs a batch of excerpts; the discriminator takes a step on the
detached reconstruction (least-squares GAN); then the generator takes a step on
mel + adversarial + feature-matching + VQ losses. Only rank 0 logs, validates and writes.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader

from ..metrics import codebook_utilization
from ..nn.config import DACConfig
from ..nn.distances import ComplexSTFTLoss, MelSpectrogramLoss, MultiScaleSTFTLoss, si_sdr
from ..nn.layers import use_fused_snake, warn_if_cpu_bf16_is_slow
from ..nn.model import DAC
from ..utils.distributed import barrier, init_training
from ..utils.workers import stop_workers, worker_init
from ..weights.checkpoint import Checkpoint, load_checkpoint, load_weights, save_folder
from ..weights.hub import resolve
from .config import TrainConfig
from .discriminator import Discriminator, FeatureMaps
from .harness import Run, stop_control
from .losses import discriminator_loss, feature_matching_loss, generator_adversarial_loss
from .media import MelImage, duration, media_excerpts, write_reconstructions
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

if TYPE_CHECKING:
    from ..data.dataset import Excerpt, ExcerptDataset

log = logging.getLogger("audiotok.train")

#: The losses of the console line of a logged step (all of them are in metrics.jsonl).
MAIN_LOSSES = ("loss", "mel", "adversarial", "feature", "disc")


@dataclass
class _GAN:
    """The discriminator side of training (none when the GAN is off): the discriminator, the module
    that runs it (DDP-wrapped under torchrun), its optimizer and schedule."""

    discriminator: Discriminator
    run: torch.nn.Module
    opt: torch.optim.AdamW
    sched: torch.optim.lr_scheduler.ExponentialLR


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
    if "ema" in state:
        check_weights(state["ema"], generator.state_dict(), f"{path}: ema")
    inference = Checkpoint(saved.model, state.get("ema", state["generator"]), Path(save_path).name)
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
    The loop, its logs and checkpoints are the run harness's (:mod:`audiotok.train.harness`).

    Returns the last logged training metrics.
    """
    if init_from is not None and resume_from is not None:
        raise ValueError("init_from and resume_from exclude each other: a run starts from one or the other")
    with stop_control(time_limit) as stop:
        env, dev, batch_per_rank = init_training(device, config.train.batch_size)
        if resume_from is not None:
            if env.is_main:
                import_state(resume_from, save_path, config)
            barrier(env)
        run = Run(save_path, config.train, max_steps, env, stop, log)
        if run.found is not None:
            _check_resume(config, run.found, init_from)
        task = _CodecTask(config, run, dev, batch_per_rank, None if run.found else init_from)
        return run.train(task, config.to_dict(), batch_per_rank, milestones=config.train.milestones)


def _check_resume(config: TrainConfig, found: tuple[Path, dict[str, Any]], init_from: str | None) -> None:
    """Refuse a resume whose settings do not fit the run's; a fine-tune keeps the architecture of the model
    it started from (``config.model`` becomes the run's)."""
    folder, state = found
    saved = state.get("config")
    if not saved:
        return
    if init_from is not None:
        config.model = DACConfig.from_dict({**saved["model"], "quantizer_dropout": config.model.quantizer_dropout})
    compared = codec_resume_settings(config.loss.gan and "discriminator" in state)
    check_resumable(saved, config.to_dict(), folder, compared, CODEC_RESUME_MAY_CHANGE,
                    "Resume with the run's settings, or start a new --save-path (with --init-from to keep its weights)")


class _CodecTask:
    """The codec's part of a run (a :class:`~audiotok.train.harness.Task`): the networks, optimizers and
    data, built and resumed from ``run.found``, and the GAN step. Rank 0 shows a few validation excerpts as
    audio and mel images in TensorBoard at each validation (inputs once per launch), and keeps the moving
    average of the generator's weights when ``train.ema`` is on: it is what rank 0 validates and saves."""

    train_shown: Sequence[str] = MAIN_LOSSES
    validation_shown: Mapping[str, str] = {"mel_distance": "{:.4f}", "stft_distance": "{:.4f}", "si_sdr": "{:.2f} dB",
                                           "codebook_utilization": "{:.3f}"}
    best_metric = "mel_distance"

    def __init__(self, config: TrainConfig, run: Run, dev: torch.device, batch_per_rank: int, init_from: str | None):
        from ..data import DataConfig, ResidentBatches

        self.config, self.dev, self.batch_per_rank, self.name = config, dev, batch_per_rank, run.save_path.name
        env, loop, weights = run.env, config.train, config.loss
        torch.manual_seed(loop.seed)  # the same initial networks on every rank and every run
        self.cudnn_benchmark = torch.backends.cudnn.benchmark  # the process's setting, restored by close()
        if dev.type == "cuda":
            torch.backends.cudnn.benchmark = loop.cudnn_benchmark
        self.generator = build_generator(config, init_from).to(dev)
        self.average = None  # train.ema: a copy of the generator holding the average (eager Snakes)
        if loop.ema > 0 and env.is_main:
            self.average = AveragedModel(self.generator, multi_avg_fn=get_ema_multi_avg_fn(loop.ema))
            self.average.requires_grad_(False)
        #: The weights rank 0 validates and writes as the checkpoints' model files.
        self.inference: DAC = self.generator if self.average is None else cast(DAC, self.average.module)
        use_fused_snake(self.generator, loop.fused_snake)
        self.trainable = trainable_parameters(self.generator, loop.freeze)
        for part in loop.freeze:
            getattr(self.generator, part).requires_grad_(False)
        b1, b2 = config.optim.betas
        self.opt_g = torch.optim.AdamW(self.trainable, lr=config.optim.lr, betas=(b1, b2))
        self.sched_g = torch.optim.lr_scheduler.ExponentialLR(self.opt_g, config.optim.gamma)
        self.gan = None  # no GAN (mel + VQ losses only): no discriminator at all
        if weights.gan:
            discriminator = config.discriminator.build(config.model.sample_rate).to(dev)
            opt_d = torch.optim.AdamW(discriminator.parameters(), lr=config.optim.lr, betas=(b1, b2))
            self.gan = _GAN(discriminator, DDP(discriminator) if env.enabled else discriminator, opt_d,
                            torch.optim.lr_scheduler.ExponentialLR(opt_d, config.optim.gamma))
        data_config = DataConfig.from_dict({**config.data, "sample_rate": config.model.sample_rate})
        self.dataset: ExcerptDataset | ResidentBatches
        if data_config.resident:  # every record decoded once onto the device; batches cut there
            self.dataset = data_config.resident_batches(dev, batch_per_rank, env.rank, env.world_size)
        else:
            self.dataset = data_config.train_dataset(env.rank, env.world_size, block_size=batch_per_rank)
        if run.found is not None:
            self._load(run.found[1])
        self.gen = DDP(self.generator) if env.enabled else self.generator

        self.mel_loss = MelSpectrogramLoss(config.model.sample_rate, weights.mel_window_lengths, weights.mel_n_mels,
                                           clamp_eps=weights.mel_clamp_eps, pow=weights.mel_pow,
                                           mag_weight=weights.mel_mag_weight).to(dev)
        self.stft_loss = MultiScaleSTFTLoss(weights.stft_window_lengths).to(dev)
        self.complex_loss = None if weights.complex_stft <= 0 else ComplexSTFTLoss(
            weights.complex_stft_window_lengths, weights.complex_stft_pow, weights.complex_stft_mag_weight).to(dev)
        self.autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=loop.bf16)
        if loop.bf16 and dev.type == "cpu":
            warn_if_cpu_bf16_is_slow("train.bf16", "set train.bf16=false on this machine")

        self.val_set = data_config.validation_set() if env.is_main and data_config.val_groups else []
        self.media_set = media_excerpts(self.val_set)  # the excerpts shown in TensorBoard
        self.mel_image: MelImage | None = None
        self.inputs_due = True
        self.audio_per_step = batch_per_rank * env.world_size * data_config.duration  # seconds a step trains on
        n_gen = sum(p.numel() for p in self.generator.parameters())
        n_disc = sum(p.numel() for p in self.gan.discriminator.parameters()) if self.gan else 0
        self.n_params = n_gen + n_disc
        self.description = f"generator {n_gen / 1e6:.2f}M, discriminator {n_disc / 1e6:.2f}M parameters"
        self.validation_size = len(self.val_set) + len(self.media_set)
        self.generator.train()
        # last, once nothing can fail: workers that end with this process and leave SIGTERM and SIGINT to it
        loader = self.dataset if isinstance(self.dataset, ResidentBatches) else DataLoader(
            self.dataset, batch_size=batch_per_rank, num_workers=loop.num_workers,
            persistent_workers=loop.num_workers > 0, worker_init_fn=worker_init(ignore_stop_signals=True))
        self.batches = iter(loader)

    def _load(self, state: dict[str, Any]) -> None:
        """Continue from a checkpoint's training state."""
        self.generator.load_state_dict(state["generator"])
        self.opt_g.load_state_dict(state["opt_g"])
        self.sched_g.load_state_dict(state["sched_g"])
        if self.average is not None:  # continues the run's average, or starts one at the generator's weights
            if "ema" not in state:
                log.info("the weight average (train.ema=%s) starts at step %d", self.config.train.ema, state["step"])
            self.average.module.load_state_dict(state.get("ema", state["generator"]))
            self.average.n_averaged.fill_(1)
        if self.gan is not None and "discriminator" in state:
            self.gan.discriminator.load_state_dict(state["discriminator"])
            self.gan.opt.load_state_dict(state["opt_d"])
            self.gan.sched.load_state_dict(state["sched_d"])
        elif self.gan is not None:  # a GAN stage continuing a run trained without one
            log.info("the run has no discriminator yet: it starts fresh at step %d", state["step"])
        self.dataset.load_state_dict(state["data"])

    def step(self, logged: bool) -> dict[str, float]:
        """The discriminator's step on the detached reconstruction, then the generator's."""
        config, gan, weights, autocast = self.config, self.gan, self.config.loss, self.autocast
        x = next(self.batches).to(self.dev, non_blocking=True)  # [B, 1, N]
        with autocast:
            y, q = self.gen(x)

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
            out["mel"] = self.mel_loss(y, x)
            out["stft"] = self.stft_loss(y, x)
            out["waveform"] = torch.nn.functional.l1_loss(y.float(), x.float())
            if self.complex_loss is not None:
                out["complex_stft"] = self.complex_loss(y, x)
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
        self.opt_g.zero_grad(set_to_none=True)
        out["loss"].backward()
        out["grad_norm"] = torch.nn.utils.clip_grad_norm_(self.trainable, config.optim.clip_generator)
        self.opt_g.step()
        self.sched_g.step()
        if self.average is not None:
            self.average.update_parameters(self.generator)
        if not logged:
            return {}
        return {**{k: float(v.detach()) for k, v in out.items()}, "lr": float(self.sched_g.get_last_lr()[0])}

    def validate(self, step: int, writer: Any) -> dict[str, float]:
        val = validate(self.inference, self.val_set, self.mel_loss, self.stft_loss, self.dev)
        if writer is not None and self.media_set:
            self.mel_image = self.mel_image or MelImage(self.config.model.sample_rate)
            write_reconstructions(writer, self.inference, self.media_set, step, self.mel_image, self.inputs_due,
                                  self.dev)
            self.inputs_due = False
        return val

    def seen(self, step: int) -> str:
        return f"{duration(step * self.audio_per_step)} audio"

    def data_state(self, step: int) -> dict[str, int]:
        return self.dataset.state_dict(consumed=step * self.batch_per_rank)

    def state(self) -> dict[str, Any]:
        state = {"generator": self.generator.state_dict(), "opt_g": self.opt_g.state_dict(),
                 "sched_g": self.sched_g.state_dict()}
        if self.average is not None:
            state["ema"] = self.average.module.state_dict()
        if self.gan is not None:
            state.update(discriminator=self.gan.discriminator.state_dict(), opt_d=self.gan.opt.state_dict(),
                         sched_d=self.gan.sched.state_dict())
        return state

    def write(self, folder: Path) -> None:
        save_folder(Checkpoint(self.config.model, self.inference.state_dict(), self.name), folder)

    def close(self) -> None:
        stop_workers(self.batches)
        torch.backends.cudnn.benchmark = self.cudnn_benchmark
