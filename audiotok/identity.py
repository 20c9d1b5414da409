"""Which codec wrote some codes, and the one check that codes mean to a codec what they meant to it.

Every carrier of codes records a :class:`CodecIdentity`: an encoded batch
(:class:`~audiotok.tokenizer.EncodedAudio`), an ``.atok`` file (:mod:`audiotok.formats.codefile`), a code
dataset's manifest (:mod:`audiotok.formats.codedataset`), a prior (:mod:`audiotok.lm.prior`) and a bulk
job's plan (:mod:`audiotok.bulk`). Each stores the identity's three fields under the same names
(``model_id``, ``config_hash``, ``codes_fingerprint``); :meth:`CodecIdentity.from_dict` reads them
back, :meth:`CodecIdentity.check_codes_of` compares two.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

from .codes import check_fingerprint
from .nn.config import DACConfig


class CodecMismatch(ValueError):
    """Codes offered to a codec they mean nothing, or other sounds, to."""


@dataclass(frozen=True)
class CodecIdentity:
    """The codec that wrote some codes.

    Attributes:
        model_id: its name (informational: a reader never loads a model by it without the user's say-so).
        config_hash: :meth:`DACConfig.architecture_hash` of its configuration (16 lowercase hex digits):
            codes mean something only to a model of that architecture.
        codes_fingerprint: :func:`~audiotok.weights.checkpoint.codes_fingerprint` of its encoder and quantizer
            weights (16 lowercase hex digits): the same architecture with other weights has other
            codebooks. ``None`` where it was not recorded (files written before audiotok recorded it).
    """

    model_id: str
    config_hash: str
    codes_fingerprint: str | None = None

    @classmethod
    def of(cls, model_id: str, config: DACConfig, codes_fingerprint: str | None) -> CodecIdentity:
        """The identity of the model ``model_id`` of ``config`` with weights of ``codes_fingerprint``."""
        return cls(str(model_id), config.architecture_hash(), codes_fingerprint)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str) -> CodecIdentity:
        """The identity stored in ``data`` under the names of its fields (``codes_fingerprint`` may be missing);
        ``ValueError`` naming ``where`` unless ``model_id`` is a string and the hashes are 16 lowercase
        hex digits."""
        if not isinstance(data.get("model_id"), str):
            raise ValueError(f"{where}: model_id={data.get('model_id')!r} is not a string")
        config_hash = check_fingerprint(data.get("config_hash"), f"{where}: config_hash")
        if config_hash is None:
            raise ValueError(f"{where}: config_hash is missing")
        return cls(data["model_id"], config_hash, check_fingerprint(data.get("codes_fingerprint"),
                                                                    f"{where}: codes_fingerprint"))

    def to_dict(self) -> dict[str, str | None]:
        """The fields by name, in the order every format stores them (``codes_fingerprint`` ``None`` when
        not recorded)."""
        return {"model_id": self.model_id, "config_hash": self.config_hash, "codes_fingerprint": self.codes_fingerprint}

    def __str__(self) -> str:
        return (f"model {self.model_id!r} (config hash {self.config_hash}, weights fingerprint "
                f"{self.codes_fingerprint or 'not recorded'})")

    def check_codes_of(self, writer: CodecIdentity | None, holds: str, *, reads: Collection[str] = (),
                       weights: bool = True, override: str = "") -> None:
        """Raise :class:`CodecMismatch` unless the codes ``writer`` wrote mean to this codec what they
        meant to their writer: the same architecture (``config_hash``) and, with ``weights``, the same
        encoder and quantizer weights: ``writer``'s fingerprint is this codec's or one of ``reads``
        (the weights this codec's were rounded from, whose codes it reads as they were meant). What is
        not recorded (a ``writer`` of ``None``, a fingerprint of ``None`` on either side) is not checked.

        The message starts with ``holds`` (what holds the codes, and its verb: ``"x.atok holds"``,
        ``"this prior models"``) and ends with ``override`` (how the caller uses other weights anyway,
        when it can) when the weights differ.
        """
        if writer is None:
            return
        ours, theirs = self.codes_fingerprint, writer.codes_fingerprint
        if writer.config_hash != self.config_hash:
            why = "another architecture, to which they mean nothing"
        elif weights and None not in (ours, theirs) and theirs != ours and theirs not in reads:
            why = "the same architecture with other weights, whose codes mean other sounds"
        else:
            return
        tail = f" ({override})" if override and writer.config_hash == self.config_hash else ""
        raise CodecMismatch(f"{holds} the codes of {writer}, not those of {self}: {why}. Use the model that wrote "
                            f"them{tail}")
