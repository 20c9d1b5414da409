"""Feeding audio codes to language models: codebook patterns, token ids, packing, code datasets, and
priors on codes (:class:`CodePrior`, trained by :mod:`audiotok.lm.trainer`) with legal sampling
(:func:`generate`, :func:`sample_to_wav`).

Token id layout (:class:`CodeVocabulary`, ``S = codebook_size``, ``K = n_codebooks``)::

    offsets=True   code c of codebook k -> k*S + c        ids [0, K*S)
                   special i            -> K*S + i        pad K*S, bos K*S+1, eos K*S+2 (default specials)
    offsets=False  code c (any codebook) -> c             ids [0, S)
                   special i            -> S + i          pad S, bos S+1, eos S+2

Patterns (:class:`CodebookPattern`) for codes ``[K, F]``:

* ``flatten``: ``[bos, c0f0, c1f0, ..., c(K-1)f0, c0f1, ..., eos]``, length ``K*F + 2``;
* ``delay``: ``[K, F+K+1]``, row ``k`` = ``[bos, pad*k, codes[k], pad*(K-1-k), eos]``;
* ``parallel``: ``[K, F+2]``, row ``k`` = ``[bos, codes[k], eos]``.

Needs ``pyarrow`` (the ``data`` extra) to read Parquet shards.
"""

from ..formats.codedataset import FORMAT_NAME as FORMAT
from ..formats.codedataset import FORMAT_VERSION, CodeDataset, CodeRecord
from ..identity import CodecIdentity
from .dataset import LMTokenDataset
from .packing import IGNORE_INDEX, pack_sequences, pad_to_length
from .patterns import DELAY_PAD, CodebookPattern, apply_pattern, invert_pattern
from .prior import CodePrior, PriorConfig
from .sampling import Sampler, Samples, generate, sample_to_wav
from .text import TextTokenizer
from .vocab import DEFAULT_SPECIAL, CodeVocabulary

__all__ = [
    "DEFAULT_SPECIAL",
    "DELAY_PAD",
    "FORMAT",
    "FORMAT_VERSION",
    "IGNORE_INDEX",
    "CodeDataset",
    "CodePrior",
    "CodecIdentity",
    "CodeRecord",
    "CodeVocabulary",
    "CodebookPattern",
    "LMTokenDataset",
    "PriorConfig",
    "Sampler",
    "Samples",
    "TextTokenizer",
    "apply_pattern",
    "generate",
    "invert_pattern",
    "pack_sequences",
    "pad_to_length",
    "sample_to_wav",
]
