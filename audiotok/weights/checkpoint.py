"""Checkpoint formats: audiotok folders, transformers DAC folders and original descript ``.pth`` files.

Every format is read into a :class:`Checkpoint` whose state dict uses this package's module names,
either folded (``*.weight``) or with weight-norm parametrizations
(``*.parametrizations.weight.original0`` = g, ``original1`` = v), in float32: weights stored in
half precision (fp16, bf16) are upcast on reading. Every writer takes a ``dtype`` to store the
weights in (``torch.float16`` halves the file); a copy whose rounding changed the
:func:`codes_fingerprint` records the fingerprint it was rounded from (``decodes_codes_of``), so code
files written with the full-precision weights still decode with it.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..codes import check_fingerprint
from ..nn.config import DACConfig
from ..nn.model import DAC
from ..utils.untrusted import OptionalEntry, check_shape, read_json

FORMAT_NAME = "audiotok"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "README.md"  # the model card, kept with the weights when a model folder is saved again
_TRANSFORMERS_DECODES = "audiotok_decodes_codes_of"  # decodes_codes_of in a transformers config.json
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
    #: fingerprints (:func:`codes_fingerprint`) of other weights whose codes this model decodes as they
    #: were meant: those it was rounded from (saved in fp16 or bf16), whose codebooks it holds rounded.
    decodes_codes_of: tuple[str, ...] = ()


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


def weight_mismatches(weights: Mapping[str, torch.Tensor],
                      expected: Mapping[str, torch.Tensor]) -> tuple[list[str], list[str], list[str]]:
    """How ``weights`` differ from ``expected`` (a module's ``state_dict()``): the missing keys and the
    unexpected keys (sorted), and the keys whose shapes differ (in ``expected``'s order)."""
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    reshaped = [k for k in expected if k in weights and weights[k].shape != expected[k].shape]
    return missing, unexpected, reshaped


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
    missing, unexpected, reshaped = weight_mismatches(state_dict, expected)
    mismatched = [f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}" for k in reshaped]
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
    the decoder. Two models with the same fingerprint write the same codes; a copy stored in fp16 has
    another (its rounded encoder moves a few codes) and lists this one in ``decodes_codes_of``."""
    digest = hashlib.sha256()
    for name in sorted(k for k in state_dict if not k.startswith("decoder.")):
        digest.update(name.encode())
        digest.update(state_dict[name].detach().cpu().float().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


#: Storage dtypes of the checkpoint writers, by name (``None``: keep each tensor's dtype).
STORAGE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def storage_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """``dtype`` as a torch floating dtype to store weights in: ``None``, a torch dtype or a name of
    :data:`STORAGE_DTYPES` (``"fp16"``, also ``"float16"``); ``ValueError`` for anything else."""
    if dtype is None or (isinstance(dtype, torch.dtype) and dtype in STORAGE_DTYPES.values()):
        return dtype
    if isinstance(dtype, str):
        names = {**STORAGE_DTYPES, **{str(d).replace("torch.", ""): d for d in STORAGE_DTYPES.values()}}
        if dtype in names:
            return names[dtype]
    raise ValueError(f"weights are stored as {', '.join(STORAGE_DTYPES)}; got dtype {dtype!r}")


def upcast(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Floating tensors of lower precision (fp16, bf16) as float32 (exactly); others unchanged."""
    return {k: v.float() if v.is_floating_point() and v.element_size() < 4 else v for k, v in state_dict.items()}


def cast_weights(state_dict: dict[str, torch.Tensor], dtype: torch.dtype | str | None,
                 decodes_codes_of: tuple[str, ...] = ()) -> tuple[dict[str, torch.Tensor], tuple[str, ...]]:
    """``(weights, decodes_codes_of)`` to store: the floating tensors of ``state_dict`` (plain or with
    weight-norm parametrizations) in ``dtype`` (``None``: as they are), and the fingerprints whose
    codes the stored weights decode: ``decodes_codes_of`` and, when rounding changed
    :func:`codes_fingerprint`, the fingerprint of the weights before rounding (their codebooks, rounded,
    are the stored ones), less the stored weights' own. ``ValueError`` if a weight does not fit
    ``dtype`` (fp16 tops out at 65504).

    Rounding to fp16 keeps 99.7% of the bundled model's codes, and it decodes the same codes within
    64 to 75 dB SNR of float32 (see its model card); bf16 keeps fewer bits (97.5%, 37 to 51 dB)."""
    dtype = storage_dtype(dtype)
    decodes, out = list(decodes_codes_of), state_dict
    if dtype is not None:
        decodes.append(codes_fingerprint(fold_state_dict(upcast(state_dict))))
        out = {}
        for key, value in state_dict.items():
            if value.is_floating_point() and value.dtype != dtype:
                value = value.to(dtype)
                if not torch.isfinite(value).all():
                    raise ValueError(f"{key} has values beyond the range of {dtype}: store the weights in another "
                                     f"dtype")
            out[key] = value
    after = codes_fingerprint(fold_state_dict(upcast(out)))  # what a reader builds
    return out, tuple(f for f in dict.fromkeys(decodes) if f != after)


def _fingerprints(value: object, where: str) -> tuple[str, ...]:
    """A stored ``decodes_codes_of`` (absent: none), checked: a list of 16-hex-digit fingerprints."""
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(f, str) for f in value):
        raise ValueError(f"{where}: decodes_codes_of must be a list of fingerprints, got {value!r}")
    return tuple(str(check_fingerprint(f, f"{where}: decodes_codes_of")) for f in value)


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
    state_dict = upcast(from_original_keys(blob["state_dict"], config))
    model_id = blob["metadata"].get("model_id")  # written by audiotok; the original package has none
    decodes = _fingerprints(blob["metadata"].get("decodes_codes_of"), f"{path}: metadata")
    return Checkpoint(config, state_dict, model_id if isinstance(model_id, str) and model_id else path.stem,
                      decodes_codes_of=decodes)


def save_original(checkpoint: Checkpoint, path: str | os.PathLike, dtype: torch.dtype | str | None = None) -> None:
    """Write the original package's ``.pth`` layout: weight_g / weight_v keys and metadata kwargs (and
    the ``model_id`` and ``decodes_codes_of``, which the original package ignores), the weights in
    ``dtype`` (default: as they are; see :func:`cast_weights`)."""
    state_dict = checkpoint.state_dict
    if not any(k.endswith(_G) for k in state_dict):
        state_dict = build_model(checkpoint, folded=False).state_dict()
    state_dict, decodes = cast_weights(state_dict, dtype, checkpoint.decodes_codes_of)
    kwargs = checkpoint.config.to_dict()
    metadata: dict = {"kwargs": kwargs, "model_id": checkpoint.model_id}
    if decodes:
        metadata["decodes_codes_of"] = list(decodes)
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
        return upcast(load_file(path))
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
    """Read an audiotok folder or a transformers DAC folder (``config.json`` + ``model.safetensors``),
    weights stored in fp16 or bf16 upcast to float32."""
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
        decodes = _fingerprints(data.get("decodes_codes_of"), str(config_path))
    else:
        check_shape(data, TRANSFORMERS_CONFIG_SHAPE, config_path)
        try:
            config = config_from_transformers(data)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{config_path}: invalid transformers DAC config: {e}") from None
        model_id = data.get("_name_or_path") or folder.name
        notice = None
        decodes = _fingerprints(data.get(_TRANSFORMERS_DECODES), str(config_path))
    card = (folder / CARD_FILE).read_text() if (folder / CARD_FILE).is_file() else None
    return Checkpoint(config, _read_safetensors(folder / WEIGHTS_FILE), str(model_id), notice, card, decodes)


def _plain_weights(checkpoint: Checkpoint) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in fold_state_dict(checkpoint.state_dict).items()}


def save_folder(checkpoint: Checkpoint, folder: str | os.PathLike, dtype: torch.dtype | str | None = None) -> None:
    """Write an audiotok folder: config.json (with the notice and ``decodes_codes_of``), plain (folded)
    weights in model.safetensors, in ``dtype`` (default: as they are; ``torch.float16`` or ``"fp16"``
    halves the file, see :func:`cast_weights`), and the model card as README.md."""
    folder = Path(folder)
    weights, decodes = cast_weights(_plain_weights(checkpoint), dtype, checkpoint.decodes_codes_of)
    folder.mkdir(parents=True, exist_ok=True)
    meta: dict = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "model_id": checkpoint.model_id,
                  "config": checkpoint.config.to_dict(), "architecture_hash": checkpoint.config.architecture_hash()}
    if checkpoint.notice:
        meta["notice"] = checkpoint.notice
    if decodes:
        meta["decodes_codes_of"] = list(decodes)
    save_file(weights, folder / WEIGHTS_FILE, metadata={"format": "pt"})
    (folder / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    _write_card(checkpoint, folder)


def _write_card(checkpoint: Checkpoint, folder: Path) -> None:
    if checkpoint.card:
        (folder / CARD_FILE).write_text(checkpoint.card)


def save_transformers(checkpoint: Checkpoint, folder: str | os.PathLike,
                      dtype: torch.dtype | str | None = None) -> None:
    """Write a folder that ``transformers.DacModel.from_pretrained`` loads with every weight used (the
    model id as ``_name_or_path``, and the model card), the weights in ``dtype`` (as in :func:`save_folder`)."""
    config = {**config_to_transformers(checkpoint.config), "_name_or_path": checkpoint.model_id}
    weights, decodes = cast_weights(_plain_weights(checkpoint), dtype, checkpoint.decodes_codes_of)
    if decodes:
        config[_TRANSFORMERS_DECODES] = list(decodes)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(weights, folder / WEIGHTS_FILE, metadata={"format": "pt"})
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
