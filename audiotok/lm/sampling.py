"""Sampling codes from a prior: from nothing, from a text, or continuing a code prompt.

Every step masks the logits to the ids that are legal at that position of the pattern, so every
sample decodes with :meth:`CodeVocabulary.decode` (which checks exactly that) and inverts to
``[K, F]`` codes:

* ``flatten``: token ``t`` of the body is a code of codebook ``t % K``; eos only at a frame boundary.
* ``delay``: row ``k`` holds pad for its first ``k`` steps, then codes; row 0 ends the sample by a pad
  (eos when ``K = 1``) after ``F`` codes, after which every row's remaining cells are forced
  (codes until frame ``F``, pads, then eos on every row at step ``F + K - 1``).
* ``parallel``: every row holds a code; row 0 may end the sample with eos, which all rows then take.

A prompt's frames are fed as they are (the delay pattern's partly known steps are forced to the
prompt's codes) and are part of the returned codes. The length lies in ``[min_frames, max_frames]``
(prompt included).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from ..utils.untrusted import check_number
from .patterns import CodebookPattern
from .prior import CodePrior

NEG_INF = float("-inf")
#: The smallest temperature above 0 (greedy): below it the scaled logits overflow float32.
MIN_TEMPERATURE = 1e-3


def check_sampling(temperature: float, top_k: int, top_p: float) -> None:
    """``ValueError`` unless ``temperature`` is 0 (greedy) or a finite number >= :data:`MIN_TEMPERATURE`,
    ``top_k`` an integer >= 0 and ``top_p`` a number in (0, 1]."""
    if temperature != 0:
        check_number(temperature, "temperature (0 for greedy)", minimum=MIN_TEMPERATURE)
    check_number(top_k, "top_k", minimum=0, integer=True)
    check_number(top_p, "top_p", above=0, maximum=1)


def filter_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Temperature, then top-k, then top-p (nucleus) filtering of ``[..., V]`` logits (-inf ids stay out).

    ``temperature`` must be > 0 (use :func:`sample_ids` with 0 for greedy); ``top_k = 0`` and
    ``top_p = 1`` turn those filters off.
    """
    logits = logits.float() / temperature
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, NEG_INF)
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        drop = probs.cumsum(dim=-1) - probs > top_p  # the most likely id always stays
        logits = logits.masked_fill(drop.scatter(-1, order, drop), NEG_INF)
    return logits


def _positions(prior: CodePrior, frames: int) -> int:
    """Backbone positions a sample of ``frames`` frames takes (bos, body, eos, and the text prefix)."""
    k = prior.vocab.n_codebooks
    steps = {"flatten": k * frames + 2, "delay": frames + k + 1, "parallel": frames + 2}[prior.pattern.value]
    return steps + (prior.text.max_len if prior.text is not None else 0)


def _position_limit(prior: CodePrior) -> int | None:
    config = (prior.lm if not prior.multi_stream else prior.backbone).config
    return getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)


def max_frames_for(prior: CodePrior) -> int | None:
    """The longest sample (frames) the prior's backbone has positions for (0 when none fits); ``None``
    when its positions are not bounded."""
    limit = _position_limit(prior)
    if limit is None:
        return None
    frames = max(0, limit - _positions(prior, 0))
    return frames // prior.vocab.n_codebooks if prior.pattern.value == "flatten" else frames


def sample_ids(logits: torch.Tensor, allowed: torch.Tensor, temperature: float = 1.0, top_k: int = 0,
               top_p: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """One id per row of ``[..., V]`` logits among the ``allowed`` ids (bool, same shape); greedy when
    ``temperature == 0``. Returns int64 ``[...]``."""
    logits = logits.float().masked_fill(~allowed, NEG_INF)
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = filter_logits(logits, temperature, top_k, top_p).softmax(dim=-1)
    flat = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1, generator=generator)
    return flat.view(probs.shape[:-1])


@dataclass
class Samples:
    """Generated samples: ``codes[i]`` int64 ``[K, F_i]`` (prompt included) and ``ids[i]`` the token
    ids they were generated as (``[L_i]`` flatten, ``[K, L_i]`` delay / parallel, bos to eos)."""

    codes: list[torch.Tensor]
    ids: list[torch.Tensor]


class Sampler:
    """One batch of ``n_samples`` samples, generated step by step with a key-value cache.

    Args:
        prior: the prior (its device is used).
        n_samples: samples generated together (the same text and prompt).
        text: text for a text-conditioned prior (default: the empty text).
        prompt: int ``[K', P]`` codes to continue, ``K' >= prior.n_codebooks`` (the first K are used).
        max_frames, min_frames: bounds on each sample's length in frames, prompt included.
        temperature, top_k, top_p: see :func:`sample_ids`.
        seed: seeds the sampling generator (default: a random one).
    """

    def __init__(self, prior: CodePrior, n_samples: int = 1, *, text: str | None = None,
                 prompt: torch.Tensor | np.ndarray | None = None, max_frames: int = 750, min_frames: int = 1,
                 temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None):
        self.prior = prior
        self.vocab = prior.vocab
        self.pattern = prior.pattern
        self.device = next(prior.parameters()).device
        k = self.vocab.n_codebooks
        if prompt is None:
            prompt = torch.zeros(k, 0, dtype=torch.long)
        prompt = torch.as_tensor(prompt).long()
        if prompt.ndim != 2 or prompt.shape[0] < k:
            raise ValueError(f"prompt must be [K, P] codes with K >= {k}, got shape {tuple(prompt.shape)}")
        self.prompt = prompt[:k].to(self.device)
        n_prompt = self.prompt.shape[1]
        check_number(min_frames, "min_frames", minimum=1, integer=True)
        check_number(max_frames, f"max_frames (at least min_frames={min_frames} and the prompt's {n_prompt} frames)",
                     minimum=max(min_frames, n_prompt), integer=True)
        check_sampling(temperature, top_k, top_p)
        check_number(n_samples, "n_samples", minimum=1, integer=True)
        self.n, self.min_frames, self.max_frames = n_samples, min_frames, max_frames
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.generator = torch.Generator(self.device)
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(seed)
        self.text = None
        if prior.text is not None:
            self.text = [t.to(self.device) for t in prior.text_prefix([text or ""] * n_samples)]
        elif text is not None:
            raise ValueError("this prior is not text-conditioned (trained with prior.text unset); sample without text")
        self._check_positions()

    def _check_positions(self) -> None:
        steps = _positions(self.prior, self.max_frames)
        limit = _position_limit(self.prior)
        if limit is not None and steps > limit:
            raise ValueError(f"max_frames={self.max_frames} needs {steps} positions ({self.pattern.value} pattern), "
                             f"the prior's backbone has {limit}")

    # -- legality --------------------------------------------------------------------------------

    def _allowed(self, t: int, end: torch.Tensor) -> torch.Tensor:
        """Bool ``[n, V]`` (flatten) or ``[n, K, V]``: the legal ids at body step ``t`` given each sample's
        end frame (``end[i] = -1`` while undecided)."""
        vocab, k_all = self.vocab, self.vocab.n_codebooks
        size, pad, eos = vocab.codebook_size, vocab.special_id("pad"), vocab.special_id("eos")
        n_prompt = self.prompt.shape[1]
        if self.pattern is CodebookPattern.FLATTEN:
            allowed = torch.zeros(self.n, vocab.vocab_size, dtype=torch.bool, device=self.device)
            k, frame = t % k_all, t // k_all
            if frame < self.max_frames:
                allowed[:, k * size:(k + 1) * size] = True
            if k == 0 and frame >= self.min_frames:
                allowed[:, eos] = True
            return allowed
        allowed = torch.zeros(self.n, k_all, vocab.vocab_size, dtype=torch.bool, device=self.device)
        for k in range(k_all):
            frame = t - k if self.pattern is CodebookPattern.DELAY else t
            for i in range(self.n):
                stop = int(end[i])
                if frame < 0 or (stop >= 0 and frame >= stop):  # before the row starts or after it ends
                    last = stop >= 0 and t == stop + k_all - 1 and self.pattern is CodebookPattern.DELAY
                    allowed[i, k, eos if last else pad] = True
                elif frame < n_prompt:
                    allowed[i, k, self.prompt[k, frame]] = True
                elif frame >= self.max_frames and self.pattern is CodebookPattern.PARALLEL:
                    allowed[i, k, eos] = True  # row 0 must end the sample here; every row takes eos
                else:
                    allowed[i, k, :size] = frame < self.max_frames
                    if k == 0 and stop < 0 and frame >= self.min_frames:  # row 0 may end the sample here
                        ends = self.pattern is CodebookPattern.PARALLEL or k_all == 1
                        allowed[i, k, eos if ends else pad] = True
        return allowed

    # -- the loop ----------------------------------------------------------------------------------

    def _prefix(self) -> torch.Tensor:
        """Ids fed before the first sampled step: bos and every fully known prompt step."""
        prompt_ids = self.vocab.encode(self.prompt, self.pattern, add_eos=False)
        if self.pattern is CodebookPattern.DELAY:
            prompt_ids = prompt_ids[:, : 1 + self.prompt.shape[1]]
        return prompt_ids.expand(self.n, *prompt_ids.shape)

    @torch.inference_mode()
    def frames(self) -> Iterator[tuple[int, torch.Tensor]]:
        """Run the generation, yielding ``(sample index, codes [K])`` for each frame as soon as it is
        complete (prompt frames first), in frame order within each sample. :attr:`ids` holds each
        sample's token ids afterwards."""
        vocab, k_all, pattern = self.vocab, self.vocab.n_codebooks, self.pattern
        pad, eos = vocab.special_id("pad"), vocab.special_id("eos")
        n_prompt = self.prompt.shape[1]
        for f in range(n_prompt):
            for i in range(self.n):
                yield i, self.prompt[:, f].cpu()
        prefix = self._prefix()  # [n, 1 + t0] or [n, K, 1 + t0]: bos, then the prompt's steps
        cells = list(prefix[..., 1:].cpu().unbind(-1))  # body steps so far, each [n] or [n, K]
        offsets = torch.from_numpy(vocab.codebook_offsets(k_all))
        end = torch.full((self.n,), -1, dtype=torch.long)  # end frame of each sample, -1 while undecided
        done = torch.zeros(self.n, dtype=torch.bool)
        mask = torch.ones(self.n, prefix.shape[-1], dtype=torch.long, device=self.device)
        text_ids, text_mask = self.text if self.text is not None else (None, None)
        logits, cache = self.prior(prefix, mask, text_ids, text_mask, use_cache=True)
        if text_mask is not None:  # later calls take the mask over every position so far
            mask = torch.cat([text_mask, mask], dim=1)
        while True:
            t = len(cells)
            step = sample_ids(logits[..., -1, :], self._allowed(t, end), self.temperature, self.top_k, self.top_p,
                              self.generator).cpu()
            step[done] = pad  # finished samples are fed pads, which are not kept
            cells.append(step)
            for i in (i for i in range(self.n) if not done[i]):
                if pattern is CodebookPattern.FLATTEN:
                    if step[i] == eos:
                        end[i], done[i] = t // k_all, True
                    elif t % k_all == k_all - 1:
                        yield i, torch.stack([cells[t - k_all + 1 + k][i] for k in range(k_all)]) - offsets
                    continue
                if end[i] < 0 and int(step[i, 0]) in (pad, eos):  # row 0 ended the sample
                    end[i] = t
                    if pattern is CodebookPattern.PARALLEL:
                        step[i] = eos
                frame = t - (k_all - 1) if pattern is CodebookPattern.DELAY else t
                if n_prompt <= frame and (end[i] < 0 or frame < end[i]):
                    yield i, torch.stack([cells[frame + k if pattern is CodebookPattern.DELAY else frame][i, k]
                                          for k in range(k_all)])
                last_step = end[i] + (k_all - 1 if pattern is CodebookPattern.DELAY else 0)
                done[i] = bool(end[i] >= 0 and t == last_step)
            if done.all():
                break
            mask = torch.cat([mask, torch.ones(self.n, 1, dtype=torch.long, device=self.device)], dim=1)
            logits, cache = self.prior(step[..., None].to(self.device), mask, cache=cache)
        ids = torch.cat([prefix[..., :1].cpu(), torch.stack(cells, dim=-1)], dim=-1)
        self.ids = [self._trim(ids[i], int(end[i])) for i in range(self.n)]

    def _trim(self, ids: torch.Tensor, end: int) -> torch.Tensor:
        """A sample's ids from bos to its eos (finished samples were fed pads after it)."""
        k_all = self.vocab.n_codebooks
        if self.pattern is CodebookPattern.FLATTEN:
            return ids[: 1 + end * k_all + 1]
        return ids[:, : 1 + end + (k_all if self.pattern is CodebookPattern.DELAY else 1)]

    def run(self) -> Samples:
        """Generate every sample; ``codes`` are the ids inverted by :meth:`CodeVocabulary.decode`."""
        for _ in self.frames():
            pass
        codes = [self.vocab.decode(ids, self.pattern) for ids in self.ids]
        return Samples(codes, self.ids)


def generate(prior: CodePrior, n_samples: int = 1, **options) -> Samples:
    """Sample ``n_samples`` code sequences from ``prior``; ``options`` as :class:`Sampler` takes."""
    return Sampler(prior, n_samples, **options).run()


def sample_to_wav(prior: CodePrior, tokenizer, path: str | os.PathLike, chunk_frames: int = 25,
                  **options) -> torch.Tensor:
    """Generate one sample and write it to a WAV file while generating: frames go through
    :meth:`AudioTokenizer.decode_stream` as they are complete. The file is built at a temporary name
    and moved to ``path`` when the sample is complete (:func:`audiotok.audio.audio_writer`): a sampler
    that fails or is killed leaves no partial file at ``path``.

    Args:
        prior: the prior.
        tokenizer: an :class:`~audiotok.AudioTokenizer` of the prior's codec (another one is refused).
        path: the WAV file (float32 at ``tokenizer.sample_rate``).
        chunk_frames: frames decoded at a time (see ``decode_stream``).
        options: as :class:`Sampler` takes.

    Returns:
        int64 codes ``[K, F]`` of the sample (prompt included).
    """
    from ..audio import audio_writer

    prior.check_codec(tokenizer)
    sampler = Sampler(prior, 1, **options)
    with audio_writer(path, tokenizer.sample_rate, 1, "FLOAT") as write:
        for audio in tokenizer.decode_stream((frame for _, frame in sampler.frames()), chunk_frames):
            write(audio[0])
    return prior.vocab.decode(sampler.ids[0], prior.pattern)
