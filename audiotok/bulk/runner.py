"""The entry point of bulk tokenization: :func:`tokenize_dataset` runs a job on the engine its
configuration names (:mod:`audiotok.bulk.torch_engine`, :mod:`audiotok.bulk.ray_engine`)."""

from __future__ import annotations

from ..tokenizer import AudioTokenizer
from .job import BulkConfig, BulkSummary
from .torch_engine import tokenize_with_torch


def tokenize_dataset(config: BulkConfig, tokenizer: AudioTokenizer | None = None) -> BulkSummary:
    """Tokenize ``config.input`` into ``config.output`` (see :mod:`audiotok.bulk`).

    Any number of processes (torchrun ranks or independent launches) may run the same job at once:
    they claim parts through the output folder until every part is done, and the manifest is
    written when all are. Running the same command again resumes an interrupted job (with any
    number of processes), or does nothing for a finished one. ``config.engine="ray"`` runs the job
    on a Ray cluster instead (:mod:`audiotok.bulk.ray_engine`; ``tokenizer`` must then be ``None``:
    its actors load ``config.model``). Returns a :class:`BulkSummary`.
    """
    if config.engine == "torch":
        return tokenize_with_torch(config, tokenizer)
    from .ray_engine import tokenize_with_ray  # Ray is an optional dependency: imported when asked for

    if tokenizer is not None:
        raise ValueError("the ray engine loads config.model in each of its actors: pass no tokenizer")
    return tokenize_with_ray(config)
