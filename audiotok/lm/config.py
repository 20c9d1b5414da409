"""Prior training configuration: typed sections loaded from YAML like the codec's (includes, overrides).

Sections: ``prior`` (:class:`~audiotok.lm.prior.PriorConfig`), ``optim``, ``train``, ``data``.
"""

from __future__ import annotations

import copy
import dataclasses
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..nn.config import check_keys
from ..train.config import apply_overrides, read_config_dict, strict_section
from ..utils.untrusted import check_number
from .prior import PriorConfig

#: Longest training example (``train.seq_len``, steps).
MAX_SEQ_LEN = 1 << 20


def _check_bounds(section: Any, name: str, **bounds: dict[str, float]) -> None:
    """:func:`~audiotok.utils.untrusted.check_number` on fields of a config section (integers where the field
    is an ``int``), before anything is allocated."""
    types = typing.get_type_hints(type(section))
    for field_name, limits in bounds.items():
        check_number(getattr(section, field_name), f"{name}.{field_name}", integer=types[field_name] is int, **limits)


@dataclass
class PriorOptimConfig:
    """AdamW with linear warm-up, then cosine decay to ``min_lr_ratio * lr`` at ``train.num_iters``."""

    lr: float = 3e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    weight_decay: float = 0.1
    warmup: int = 200
    min_lr_ratio: float = 0.1
    clip: float = 1.0

    def __post_init__(self) -> None:
        _check_bounds(self, "optim", lr={"above": 0}, weight_decay={"minimum": 0}, warmup={"minimum": 0},
                      min_lr_ratio={"minimum": 0, "maximum": 1}, clip={"above": 0})
        if not isinstance(self.betas, list) or len(self.betas) != 2:
            raise ValueError(f"optim.betas must be two numbers in [0, 1), got {self.betas!r}")
        for beta in self.betas:
            check_number(beta, "optim.betas", minimum=0, maximum=0.9999)


@dataclass
class PriorLoopConfig:
    """Global batch (split across ranks) of ``seq_len`` steps (tokens for ``flatten``), iterations,
    logging and checkpoints. ``shuffle_blocks``: training examples are drawn from a buffer of this
    many (1: in order)."""

    batch_size: int = 16
    seq_len: int = 512
    num_iters: int = 10_000
    seed: int = 0
    shuffle_blocks: int = 256
    num_workers: int = 0
    log_every: int = 50
    valid_every: int = 500
    save_every: int = 500

    def __post_init__(self) -> None:
        _check_bounds(self, "train", batch_size={"minimum": 1}, seq_len={"minimum": 2, "maximum": MAX_SEQ_LEN},
                      num_iters={"minimum": 1}, seed={"minimum": 0}, shuffle_blocks={"minimum": 1},
                      num_workers={"minimum": 0}, log_every={"minimum": 1}, valid_every={"minimum": 1},
                      save_every={"minimum": 1})


@dataclass
class PriorDataConfig:
    """Code datasets (folders written by ``recipes/tokenize_dataset.py``).

    ``valid``: held-out codes for the validation loss (``valid_blocks`` examples, in order);
    ``text_key``: the record metadata key holding each record's text (text-conditioned priors).
    """

    train: str = ""
    valid: str | None = None
    valid_blocks: int = 64
    text_key: str = "text"

    def __post_init__(self) -> None:
        _check_bounds(self, "data", valid_blocks={"minimum": 0})


@dataclass
class PriorTrainConfig:
    prior: PriorConfig = field(default_factory=PriorConfig)
    optim: PriorOptimConfig = field(default_factory=PriorOptimConfig)
    train: PriorLoopConfig = field(default_factory=PriorLoopConfig)
    data: PriorDataConfig = field(default_factory=PriorDataConfig)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PriorTrainConfig:
        data = copy.deepcopy(data)
        check_keys(cls, data, "config sections")
        config = cls(
            prior=strict_section(PriorConfig, data.get("prior") or {}, "prior"),
            optim=strict_section(PriorOptimConfig, data.get("optim") or {}, "optim"),
            train=strict_section(PriorLoopConfig, data.get("train") or {}, "train"),
            data=strict_section(PriorDataConfig, data.get("data") or {}, "data"),
        )
        if not config.data.train:
            raise ValueError("data.train must name a code dataset folder")
        return config

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_prior_config(path: str | Path, overrides: Sequence[str] = ()) -> PriorTrainConfig:
    """A prior training config file, with its includes and ``section.key=value`` overrides applied."""
    return PriorTrainConfig.from_dict(apply_overrides(read_config_dict(path), list(overrides)))
