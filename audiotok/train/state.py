"""Run checkpoints: each one a folder with inference weights and everything an exact resume needs.

    <run>/latest/      config.json + model.safetensors (plain weights: AudioTokenizer loads them)
                       train_state.pt (generator with weight norm, discriminator when the GAN is on, optimizers,
                       schedulers, step, data position, RNG states; plain tensors and dicts only,
                       read back with ``torch.load(weights_only=True)``)
    <run>/best/        the same, for the best validation mel distance so far
    <run>/step_<N>/    milestones
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import Checkpoint, save_folder

STATE_FILE = "train_state.pt"


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@contextmanager
def replace_folder(folder: Path) -> Iterator[Path]:
    """Write ``folder`` atomically: the caller fills the yielded temporary sibling, which is then swapped
    in by renames (an interrupted write leaves the previous ``folder`` as it was)."""
    folder = Path(folder)
    tmp = folder.with_name(f".{folder.name}.tmp")
    old = folder.with_name(f".{folder.name}.old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    yield tmp
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)


def save_run_checkpoint(folder: Path, generator: Checkpoint, state: dict[str, Any]) -> None:
    """Write ``folder`` (inference weights and the training state) atomically."""
    with replace_folder(folder) as tmp:
        save_folder(generator, tmp)
        torch.save(state, tmp / STATE_FILE)


def load_train_state(folder: Path) -> dict[str, Any]:
    path = Path(folder) / STATE_FILE
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: unreadable training state: {e}") from e
