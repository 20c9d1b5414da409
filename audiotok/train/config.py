"""Training configuration: typed sections loaded from YAML, with includes and command-line overrides.

A config file is a mapping of sections (``model``, ``discriminator``, ``loss``, ``optim``, ``train``,
``data``). ``include: [other.yml, ...]`` (paths relative to the including file) are merged first,
section by section (a key replaces the included value as a whole), so a config states only what it
changes. Overrides such as
``train.batch_size=4`` or ``model.n_codebooks=12`` are applied last; values are parsed as YAML.
"""

from __future__ import annotations

import copy
import dataclasses
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..nn.config import DACConfig, check_keys
from .discriminator import MPD_CHANNELS, MRD_CHANNELS, Discriminator


def _typed(value: Any, kind: Any, where: str) -> Any:
    """Check a scalar setting's type. A float setting also takes an int or a numeric string (YAML 1.1
    reads ``5e-4``, with no dot, as a string)."""
    if kind is float and not isinstance(value, bool):
        if isinstance(value, int):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    if kind in (bool, int, float) and type(value) is not kind:  # exact: a bool is not an int here
        raise ValueError(f"{where}: expected {kind.__name__}, got {value!r}")
    return value


def strict_section(cls, data: dict[str, Any], where: str):
    """A config section dataclass from a dict: unknown keys and mistyped scalars are errors naming ``where``."""
    check_keys(cls, data, where)
    hints = typing.get_type_hints(cls)
    return cls(**{k: _typed(v, hints[k], f"{where}.{k}") for k, v in data.items()})


@dataclass
class DiscriminatorConfig:
    """Sub-discriminators: MPD periods, MRD STFT windows with frequency bands, MSD rates, and the
    MPD and MRD conv widths (the paper's by default)."""

    periods: list[int] = field(default_factory=lambda: [2, 3, 5, 7, 11])
    fft_sizes: list[int] = field(default_factory=lambda: [2048, 1024, 512])
    bands: list[list[float]] = field(
        default_factory=lambda: [[0.0, 0.1], [0.1, 0.25], [0.25, 0.5], [0.5, 0.75], [0.75, 1.0]])
    msd_rates: list[int] = field(default_factory=list)
    mpd_channels: list[int] = field(default_factory=lambda: list(MPD_CHANNELS))
    mrd_channels: int = MRD_CHANNELS

    def __post_init__(self):
        if not self.mpd_channels or min(self.mpd_channels) < 1 or self.mrd_channels < 1:
            raise ValueError(f"discriminator: channel widths must be positive, got mpd_channels="
                             f"{self.mpd_channels}, mrd_channels={self.mrd_channels}")

    def build(self, sample_rate: int) -> Discriminator:
        """The discriminator these settings describe, for audio at ``sample_rate``."""
        return Discriminator(sample_rate, self.periods, self.fft_sizes, self.bands, self.msd_rates,
                             self.mpd_channels, self.mrd_channels)


@dataclass
class LossConfig:
    """Loss settings and weights (the paper's lambdas). A zero adversarial and feature weight turns
    the GAN off (the no-adv ablation): no discriminator is trained.

    Beyond the paper (both off by default): ``waveform`` weighs the L1 distance of the waveforms and
    ``complex_stft`` the multi-resolution power-law compressed complex STFT loss
    (:class:`~audiotok.nn.distances.ComplexSTFTLoss`: windows ``complex_stft_window_lengths``, compression
    ``complex_stft_pow``, compressed-magnitude term weighted ``complex_stft_mag_weight`` beside the
    complex term), the losses that see phase.
    """

    mel_window_lengths: list[int] = field(default_factory=lambda: [32, 64, 128, 256, 512, 1024, 2048])
    mel_n_mels: list[int] = field(default_factory=lambda: [5, 10, 20, 40, 80, 160, 320])
    mel_clamp_eps: float = 1e-5
    mel_pow: float = 1.0
    mel_mag_weight: float = 0.0
    stft_window_lengths: list[int] = field(default_factory=lambda: [2048, 512])
    mel: float = 15.0
    feature: float = 2.0
    adversarial: float = 1.0
    commitment: float = 0.25
    codebook: float = 1.0
    waveform: float = 0.0
    complex_stft: float = 0.0
    complex_stft_window_lengths: list[int] = field(default_factory=lambda: [2048, 512, 128])
    complex_stft_pow: float = 0.3
    complex_stft_mag_weight: float = 1.0

    @property
    def gan(self) -> bool:
        return self.adversarial > 0 or self.feature > 0


@dataclass
class OptimConfig:
    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.8, 0.99])
    gamma: float = 0.999996
    clip_discriminator: float = 10.0
    clip_generator: float = 1000.0


GENERATOR_PARTS = ("encoder", "quantizer", "decoder")


@dataclass
class LoopConfig:
    """The loop: global batch (split across ranks), iterations, precision, logging and checkpoints.

    ``fused_snake`` compiles each Snake into one Inductor kernel (forward and backward; needs a C++
    compiler on CPU, Triton on CUDA). ``freeze`` names generator parts (``encoder``, ``quantizer``,
    ``decoder``) left out of training: freezing the encoder and quantizer fine-tunes the decoder
    alone, so the codes a model writes do not change. ``cudnn_benchmark`` (CUDA only) lets cuDNN time
    its convolution algorithms once per input shape and keep the fastest
    (``torch.backends.cudnn.benchmark``, PyTorch's advice for fixed-shape convolutional training: every
    step has the same batch shape); the result is no longer bit-reproducible from run to run.
    ``ema`` (0 < ema < 1; 0 turns it off) keeps an exponential moving average of the generator's weights,
    updated after every step with this decay (0.999 weighs about the last 1,000 steps): validation, the
    ``best`` checkpoint and every checkpoint's model files are then the average's, and the training state
    holds it beside the generator (an export without moments leaves it out: it restarts from the generator).
    """

    batch_size: int = 12
    num_iters: int = 250_000
    bf16: bool = False
    fused_snake: bool = False
    cudnn_benchmark: bool = True
    seed: int = 0
    num_workers: int = 4
    log_every: int = 50
    valid_every: int = 1000
    save_every: int = 1000
    milestones: list[int] = field(default_factory=lambda: [10_000, 50_000, 100_000, 200_000])
    freeze: list[str] = field(default_factory=list)
    ema: float = 0.0

    def __post_init__(self):
        if not 0 <= self.ema < 1:
            raise ValueError(f"train.ema: the average's decay must be in [0, 1) (0: off), got {self.ema}")
        unknown = sorted(set(self.freeze) - set(GENERATOR_PARTS))
        if unknown:
            raise ValueError(f"train.freeze: unknown parts {unknown}; expected some of {list(GENERATOR_PARTS)}")
        if set(self.freeze) == set(GENERATOR_PARTS):
            raise ValueError("train.freeze names every generator part: nothing is left to train")


@dataclass
class TrainConfig:
    model: DACConfig = field(default_factory=DACConfig)
    discriminator: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: LoopConfig = field(default_factory=LoopConfig)
    data: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        data = copy.deepcopy(data)
        unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"unknown config sections {unknown}")
        model = dict(data.get("model") or {})
        preset = model.pop("preset", None)
        return cls(
            model=DACConfig.preset(preset, **model) if preset else DACConfig.from_dict(model),
            discriminator=strict_section(DiscriminatorConfig, data.get("discriminator") or {}, "discriminator"),
            loss=strict_section(LossConfig, data.get("loss") or {}, "loss"),
            optim=strict_section(OptimConfig, data.get("optim") or {}, "optim"),
            train=strict_section(LoopConfig, data.get("train") or {}, "train"),
            data=data.get("data") or {},
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """Merge configs section by section: a key set in ``top`` replaces that key of the section as a
    whole (so ``data.groups`` in an ablation replaces every group of the base)."""
    out = dict(base)
    for section, values in top.items():
        if isinstance(values, dict) and isinstance(out.get(section), dict):
            out[section] = {**out[section], **values}
        else:
            out[section] = values
    return out


def read_config_dict(path: str | Path) -> dict[str, Any]:
    """A config file with its includes resolved (no overrides)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except OSError as e:
        raise ValueError(f"{path}: cannot read config: {e}") from e
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not a YAML config: {_yaml_problem(e)}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a config must be a mapping of sections")
    merged: dict[str, Any] = {}
    for include in data.pop("include", None) or []:
        merged = _merge(merged, read_config_dict(path.parent / include))
    return _merge(merged, data)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` strings (values parsed as YAML) to a config dict."""
    data = copy.deepcopy(data)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} must look like section.key=value")
        *parents, leaf = key.split(".")
        node = data
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {part} is not a section")
        try:
            node[leaf] = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise ValueError(f"override {item!r}: the value is not YAML: {_yaml_problem(e)}") from None
    return data


def _yaml_problem(error: yaml.YAMLError) -> str:
    """What is wrong in a YAML text and where, in one line (``expected ',' or ']' (line 1, column 3)``)."""
    mark = getattr(error, "problem_mark", None)
    where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
    return (getattr(error, "problem", None) or " ".join(str(error).split())) + where


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> TrainConfig:
    return TrainConfig.from_dict(apply_overrides(read_config_dict(path), list(overrides)))
