"""Resolving a ``from_pretrained`` source to a local checkpoint path."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

log = logging.getLogger("audiotok")

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

# Short names for the published Descript models on the Hugging Face hub.
ALIASES = {
    "dac_44khz": "descript/dac_44khz",
    "dac_24khz": "descript/dac_24khz",
    "dac_16khz": "descript/dac_16khz",
}

PRETRAINED_DIR = Path(__file__).parent / "pretrained"
DEFAULT_MODEL = "default"
# The model_id the shipped model records (in its config.json and in every .atok file it writes).
DEFAULT_MODEL_ID = "audiotok-24khz-v0.3"
# Earlier bundled models whose codes the bundled model reads as they were meant, with the
# `checkpoint.codes_fingerprint` of their encoder and quantizer, which the bundled model shares (v0.3
# fine-tuned v0.2's decoder alone), so it writes the same codes.
SAME_CODES_AS = {"audiotok-24khz-v0.2": "98443b3c04d63f4f"}


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
    """True for the sources that load the bundled model: ``None``, its id and the ids in ``SAME_CODES_AS``."""
    return source is None or str(source) == DEFAULT_MODEL_ID or str(source) in SAME_CODES_AS


def resolve(source: str | os.PathLike | None) -> Path:
    """A local file or folder for ``source``: the default model (``None``, its id or the id of an earlier
    bundled model it writes the same codes as), a path, or a hub id (cached or downloaded)."""
    if source is None or names_bundled_model(source):
        if str(source) in SAME_CODES_AS:
            log.info("%s: using %s, which writes the same codes (only its decoder changed)", source, DEFAULT_MODEL_ID)
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
    return Path(_download(name))


def _download(repo_id: str) -> str:
    from huggingface_hub import snapshot_download

    patterns = ["config.json", "*.safetensors", "*.pth"]
    try:  # the cache first: works offline once downloaded
        return snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True)
    except Exception:
        pass
    try:
        return snapshot_download(repo_id, allow_patterns=patterns)
    except Exception as e:
        raise FileNotFoundError(
            f"could not load {repo_id!r} from the Hugging Face hub and it is not in the local cache "
            f"({type(e).__name__}: {e}). Connect to the internet once to cache it, or pass a local path."
        ) from e


def looks_like_hub_id(source: str) -> bool:
    """``owner/name`` that is not a relative path (``./x``, ``../x``)."""
    return bool(_HUB_ID.match(source)) and not source.startswith(("./", "../"))
