"""Encoding a pool of decoded records in a bulk job with :meth:`AudioTokenizer.encode_each`: codes or a
failure record per record."""

from __future__ import annotations

import warnings

import numpy as np

from ..tokenizer import AudioTokenizer
from .inputs import Decoded, Failure

#: The tokenizer's warning for audio beyond [-1, 1] (``audiotok.audio``): a bulk job counts such
#: records and logs the count once instead (resampling makes full-scale recordings peak slightly above 1).
LOUD_WARNING = r"clip \d+ has peak amplitude"


def encode_items(tokenizer: AudioTokenizer, items: list[Decoded], n_quantizers: int, batch_seconds: float,
                 chunk_seconds: float | None, mono: bool = True) -> list[np.ndarray | Failure]:
    """Codes (uint16 ``[K, F]`` when ``mono``, else ``[C, K, F]``) or a :class:`Failure` per item.

    Every channel is coded as a clip of its own (what ``encode(..., mono=False)`` does), by
    :meth:`AudioTokenizer.encode_each`: grouped by the tokenizer's batch planner, the next group
    prepared while the model runs one, a group that fails retried clip by clip; reading, decoding and
    resampling run in the job's readers. A clip that still fails makes its item a
    ``Failure("encode")``. If every clip of eight or more fails, the error is systematic (device,
    model) and is raised instead.
    """
    clips = [(i, c) for i, item in enumerate(items) for c in range(item.audio.shape[0])]
    # one warning per clip would flood a job's log: counted by the caller. The filter is the process's,
    # so it covers the thread that plans (and pads) group n + 1 while the model runs group n.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", LOUD_WARNING, UserWarning)
        out = tokenizer.encode_each([items[i].audio[c].numpy() for i, c in clips], n_quantizers,
                                    chunk_seconds=chunk_seconds, batch_seconds=batch_seconds)
    failed = [e for e in out if isinstance(e, Exception)]
    if len(clips) >= 8 and len(failed) == len(clips):
        raise RuntimeError(f"encoding failed for all {len(clips)} clips of a pool") from failed[0]
    codes: dict[tuple[int, int], np.ndarray] = {}
    errors: dict[int, str] = {}
    for (i, c), result in zip(clips, out):
        if isinstance(result, Exception):
            errors.setdefault(i, f"{type(result).__name__}: {result}")
        else:
            codes[(i, c)] = result.numpy().astype(np.uint16)
    results: list[np.ndarray | Failure] = []
    for i, item in enumerate(items):
        if i in errors:
            results.append(Failure(item.part, item.position, item.key, "encode", errors[i]))
        elif mono:
            results.append(codes[(i, 0)])
        else:
            results.append(np.stack([codes[(i, c)] for c in range(item.audio.shape[0])]))
    return results
