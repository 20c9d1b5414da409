"""Describing models, code files and code datasets, and converting models between checkpoint formats."""

from __future__ import annotations

import itertools
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..formats.codefile import CodeFile, read_header
from ..tokenizer import AudioTokenizer
from ..weights.checkpoint import detect_format, storage_dtype
from ..weights.hub import ALIASES, resolve

#: Checkpoint formats :func:`convert_model` writes.
CONVERT_FORMATS = ("audiotok", "transformers", "original")


def model_info(source: str | os.PathLike | None, device: str | None = None) -> dict[str, Any]:
    """Facts about a model (anything ``AudioTokenizer.from_pretrained`` takes), in display order."""
    path = resolve(source)
    fmt = detect_format(path)
    tok = AudioTokenizer.from_pretrained(source, device=device)
    c = tok.config
    params = {name: sum(p.numel() for p in getattr(tok.model, name).parameters())
              for name in ("encoder", "quantizer", "decoder")}
    aliases = [name for name, target in ALIASES.items() if target in (source, tok.model_id)]
    return {
        "model_id": tok.model_id,
        **({"aliases": ", ".join(aliases)} if aliases else {}),
        "format": fmt,
        "path": str(path),
        "sample_rate": c.sample_rate,
        "hop_length": c.hop_length,
        "frame_rate": round(c.frame_rate, 4),
        "codebooks": f"{c.n_codebooks} x {c.codebook_size} x {c.codebook_dim}",
        "n_codebooks": c.n_codebooks,
        "codebook_size": c.codebook_size,
        "codebook_dim": c.codebook_dim,
        "latent_dim": c.latent_dim,
        "bitrate_kbps": round(c.bitrate() / 1000, 3),
        "params_encoder": params["encoder"],
        "params_quantizer": params["quantizer"],
        "params_decoder": params["decoder"],
        "params_total": sum(params.values()),
        "config_hash": c.architecture_hash(),
        "codes_fingerprint": tok.codes_fingerprint,
        **({"decodes_codes_of": ", ".join(tok.decodes_codes_of)} if tok.decodes_codes_of else {}),
    }


def code_file_info(path: str | os.PathLike) -> dict[str, Any]:
    """The header fields and code shape of an ``.atok`` file (the whole file is read and checked)."""
    path = Path(path)
    cf = CodeFile.load(path)  # checks the checksum, if the file records one
    header = read_header(path)
    c, k, f = cf.shape
    return {
        "file": str(path),
        "format": "audiotok-codes",
        "format_version": header.format_version,
        "model_id": cf.codec.model_id,
        "config_hash": cf.codec.config_hash,
        "codes_fingerprint": cf.codec.codes_fingerprint or "(not recorded)",
        "crc32": f"{header.crc32} (verified)" if header.crc32 else "(not recorded)",
        "sample_rate": cf.sample_rate,
        "hop_length": cf.hop_length,
        "n_codebooks": cf.n_codebooks,
        "codebook_size": cf.codebook_size,
        "num_samples": cf.num_samples,
        "source_sample_rate": cf.source_sample_rate,
        "channels": cf.channels,
        "duration_s": round(cf.duration, 6),
        "packing": cf.packing,
        "code_shape": [c, k, f],
        "file_bytes": path.stat().st_size,
    }


def code_dataset_info(path: str | os.PathLike, max_records: int = 2000) -> dict[str, Any]:
    """What a language model will see in a code dataset (a folder or URL, :mod:`audiotok.formats.codedataset`): its
    writer, size and token rate, and per codebook the distinct codes, the perplexity (``2 ** H``) and
    the entropy in bits of the code histogram over the first ``max_records`` records (every channel
    of a per-channel record counts)."""
    from ..formats.codedataset import CodeDataset
    from ..metrics import codebook_utilization

    if max_records < 1:
        raise ValueError(f"max_records must be at least 1, got {max_records}")
    dataset = CodeDataset(path)
    config, k = dataset.config, dataset.n_codebooks
    records = list(itertools.islice(iter(dataset), max_records))
    items = [channel for record in records for channel in record.codes.reshape(-1, k, record.codes.shape[-1])]
    if not items:
        raise ValueError(f"{path}: the code dataset has no records")
    usage = codebook_utilization(items, config.codebook_size)
    flat = np.concatenate(items, axis=1)
    bits = math.log2(config.codebook_size)
    return {
        "dataset": str(path),
        "format": "audiotok-code-dataset",
        "model_id": dataset.model_id,
        "config_hash": dataset.codec.config_hash,
        "codes_fingerprint": dataset.codes_fingerprint or "(not recorded)",
        "records": len(dataset),
        "audio_hours": dataset.manifest.audio_hours,
        "n_codebooks": k,
        "codebook_size": config.codebook_size,
        "frame_rate": round(config.frame_rate, 4),
        "tokens_per_second": round(config.frame_rate * k, 4),
        "records_read": len(records),
        "frames_read": int(flat.shape[1]),
        "distinct_codes": [int(np.unique(row).size) for row in flat],
        "perplexity": [round(p, 1) for p in usage.perplexity(config.codebook_size)],
        "entropy_bits": [round(u * bits, 3) for u in usage.per_codebook],
        "utilization": round(usage.overall, 4),
    }


def convert_model(source: str | os.PathLike | None, dst: str | os.PathLike, to: str,
                  device: str | None = None, model_id: str | None = None,
                  dtype: torch.dtype | str | None = None) -> Path:
    """Load ``source`` and write it to ``dst`` in format ``to`` (see :data:`CONVERT_FORMATS`).

    ``"audiotok"`` and ``"transformers"`` write a folder (with the model card); ``"original"`` writes
    a ``.pth`` file. The copy keeps the source's model id (which code files it writes record) unless
    ``model_id`` is given. ``dtype`` (``"fp16"``, ``"bf16"``, ``"fp32"`` or a torch dtype): the
    precision the weights are stored in (default: float32, as loaded); see
    :func:`~audiotok.weights.checkpoint.cast_weights`.
    """
    dtype = storage_dtype(dtype)
    if to not in CONVERT_FORMATS:
        raise ValueError(f"unknown target format {to!r}; choose one of {', '.join(CONVERT_FORMATS)}")
    dst = Path(dst)
    src_path = resolve(source)
    if dst.exists() and dst.resolve() == src_path.resolve():
        raise ValueError(f"{dst}: the destination is the source; write the converted model elsewhere")
    if to == "original":
        if dst.suffix not in (".pth", ".pt"):
            raise ValueError(f"{dst}: an original DAC checkpoint is a file ending in .pth")
        if dst.is_dir():
            raise ValueError(f"{dst}: is a folder; give a .pth file path")
    elif dst.is_file():
        raise ValueError(f"{dst}: is a file; the {to} format is a folder")
    tok = AudioTokenizer.from_pretrained(source, device=device)
    if to == "audiotok":
        tok.save_pretrained(dst, model_id, dtype)
    elif to == "transformers":
        tok.export_transformers(dst, model_id, dtype)
    else:
        dst.parent.mkdir(parents=True, exist_ok=True)
        tok.export_original(dst, model_id, dtype)
    return dst
