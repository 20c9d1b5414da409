"""Text prefixes for text-conditioned priors (TTS): text to token ids, padded to a fixed length, and
text-code training examples.

A prefix is ``[START, t0, t1, ..., pad, ...]`` of ``max_len`` ids with an attention mask (1 on
``START`` and the text, 0 on padding); ``START = vocab_size`` (one id past the tokenizer's), so the
prefix vocabulary has ``vocab_size + 1`` ids and an empty text still has one position to attend to.
Text longer than ``max_len - 1`` tokens is cut.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import IterableDataset, get_worker_info

from ..utils.untrusted import check_number
from .packing import pad_to_length
from .patterns import CodebookPattern

if TYPE_CHECKING:
    from ..formats.codedataset import CodeDataset, CodeRecord
    from .vocab import CodeVocabulary

BYTES = "bytes"
TOKENIZER_FOLDER = "text_tokenizer"
#: Longest text prefix (``max_len``, the prior's ``max_text_len``).
MAX_TEXT_LEN = 65536


class TextTokenizer:
    """Text to ids with a ``transformers`` tokenizer, or as UTF-8 bytes (ids 0..255) when ``tokenizer`` is None.

    Args:
        tokenizer: a ``transformers`` tokenizer (``PreTrainedTokenizerBase``), or None for bytes.
        max_len: prefix length, ``START`` included.
    """

    def __init__(self, tokenizer: Any = None, max_len: int = 64):
        check_number(max_len, "max_len", minimum=1, maximum=MAX_TEXT_LEN, integer=True)
        self.tokenizer = tokenizer
        self.max_len = max_len

    @property
    def kind(self) -> str:
        return BYTES if self.tokenizer is None else "transformers"

    @property
    def vocab_size(self) -> int:
        """Ids the tokenizer gives (``START`` excluded)."""
        return 256 if self.tokenizer is None else len(self.tokenizer)

    @property
    def start_id(self) -> int:
        return self.vocab_size

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no special tokens)."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a string, got {type(text).__name__}")
        if self.tokenizer is None:
            return list(text.encode("utf-8"))
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def prefix(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """int64 ``ids [B, max_len]`` and ``mask [B, max_len]`` for a batch of texts."""
        ids = torch.zeros(len(texts), self.max_len, dtype=torch.long)
        mask = torch.zeros(len(texts), self.max_len, dtype=torch.long)
        for i, text in enumerate(texts):
            row = [self.start_id] + self.encode(text)[: self.max_len - 1]
            ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
        return ids, mask

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "vocab_size": self.vocab_size, "max_len": self.max_len}

    def save(self, folder: str | os.PathLike) -> None:
        """Write the ``transformers`` tokenizer (if any) to ``folder/text_tokenizer``."""
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(str(Path(folder) / TOKENIZER_FOLDER))

    @classmethod
    def load(cls, folder: str | os.PathLike, data: dict[str, Any]) -> TextTokenizer:
        """Inverse of :meth:`to_dict` + :meth:`save` (the tokenizer is read from ``folder``, never downloaded)."""
        tokenizer = None
        if data["kind"] != BYTES:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(Path(folder) / TOKENIZER_FOLDER), local_files_only=True)
        text = cls(tokenizer, int(data["max_len"]))
        if text.vocab_size != data["vocab_size"]:
            raise ValueError(f"{folder}: text tokenizer has {text.vocab_size} ids, the prior was made with "
                             f"{data['vocab_size']}")
        return text

    @classmethod
    def from_name(cls, name: str, max_len: int) -> TextTokenizer:
        """``"bytes"``, or a ``transformers`` tokenizer folder (or a hub id already in the local cache)."""
        if name == BYTES:
            return cls(None, max_len)
        from transformers import AutoTokenizer

        return cls(AutoTokenizer.from_pretrained(name, local_files_only=True), max_len)


class TextCodeDataset(IterableDataset):
    """One example per record for a text-conditioned prior: the record's codes (first channel) as ids of
    ``pattern``, cut to ``seq_len`` and padded (no packing: each example has its own text), and the
    text prefix of the record's ``text_key`` field (:meth:`CodeRecord.lookup`: its kept metadata, e.g. the
    ``text`` column or ``txt`` member the bulk tokenizer kept, else its record fields).

    Yields:
        ``input_ids``, ``attention_mask``, ``labels`` as :func:`~audiotok.lm.pad_to_length` gives, and
        ``text_ids``, ``text_mask`` ``[max_len]``; int64 tensors.
    """

    def __init__(self, code_dataset: CodeDataset, vocab: CodeVocabulary, pattern: CodebookPattern | str,
                 text: TextTokenizer, *, seq_len: int, text_key: str = "text"):
        super().__init__()
        self.code_dataset, self.vocab, self.pattern = code_dataset, vocab, CodebookPattern(pattern)
        self.text, self.seq_len, self.text_key = text, seq_len, text_key

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        records = self.code_dataset
        worker = get_worker_info()
        if worker is not None:
            records = records.split_by_rank(worker.id, worker.num_workers)
        return self.examples(records)

    def examples(self, records: Iterable[CodeRecord]) -> Iterator[dict[str, torch.Tensor]]:
        """One example per record of ``records``."""
        for record in records:
            try:
                text = record.lookup(self.text_key)
            except KeyError:
                raise ValueError(f"record {record.key!r} has no {self.text_key!r} metadata: a text-conditioned "
                                 f"prior needs code datasets that carry each record's text (data.text_key)") from None
            ids = self.vocab.encode(record.channel_codes[0][: self.vocab.n_codebooks], self.pattern)
            example = pad_to_length(ids[..., : self.seq_len], self.seq_len, self.vocab.special_id("pad"))
            text_ids, text_mask = self.text.prefix([str(text)])
            yield {**example, "text_ids": text_ids[0], "text_mask": text_mask[0]}
