"""Where an evaluation runs: its device, its place among the torchrun ranks, seeding, where its
outputs go, and the two collectives the tools need (each rank's shard of a dataset, and rows
gathered back onto rank 0 in dataset order)."""
from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from ssl_xcit import distributed as du
from ssl_xcit.distributed import pick_device


@dataclass(frozen=True)
class EvalEnv(du.OnRank):
    """Where this process runs: its device and its place among the ranks."""

    device: torch.device
    rank: int = 0
    world_size: int = 1
    owns_group: bool = False  # this tool started the process group, so it ends it


def setup_env(device: str = "auto", seed: int = 0) -> EvalEnv:
    """Join the torchrun process group (if any), pick the device, and seed every generator.

    Seeding before the backbone is built makes a random-init backbone identical on all ranks.
    """
    had_group = dist.is_available() and dist.is_initialized()
    info = du.init_distributed(device)
    dev = pick_device(device, info.local_rank)  # cuda without a GPU: one line
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    seed_everything(seed)
    return EvalEnv(device=dev, rank=info.rank, world_size=info.world_size,
                   owns_group=info.world_size > 1 and not had_group)


def teardown_env(env: EvalEnv) -> None:
    """End the process group if this tool started it (a caller's own group is left alone)."""
    if env.owns_group:
        du.cleanup()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def comm_device(default: torch.device | None = None) -> torch.device:
    """The device collectives need: the current GPU under NCCL, the CPU under gloo."""
    if du.get_world_size() > 1 and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return default if default is not None else torch.device("cpu")


def default_output_dir(checkpoint: str | None, fallback: str | os.PathLike = "outputs") -> Path:
    """Next to the checkpoint file; for a model name (random init) ``outputs/<name>``."""
    if checkpoint and Path(checkpoint).is_file():
        return Path(checkpoint).resolve().parent
    name = Path(checkpoint).name if checkpoint else "eval"
    return Path(fallback) / name


def shard_sampler(n: int, env_world: int | None = None, env_rank: int | None = None):
    """This rank's contiguous shard of ``range(n)`` (each index on exactly one rank)."""
    from ssl_xcit.data.sampler import ShardedIndexSampler
    world = du.get_world_size() if env_world is None else env_world
    rank = du.get_rank() if env_rank is None else env_rank
    return ShardedIndexSampler(n, world, rank)


def gather_rows(rows: torch.Tensor, indices: torch.Tensor, chunk_rows: int = 65536
                ) -> tuple[torch.Tensor, torch.Tensor] | tuple[None, None]:
    """Collect every rank's ``rows`` on rank 0, ordered by their dataset ``indices``.

    Ranks may hold different counts (shards of unequal size, corrupt files dropped); rows are
    padded to the largest count and sent in chunks so no rank needs all of them on the GPU at once.
    Returns ``(rows, indices)`` sorted by index on rank 0 and ``(None, None)`` on the others.
    """
    if rows.shape[0] != indices.shape[0]:
        raise ValueError(f"gather_rows: {rows.shape[0]} rows but {indices.shape[0]} indices")
    world = du.get_world_size()
    if world == 1:
        order = torch.argsort(indices)
        return rows[order], indices[order]
    dev = comm_device()
    count = torch.tensor([rows.shape[0]], device=dev, dtype=torch.long)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    counts_l = [int(c.item()) for c in counts]
    most = max(counts_l)
    pad_rows = torch.zeros((most, *rows.shape[1:]), dtype=rows.dtype)
    pad_rows[: rows.shape[0]] = rows.cpu()
    pad_idx = torch.full((most,), -1, dtype=torch.long)
    pad_idx[: indices.shape[0]] = indices.cpu()
    rank = du.get_rank()
    got_rows: list[list[torch.Tensor]] = [[] for _ in range(world)]
    got_idx: list[list[torch.Tensor]] = [[] for _ in range(world)]
    for start in range(0, max(most, 1), chunk_rows):
        for src, got in ((pad_rows, got_rows), (pad_idx, got_idx)):
            piece = src[start:start + chunk_rows].to(dev).contiguous()
            bucket = [torch.empty_like(piece) for _ in range(world)] if rank == 0 else None
            dist.gather(piece, bucket, dst=0)
            if rank == 0:
                for r in range(world):
                    got[r].append(bucket[r].cpu())
    if rank != 0:
        return None, None
    all_rows = torch.cat([torch.cat(got_rows[r])[: counts_l[r]] for r in range(world)])
    all_idx = torch.cat([torch.cat(got_idx[r])[: counts_l[r]] for r in range(world)])
    if torch.unique(all_idx).numel() != all_idx.numel():
        raise RuntimeError("gather_rows: the same dataset index came from two ranks (overlapping shards)")
    order = torch.argsort(all_idx)
    return all_rows[order], all_idx[order]
