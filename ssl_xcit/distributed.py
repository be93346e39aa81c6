"""torch.distributed set-up from the environment, and the few collectives the project uses.

Every entry point (torchrun, SLURM through submitit, a plain ``python`` run) ends up here with the
torchrun variables set (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT); a plain run with
none of them is a world of one and never initialises a process group.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ssl_xcit.errors import UserError


class DeviceError(UserError, ValueError, RuntimeError):
    """A device or process-group setting this process cannot use: ``device=cuda`` without a GPU, a
    GPU index that is not there, a misspelt device, torchrun variables that do not fit together.
    A :class:`UserError` (one line on a command line) and still the ``ValueError`` or
    ``RuntimeError`` these were raised as before, so callers that catch those keep working."""


class OnRank:
    """What runs on one rank of the job (the process group's description, a run, an evaluation):
    rank 0 is the main process, which alone prints, writes and draws progress bars."""
    rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@dataclass(frozen=True)
class DistInfo(OnRank):
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError as err:
        raise DeviceError(f"environment variable {name}={value!r} is not an integer") from err


def init_distributed(device: str = "auto", timeout_minutes: float = 30.0) -> DistInfo:
    """Join the process group described by the torchrun variables, or run alone.

    NCCL when the process has a GPU, gloo otherwise. Idempotent: a second call returns the
    existing group's description.
    """
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    if world_size <= 1:
        return DistInfo()
    if not 0 <= rank < world_size:
        raise DeviceError(f"RANK={rank} is outside WORLD_SIZE={world_size}")
    for var in ("MASTER_ADDR", "MASTER_PORT"):
        if var not in os.environ:
            raise DeviceError(f"WORLD_SIZE={world_size} but {var} is not set: start with torchrun "
                               "or launch/submit.py, which set it")
    use_cuda = torch.cuda.is_available() and device in ("auto", "cuda")
    backend = "nccl" if use_cuda else "gloo"
    if dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, dist.get_backend())
    if use_cuda:
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
    dist.init_process_group(backend=backend, rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(minutes=timeout_minutes))
    return DistInfo(rank, world_size, local_rank, backend)


def pick_device(name: str = "auto", local_rank: int | None = None) -> torch.device:
    """The one device rule of every entry point (training, evaluation, quickstart, benchmarks).

    ``auto`` is CUDA when torch sees a GPU, else the CPU; ``cuda`` without a GPU is an error rather
    than a silent CPU run. ``local_rank`` picks the GPU of this process (default: the current one,
    which :func:`init_distributed` has set to the local rank).
    """
    if name not in ("auto", "cpu", "cuda") and not (name.startswith("cuda:") and name[5:].isdigit()):
        raise DeviceError(f"device must be auto, cpu, cuda or cuda:N, got {name!r}")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceError(f"device {name} was asked for but torch sees no CUDA GPU; use cpu or auto")
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if name.startswith("cuda:"):
        count = torch.cuda.device_count()
        if int(name[5:]) >= count:
            raise DeviceError(f"device {name} was asked for but torch sees {count} GPU(s) (cuda:0 to "
                              f"cuda:{count - 1}); check CUDA_VISIBLE_DEVICES")
        return torch.device(name)
    index = torch.cuda.current_device() if local_rank is None else local_rank % torch.cuda.device_count()
    return torch.device("cuda", index)


def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if get_world_size() > 1:
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks (a no-op alone); returns the tensor for chaining."""
    if get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def any_rank_flags(*flags: bool, device: torch.device | str = "cpu") -> tuple[bool, ...]:
    """Each flag True on every rank when it is True on at least one; one all-reduce for all of them."""
    if get_world_size() == 1:
        return tuple(bool(f) for f in flags)
    t = torch.tensor([1.0 if f else 0.0 for f in flags], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return tuple(v > 0 for v in t.tolist())


def broadcast_int(value: int, src: int = 0, device: torch.device | str = "cpu") -> int:
    """Rank ``src``'s ``value`` on every rank (a plan that all ranks must follow)."""
    if get_world_size() == 1:
        return int(value)
    t = torch.tensor([int(value)], dtype=torch.long, device=device)
    dist.broadcast(t, src=src)
    return int(t.item())


def any_rank(flag: bool, device: torch.device | str = "cpu") -> bool:
    """True on every rank when ``flag`` is True on at least one (e.g. a stop request)."""
    return any_rank_flags(flag, device=device)[0]


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
