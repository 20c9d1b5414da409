"""Encoding a pool of decoded records in a bulk job: batched as the tokenizer plans, the next batch
prepared while the model runs one, a failed batch retried clip by clip."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import numpy as np
import torch

from ..prefetch import prefetch
from ..segments import make_batches, plan_segments
from ..tokenizer import AudioTokenizer, EncodePlan
from .inputs import Decoded, Failure

#: The tokenizer's warning for audio beyond [-1, 1] (``audiotok.audio``): a bulk job counts such
#: records and logs the count once instead (resampling makes full-scale recordings peak slightly above 1).
LOUD_WARNING = r"clip \d+ has peak amplitude"


def encode_items(tokenizer: AudioTokenizer, items: list[Decoded], n_quantizers: int, batch_seconds: float,
                 chunk_seconds: float | None, mono: bool = True) -> list[np.ndarray | Failure]:
    """Codes (uint16 ``[K, F]`` when ``mono``, else ``[C, K, F]``) or a :class:`Failure` per item.

    Every channel is coded as a clip of its own (what ``encode(..., mono=False)`` does); clips are
    grouped by the tokenizer's own batch planner (:func:`audiotok.segments.make_batches` under
    :meth:`AudioTokenizer.frame_budgets`), so ``encode`` runs each group as the batch it plans,
    exact padded (and chunked) encoding included. The next group is planned and padded (in pinned
    memory on CUDA) in a background thread while the model runs the current one
    (:meth:`AudioTokenizer.plan_encode`, :func:`audiotok.prefetch.prefetch`); reading, decoding and
    resampling run in the job's readers. A group is the unit of retry: one that fails is retried
    clip by clip; a clip that still fails makes its item a ``Failure("encode")``. If every clip of
    eight or more fails, the error is systematic (device, model) and is raised instead.
    """
    clips = [(i, c) for i, item in enumerate(items) for c in range(item.audio.shape[0])]
    frames = [tokenizer.num_frames(items[i].audio.shape[-1]) for i, _ in clips]
    codes: dict[tuple[int, int], np.ndarray] = {}
    errors: dict[int, str] = {}
    first_error: Exception | None = None
    max_frames = tokenizer.frame_budgets(chunk_seconds, batch_seconds)[1]

    def plan(group: list[int]) -> EncodePlan:
        audio = [items[clips[j][0]].audio[clips[j][1]].numpy() for j in group]
        return tokenizer.plan_encode(audio, tokenizer.sample_rate, n_quantizers, chunk_seconds=chunk_seconds,
                                     batch_seconds=batch_seconds, pad=True)

    def planned(groups: list[list[int]]) -> Iterator[tuple[list[int], EncodePlan | Exception]]:
        for group in groups:
            try:
                yield group, plan(group)
            except Exception as e:  # noqa: BLE001 - the group's failure, handled where it is run
                yield group, e

    def run(group: list[int], planned: EncodePlan | Exception) -> None:
        if isinstance(planned, Exception):
            raise planned
        enc = tokenizer.run_plan(planned)
        out = enc.codes.numpy()
        for b, j in enumerate(group):
            codes[clips[j]] = out[b, :, : int(enc.lengths[b])].astype(np.uint16)

    groups = [[segment.item for segment in batch] for batch in make_batches(plan_segments(frames, None, (0, 0)),
                                                                            max_frames)]
    # one warning per clip would flood a job's log: counted by the caller. The filter is the process's,
    # so it covers the thread that plans (and pads) group n + 1 while the model runs group n.
    with warnings.catch_warnings(), contextlib.closing(prefetch(planned(groups))) as ahead:
        warnings.filterwarnings("ignore", LOUD_WARNING, UserWarning)
        for group, ready in ahead:
            try:
                run(group, ready)
                continue
            except Exception as e:  # noqa: BLE001 - out of memory, odd inputs: retry clip by clip
                first_error = first_error or e
                if isinstance(e, torch.cuda.OutOfMemoryError):
                    torch.cuda.empty_cache()
                if len(group) == 1:
                    errors.setdefault(clips[group[0]][0], f"{type(e).__name__}: {e}")
                    continue
            for j in group:
                try:
                    run([j], plan([j]))
                except Exception as e:  # noqa: BLE001
                    errors.setdefault(clips[j][0], f"{type(e).__name__}: {e}")
    if first_error is not None and len(clips) >= 8 and not codes:
        raise RuntimeError(f"encoding failed for all {len(clips)} clips of a pool") from first_error
    results: list[np.ndarray | Failure] = []
    for i, item in enumerate(items):
        if i in errors:
            results.append(Failure(item.part, item.position, item.key, "encode", errors[i]))
        elif mono:
            results.append(codes[(i, 0)])
        else:
            results.append(np.stack([codes[(i, c)] for c in range(item.audio.shape[0])]))
    return results
