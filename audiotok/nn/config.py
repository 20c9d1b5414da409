"""Model configuration for the Improved RVQGAN (DAC) generator."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


def bitrate(frame_rate: float, n_codebooks: int, codebook_size: int) -> float:
    """Bits per second of codes: ``n_codebooks`` codes of ``log2(codebook_size)`` bits per frame, at
    ``frame_rate`` frames per second."""
    return frame_rate * n_codebooks * math.log2(codebook_size)


def check_keys(cls: type, data: Mapping[str, Any], where: str) -> None:
    """``ValueError`` naming the keys of ``data`` that are not fields of the dataclass ``cls``: the
    unknown-key check of every ``from_dict``."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown}; expected some of {sorted(names)}")


@dataclass
class DACConfig:
    """Architecture of a DAC generator.

    Encoder and decoder rates are independent lists; their products must be equal
    (the hop length). ``latent_dim`` defaults to ``encoder_dim * 2**len(encoder_rates)``.
    """

    sample_rate: int = 44100
    encoder_dim: int = 64
    encoder_rates: list[int] = field(default_factory=lambda: [2, 4, 8, 8])
    latent_dim: int | None = None
    decoder_dim: int = 1536
    decoder_rates: list[int] = field(default_factory=lambda: [8, 8, 4, 2])
    n_codebooks: int = 9
    codebook_size: int = 1024
    codebook_dim: int = 8
    quantizer_dropout: float = 0.0

    def __post_init__(self) -> None:
        for name in ("encoder_rates", "decoder_rates"):
            rates = getattr(self, name)
            if not isinstance(rates, (list, tuple)) or not all(_is_int(r) for r in rates):
                raise ValueError(f"DACConfig.{name} must be a list of integers, got {rates!r}")
            setattr(self, name, [int(r) for r in rates])
        if self.latent_dim is None and _is_int(self.encoder_dim):
            self.latent_dim = self.encoder_dim * 2 ** len(self.encoder_rates)
        # Early published configs store quantizer_dropout as a bool.
        if isinstance(self.quantizer_dropout, str) or not isinstance(self.quantizer_dropout, (int, float)):
            raise ValueError(f"DACConfig.quantizer_dropout must be a number in [0, 1], got {self.quantizer_dropout!r}")
        self.quantizer_dropout = float(self.quantizer_dropout)
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` if the configuration cannot describe a working model."""
        ints = {
            "sample_rate": self.sample_rate,
            "encoder_dim": self.encoder_dim,
            "latent_dim": self.latent_dim,
            "decoder_dim": self.decoder_dim,
            "n_codebooks": self.n_codebooks,
            "codebook_size": self.codebook_size,
            "codebook_dim": self.codebook_dim,
        }
        for name, value in ints.items():
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"DACConfig.{name} must be a positive integer, got {value!r}")
            if value > LIMITS[name]:
                raise ValueError(f"DACConfig.{name}={value} is above the supported {LIMITS[name]}")
        for name in ("encoder_rates", "decoder_rates"):
            rates = getattr(self, name)
            if not rates or any(r <= 0 for r in rates):
                raise ValueError(f"DACConfig.{name} must be a non-empty list of positive integers, got {rates}")
            if len(rates) > LIMITS["blocks"] or max(rates) > LIMITS["rate"]:
                raise ValueError(f"DACConfig.{name}={rates}: at most {LIMITS['blocks']} blocks with rates up to "
                                 f"{LIMITS['rate']} are supported")
        if math.prod(self.encoder_rates) != math.prod(self.decoder_rates):
            raise ValueError(
                f"encoder_rates {self.encoder_rates} and decoder_rates {self.decoder_rates} must have the same "
                f"product (the hop length): {math.prod(self.encoder_rates)} != {math.prod(self.decoder_rates)}"
            )
        if self.decoder_dim % 2 ** len(self.decoder_rates):
            raise ValueError(
                f"decoder_dim {self.decoder_dim} must be divisible by "
                f"2**len(decoder_rates) = {2 ** len(self.decoder_rates)}"
            )
        if not 0.0 <= self.quantizer_dropout <= 1.0:
            raise ValueError(f"quantizer_dropout must be in [0, 1], got {self.quantizer_dropout}")
        if self.parameter_count() > LIMITS["parameters"]:
            raise ValueError(f"this DACConfig describes about {self.parameter_count() / 1e9:.1f} billion parameters, "
                             f"above the supported {LIMITS['parameters'] / 1e9:.0f} billion")

    def parameter_count(self) -> int:
        """The generator's number of weights (convolution kernels and codebooks; biases and Snake
        parameters are left out), from the config alone: checked before anything is allocated."""
        res_unit = lambda c: 3 * (c * c * 7 + c * c)  # noqa: E731  (three residual units: 7-tap and 1x1 convs)
        latent = int(self.latent_dim or 0)  # set by __post_init__
        count, c = 7 * self.encoder_dim, self.encoder_dim
        for stride in self.encoder_rates:
            count += res_unit(c) + c * 2 * c * 2 * stride
            c *= 2
        count += c * latent * 3
        count += self.n_codebooks * (2 * latent * self.codebook_dim + self.codebook_size * self.codebook_dim)
        c = self.decoder_dim
        count += latent * c * 7
        for stride in self.decoder_rates:
            count += c * (c // 2) * 2 * stride + res_unit(c // 2)
            c //= 2
        return count + c * 7

    @property
    def hop_length(self) -> int:
        """Audio samples per code frame."""
        return math.prod(self.encoder_rates)

    @property
    def frame_rate(self) -> float:
        """Code frames per second of audio."""
        return self.sample_rate / self.hop_length

    @property
    def bits_per_codebook(self) -> float:
        return math.log2(self.codebook_size)

    def bitrate(self, n_codebooks: int | None = None) -> float:
        """Bits per second when coding with the first ``n_codebooks`` codebooks (all by default)."""
        return bitrate(self.frame_rate, self.n_codebooks if n_codebooks is None else n_codebooks, self.codebook_size)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DACConfig:
        """Build a config from a dict; unknown keys raise ``ValueError``."""
        if not isinstance(data, dict):
            raise ValueError(f"a DACConfig must be a mapping of fields, got {type(data).__name__}")
        check_keys(cls, data, "DACConfig")
        return cls(**data)

    def architecture_hash(self) -> str:
        """Short hash of everything that decides which codes mean what (not training-only settings)."""
        arch = self.to_dict()
        arch.pop("quantizer_dropout")
        blob = json.dumps(arch, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> DACConfig:
        """A published or test configuration by name (see ``PRESETS``)."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **overrides})


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


#: Upper bounds of :class:`DACConfig` values (far above any published model; ``codebook_size`` is
#: what the uint16 code storage holds), checked before a model is built from an untrusted config.
LIMITS = {"sample_rate": 768_000, "encoder_dim": 4096, "latent_dim": 65536, "decoder_dim": 65536, "n_codebooks": 1024,
          "codebook_size": 65536, "codebook_dim": 4096, "blocks": 16, "rate": 1024, "parameters": 2_000_000_000}


PRESETS: dict[str, dict[str, Any]] = {
    # The published Descript models (dac-spec.md, "Published models").
    "44khz": dict(sample_rate=44100, encoder_rates=[2, 4, 8, 8], decoder_rates=[8, 8, 4, 2], n_codebooks=9),
    "44khz-16kbps": dict(
        sample_rate=44100, encoder_rates=[2, 4, 8, 8], decoder_rates=[8, 8, 4, 2], latent_dim=128, n_codebooks=18
    ),
    "24khz": dict(sample_rate=24000, encoder_rates=[2, 4, 5, 8], decoder_rates=[8, 5, 4, 2], n_codebooks=32),
    "16khz": dict(sample_rate=16000, encoder_rates=[2, 4, 5, 8], decoder_rates=[8, 5, 4, 2], n_codebooks=12),
    # Small models with the published rate structures, for tests and CPU experiments.
    "tiny-44khz": dict(
        sample_rate=44100, encoder_dim=4, encoder_rates=[2, 4, 8, 8], decoder_dim=32,
        decoder_rates=[8, 8, 4, 2], n_codebooks=4, codebook_size=64, codebook_dim=4,
    ),
    "tiny-24khz": dict(
        sample_rate=24000, encoder_dim=4, encoder_rates=[2, 4, 5, 8], decoder_dim=32,
        decoder_rates=[8, 5, 4, 2], n_codebooks=4, codebook_size=64, codebook_dim=4,
    ),
    "tiny-16khz": dict(
        sample_rate=16000, encoder_dim=4, encoder_rates=[2, 4, 5, 8], decoder_dim=32,
        decoder_rates=[8, 5, 4, 2], n_codebooks=4, codebook_size=64, codebook_dim=4,
    ),
}
PRESETS["44khz-8kbps"] = PRESETS["44khz"]
