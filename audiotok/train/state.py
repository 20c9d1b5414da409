"""Training run checkpoints: crash-safe folders with inference weights and everything an exact resume needs
(the codec trainer's and the prior trainer's).

A run folder (the codec trainer's files shown; the prior trainer's model files are its own)::

    <run>/checkpoints/step_<N>/    one complete checkpoint per saved step N: config.json +
                                   model.safetensors (plain weights: AudioTokenizer loads them) and
                                   train_state.pt (generator with weight norm, discriminator when the GAN
                                   is on, optimizers, schedulers, step, best validation mel distance,
                                   data position and the training config; plain tensors and dicts only,
                                   read back with ``torch.load(weights_only=True)``)
    <run>/latest -> checkpoints/step_<N>     symbolic links: the newest checkpoint,
    <run>/best -> checkpoints/step_<M>       the best validation mel distance so far,
    <run>/step_<K> -> checkpoints/step_<K>   and milestones, kept for good

Saving step N (one atomic switch): the files are written into ``checkpoints/.step_N.tmp``, each
fsynced, the folder fsynced and renamed to ``checkpoints/step_N``, and ``checkpoints/`` fsynced: a
folder under ``checkpoints/`` without a leading dot is always whole. Then each link is replaced
atomically (a new link under a temporary name moved over the old one with ``os.replace``), the run
folder is fsynced, and only then are the checkpoints that no link names any more deleted. A crash at
any point leaves every complete checkpoint that existed before it, plus possibly the new one; the next
run resumes from the newest complete checkpoint whichever links were updated.

Runs written before this layout (real ``latest/``, ``best/`` and ``step_N/`` folders, and the
``.latest.old`` / ``.latest.tmp`` folders a crash between their renames left) resume as they are:
their folders are candidates too when their training state loads. The first save replaces ``latest/``
(and ``best/`` when it improves) by links; a ``best/`` folder that stays best is moved under
``checkpoints/`` and linked; leftover ``.*.old`` / ``.*.tmp`` folders are deleted once the new
checkpoint is durable; old ``step_N/`` milestones stay where they are.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import Any

import torch

from ..io import fsync_dir, fsync_file

log = logging.getLogger("audiotok.train")

STATE_FILE = "train_state.pt"
CHECKPOINTS = "checkpoints"
_STEP = re.compile(r"step_(\d+)")
_LEGACY = re.compile(r"(latest|best|step_\d+)|\.(latest|best|step_\d+)\.(old|tmp)")
_LEGACY_LEFTOVER = re.compile(r"\.(latest|best|step_\d+)\.(old|tmp)")


def load_train_state(folder: Path) -> dict[str, Any]:
    """The training state of a checkpoint folder; ``ValueError`` when it is missing or unreadable."""
    path = Path(folder) / STATE_FILE
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: unreadable training state: {e}") from e


def _legacy_step(folder: Path) -> int | None:
    """The step of a checkpoint folder written before this layout; ``None`` when its state does not load
    (a folder a crash left half written)."""
    try:
        state = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True, mmap=True)
        return int(state["step"])
    except Exception:
        return None


def _candidates(run: Path) -> list[tuple[int, Path]]:
    """``(step, folder)`` of every complete checkpoint of ``run``, in both layouts."""
    found = []
    checkpoints = run / CHECKPOINTS
    if checkpoints.is_dir():
        for path in checkpoints.iterdir():
            match = _STEP.fullmatch(path.name)
            if match and path.is_dir():
                found.append((int(match[1]), path))
    if run.is_dir():
        for path in run.iterdir():
            if _LEGACY.fullmatch(path.name) and path.is_dir() and not path.is_symlink():
                step = _legacy_step(path)
                if step is not None:
                    found.append((step, path))
    return found


def newest_checkpoint(run: str | os.PathLike) -> tuple[Path, dict[str, Any]] | None:
    """The newest complete checkpoint of ``run`` and its training state; ``None`` when it has none.

    Every complete checkpoint counts, whatever ``latest`` names (a crash may have come between writing a
    checkpoint and moving the link). One whose state does not load is skipped with a warning.
    """
    for step, folder in sorted(_candidates(Path(run)), key=lambda c: c[0], reverse=True):
        try:
            return folder, load_train_state(folder)
        except ValueError as e:
            log.warning("skipping checkpoint %s (step %d): %s", folder, step, e)
    return None


def _save_state(state: dict[str, Any], path: Path) -> None:
    torch.save(state, path)


def _write(folder: Path, write: Callable[[Path], None], state: dict[str, Any]) -> None:
    """The checkpoint's files in ``folder``, each durable, and the folder's entries durable."""
    folder.mkdir()
    write(folder)
    _save_state(state, folder / STATE_FILE)
    for path in folder.iterdir():
        fsync_file(path)
    fsync_dir(folder)


def _link(run: Path, name: str, target: Path) -> None:
    """Point ``run/name`` at ``target``, atomically (a folder of the earlier layout is replaced)."""
    path, tmp = run / name, run / f".{name}.link"
    tmp.unlink(missing_ok=True)
    os.symlink(os.path.relpath(target, run), tmp)
    if path.is_dir() and not path.is_symlink():  # an earlier layout's folder: the new checkpoint is durable
        shutil.rmtree(path)
    os.replace(tmp, path)


def _adopt_best(run: Path) -> None:
    """Move an earlier layout's ``best/`` folder under ``checkpoints/`` and link it (finishing an
    adoption a crash interrupted)."""
    best, pending = run / "best", run / ".best.link"
    if not best.exists() and pending.exists():  # the folder was moved, the link not yet in place
        os.replace(pending, best)
    if not best.is_dir() or best.is_symlink():
        return
    step = _legacy_step(best)
    if step is None:
        log.warning("%s: its training state does not load; left as it is", best)
        return
    target = run / CHECKPOINTS / f"step_{step}"
    if target.exists():  # the same step's checkpoint: the same state
        _link(run, "best", target)
        return
    pending.unlink(missing_ok=True)
    os.symlink(os.path.relpath(target, run), pending)
    os.replace(best, target)
    fsync_dir(target.parent)
    os.replace(pending, best)


def _collect_garbage(run: Path) -> None:
    """Delete what no link names: checkpoints superseded by durable newer ones, leftovers of crashed saves
    (temporary folders and links, and an earlier layout's ``.*.old`` / ``.*.tmp`` folders)."""
    linked = {(run / os.readlink(p)).resolve() for p in run.iterdir() if p.is_symlink() and not p.name.startswith(".")}
    for path in (run / CHECKPOINTS).iterdir():
        if path.name.startswith(".") or path.resolve() not in linked:
            shutil.rmtree(path)
    for path in run.iterdir():
        if path.is_symlink() and path.name.startswith("."):
            path.unlink()
        elif _LEGACY_LEFTOVER.fullmatch(path.name) and path.is_dir():
            shutil.rmtree(path)


def save_checkpoint(run: str | os.PathLike, state: dict[str, Any], write: Callable[[Path], None], best: bool = False,
                    milestone: bool = False) -> Path:
    """Save the checkpoint of step ``state["step"]`` and point ``latest`` (and ``best``, and a milestone
    link ``step_<N>`` when asked) at it; returns its folder. ``write(folder)`` writes the model's files
    (e.g. :func:`~audiotok.checkpoint.save_folder`); the training state goes beside them as
    ``train_state.pt``. See the module docstring for the order of operations that makes this crash safe."""
    run = Path(run)
    step = int(state["step"])
    checkpoints = run / CHECKPOINTS
    checkpoints.mkdir(parents=True, exist_ok=True)
    folder, tmp = checkpoints / f"step_{step}", checkpoints / f".step_{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)  # a crashed save's leftover: never complete
    _write(tmp, write, state)
    if folder.exists():  # one that resume skipped as unreadable: the new one replaces it
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    fsync_dir(checkpoints)
    names = ["latest"] + (["best"] if best else []) + ([f"step_{step}"] if milestone else [])
    for name in names:
        _link(run, name, folder)
    if not best:
        _adopt_best(run)
    fsync_dir(run)
    _collect_garbage(run)
    return folder


#: What a resumed codec run shares with the run: its state cannot be loaded otherwise (the generator's
#: architecture, the discriminator, the trained parameters). ``quantizer_dropout`` may change.
CODEC_RESUME_SETTINGS = ("model", "discriminator", "train.freeze")
CODEC_RESUME_MAY_CHANGE = ("model.quantizer_dropout",)


def check_resumable(saved: dict[str, Any], current: dict[str, Any], folder: Path, compared: Sequence[str],
                    may_change: Collection[str] = (),
                    advice: str = "Resume with the run's settings, or start a new --save-path") -> None:
    """Raise ``ValueError`` naming every setting that differs between a run's saved training config and
    the current one, among the ``compared`` ones: whole sections (``"model"``) or single settings
    (``"train.freeze"``), except the settings in ``may_change`` (``"section.key"``). A setting that one
    of the two configs lacks (added to the code since the run) is not compared: its default keeps the
    earlier behaviour. ``advice`` ends the message."""
    differences = []
    for key in compared:
        section, _, leaf = key.partition(".")
        old, new = saved.get(section) or {}, current.get(section) or {}
        if leaf:
            old, new = {leaf: old.get(leaf)}, {leaf: new.get(leaf)}
        for name in sorted(set(old) & set(new)):
            path = f"{section}.{name}"
            if path not in may_change and old[name] != new[name]:
                differences.append(f"{path}: {old[name]!r} in the run, {new[name]!r} now")
    if differences:
        raise ValueError(
            f"{folder}: the run was trained with another configuration, so its state cannot be resumed: "
            + "; ".join(differences) + f". {advice}"
        )
