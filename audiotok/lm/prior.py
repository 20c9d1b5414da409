"""Priors on codes: ``transformers`` decoders that model the token ids of a codebook pattern.

* ``flatten``: any ``transformers`` causal LM (``AutoModelForCausalLM``) over the one-stream vocabulary
  (:class:`CodeVocabulary` with offsets, ``K*S + 3`` ids).
* ``delay`` / ``parallel``: a multi-stream model, as MusicGen: per step the ``K`` code embeddings
  (one table per codebook, ``S + 3`` ids each: codes, pad, bos, eos) are summed, a ``transformers``
  decoder backbone (``AutoModel``: GPT-2, Llama, ...) runs over the steps, and ``K`` linear heads give
  each codebook's next id.

Text conditioning (optional): a fixed-length prefix of text ids (:mod:`audiotok.lm.text`) before the
codes; the flattened LM takes them as ids past the code vocabulary, the multi-stream model through
the backbone's own token embedding. Positions are ``0, 1, ...`` over prefix and codes, in training and
sampling alike.

A prior is saved as one folder::

    config.json        {"format": "audiotok-prior", "format_version": 1, "prior": PriorConfig,
                        "vocabulary": CodeVocabulary.to_dict(),
                        "codec": {"model_id", "config_hash", "config", "codes_fingerprint"},
                        "text": null | {"kind": "bytes" | "transformers", "vocab_size", "max_len"}}
    model.safetensors  the weights
    text_tokenizer/    the transformers tokenizer, for "kind": "transformers"

The codec's ``config_hash`` and ``codes_fingerprint`` (the :func:`~audiotok.weights.checkpoint.codes_fingerprint`
of the encoder and quantizer weights that wrote the training codes, from the code dataset's manifest)
tie the prior to the codec whose codes it models: decoding its samples with another architecture, or
with the same architecture and other weights, is refused (:meth:`CodePrior.check_codec`), and so is
validating or resuming it on a code dataset of another codec (:meth:`CodePrior.check_dataset`).
``codes_fingerprint`` is ``null`` (or absent, in priors saved before it existed) when the training codes
did not record it; then only the architecture is checked, with a warning.
"""

from __future__ import annotations

import dataclasses
import inspect
import itertools
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from ..identity import CodecIdentity
from ..nn.config import LIMITS, DACConfig, check_keys
from ..utils.untrusted import OptionalEntry, check_number, check_shape, read_json, shown
from .packing import IGNORE_INDEX
from .patterns import CodebookPattern
from .text import MAX_TEXT_LEN, TextTokenizer
from .vocab import CodeVocabulary

if TYPE_CHECKING:
    from ..formats.codedataset import CodeDataset

FORMAT = "audiotok-prior"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
#: The entries of a prior folder's ``config.json`` (see the module docstring) this reader uses.
CONFIG_SHAPE = {
    "format": str, "format_version": int, "prior": dict,
    "vocabulary": {"codebook_size": int, "n_codebooks": int, "offsets": OptionalEntry(bool),
                   "special": OptionalEntry([str]), "vocab_size": OptionalEntry(int),
                   "special_ids": OptionalEntry(dict)},
    "codec": {"model_id": str, "config_hash": str, "config": dict,
              "codes_fingerprint": OptionalEntry((str, type(None)))},
    "text": OptionalEntry((dict, type(None))),
}
TEXT_SHAPE = {"kind": str, "vocab_size": int, "max_len": int}
#: Most weights and buffers (elements) a prior may have, checked on a shapes-only (``meta``) copy of it
#: before anything is allocated.
MAX_PRIOR_ELEMENTS = 4_000_000_000


@dataclass
class PriorConfig:
    """A prior's architecture (the ``prior`` section of an LM training config).

    Attributes:
        pattern: ``flatten``, ``delay`` or ``parallel``.
        n_codebooks: model the first ``K`` codebooks (default: all the codec has).
        backbone: ``transformers`` config of the decoder: ``model_type`` (``gpt2``, ``llama``, ...)
            and its settings (``AutoConfig.for_model``); the vocabulary size is set here.
        text: ``None`` (unconditional), ``"bytes"`` (UTF-8 bytes) or a local ``transformers``
            tokenizer folder for text conditioning.
        max_text_len: text prefix length (start token included).
    """

    pattern: str = "delay"
    n_codebooks: int | None = None
    backbone: dict[str, Any] = field(default_factory=lambda: {"model_type": "gpt2", "n_layer": 4, "n_head": 4,
                                                              "n_embd": 256, "n_positions": 2048})
    text: str | None = None
    max_text_len: int = 64

    def __post_init__(self) -> None:
        CodebookPattern(self.pattern)
        if not isinstance(self.backbone, dict) or not isinstance(self.backbone.get("model_type"), str):
            raise ValueError(f"prior.backbone needs a model_type (gpt2, llama, ...), got {self.backbone!r}")
        for key, value in self.backbone.items():
            if isinstance(value, float):
                check_number(value, f"prior.backbone.{key}")
        if self.n_codebooks is not None:
            check_number(self.n_codebooks, "prior.n_codebooks", minimum=1, maximum=LIMITS["n_codebooks"], integer=True)
        if self.text is not None and not isinstance(self.text, str):
            raise ValueError(f"prior.text must be null, 'bytes' or a tokenizer folder, got {self.text!r}")
        check_number(self.max_text_len, "prior.max_text_len", minimum=1, maximum=MAX_TEXT_LEN, integer=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str) -> PriorConfig:
        """A config from the ``prior`` entry of a saved prior; unknown keys and bad values raise
        ``ValueError`` naming ``where``."""
        check_keys(cls, data, where)
        try:
            return cls(**data)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None

    def codebooks_of(self, codec_config: DACConfig) -> int:
        """The codebooks a prior of this config models for the codec of ``codec_config``:
        ``n_codebooks``, or all of the codec's; ``ValueError`` if the codec has fewer."""
        n_codebooks = self.n_codebooks or codec_config.n_codebooks
        if not 1 <= n_codebooks <= codec_config.n_codebooks:
            raise ValueError(f"prior.n_codebooks must be in [1, {codec_config.n_codebooks}] for the codec's "
                             f"{codec_config.n_codebooks} codebooks, got {n_codebooks}")
        return n_codebooks


class CodePrior(nn.Module):
    """A language model on the codes of one codec, for one :class:`CodebookPattern`.

    Args:
        config: the architecture.
        codec: the codec whose codes it models; ``codec_config`` its configuration.
        text: the text tokenizer (default: built from ``config.text``; ignored when that is None).

    Attributes:
        vocab: token ids; with offsets for ``flatten``, without for ``delay`` / ``parallel``.
        pattern: the codebook pattern.
        text: the :class:`TextTokenizer`, or None for an unconditional prior.
    """

    def __init__(self, config: PriorConfig, codec: CodecIdentity, codec_config: DACConfig,
                 text: TextTokenizer | None = None):
        super().__init__()
        from transformers import AutoModel, AutoModelForCausalLM

        self.config = config
        self.codec, self.codec_config = codec, codec_config
        self._warned_unchecked_weights = False
        self.pattern = CodebookPattern(config.pattern)
        n_codebooks = config.codebooks_of(codec_config)
        flat = self.pattern is CodebookPattern.FLATTEN
        self.vocab = CodeVocabulary.for_codec(codec_config, offsets=flat, n_codebooks=n_codebooks)
        if config.text is None:
            self.text = None
        else:
            self.text = text if text is not None else TextTokenizer.from_name(config.text, config.max_text_len)
        text_ids = self.text.vocab_size + 1 if self.text is not None else 0
        settings = {k: v for k, v in config.backbone.items() if k != "model_type"}
        settings.update(bos_token_id=None, eos_token_id=None, pad_token_id=None)
        # flatten: code and text ids in one table; else text prefix ids (codes have their own tables)
        settings["vocab_size"] = self.vocab.vocab_size + text_ids if flat else max(text_ids, 1)
        kind = AutoModelForCausalLM if flat else AutoModel
        backbone = _backbone_config(config.backbone["model_type"], settings)
        _check_size(kind, backbone, 0 if flat else 2 * n_codebooks * self.vocab.vocab_size * backbone.hidden_size)
        if flat:
            self.lm = kind.from_config(backbone)
        else:
            self.backbone = kind.from_config(backbone)
            width, size = self.backbone.config.hidden_size, self.vocab.vocab_size
            self.embed = nn.ModuleList(nn.Embedding(size, width) for _ in range(n_codebooks))
            self.heads = nn.ModuleList(nn.Linear(width, size, bias=False) for _ in range(n_codebooks))
            if self.text is None:  # the backbone's token embedding only embeds text
                self.backbone.get_input_embeddings().requires_grad_(False)
            std = getattr(self.backbone.config, "initializer_range", 0.02)
            for module in (*self.embed, *self.heads):
                nn.init.normal_(module.weight, std=std)
        decoder = self.lm if flat else self.backbone
        self._cache_arg = "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"

    @property
    def n_codebooks(self) -> int:
        return self.vocab.n_codebooks

    @property
    def multi_stream(self) -> bool:
        return self.pattern is not CodebookPattern.FLATTEN

    def text_prefix(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``ids, mask`` ``[B, max_text_len]`` for texts; a clear error for an unconditional prior."""
        if self.text is None:
            raise ValueError("this prior is not text-conditioned (trained with prior.text unset)")
        return self.text.prefix(texts)

    # -- forward ---------------------------------------------------------------------------------

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                text_ids: torch.Tensor | None = None, text_mask: torch.Tensor | None = None,
                cache: Any = None, use_cache: bool = False) -> tuple[torch.Tensor, Any]:
        """Next-id logits for every code position.

        Args:
            input_ids: ``[B, L]`` (flatten) or ``[B, K, L]`` (delay, parallel) code token ids.
            attention_mask: ``[B, L]`` for the codes (default all ones); with ``cache``, ``[B, P + L]``
                over every position so far (``P`` cached, text prefix included).
            text_ids, text_mask: ``[B, T]`` text prefix (:meth:`text_prefix`), for the first call only.
            cache: the ``transformers`` cache a previous call returned, for incremental decoding.
            use_cache: return a cache (for sampling; always with ``cache``).

        Returns:
            (logits ``[B, L, V]`` (flatten) or ``[B, K, L, V]``, the cache or None).
        """
        if input_ids.ndim != (3 if self.multi_stream else 2):
            raise ValueError(f"{self.pattern.value} prior takes input_ids of "
                             f"{'[B, K, L]' if self.multi_stream else '[B, L]'}, got {tuple(input_ids.shape)}")
        batch, length = input_ids.shape[0], input_ids.shape[-1]
        device = input_ids.device
        past = cache.get_seq_length() if cache is not None else 0
        n_text = 0 if text_ids is None else text_ids.shape[1]
        if attention_mask is None:
            attention_mask = torch.ones(batch, past + length, dtype=torch.long, device=device)
        if text_ids is not None:
            if self.text is None:
                raise ValueError("this prior is not text-conditioned (trained with prior.text unset)")
            if cache is not None:
                raise ValueError("the text prefix goes with the first call only, not with a cache")
            attention_mask = torch.cat([torch.ones_like(text_ids) if text_mask is None else text_mask,
                                        attention_mask], dim=1)
        positions = torch.arange(past, past + n_text + length, device=device).expand(batch, -1)
        kwargs = {"attention_mask": attention_mask, "position_ids": positions,
                  "use_cache": use_cache or cache is not None, self._cache_arg: cache}
        if not self.multi_stream:
            ids = input_ids if text_ids is None else torch.cat([text_ids + self.vocab.vocab_size, input_ids], 1)
            out = self.lm(input_ids=ids, **kwargs)
            logits = out.logits[:, n_text:, : self.vocab.vocab_size]
        else:
            x = sum(embed(input_ids[:, k]) for k, embed in enumerate(self.embed))  # [B, L, D]
            if text_ids is not None:
                x = torch.cat([self.backbone.get_input_embeddings()(text_ids), x], dim=1)
            out = self.backbone(inputs_embeds=x, **kwargs)
            hidden = out.last_hidden_state[:, n_text:]
            logits = torch.stack([head(hidden) for head in self.heads], dim=1)  # [B, K, L, V]
        if not (use_cache or cache is not None):
            return logits, None
        return logits, out["cache"] if "cache" in out else out.past_key_values

    def codebook_of(self, labels: torch.Tensor) -> torch.Tensor:
        """The codebook (0..K-1) of each code id in ``labels`` (``[B, L]`` or ``[B, K, L]``), -1 for
        special ids and ignored positions."""
        size = self.vocab.codebook_size
        if not self.multi_stream:
            code = (labels >= 0) & (labels < self.vocab.num_code_ids)
            return torch.where(code, labels // size, -1)
        rows = torch.arange(labels.shape[1], device=labels.device)[None, :, None].expand_as(labels)
        return torch.where((labels >= 0) & (labels < size), rows, -1)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Next-token cross-entropy of :meth:`forward`'s logits against ``labels`` (the input ids, with
        ``-100`` where nothing is to be learnt; the delay pattern's pad cells are left out too).

        Returns:
            (mean loss over every counted position, summed loss ``[K]`` and count ``[K]`` of the code
            targets of each codebook).
        """
        logits, labels = logits[..., :-1, :], labels[..., 1:]
        labels = labels.masked_fill(labels == self.vocab.special_id("pad"), IGNORE_INDEX)
        losses = F.cross_entropy(logits.float().flatten(0, -2), labels.flatten(), ignore_index=IGNORE_INDEX,
                                 reduction="none").view(labels.shape)
        counted = labels != IGNORE_INDEX
        mean = losses.sum() / counted.sum().clamp(min=1)
        codebook = self.codebook_of(labels)
        keep = codebook >= 0
        sums = torch.zeros(self.n_codebooks, device=logits.device).index_add_(0, codebook[keep], losses[keep])
        counts = torch.zeros(self.n_codebooks, device=logits.device).index_add_(0, codebook[keep],
                                                                                torch.ones_like(losses[keep]))
        return mean, sums.detach(), counts

    # -- codec -------------------------------------------------------------------------------------

    def check_codec(self, tokenizer) -> None:
        """Raise ``ValueError`` (naming both codecs) unless ``tokenizer`` (an :class:`~audiotok.AudioTokenizer`)
        is the codec this prior was trained on: the same config hash, enough codebooks and the same
        encoder and quantizer weights (``codes_fingerprint``). A prior that does not record the fingerprint
        (saved before it existed, or trained on codes that did not record it) is checked by architecture
        only, with a warning (once per prior)."""
        tokenizer.check_codec(self.codec, "this prior models")
        if self.codec.codes_fingerprint is None and not self._warned_unchecked_weights:
            self._warned_unchecked_weights = True
            warnings.warn(f"this prior does not record the weights fingerprint of its codec {self.codec.model_id!r} "
                          f"(saved by an earlier audiotok, or trained on a code dataset that does not record it): "
                          f"only the architecture of {tokenizer.model_id!r} was checked. Its codes must be those "
                          f"the prior was trained on", stacklevel=2)

    def check_dataset(self, dataset: CodeDataset) -> None:
        """Raise ``ValueError`` unless ``dataset`` holds codes this prior models (:func:`check_codes`):
        for validation, evaluation or more training."""
        check_codes(self.codec, self.n_codebooks, dataset)

    # -- saving ------------------------------------------------------------------------------------

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """Write the prior as one folder (see the module docstring)."""
        from safetensors.torch import save_model

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "prior": dataclasses.asdict(self.config),
                "vocabulary": self.vocab.to_dict(),
                "codec": {**self.codec.to_dict(), "config": self.codec_config.to_dict()},
                "text": self.text.to_dict() if self.text is not None else None}
        (folder / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        save_model(self, str(folder / WEIGHTS_FILE))
        if self.text is not None:
            self.text.save(folder)

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, device: str | torch.device | None = None) -> CodePrior:
        """Load a folder written by :meth:`save_pretrained`, or a training run (its ``latest/``), in eval mode."""
        from safetensors.torch import load_model

        folder = prior_folder(folder)
        meta = read_prior_config(folder)
        where = folder / CONFIG_FILE
        config = PriorConfig.from_dict(meta["prior"], f"{where}: prior")
        text = TextTokenizer.load(folder, meta["text"]) if meta.get("text") else None
        try:
            saved = CodeVocabulary.from_dict(meta["vocabulary"])
            codec, codec_config = prior_codec(meta)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}: {e}") from None
        prior = cls(config, codec, codec_config, text)
        if saved != prior.vocab:
            raise ValueError(f"{folder}: saved vocabulary {saved} does not match the prior's {prior.vocab}")
        try:
            load_model(prior, str(folder / WEIGHTS_FILE), strict=True)
        except (RuntimeError, ValueError) as e:  # missing, unexpected or misshapen weights; a corrupt file
            raise ValueError(f"{folder / WEIGHTS_FILE}: weights do not fit {where}: {shown(e)}") from None
        return prior.to(device or "cpu").eval()


def _backbone_config(model_type: str, settings: dict[str, Any]) -> Any:
    """The ``transformers`` config of a prior's backbone; ``ValueError`` naming the settings it refuses."""
    from transformers import AutoConfig

    try:
        return AutoConfig.for_model(model_type, **settings)
    except (TypeError, ValueError, KeyError) as e:
        raise ValueError(f"prior.backbone: transformers has no {model_type!r} model with these settings: "
                         f"{shown(e)}") from None


def _check_size(kind: Any, backbone: Any, extra: int) -> None:
    """``ValueError`` if the model ``kind.from_config(backbone)``, with ``extra`` more weights, would hold
    more than :data:`MAX_PRIOR_ELEMENTS` weights and buffers, or cannot be built: counted on a copy
    built on the ``meta`` device, which allocates nothing."""
    try:
        with torch.device("meta"):
            model = kind.from_config(backbone)
    except Exception as e:  # noqa: BLE001 - any setting transformers cannot build with (negative sizes, ...)
        raise ValueError(f"prior.backbone: transformers cannot build this {backbone.model_type!r} model: "
                         f"{type(e).__name__}: {shown(e)}") from None
    count = sum(t.numel() for t in itertools.chain(model.parameters(), model.buffers())) + extra
    if count > MAX_PRIOR_ELEMENTS:
        raise ValueError(f"prior.backbone describes a model of {count / 1e9:.1f} billion weights and buffers, "
                         f"above the supported {MAX_PRIOR_ELEMENTS / 1e9:.0f} billion")


def check_codes(codec: CodecIdentity, n_codebooks: int, dataset: CodeDataset) -> None:
    """Raise ``ValueError`` unless ``dataset`` holds the codes of ``codec`` (:meth:`CodecIdentity.check_codes_of`,
    naming both codecs) with at least the ``n_codebooks`` codebooks a prior models."""
    codec.check_codes_of(dataset.codec, f"code dataset {dataset.root} holds")
    if dataset.n_codebooks < n_codebooks:
        raise ValueError(f"code dataset {dataset.root} holds {dataset.n_codebooks} codebooks per record, the prior "
                         f"models {n_codebooks} (prior.n_codebooks): code the audio with more, or model fewer")


def prior_codec(meta: dict[str, Any]) -> tuple[CodecIdentity, DACConfig]:
    """The codec of a prior's ``config.json`` (:func:`read_prior_config`) and its configuration;
    ``ValueError`` unless they agree."""
    codec, config = CodecIdentity.from_dict(meta["codec"], "codec"), DACConfig.from_dict(meta["codec"]["config"])
    if config.architecture_hash() != codec.config_hash:
        raise ValueError(f"codec {codec.model_id!r}: config hash {codec.config_hash} does not match its config "
                         f"({config.architecture_hash()})")
    return codec, config


def prior_folder(path: str | os.PathLike) -> Path:
    """The prior folder ``path`` names: itself, or a training run's ``latest/``."""
    folder = Path(path)
    if not (folder / CONFIG_FILE).exists() and (folder / "latest" / CONFIG_FILE).exists():
        return folder / "latest"
    return folder


def read_prior_config(folder: str | os.PathLike) -> dict[str, Any]:
    """The ``config.json`` of a prior folder (see the module docstring); ``ValueError`` unless it is
    one of a format this audiotok reads."""
    folder = Path(folder)
    try:
        meta = read_json(folder / CONFIG_FILE, dict)
    except OSError as e:
        raise ValueError(f"{folder}: not a prior folder ({CONFIG_FILE}: {e})") from e
    if meta.get("format") != FORMAT:
        raise ValueError(f"{folder}: not a prior (format {meta.get('format')!r}, expected {FORMAT!r})")
    check_shape(meta, CONFIG_SHAPE, folder / CONFIG_FILE)
    if meta["format_version"] > FORMAT_VERSION:
        raise ValueError(f"{folder}: prior format_version {meta['format_version']} is newer than this "
                         f"audiotok reads ({FORMAT_VERSION})")
    if meta.get("text") is not None:
        check_shape(meta["text"], TEXT_SHAPE, folder / CONFIG_FILE, "text")
    return meta
