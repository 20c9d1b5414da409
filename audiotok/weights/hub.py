"""Resolving a ``from_pretrained`` source to a local checkpoint path."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

log = logging.getLogger("audiotok")

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

PRETRAINED_DIR = Path(__file__).parent / "pretrained"
DEFAULT_MODEL = "default"
# The model_id the shipped model records (in its config.json and in every .atok file it writes).
DEFAULT_MODEL_ID = "audiotok-24khz-v0.6"
# Earlier bundled models whose code files the bundled model decodes as they were meant, with the
# `checkpoint.codes_fingerprint` of the encoder and quantizer that wrote them, which the bundled model
# lists in its `decodes_codes_of` (config.json). Empty: v0.6 and v0.5 each trained the encoder and
# quantizer further than the model before, and v0.4 re-trained those of v0.3 (whose fp16 copy decoded
# v0.2's codes): their code files decode only with an audiotok build that bundles them, or a model
# folder saved from one (`resolve` says so).
SAME_CODES_AS: dict[str, str] = {}

# Short names: ``default`` for the bundled model; the published Descript models on the Hugging Face
# hub by their hub name and by the name of their ``DACConfig`` preset.
ALIASES = {
    DEFAULT_MODEL: DEFAULT_MODEL_ID,
    "dac_44khz": "descript/dac_44khz",
    "dac_24khz": "descript/dac_24khz",
    "dac_16khz": "descript/dac_16khz",
    "44khz": "descript/dac_44khz",
    "24khz": "descript/dac_24khz",
    "16khz": "descript/dac_16khz",
}

#: Keyword arguments of ``from_pretrained`` passed on to ``huggingface_hub.snapshot_download``.
HUB_ARGUMENTS = ("revision", "cache_dir", "token", "local_files_only", "force_download")


def describe_names() -> str:
    """The model names ``resolve`` takes besides paths and hub ids, for ``--help`` and ``info``:
    ``default = <DEFAULT_MODEL_ID> (bundled), dac_44khz, 44khz = descript/dac_44khz, ...``."""
    by_target: dict[str, list[str]] = {}
    for name, target in ALIASES.items():
        by_target.setdefault(target, []).append(name)
    return "; ".join(f"{', '.join(names)} = {target}" + (" (bundled)" if target == DEFAULT_MODEL_ID else "")
                     for target, names in by_target.items())


def default_model_path() -> Path:
    """The model folder that ships inside the package; a clear error while none ships yet."""
    path = PRETRAINED_DIR / DEFAULT_MODEL
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            "this audiotok build ships no default model yet (it is trained with recipes/train.py and bundled "
            "in a later release). Pass a source instead: a model folder, an original DAC .pth file, or a hub "
            "id such as 'descript/dac_44khz'."
        )
    return path


def names_bundled_model(source: str | os.PathLike | None) -> bool:
    """True for the sources that load the bundled model: ``None``, its id, its alias ``default`` and the
    ids in ``SAME_CODES_AS``. A local folder named ``default`` is that folder, not the bundled model."""
    if source is None or str(source) in (DEFAULT_MODEL_ID, *SAME_CODES_AS):
        return True
    return str(source) == DEFAULT_MODEL and not Path(str(source)).exists()


def resolve(source: str | os.PathLike | None, **hub_arguments: Any) -> Path:
    """A local file or folder for ``source``: the default model (``None``, its id, ``default`` or the id
    of an earlier bundled model whose codes it decodes), a path, or a hub id or alias (cached or
    downloaded). ``hub_arguments`` (see :data:`HUB_ARGUMENTS`) go to ``snapshot_download`` for hub ids."""
    unknown = sorted(set(hub_arguments) - set(HUB_ARGUMENTS))
    if unknown:
        raise TypeError(f"unknown hub arguments {unknown}; known: {', '.join(HUB_ARGUMENTS)}")
    if source is None or names_bundled_model(source):
        if str(source) in SAME_CODES_AS:
            log.info("%s: using %s, which decodes its codes (only its decoder changed)", source, DEFAULT_MODEL_ID)
        return default_model_path()
    path = Path(source).expanduser()
    if path.exists():
        return path
    name = ALIASES.get(str(source), str(source))
    if name.startswith("audiotok-"):
        raise FileNotFoundError(
            f"{source!r} is not the model this audiotok release bundles ({DEFAULT_MODEL_ID!r}): codes it wrote "
            f"decode only with the audiotok release that bundled it, or with a folder saved from it"
        )
    if not looks_like_hub_id(name):
        raise FileNotFoundError(f"{source}: no such file or folder, and not a hub id like 'descript/dac_44khz'")
    return Path(_download(name, **hub_arguments))


def _download(repo_id: str, local_files_only: bool = False, force_download: bool = False, **kwargs: Any) -> str:
    from huggingface_hub import snapshot_download

    patterns = ["config.json", "*.safetensors", "*.pth", "README.md"]
    if not force_download:
        try:  # the cache first: works offline once downloaded
            return snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True, **kwargs)
        except Exception:
            if local_files_only:
                raise FileNotFoundError(
                    f"{repo_id!r} (revision {kwargs.get('revision') or 'main'}) is not in the local Hugging Face "
                    f"cache and local_files_only=True") from None
    try:
        return snapshot_download(repo_id, allow_patterns=patterns, force_download=force_download, **kwargs)
    except Exception as e:
        reason = " ".join(str(e).split())  # one line
        raise FileNotFoundError(
            f"could not load {repo_id!r} from the Hugging Face hub and it is not in the local cache "
            f"({type(e).__name__}: {reason}). Connect to the internet once to cache it, or pass a local path."
        ) from e


def looks_like_hub_id(source: str) -> bool:
    """``owner/name`` that is not a relative path (``./x``, ``../x``)."""
    return bool(_HUB_ID.match(source)) and not source.startswith(("./", "../"))
