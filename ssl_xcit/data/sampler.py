"""Samplers: a resumable, world-size-independent training sampler and a contiguous evaluation sharder.

Training order is a function of (seed, epoch) only: the epoch's permutation comes from
``torch.Generator().manual_seed(seed + epoch)``, rank ``r`` of ``R`` takes the interleaved
positions ``perm[r::R]``, and every position carries a ``sample_seed`` hashed from
(seed, epoch, global position). Hence at step ``s`` the union of the ranks' batches is exactly the
single-process batch ``s`` with batch size ``batch_size_per_rank * R``, augmented identically; a run
can resume mid-epoch on another number of GPUs as long as the global batch divides the samples
already consumed.
"""
from __future__ import annotations

import warnings
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import Sampler

from ssl_xcit.errors import UserError

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_STATE_VERSION = 1


class EmptyEpochError(UserError, ValueError):
    """Fewer images than one global batch with ``drop_last``: an epoch would have no step."""


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser on uint64 arrays: a bijection with good avalanche (Steele et al. 2014)."""
    with np.errstate(over="ignore"):
        z = x + np.uint64(_GOLDEN)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def sample_seeds(seed: int, epoch: int, positions: np.ndarray | torch.Tensor) -> np.ndarray:
    """63-bit augmentation seeds for global ``positions`` of ``epoch`` (independent of rank).

    Chained SplitMix64: h = mix(mix(mix(seed) ^ epoch) ^ position) >> 1. For a fixed (seed, epoch)
    the map from position to seed is injective, so no two images of an epoch share crops.
    """
    pos = np.asarray(positions, dtype=np.int64).astype(np.uint64)
    h = _splitmix64(np.array([seed & _MASK64], dtype=np.uint64))
    h = _splitmix64(h ^ np.uint64(epoch & _MASK64))
    return (_splitmix64(h ^ pos) >> np.uint64(1)).astype(np.int64)


class ResumableDistributedSampler(Sampler):
    """Yields ``(dataset_index, sample_seed)`` pairs for one rank; use with
    ``DataLoader(dataset, batch_size=batch_size_per_rank, sampler=sampler)``.

    ``drop_last=True``: every rank gets ``steps_per_epoch = dataset_len // (batch_size_per_rank *
    num_replicas)`` full batches. ``drop_last=False``: the tail is padded by repeating the first
    positions of the permutation until it divides evenly among ranks, so every rank runs
    ``ceil(dataset_len / global_batch)`` steps and the last batch of each rank may be short (the
    padded duplicates make multi-rank and single-process last steps differ slightly).

    Resume: ``set_epoch(e)`` then ``set_start_step(s)`` skips the first ``s`` batches of epoch ``e``.
    ``set_epoch`` with a *different* epoch resets the start step to 0; with the same epoch it
    keeps it, so ``load_state_dict(...)`` followed by the loop's usual ``set_epoch(epoch)`` resumes.
    """

    def __init__(self, dataset_len: int, batch_size_per_rank: int, num_replicas: int = 1, rank: int = 0,
                 shuffle: bool = True, seed: int = 0, drop_last: bool = True) -> None:
        self.dataset_len = _check_int("dataset_len", dataset_len, 1)
        self.batch_size_per_rank = _check_int("batch_size_per_rank", batch_size_per_rank, 1)
        self.num_replicas = _check_int("num_replicas", num_replicas, 1)
        self.rank = _check_int("rank", rank, 0)
        if self.rank >= self.num_replicas:
            raise ValueError(f"rank {rank} is out of range for num_replicas={num_replicas}")
        self.seed = _check_int("seed", seed, 0)
        self.shuffle = bool(shuffle)
        self.drop_last = bool(drop_last)
        if self.drop_last and self.dataset_len < self.global_batch_size:
            raise EmptyEpochError(
                f"the dataset has {dataset_len} images, fewer than one global batch of "
                f"{self.global_batch_size} ({batch_size_per_rank} per process x {num_replicas} "
                f"process{'es' if num_replicas > 1 else ''}): an epoch would have no step; lower the batch size")
        self.epoch = 0
        self.start_step = 0

    @property
    def global_batch_size(self) -> int:
        return self.batch_size_per_rank * self.num_replicas

    @property
    def steps_per_epoch(self) -> int:
        """Optimiser steps in a full epoch (identical on every rank)."""
        if self.drop_last:
            return self.dataset_len // self.global_batch_size
        return -(-self.dataset_len // self.global_batch_size)

    @property
    def _positions_per_epoch(self) -> int:
        """Global positions consumed per epoch (after dropping or padding)."""
        if self.drop_last:
            return self.steps_per_epoch * self.global_batch_size
        return -(-self.dataset_len // self.num_replicas) * self.num_replicas

    def set_epoch(self, epoch: int) -> None:
        epoch = _check_int("epoch", epoch, 0)
        if epoch != self.epoch:
            self.start_step = 0
        self.epoch = epoch

    def set_start_step(self, step: int) -> None:
        """Skip the first ``step`` batches of the current epoch (mid-epoch resume)."""
        step = _check_int("step", step, 0)
        if step > self.steps_per_epoch:
            raise ValueError(f"start step {step} is beyond the {self.steps_per_epoch} steps of an epoch")
        self.start_step = step

    def permutation(self, epoch: int | None = None) -> torch.Tensor:
        """The epoch's order of dataset indices (identical on every rank)."""
        epoch = self.epoch if epoch is None else epoch
        if not self.shuffle:
            return torch.arange(self.dataset_len)
        gen = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.dataset_len, generator=gen)

    def _local_positions(self) -> np.ndarray:
        """Global positions this rank visits in the rest of this epoch."""
        first_local = self.start_step * self.batch_size_per_rank
        positions = np.arange(self.rank, self._positions_per_epoch, self.num_replicas, dtype=np.int64)
        return positions[first_local:]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        perm = self.permutation().numpy()
        positions = self._local_positions()
        indices = perm[positions % self.dataset_len]  # modulo only matters for drop_last=False padding
        seeds = sample_seeds(self.seed, self.epoch, positions)
        return iter(zip(indices.tolist(), seeds.tolist()))

    def __len__(self) -> int:
        """Items this rank yields in the rest of the current epoch (after the start step)."""
        return len(self._local_positions())

    # -- checkpointing -----------------------------------------------------------------------
    def state_dict(self, step: int | None = None) -> dict[str, Any]:
        """What a checkpoint needs; ``step`` = batches of the current epoch already trained on
        (default: the start step). The loader prefetches, so only the training loop knows it."""
        step = self.start_step if step is None else _check_int("step", step, 0)
        return {"version": _STATE_VERSION, "epoch": self.epoch, "start_step": step, "seed": self.seed,
                "num_replicas": self.num_replicas, "batch_size_per_rank": self.batch_size_per_rank,
                "dataset_len": self.dataset_len, "shuffle": self.shuffle, "drop_last": self.drop_last}

    def load_state_dict(self, state: dict[str, Any], strict: bool = True) -> None:
        """Restore epoch, start step and seed from a checkpoint.

        Exact resume survives a change of world size or per-rank batch size if the samples already
        consumed (``start_step * old global batch``) are a whole number of new global batches; the
        start step is converted. Otherwise, and when the dataset size or ``shuffle`` changed, the
        order cannot be reproduced: ``strict=True`` raises ``ValueError``; ``strict=False`` warns
        and falls back (new dataset size or shuffle: restart the checkpoint's epoch at step 0;
        non-dividing global batch: round the step down, re-seeing fewer than one global batch).
        """
        missing = {"epoch", "start_step", "seed", "num_replicas", "batch_size_per_rank", "dataset_len",
                   "shuffle"} - set(state)
        if missing:
            raise KeyError(f"sampler state is missing {sorted(missing)}; got keys {sorted(state)}")
        epoch = _check_int("state['epoch']", state["epoch"], 0)
        step = _check_int("state['start_step']", state["start_step"], 0)
        seed = _check_int("state['seed']", state["seed"], 0)
        if seed != self.seed:
            warnings.warn(f"sampler seed {self.seed} replaced by the checkpoint's seed {seed} to resume "
                          "the same data order", stacklevel=2)

        problems = []
        if state["dataset_len"] != self.dataset_len:
            problems.append(f"the dataset had {state['dataset_len']} images and now has {self.dataset_len}")
        if bool(state["shuffle"]) != self.shuffle:
            problems.append(f"shuffle was {state['shuffle']} and is now {self.shuffle}")
        if problems:
            msg = "cannot resume the data order exactly: " + "; ".join(problems)
            if strict:
                raise ValueError(msg)
            warnings.warn(msg + f"; restarting epoch {epoch} at step 0", stacklevel=2)
            step = 0

        old_global = state["batch_size_per_rank"] * state["num_replicas"]
        consumed = step * old_global
        new_step, remainder = divmod(consumed, self.global_batch_size)
        if remainder:
            msg = (f"cannot resume mid-epoch exactly: {consumed} samples of epoch {epoch} were consumed "
                   f"with global batch {old_global} ({state['num_replicas']} x {state['batch_size_per_rank']}), "
                   f"not a multiple of the new global batch {self.global_batch_size} "
                   f"({self.num_replicas} x {self.batch_size_per_rank})")
            if strict:
                raise ValueError(msg)
            warnings.warn(msg + f"; resuming at step {new_step}, re-seeing {remainder} samples", stacklevel=2)
        self.seed = seed
        self.epoch = epoch
        self.start_step = min(new_step, self.steps_per_epoch)


class ShardedIndexSampler(Sampler):
    """Contiguous, balanced shards of ``range(dataset_len)``: each index exactly once over all ranks.

    Rank ``r`` gets ``[r * n // R, (r + 1) * n // R)``; shard sizes differ by at most one and no
    index is padded or repeated, so gathered features line up with dataset indices.
    """

    def __init__(self, dataset_len: int, num_replicas: int = 1, rank: int = 0) -> None:
        self.dataset_len = _check_int("dataset_len", dataset_len, 0)
        self.num_replicas = _check_int("num_replicas", num_replicas, 1)
        self.rank = _check_int("rank", rank, 0)
        if self.rank >= self.num_replicas:
            raise ValueError(f"rank {rank} is out of range for num_replicas={num_replicas}")
        self.start = self.rank * self.dataset_len // self.num_replicas
        self.stop = (self.rank + 1) * self.dataset_len // self.num_replicas

    @property
    def max_shard_len(self) -> int:
        """The largest shard's size (pad to this before an ``all_gather``)."""
        return -(-self.dataset_len // self.num_replicas)

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.start, self.stop))

    def __len__(self) -> int:
        return self.stop - self.start
