"""Where a process runs: its torchrun rank, the process group, and its device.

Training (:mod:`audiotok.train`) and bulk tokenization (:mod:`audiotok.bulk`) both start here, so
they read the same environment and pick devices by the same rule (:func:`rank_device`).
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    """This process's place in a torchrun job (``world_size = 1`` without torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_environ(cls) -> DistEnv:
        """The joined process group's rank and size if there is one, else torchrun's ``RANK``,
        ``WORLD_SIZE`` and ``LOCAL_RANK`` variables (defaults 0, 1, 0)."""
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size(), local_rank)
        return cls(int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")), local_rank)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """A ``torch.device`` for a user string (``None``: CPU); ``ValueError`` for unknown or unavailable devices."""
    try:
        dev = torch.device(device or "cpu")
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"invalid device {device!r}: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    if dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ValueError(f"device {device!r} requested but MPS is not available")
    return dev


def rank_device(device: str | torch.device | None, local_rank: int = 0) -> torch.device:
    """The device of the process with ``local_rank`` on its machine.

    ``None`` means CUDA when available, else CPU. A CUDA device without an index becomes
    ``cuda:(local_rank % device_count)`` (one GPU per local rank, shared round-robin when there are
    more ranks than GPUs); an explicit index is kept.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = resolve_device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank % torch.cuda.device_count())
    return check_runs(dev)


def check_runs(dev: torch.device) -> torch.device:
    """``dev`` if a tensor can be made there, computed on and copied back; else ``ValueError`` naming it
    (``meta`` holds no data, ``cuda:7`` on a machine with one GPU, a backend this build lacks)."""
    if dev.type == "cpu":
        return dev
    try:
        (torch.ones(1, device=dev) + 1).cpu()
    except Exception as e:  # NotImplementedError (meta), RuntimeError, AssertionError (torch without CUDA)
        lines = str(e).strip().splitlines()
        raise ValueError(f"device {str(dev)!r} cannot run audiotok here ({type(e).__name__}: "
                         f"{lines[0] if lines else ''})") from None
    return dev


def init_process_group(env: DistEnv, backend: str, timeout: datetime.timedelta | None = None) -> bool:
    """Join the torchrun process group when there are several ranks and none is joined yet.

    Returns whether this call joined it (the caller then ends it with :func:`shutdown`).
    """
    if not env.enabled or dist.is_initialized():
        return False
    dist.init_process_group(backend, timeout=timeout)
    return True


def init_training(device: str | None, batch_size: int) -> tuple[DistEnv, torch.device, int]:
    """A training process's set-up (the codec's and the prior's trainers): its place in the job, its
    device (made current on CUDA), the process group joined (NCCL on CUDA, gloo otherwise), and its
    share of the global ``batch_size``, which must split evenly across the ranks."""
    env = DistEnv.from_environ()
    dev = rank_device(device, env.local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    init_process_group(env, "nccl" if dev.type == "cuda" else "gloo")
    if batch_size % env.world_size:
        raise ValueError(f"global batch {batch_size} does not split across {env.world_size} ranks")
    return env, dev, batch_size // env.world_size


def barrier(env: DistEnv) -> None:
    """Wait for every rank (nothing to wait for with one rank)."""
    if env.enabled:
        dist.barrier()


_cpu_group_made: Any = None  # a gloo group beside a GPU (NCCL) default group, made on first use


def _cpu_group() -> Any:
    """A CPU (gloo) group: the default one (``None``), or one made once beside NCCL."""
    global _cpu_group_made
    if dist.get_backend() == "gloo":
        return None
    if _cpu_group_made is None:
        _cpu_group_made = dist.new_group(backend="gloo")
    return _cpu_group_made


def max_over_ranks(values: Sequence[int], env: DistEnv) -> list[int]:
    """The element-wise maximum of a few integers over all ranks (``values`` as they are with one rank).

    It runs on a CPU (gloo) group, the default one or one made once beside NCCL, so it never waits for
    a GPU; every rank must call it at the same point."""
    if not env.enabled:
        return list(values)
    tensor = torch.tensor(list(values), dtype=torch.int64)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=_cpu_group())
    return [int(v) for v in tensor.tolist()]


def gather_objects(value: Any, env: DistEnv) -> list[Any]:
    """``value`` (picklable) of every rank, in rank order, on every rank (``[value]`` with one rank); on a
    CPU (gloo) group, as :func:`max_over_ranks`; every rank must call it at the same point."""
    if not env.enabled:
        return [value]
    values: list[Any] = [None] * env.world_size
    dist.all_gather_object(values, value, group=_cpu_group())
    return values


def shutdown() -> None:
    """Leave the process group, if one is joined."""
    global _cpu_group_made
    _cpu_group_made = None
    if dist.is_initialized():
        dist.destroy_process_group()
