"""Checkpoint formats: audiotok folders, transformers DAC folders and original descript ``.pth`` files.

Every format is read into a :class:`Checkpoint` whose state dict uses this package's module names,
either folded (``*.weight``) or with weight-norm parametrizations
(``*.parametrizations.weight.original0`` = g, ``original1`` = v).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .config import DACConfig
from .model import DAC
from .untrusted import OptionalEntry, check_shape, read_json

FORMAT_NAME = "audiotok"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "README.md"  # the model card, kept with the weights when a model folder is saved again
_G = "parametrizations.weight.original0"
_V = "parametrizations.weight.original1"


@dataclass
class Checkpoint:
    """A generator's config, its weights (this package's key names), a name for it and what travels
    with it: a notice shown on loading and the model card (``README.md`` of its folder)."""

    config: DACConfig
    state_dict: dict[str, torch.Tensor]
    model_id: str
    notice: str | None = None  # shown to whoever loads the model (e.g. "early checkpoint")
    card: str | None = None


# ---------------------------------------------------------------------------------------------
# Weight norm in state-dict space


def fold_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Turn every (g, v) pair into the plain weight ``g * v / ||v||`` (norm over all dims but 0)."""
    out = {}
    for key, value in state_dict.items():
        if key.endswith(_V):
            continue
        if key.endswith(_G):
            prefix = key[: -len(_G)]
            v = state_dict.get(prefix + _V)
            if v is None:
                raise ValueError(f"checkpoint has {key} but no matching {prefix + _V}")
            out[prefix + "weight"] = torch._weight_norm(v, value, 0)
        else:
            out[key] = value
    return out


def unfold_state_dict(state_dict: dict[str, torch.Tensor], weight_norm_keys: set[str]) -> dict[str, torch.Tensor]:
    """Give the plain weights named in ``weight_norm_keys`` a (g, v) form: v = w, g = ||w||.

    g is the norm the weight-norm kernel itself computes (not ``norm_except_dim``, which rounds
    differently), so g / ||v|| is exactly 1 and folding gives back ``w`` bit for bit: a fine-tune's
    untouched (e.g. frozen) weights come out as they went in.
    """
    out = {}
    for key, value in state_dict.items():
        if key in weight_norm_keys:
            prefix = key[: -len("weight")]
            shape = (value.shape[0],) + (1,) * (value.dim() - 1)
            out[prefix + _G] = torch._weight_norm_interface(value, value.new_ones(shape), 0)[1].reshape(shape)
            out[prefix + _V] = value.clone()
        else:
            out[key] = value
    return out


def load_weights(model: DAC, state_dict: dict[str, torch.Tensor]) -> DAC:
    """Load ``state_dict`` into ``model`` in whichever weight-norm form the model has, strictly.

    Raises ``ValueError`` naming missing and unexpected keys and shape mismatches.
    """
    parametrized = not model.is_folded
    if parametrized and not any(k.endswith(_G) for k in state_dict):
        wn_keys = {k[: -len(_G)] + "weight" for k in model.state_dict() if k.endswith(_G)}
        state_dict = unfold_state_dict(state_dict, wn_keys)
    elif not parametrized:
        state_dict = fold_state_dict(state_dict)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mismatched = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in state_dict and state_dict[k].shape != expected[k].shape
    ]
    if missing or unexpected or mismatched:
        problems = []
        kinds = (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mismatched))
        for label, items in kinds:
            if items:
                shown = ", ".join(items[:8]) + (f", ... ({len(items)} in all)" if len(items) > 8 else "")
                problems.append(f"{label}: {shown}")
        raise ValueError(
            "checkpoint weights do not fit this architecture (is it a checkpoint of another model, or is its "
            "config wrong?); " + "; ".join(problems)
        )
    model.load_state_dict(state_dict, strict=True)
    return model


def codes_fingerprint(state_dict: dict[str, torch.Tensor]) -> str:
    """16 hex digits of SHA-256 over the plain (folded) weights that decide the codes: everything but
    the decoder. Two models with the same fingerprint write the same codes."""
    digest = hashlib.sha256()
    for name in sorted(k for k in state_dict if not k.startswith("decoder.")):
        digest.update(name.encode())
        digest.update(state_dict[name].detach().cpu().float().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def build_model(checkpoint: Checkpoint, folded: bool = True) -> DAC:
    """A :class:`DAC` holding the checkpoint's weights; ``folded=False`` keeps trainable weight norm."""
    model = DAC(checkpoint.config)
    if folded:
        model.fold_weight_norm()
    return load_weights(model, checkpoint.state_dict)


# ---------------------------------------------------------------------------------------------
# Original descript .pth <-> our names

_RES_UNIT = {"snake1": "block.0", "conv1": "block.1", "snake2": "block.2", "conv2": "block.3"}


def _module_map(config: DACConfig) -> dict[str, str]:
    """Our module path -> the original package's module path, for every module that holds weights."""
    m: dict[str, str] = {"encoder.conv1": "encoder.block.0", "decoder.conv1": "decoder.model.0"}

    def res_unit(ours: str, orig: str) -> None:
        for a, b in _RES_UNIT.items():
            m[f"{ours}.{a}"] = f"{orig}.{b}"

    n = len(config.encoder_rates)
    for i in range(n):
        for j in range(3):
            res_unit(f"encoder.block.{i}.res_unit{j + 1}", f"encoder.block.{i + 1}.block.{j}")
        m[f"encoder.block.{i}.snake1"] = f"encoder.block.{i + 1}.block.3"
        m[f"encoder.block.{i}.conv1"] = f"encoder.block.{i + 1}.block.4"
    m["encoder.snake1"] = f"encoder.block.{n + 1}"
    m["encoder.conv2"] = f"encoder.block.{n + 2}"
    n = len(config.decoder_rates)
    for i in range(n):
        m[f"decoder.block.{i}.snake1"] = f"decoder.model.{i + 1}.block.0"
        m[f"decoder.block.{i}.conv_t1"] = f"decoder.model.{i + 1}.block.1"
        for j in range(3):
            res_unit(f"decoder.block.{i}.res_unit{j + 1}", f"decoder.model.{i + 1}.block.{j + 2}")
    m["decoder.snake1"] = f"decoder.model.{n + 1}"
    m["decoder.conv2"] = f"decoder.model.{n + 2}"
    return m


_LEAVES = {_G: "weight_g", _V: "weight_v", "weight": "weight", "bias": "bias", "alpha": "alpha"}


def _split(key: str) -> tuple[str, str]:
    for leaf in (_G, _V, "weight", "bias", "alpha"):
        if key.endswith("." + leaf):
            return key[: -len(leaf) - 1], leaf
    raise ValueError(f"unrecognized parameter name {key!r}")


def to_original_keys(state_dict: dict[str, torch.Tensor], config: DACConfig) -> dict[str, torch.Tensor]:
    """Rename a parametrized state dict to the original package's names (weight_g / weight_v)."""
    modules = _module_map(config)
    out = {}
    for key, value in state_dict.items():
        module, leaf = _split(key)
        out[f"{modules.get(module, module)}.{_LEAVES[leaf]}"] = value
    return out


def from_original_keys(state_dict: dict[str, torch.Tensor], config: DACConfig) -> dict[str, torch.Tensor]:
    """Rename an original-package state dict to this package's parametrized names."""
    modules = {v: k for k, v in _module_map(config).items()}
    leaves = {v: k for k, v in _LEAVES.items()}
    out = {}
    for key, value in state_dict.items():
        module, _, leaf = key.rpartition(".")
        out[f"{modules.get(module, module)}.{leaves.get(leaf, leaf)}"] = value
    return out


_PTH_KWARGS = ("encoder_dim", "encoder_rates", "latent_dim", "decoder_dim", "decoder_rates", "n_codebooks",
               "codebook_size", "codebook_dim", "quantizer_dropout", "sample_rate")


def load_original(path: str | os.PathLike) -> Checkpoint:
    """Read an original descript-audio-codec ``.pth`` file, without running any code from it."""
    path = Path(path)
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors, truncated files, non-plain objects
        raise ValueError(f"{path}: not a loadable DAC .pth checkpoint (read with weights_only=True): {e}") from e
    if not isinstance(blob, dict) or "state_dict" not in blob:
        raise ValueError(f"{path}: expected a dict with 'state_dict' and 'metadata' (an original DAC .pth file)")
    metadata = blob.get("metadata")
    kwargs = metadata.get("kwargs") if isinstance(metadata, dict) else None
    if not isinstance(kwargs, dict):
        raise ValueError(f"{path}: no metadata.kwargs in the checkpoint; cannot tell its architecture")
    try:
        config = DACConfig(**{k: kwargs[k] for k in _PTH_KWARGS if k in kwargs and kwargs[k] is not None})
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: invalid architecture in metadata.kwargs: {e}") from None
    state_dict = from_original_keys(blob["state_dict"], config)
    model_id = blob["metadata"].get("model_id")  # written by audiotok; the original package has none
    return Checkpoint(config, state_dict, model_id if isinstance(model_id, str) and model_id else path.stem)


def save_original(checkpoint: Checkpoint, path: str | os.PathLike) -> None:
    """Write the original package's ``.pth`` layout: weight_g / weight_v keys and metadata kwargs (and
    the ``model_id``, which the original package ignores)."""
    state_dict = checkpoint.state_dict
    if not any(k.endswith(_G) for k in state_dict):
        state_dict = build_model(checkpoint, folded=False).state_dict()
    kwargs = checkpoint.config.to_dict()
    metadata = {"kwargs": kwargs, "model_id": checkpoint.model_id}
    torch.save({"state_dict": to_original_keys(state_dict, checkpoint.config), "metadata": metadata}, path)


# ---------------------------------------------------------------------------------------------
# transformers DAC folders


def config_from_transformers(data: dict) -> DACConfig:
    """Our config from a transformers ``DacConfig`` dict; its ``hop_length`` is ignored (often wrong)."""
    down = data.get("downsampling_ratios", [2, 4, 8, 8])
    return DACConfig(  # values as stored: DACConfig checks each one by name
        sample_rate=data.get("sampling_rate", 16000),
        encoder_dim=data.get("encoder_hidden_size", 64),
        encoder_rates=down,
        decoder_dim=data.get("decoder_hidden_size", 1536),
        decoder_rates=data.get("upsampling_ratios") or (down[::-1] if isinstance(down, list) else down),
        n_codebooks=data.get("n_codebooks", 9),
        codebook_size=data.get("codebook_size", 1024),
        codebook_dim=data.get("codebook_dim", 8),
        quantizer_dropout=data.get("quantizer_dropout", 0.0),
    )


def config_to_transformers(config: DACConfig) -> dict:
    """A transformers ``DacConfig`` dict; raises if transformers cannot represent the architecture."""
    default_latent = config.encoder_dim * 2 ** len(config.encoder_rates)
    if config.latent_dim != default_latent:
        raise ValueError(
            f"transformers.DacModel fixes the latent size to encoder_dim * 2**len(encoder_rates) = {default_latent}; "
            f"this model has latent_dim={config.latent_dim} and cannot be exported to that format"
        )
    if config.decoder_rates != config.encoder_rates[::-1]:
        raise ValueError(
            f"transformers.DacModel needs decoder rates that mirror the encoder rates; this model has "
            f"encoder_rates={config.encoder_rates}, decoder_rates={config.decoder_rates}"
        )
    return {
        "architectures": ["DacModel"],
        "model_type": "dac",
        "sampling_rate": config.sample_rate,
        "encoder_hidden_size": config.encoder_dim,
        "downsampling_ratios": list(config.encoder_rates),
        "decoder_hidden_size": config.decoder_dim,
        "upsampling_ratios": list(config.decoder_rates),
        "n_codebooks": config.n_codebooks,
        "codebook_size": config.codebook_size,
        "codebook_dim": config.codebook_dim,
        "quantizer_dropout": config.quantizer_dropout,
        "commitment_loss_weight": 0.25,
        "codebook_loss_weight": 1.0,
        "hop_length": config.hop_length,
        "hidden_size": config.latent_dim,
    }


# ---------------------------------------------------------------------------------------------
# Folders (ours and transformers')


#: The entries of an audiotok folder's ``config.json`` (:func:`save_folder`) and of a transformers one
#: (its values are checked by :func:`config_from_transformers`).
AUDIOTOK_CONFIG_SHAPE = {"format": str, "format_version": OptionalEntry(int), "model_id": OptionalEntry(str),
                         "config": dict, "architecture_hash": OptionalEntry(str),
                         "notice": OptionalEntry((str, type(None)))}
TRANSFORMERS_CONFIG_SHAPE = {"_name_or_path": OptionalEntry(str)}


def _read_json(path: Path) -> dict:
    try:
        return read_json(path, dict)
    except OSError as e:
        raise ValueError(f"{path}: unreadable config file: {e}") from e


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ValueError(f"{path.parent}: no {path.name} next to {CONFIG_FILE}")
    try:
        return load_file(path)
    except Exception as e:
        raise ValueError(f"{path}: corrupt or unreadable safetensors file: {e}") from e


def _folder_format(config_path: Path, data: dict) -> str:
    if data.get("format") == FORMAT_NAME:
        return "audiotok"
    if data.get("model_type") == "dac":
        return "transformers"
    raise ValueError(
        f"{config_path}: neither an audiotok config (format={FORMAT_NAME!r}) nor a transformers DAC config "
        f"(model_type='dac'), found model_type={data.get('model_type')!r}"
    )


def load_folder(folder: str | os.PathLike) -> Checkpoint:
    """Read an audiotok folder or a transformers DAC folder (``config.json`` + ``model.safetensors``)."""
    folder = Path(folder)
    config_path = folder / CONFIG_FILE
    if not config_path.is_file():
        raise ValueError(f"{folder}: no {CONFIG_FILE}; not an audiotok or transformers DAC model folder")
    data = _read_json(config_path)
    if _folder_format(config_path, data) == "audiotok":
        check_shape(data, AUDIOTOK_CONFIG_SHAPE, config_path)
        if data.get("format_version", 0) > FORMAT_VERSION:
            raise ValueError(f"{folder}: written by a newer audiotok (format_version {data['format_version']!r})")
        try:
            config = DACConfig.from_dict(data["config"])
        except (TypeError, ValueError) as e:
            raise ValueError(f"{config_path}: invalid model config: {e}") from None
        stored = data.get("architecture_hash")
        if stored is not None and stored != config.architecture_hash():
            raise ValueError(f"{config_path}: architecture_hash {stored!r} does not match its config "
                             f"({config.architecture_hash()}): the config was edited after the model was saved")
        model_id = data.get("model_id") or folder.name
        notice = data.get("notice")
    else:
        check_shape(data, TRANSFORMERS_CONFIG_SHAPE, config_path)
        try:
            config = config_from_transformers(data)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{config_path}: invalid transformers DAC config: {e}") from None
        model_id = data.get("_name_or_path") or folder.name
        notice = None
    card = (folder / CARD_FILE).read_text() if (folder / CARD_FILE).is_file() else None
    return Checkpoint(config, _read_safetensors(folder / WEIGHTS_FILE), str(model_id), notice, card)


def _plain_weights(checkpoint: Checkpoint) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in fold_state_dict(checkpoint.state_dict).items()}


def save_folder(checkpoint: Checkpoint, folder: str | os.PathLike) -> None:
    """Write an audiotok folder: config.json (with the notice), plain (folded) weights in
    model.safetensors and the model card as README.md."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "model_id": checkpoint.model_id,
            "config": checkpoint.config.to_dict(), "architecture_hash": checkpoint.config.architecture_hash()}
    if checkpoint.notice:
        meta["notice"] = checkpoint.notice
    save_file(_plain_weights(checkpoint), folder / WEIGHTS_FILE, metadata={"format": "pt"})
    (folder / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    _write_card(checkpoint, folder)


def _write_card(checkpoint: Checkpoint, folder: Path) -> None:
    if checkpoint.card:
        (folder / CARD_FILE).write_text(checkpoint.card)


def save_transformers(checkpoint: Checkpoint, folder: str | os.PathLike) -> None:
    """Write a folder that ``transformers.DacModel.from_pretrained`` loads with every weight used (the
    model id as ``_name_or_path``, and the model card)."""
    config = {**config_to_transformers(checkpoint.config), "_name_or_path": checkpoint.model_id}
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(_plain_weights(checkpoint), folder / WEIGHTS_FILE, metadata={"format": "pt"})
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    _write_card(checkpoint, folder)


def locate_checkpoint(path: str | os.PathLike) -> tuple[str, Path]:
    """``(format, location)`` of a local checkpoint: ``"original"`` and its ``.pth`` file, or
    ``"audiotok"`` / ``"transformers"`` and the model folder. ``path`` is a model folder, its
    ``config.json`` or ``model.safetensors``, a training run folder (its ``latest`` generator) or
    a ``.pth`` file. Raises ``FileNotFoundError`` if missing and ``ValueError`` for anything else."""
    path = Path(path)
    if path.is_dir():
        if not (path / CONFIG_FILE).exists() and (path / "latest" / CONFIG_FILE).exists():
            path = path / "latest"  # a training run: its latest generator
    elif path.is_file():
        if path.suffix in (".pth", ".pt"):
            return "original", path
        if path.name not in (CONFIG_FILE, WEIGHTS_FILE):
            raise ValueError(f"{path}: unsupported checkpoint file; expected a model folder or an original DAC .pth")
        path = path.parent
    else:
        raise FileNotFoundError(f"{path}: no such file or folder")
    config_path = path / CONFIG_FILE
    if not config_path.is_file():
        raise ValueError(f"{path}: no {CONFIG_FILE}; not an audiotok or transformers DAC model folder")
    return _folder_format(config_path, _read_json(config_path)), path


def detect_format(path: str | os.PathLike) -> str:
    """The checkpoint format of a local path: ``"audiotok"``, ``"transformers"`` or ``"original"``
    (see :func:`locate_checkpoint`)."""
    return locate_checkpoint(path)[0]


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read a local checkpoint of any supported format (see :func:`locate_checkpoint`)."""
    fmt, location = locate_checkpoint(path)
    return load_original(location) if fmt == "original" else load_folder(location)
