"""Training run checkpoints: crash-safe folders with inference weights and everything an exact resume needs
(the codec trainer's and the prior trainer's).

A run folder (the codec trainer's files shown; the prior trainer's model files are its own)::

    <run>/checkpoints/step_<N>/    one complete checkpoint per saved step N: config.json +
                                   model.safetensors (plain weights: AudioTokenizer loads them; the
                                   moving average's when train.ema is on) and train_state.pt (generator
                                   with weight norm, its average ``ema`` when on, discriminator when the
                                   GAN is on, optimizers, schedulers, step, best validation mel distance,
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

A run's resumable state also travels as one file: :func:`export_state` writes the newest checkpoint's
state as safetensors (weights in float16, optimizer moments in bfloat16, the rest as JSON metadata; no
pickle), :func:`read_state_export` reads it back, and the codec trainer starts a new run from it
(:func:`audiotok.train.trainer.import_state`, ``recipes/train.py --resume-from``).

Runs written before this layout (real ``latest/``, ``best/`` and ``step_N/`` folders, and the
``.latest.old`` / ``.latest.tmp`` folders a crash between their renames left) resume as they are:
their folders are candidates too when their training state loads. The first save replaces ``latest/``
(and ``best/`` when it improves) by links; a ``best/`` folder that stays best is moved under
``checkpoints/`` and linked; leftover ``.*.old`` / ``.*.tmp`` folders are deleted once the new
checkpoint is durable; old ``step_N/`` milestones stay where they are.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes

from ..utils.io import atomic_write, fsync_dir, fsync_file
from ..utils.untrusted import parse_json
from ..weights.checkpoint import weight_mismatches

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
    (e.g. :func:`~audiotok.weights.checkpoint.save_folder`); the training state goes beside them as
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


def codec_resume_settings(loads_discriminator: bool) -> list[str]:
    """The :data:`CODEC_RESUME_SETTINGS` a codec resume compares: ``discriminator`` only when the run's
    discriminator is loaded (the GAN is on and the state has one); otherwise any discriminator may come."""
    return [k for k in CODEC_RESUME_SETTINGS if loads_discriminator or k != "discriminator"]


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


# -- a portable export of the resumable state ------------------------------------------------------
#
# One safetensors file (no pickle): the tensors under ``<entry>/<key>`` (module weights: every
# dict of tensors in the training state, such as ``generator`` and ``discriminator``, in float16) and
# ``<entry>/state/<i>/<name>`` (an optimizer's per-parameter moments, ``exp_avg`` and ``exp_avg_sq``,
# in bfloat16); the rest (optimizer step counts and parameter groups, schedulers, step, best, data
# position, training config) as JSON in the metadata entry ``audiotok.train_state``, which also lists
# every tensor's original dtype and shape. ``best`` is ``null`` before the first validation (it is
# infinite then, which JSON cannot hold; version 1 wrote Python's ``Infinity``, which is still read).

EXPORT_KEY = "audiotok.train_state"
EXPORT_VERSION = 2
READ_VERSIONS = (1, 2)
_EXPORT_SHAPE = {"version": int, "tensors": dict, "modules": [str], "optimizers": dict, "values": dict}
WEIGHTS_DTYPE = torch.float16
#: Entries of a training state that are running averages, like the optimizer moments: an export without
#: moments leaves them out too (``ema``, the generator's average, then restarts from the generator).
RUNNING_AVERAGES = ("ema",)
MOMENTS_DTYPE = torch.bfloat16


def _is_weights(value: Any) -> bool:
    return isinstance(value, dict) and bool(value) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items())


def _is_optimizer(value: Any) -> bool:
    return isinstance(value, dict) and set(value) == {"state", "param_groups"}


def _export_source(run: Path) -> tuple[Path, dict[str, Any]]:
    """The checkpoint folder to export and its training state: ``run`` itself when it is a checkpoint
    folder, else the newest complete checkpoint of the run folder ``run``."""
    if (run / STATE_FILE).is_file():
        return run, load_train_state(run)
    found = newest_checkpoint(run)
    if found is None:
        raise ValueError(f"{run}: no complete checkpoint to export (expected a run folder or a checkpoint folder)")
    return found


def _flatten_state(state: Mapping[str, Any], moments: bool,
                   where: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A training state -> (tensors to store, by name; the JSON metadata)."""
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, Any] = {"version": EXPORT_VERSION, "source": str(where), "moments": moments, "tensors": {},
                            "modules": [], "optimizers": {}, "values": {}}

    def put(name: str, tensor: torch.Tensor, dtype: torch.dtype) -> None:
        meta["tensors"][name] = [str(tensor.dtype).removeprefix("torch."), list(tensor.shape)]
        stored = tensor.detach().cpu()
        tensors[name] = (stored.to(dtype) if stored.is_floating_point() else stored).contiguous()

    for entry, value in state.items():
        if entry in RUNNING_AVERAGES and not moments:
            continue
        if _is_weights(value):
            meta["modules"].append(entry)
            for key, tensor in value.items():
                put(f"{entry}/{key}", tensor, WEIGHTS_DTYPE)
        elif _is_optimizer(value):
            scalars: dict[str, dict[str, Any]] = {}
            for index, param_state in value["state"].items() if moments else ():
                scalars[str(index)] = {}
                for name, item in param_state.items():
                    if isinstance(item, torch.Tensor) and item.ndim > 0:
                        put(f"{entry}/state/{index}/{name}", item, MOMENTS_DTYPE)
                    elif isinstance(item, torch.Tensor):  # the step count
                        scalars[str(index)][name] = [item.item(), str(item.dtype).removeprefix("torch.")]
                    else:
                        scalars[str(index)][name] = [item, None]
            meta["optimizers"][entry] = {"param_groups": value["param_groups"], "state": scalars}
        else:
            meta["values"][entry] = None if entry == "best" and value == math.inf else value
    return tensors, meta


def export_state(run: str | os.PathLike, out: str | os.PathLike, moments: bool = True) -> Path:
    """Write the resumable state of a run's newest complete checkpoint (or of the checkpoint folder
    ``run``) to one safetensors file ``out``, small enough to move over a thin link; returns ``out``.

    Module weights (the generator with its weight-norm parametrization, the discriminator when the GAN
    is on) are stored in float16, optimizer moments in bfloat16, the rest as JSON metadata (see above).
    ``moments=False`` leaves the moments out, and the generator's moving average (``train.ema``): a run
    resumed from the file restarts its optimizers and its average (the learning rate schedule still
    continues). For the shipped default architecture (``recipes/configs/default.yml``: a 9.53M-parameter
    generator, a 42.5M-parameter discriminator) the file is 57 MB with moments and 19 MB without for the
    generator alone (a GAN-free stage; its ``train_state.pt`` is 115 MB), 313 MB and 104 MB with the
    discriminator (a GAN run; 625 MB); the average adds 19 MB to an export with moments.
    :func:`read_state_export` reads it back.
    """
    folder, state = _export_source(Path(run))
    tensors, meta = _flatten_state(state, moments, folder)
    try:
        metadata = json.dumps(meta, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{folder}: its training state cannot be exported: {e}") from e
    with atomic_write(out) as f:
        f.write(safetensors_bytes(tensors, metadata={EXPORT_KEY: metadata}))
    return Path(out)


def _read_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors and the parsed metadata of an export; ``ValueError`` naming ``path`` when it is not one."""
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except (OSError, SafetensorError) as e:
        raise ValueError(f"{path}: not a readable training state export (truncated or not safetensors?): {e}") from e
    if EXPORT_KEY not in header:
        raise ValueError(f"{path}: a safetensors file without {EXPORT_KEY!r} metadata: not a training state export "
                         "(write one with recipes/train.py --export-state)")
    meta = parse_json(header[EXPORT_KEY], f"{path}: its {EXPORT_KEY!r} metadata", _EXPORT_SHAPE, infinity=True)
    if meta["version"] not in READ_VERSIONS:
        raise ValueError(f"{path}: a training state export of version {meta['version']}; this version of audiotok "
                         f"reads versions {', '.join(map(str, READ_VERSIONS))}")
    return tensors, meta


def _check_listed(path: Path, tensors: Mapping[str, torch.Tensor], listed: Mapping[str, Any]) -> None:
    """The file holds exactly the tensors its metadata lists, with their shapes."""
    missing, unexpected = sorted(set(listed) - set(tensors)), sorted(set(tensors) - set(listed))
    if missing or unexpected:
        raise ValueError(f"{path}: the export is incomplete or edited: "
                         + "; ".join(f"{what} tensors {_few(names)}" for what, names in
                                     (("missing", missing), ("unexpected", unexpected)) if names))
    for name, (_, shape) in listed.items():
        if list(tensors[name].shape) != shape:
            raise ValueError(f"{path}: tensor {name} has shape {list(tensors[name].shape)}, its metadata says {shape}")


def _few(names: Sequence[str], at_most: int = 5) -> str:
    return ", ".join(names[:at_most]) + (f" and {len(names) - at_most} more" if len(names) > at_most else "")


def read_state_export(path: str | os.PathLike) -> dict[str, Any]:
    """The training state in a file :func:`export_state` wrote, as ``train_state.pt`` holds it: module
    weights and moments upcast to their original dtype (float32), step counts as tensors. An export
    without moments gives optimizers with an empty ``state`` (they restart) and their parameter groups
    (learning rates). ``ValueError`` naming ``path`` when the file is truncated, is not an export, or
    lacks tensors or has other shapes than its metadata lists."""
    path = Path(path)
    tensors, meta = _read_file(path)
    _check_listed(path, tensors, meta["tensors"])
    try:
        return _unflatten_state(tensors, meta)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ValueError(f"{path}: unreadable training state export metadata: {e!r}") from e


def _unflatten_state(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> dict[str, Any]:
    """:func:`_flatten_state` undone: the training state, tensors in their original dtypes."""

    def dtype(name: str) -> torch.dtype:
        kind = getattr(torch, name, None)
        if not isinstance(kind, torch.dtype):
            raise ValueError(f"unknown dtype {name!r}")
        return kind

    def get(name: str) -> torch.Tensor:
        return tensors[name].to(dtype(meta["tensors"][name][0]))

    state: dict[str, Any] = dict(meta["values"])
    if "best" in state and state["best"] is None:  # no validation yet
        state["best"] = math.inf
    for entry in meta["modules"]:
        prefix = f"{entry}/"
        state[entry] = {name[len(prefix):]: get(name) for name in meta["tensors"] if name.startswith(prefix)}
    for entry, optimizer in meta["optimizers"].items():
        per_param: dict[int, dict[str, Any]] = {}
        for index, scalars in optimizer["state"].items():
            item = {name: value if kind is None else torch.tensor(value, dtype=dtype(kind))
                    for name, (value, kind) in scalars.items()}
            prefix = f"{entry}/state/{index}/"
            item.update({name[len(prefix):]: get(name) for name in meta["tensors"] if name.startswith(prefix)})
            per_param[int(index)] = item
        state[entry] = {"state": per_param, "param_groups": optimizer["param_groups"]}
    return state


def check_weights(weights: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], where: str) -> None:
    """``ValueError`` starting with ``where`` unless ``weights`` has exactly the keys and shapes of ``expected``
    (a module's ``state_dict()``)."""
    missing, unexpected, reshaped = weight_mismatches(weights, expected)
    problems = [f"{what} keys {_few(names)}" for what, names in (("missing", missing), ("unexpected", unexpected))
                if names]
    problems += [f"{key} has shape {list(weights[key].shape)}, the model {list(expected[key].shape)}"
                 for key in reshaped[:5]]
    if problems:
        raise ValueError(f"{where}: does not fit the model its config describes: " + "; ".join(problems))


def check_moments(optimizer: Mapping[str, Any], params: Sequence[torch.Tensor], where: str) -> None:
    """``ValueError`` starting with ``where`` unless the optimizer state ``optimizer`` (``state_dict()`` form)
    is one for ``params``: as many parameters, and each moment shaped as its parameter."""
    indices = [i for group in optimizer["param_groups"] for i in group["params"]]
    if len(indices) != len(params):
        raise ValueError(f"{where}: the optimizer holds {len(indices)} parameters, the model has {len(params)} "
                         "trainable ones")
    for position, index in enumerate(indices):
        for name, value in optimizer["state"].get(index, {}).items():
            if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape != params[position].shape:
                raise ValueError(f"{where}: state {index} {name} has shape {list(value.shape)}, its parameter "
                                 f"{list(params[position].shape)}")
