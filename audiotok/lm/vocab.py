"""``CodeVocabulary``: codes to language-model token ids and back."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch

from ..nn.config import DACConfig
from .patterns import CodebookPattern, apply_pattern, as_int64, invert_pattern

Array = TypeVar("Array", np.ndarray, torch.Tensor)

DEFAULT_SPECIAL = ("pad", "bos", "eos")


def _to_numpy(x: Any, ndim: int, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
    return np.asarray(as_int64(x, ndim, name))


def _like(out: np.ndarray, ref: Any) -> Any:
    """``out`` as a tensor on ``ref``'s device when ``ref`` is a tensor, else as is."""
    return torch.from_numpy(out).to(ref.device) if isinstance(ref, torch.Tensor) else out


@dataclass(frozen=True)
class CodeVocabulary:
    """Token ids for the codes of ``n_codebooks`` codebooks of ``codebook_size`` entries each.

    Id layout, with ``S = codebook_size``, ``K = n_codebooks``:

    * ``offsets=True``: code ``c`` of codebook ``k`` has id ``k*S + c`` (one flat vocabulary of
      ``K*S`` code ids, so a flattened model knows which codebook each token is from); special token
      ``i`` of ``special`` has id ``K*S + i``. With the default specials: pad ``K*S``, bos ``K*S+1``,
      eos ``K*S+2``; ``vocab_size = K*S + 3``.
    * ``offsets=False``: code ``c`` has id ``c`` in every codebook; special ``i`` has id ``S + i``;
      ``vocab_size = S + len(special)``.

    Ids are int64. ``encode``/``decode`` accept numpy arrays or torch tensors and return the same kind
    (tensors on the input's device).
    """

    codebook_size: int
    n_codebooks: int
    offsets: bool = True
    special: tuple[str, ...] = DEFAULT_SPECIAL

    def __post_init__(self) -> None:
        for name in ("codebook_size", "n_codebooks"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        special = tuple(self.special)
        if len(set(special)) != len(special) or not all(isinstance(s, str) and s for s in special):
            raise ValueError(f"special must be distinct non-empty names, got {special}")
        object.__setattr__(self, "special", special)
        object.__setattr__(self, "offsets", bool(self.offsets))

    @classmethod
    def for_codec(cls, config: DACConfig, offsets: bool = True, special: Sequence[str] = DEFAULT_SPECIAL,
                  n_codebooks: int | None = None) -> CodeVocabulary:
        """A vocabulary for the codes of the codec of ``config`` (a code dataset's, a prior's): its
        ``codebook_size`` and ``n_codebooks`` (or the first ``n_codebooks``); the same for every pattern."""
        return cls(config.codebook_size, config.n_codebooks if n_codebooks is None else n_codebooks, offsets,
                   tuple(special))

    # -- ids ------------------------------------------------------------------------------------

    @property
    def num_code_ids(self) -> int:
        """Ids used by codes: ``K*S`` with offsets, ``S`` without."""
        return self.codebook_size * (self.n_codebooks if self.offsets else 1)

    @property
    def vocab_size(self) -> int:
        return self.num_code_ids + len(self.special)

    @property
    def special_ids(self) -> dict[str, int]:
        return {name: self.num_code_ids + i for i, name in enumerate(self.special)}

    @property
    def pad_id(self) -> int | None:
        return self.special_ids.get("pad")

    @property
    def bos_id(self) -> int | None:
        return self.special_ids.get("bos")

    @property
    def eos_id(self) -> int | None:
        return self.special_ids.get("eos")

    def special_id(self, name: str) -> int:
        """Id of special token ``name``; ``ValueError`` if the vocabulary has none."""
        if name not in self.special:
            raise ValueError(f"vocabulary has no {name!r} special token (special={self.special})")
        return self.special_ids[name]

    def codebook_offsets(self, n_codebooks: int) -> np.ndarray:
        """int64 ``[n_codebooks]``: the id of code 0 in each codebook."""
        return np.arange(n_codebooks, dtype=np.int64) * (self.codebook_size if self.offsets else 0)

    # -- encoding ------------------------------------------------------------------------------

    def encode(self, codes: Array, pattern: CodebookPattern | str = "flatten", add_bos: bool = True,
               add_eos: bool = True) -> Array:
        """Token ids of one sequence of codes.

        Args:
            codes: ``[K, F]`` integer codes in ``[0, codebook_size)``, ``1 <= K <= n_codebooks``
                (the first ``K`` codebooks).
            pattern: codebook layout, see :class:`CodebookPattern`.
            add_bos, add_eos: put the bos / eos id first / last (on every row for delay and parallel).

        Returns:
            int64 ids: ``[add_bos + K*F + add_eos]`` for flatten; ``[K, add_bos + L + add_eos]`` for
            delay (``L = F+K-1``, empty cells hold the pad id) and parallel (``L = F``).
        """
        pattern = CodebookPattern(pattern)
        arr = _to_numpy(codes, 2, "codes")
        n_codebooks = arr.shape[0]
        if not 1 <= n_codebooks <= self.n_codebooks:
            raise ValueError(f"codes have {n_codebooks} codebooks, this vocabulary takes 1 to {self.n_codebooks}")
        bad = np.argwhere((arr < 0) | (arr >= self.codebook_size))
        if len(bad):
            k, f = bad[0]
            raise ValueError(f"code {arr[k, f]} at codebook {k}, frame {f} is outside [0, {self.codebook_size})")
        ids = arr + self.codebook_offsets(n_codebooks)[:, None]
        if pattern is CodebookPattern.DELAY:
            ids = apply_pattern(ids, pattern, pad_value=self.special_id("pad"))
        else:
            ids = apply_pattern(ids, pattern)
        rows = ids.shape[:-1]
        parts = [np.full(rows + (1,), self.special_id("bos"))] if add_bos else []
        parts.append(ids)
        if add_eos:
            parts.append(np.full(rows + (1,), self.special_id("eos")))
        return _like(np.concatenate(parts, axis=-1).astype(np.int64, copy=False), codes)

    def decode(self, ids: Array, pattern: CodebookPattern | str = "flatten", n_codebooks: int | None = None,
               has_bos: bool = True, has_eos: bool = True) -> Array:
        """Codes of one sequence of ids, checking that the ids are exactly what :meth:`encode` makes.

        Args:
            ids: ``[L]`` (flatten) or ``[K, L]`` (delay, parallel) token ids.
            pattern: the pattern used to encode.
            n_codebooks: ``K`` for flatten (default: this vocabulary's ``n_codebooks``); for delay and
                parallel it is the row count, and if given must match it.
            has_bos, has_eos: whether ``ids`` start / end with bos / eos (on every row).

        Returns:
            int64 ``[K, F]`` codes.

        Raises:
            ValueError: for ids outside ``[0, vocab_size)``, a missing bos/eos, a special token anywhere
                but its place (including a pad outside the delay pattern's empty cells), a code id of
                the wrong codebook (with offsets), or a length that does not fit ``K``.
        """
        pattern = CodebookPattern(pattern)
        flat = pattern is CodebookPattern.FLATTEN
        arr = _to_numpy(ids, 1 if flat else 2, "ids")
        if flat:
            n_codebooks = self.n_codebooks if n_codebooks is None else n_codebooks
        elif n_codebooks is not None and n_codebooks != arr.shape[0]:
            raise ValueError(f"ids have {arr.shape[0]} rows, expected n_codebooks={n_codebooks}")
        else:
            n_codebooks = arr.shape[0]
        if not 1 <= n_codebooks <= self.n_codebooks:
            raise ValueError(f"n_codebooks must be in [1, {self.n_codebooks}], got {n_codebooks}")
        bad = np.argwhere((arr < 0) | (arr >= self.vocab_size))
        if len(bad):
            raise ValueError(f"id {arr[tuple(bad[0])]} at position {tuple(bad[0].tolist())} is outside "
                             f"[0, {self.vocab_size})")
        body = self._strip(arr, has_bos, has_eos)
        if pattern is CodebookPattern.DELAY:
            grid = invert_pattern(body, pattern, n_codebooks, pad_value=self.special_id("pad"))
        else:
            grid = invert_pattern(body, pattern, n_codebooks)
        first = self.codebook_offsets(n_codebooks)[:, None]
        bad = np.argwhere((grid < first) | (grid >= first + self.codebook_size))
        if len(bad):
            k, f = bad[0]
            raise ValueError(f"id {grid[k, f]} at codebook {k}, frame {f} {self._describe(int(grid[k, f]))}, "
                             f"expected a code id of codebook {k}")
        return _like(grid - first, ids)

    def _strip(self, ids: np.ndarray, has_bos: bool, has_eos: bool) -> np.ndarray:
        """``ids`` without the bos / eos column, after checking it is there."""
        for present, name, index in ((has_bos, "bos", 0), (has_eos, "eos", -1)):
            if present:
                want = self.special_id(name)
                if ids.shape[-1] == 0 or (ids[..., index] != want).any():
                    got = ids[..., index].tolist() if ids.shape[-1] else "nothing"
                    where = "first" if index == 0 else "last"
                    raise ValueError(f"missing {name}: expected id {want} {where}, got {got}")
        return ids[..., int(has_bos) : ids.shape[-1] - int(has_eos)]

    def _describe(self, token: int) -> str:
        if token >= self.num_code_ids:
            return f"is the special token {self.special[token - self.num_code_ids]!r}"
        return f"is a code id of codebook {token // self.codebook_size}"

    # -- saving --------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready description; the derived ``vocab_size`` and ``special_ids`` are included for readers."""
        return {
            "codebook_size": self.codebook_size,
            "n_codebooks": self.n_codebooks,
            "offsets": self.offsets,
            "special": list(self.special),
            "vocab_size": self.vocab_size,
            "special_ids": self.special_ids,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CodeVocabulary:
        """Inverse of :meth:`to_dict`; derived entries, when present, must agree."""
        vocab = cls(data["codebook_size"], data["n_codebooks"], data.get("offsets", True),
                    tuple(data.get("special", DEFAULT_SPECIAL)))
        for name in ("vocab_size", "special_ids"):
            if name in data and data[name] != getattr(vocab, name):
                raise ValueError(f"vocabulary {name} {data[name]} does not match the layout ({getattr(vocab, name)})")
        return vocab
