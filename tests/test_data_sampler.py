"""ResumableDistributedSampler (DDP equivalence, seeds, resume) and ShardedIndexSampler."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from ssl_xcit.data.sampler import ResumableDistributedSampler, ShardedIndexSampler, sample_seeds

M64 = (1 << 64) - 1


def _ref_mix(x: int) -> int:
    """SplitMix64 finaliser in plain Python integers (independent of the NumPy version)."""
    z = (x + 0x9E3779B97F4A7C15) & M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def _ref_seed(seed: int, epoch: int, pos: int) -> int:
    return _ref_mix(_ref_mix(_ref_mix(seed) ^ epoch) ^ pos) >> 1


def _batches(sampler: ResumableDistributedSampler) -> list[list[tuple[int, int]]]:
    items = list(sampler)
    bs = sampler.batch_size_per_rank
    return [items[i:i + bs] for i in range(0, len(items), bs)]


def test_splitmix_reference_known_value():
    # first output of the SplitMix64 generator seeded with 0 (Vigna's reference implementation)
    assert _ref_mix(0) == 0xE220A8397B1DCDAF


def test_sample_seeds_match_python_reference():
    positions = np.array([0, 1, 2, 1000, 2**40 + 7])
    for seed, epoch in [(0, 0), (7, 3), (2**40, 11)]:
        got = sample_seeds(seed, epoch, positions).tolist()
        assert got == [_ref_seed(seed, epoch, int(p)) for p in positions]
        assert all(0 <= s < 2**63 for s in got)


@pytest.mark.parametrize("n, bs, replicas", [(103, 4, 2), (100, 3, 3), (64, 2, 4), (50, 5, 1)])
def test_rank_union_equals_single_process_batch(n, bs, replicas):
    single = ResumableDistributedSampler(n, bs * replicas, num_replicas=1, rank=0, seed=5)
    ranks = [ResumableDistributedSampler(n, bs, num_replicas=replicas, rank=r, seed=5) for r in range(replicas)]
    for epoch in (0, 1, 4):
        for s in [single, *ranks]:
            s.set_epoch(epoch)
        single_batches = _batches(single)
        rank_batches = [_batches(s) for s in ranks]
        steps = n // (bs * replicas)
        assert single.steps_per_epoch == steps and len(single_batches) == steps
        for r, s in enumerate(ranks):
            assert s.steps_per_epoch == steps and len(rank_batches[r]) == steps and len(s) == steps * bs
            assert all(len(b) == bs for b in rank_batches[r])
        for step in range(steps):
            union = sorted(itertools.chain.from_iterable(rb[step] for rb in rank_batches))
            assert union == sorted(single_batches[step])  # same images *and* same augmentation seeds
        all_idx = [i for rb in rank_batches for b in rb for i, _ in b]
        assert len(set(all_idx)) == len(all_idx)  # no image twice in an epoch


def test_permutation_seed_and_epoch_rule():
    s = ResumableDistributedSampler(20, 4, seed=10)
    s.set_epoch(3)
    expected = torch.randperm(20, generator=torch.Generator().manual_seed(13)).tolist()
    items = list(s)
    assert [i for i, _ in items] == expected
    assert [sd for _, sd in items] == [_ref_seed(10, 3, p) for p in range(20)]
    s.set_epoch(4)
    assert [i for i, _ in s] != expected
    assert len({sd for _, sd in s} | {sd for _, sd in items}) == 40  # seeds differ across epochs

    plain = ResumableDistributedSampler(10, 3, shuffle=False, seed=1)
    assert [i for i, _ in plain] == list(range(9))


def test_seed_depends_on_global_position_not_rank():
    one = list(ResumableDistributedSampler(24, 6, seed=2))
    r1 = list(ResumableDistributedSampler(24, 3, num_replicas=2, rank=1, seed=2))
    assert r1 == one[1::2]


def test_drop_last_false_covers_everything_with_equal_steps():
    n, bs, replicas = 23, 4, 3
    ranks = [ResumableDistributedSampler(n, bs, replicas, r, seed=1, drop_last=False) for r in range(replicas)]
    batches = [_batches(s) for s in ranks]
    assert {len(b) for b in batches} == {ranks[0].steps_per_epoch} == {2}
    seen = {i for b in batches for batch in b for i, _ in batch}
    assert seen == set(range(n))
    assert sum(len(s) for s in ranks) == 24  # 23 padded to a multiple of 3


def test_start_step_skips_batches_and_resets_on_new_epoch():
    s = ResumableDistributedSampler(50, 4, num_replicas=2, rank=1, seed=9)
    s.set_epoch(2)
    full = list(s)
    s.set_start_step(3)
    assert list(s) == full[12:] and len(s) == len(full) - 12
    s.set_epoch(2)  # same epoch: the resume point survives the loop's set_epoch
    assert s.start_step == 3
    s.set_epoch(3)
    assert s.start_step == 0 and len(s) == len(full)
    with pytest.raises(ValueError, match="beyond the 6 steps"):
        s.set_start_step(7)


def test_state_dict_roundtrip_resumes_exactly():
    a = ResumableDistributedSampler(90, 5, num_replicas=2, rank=0, seed=4)
    a.set_epoch(7)
    full = list(a)
    state = a.state_dict(step=2)
    b = ResumableDistributedSampler(90, 5, num_replicas=2, rank=0, seed=4)
    b.load_state_dict(state)
    b.set_epoch(7)
    assert b.epoch == 7 and b.start_step == 2 and list(b) == full[10:]


def test_resume_on_other_world_size_with_same_global_batch():
    old = [ResumableDistributedSampler(100, 6, 2, r, seed=1) for r in range(2)]
    for s in old:
        s.set_epoch(1)
    old_rest = sorted(itertools.chain.from_iterable(
        [x for b in _batches(s)[4:] for x in b] for s in old))
    state = old[0].state_dict(step=4)
    new = ResumableDistributedSampler(100, 12, 1, 0, seed=1)
    new.load_state_dict(state)
    assert new.start_step == 4
    assert sorted(new) == old_rest

    # global batch 12 -> 8: 48 consumed samples = 6 new steps, still exact
    eight = ResumableDistributedSampler(100, 4, 2, 0, seed=1)
    eight.load_state_dict(state)
    assert eight.start_step == 6


def test_resume_errors_and_fallbacks():
    state = ResumableDistributedSampler(100, 6, 2, 0, seed=1).state_dict(step=3)  # 36 samples consumed
    ten = ResumableDistributedSampler(100, 5, 2, 0, seed=1)
    with pytest.raises(ValueError, match="36 samples.*global batch 10"):
        ten.load_state_dict(state)
    with pytest.warns(UserWarning, match="resuming at step 3"):
        ten.load_state_dict(state, strict=False)
    assert ten.start_step == 3

    bigger = ResumableDistributedSampler(120, 6, 2, 0, seed=1)
    with pytest.raises(ValueError, match="had 100 images and now has 120"):
        bigger.load_state_dict(state)
    with pytest.warns(UserWarning, match="restarting epoch 0 at step 0"):
        bigger.load_state_dict(state, strict=False)
    assert bigger.start_step == 0

    other_seed = ResumableDistributedSampler(100, 6, 2, 0, seed=2)
    with pytest.warns(UserWarning, match="checkpoint's seed 1"):
        other_seed.load_state_dict(state)
    assert other_seed.seed == 1
    with pytest.raises(KeyError, match="missing"):
        other_seed.load_state_dict({"epoch": 1})


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="rank 2 is out of range"):
        ResumableDistributedSampler(10, 2, num_replicas=2, rank=2)
    with pytest.raises(ValueError, match="batch_size_per_rank must be >= 1"):
        ResumableDistributedSampler(10, 0)
    with pytest.raises(ValueError, match="fewer than one global batch of 12"):
        ResumableDistributedSampler(10, 6, num_replicas=2, rank=0)
    with pytest.raises(TypeError, match="dataset_len must be an int"):
        ResumableDistributedSampler(10.0, 2)
    with pytest.raises(ValueError, match="seed must be >= 0"):
        ResumableDistributedSampler(10, 2, seed=-1)


@pytest.mark.parametrize("n, replicas", [(10, 3), (7, 7), (2, 5), (0, 2), (1000, 8)])
def test_sharded_sampler_covers_each_index_once_contiguously(n, replicas):
    shards = [ShardedIndexSampler(n, replicas, r) for r in range(replicas)]
    flat = [i for s in shards for i in s]
    assert flat == list(range(n))  # contiguous, in rank order, no padding
    sizes = [len(s) for s in shards]
    assert sum(sizes) == n and max(sizes) - min(sizes) <= 1
    assert all(len(list(s)) == len(s) for s in shards)
    assert max(sizes) == shards[0].max_shard_len
    with pytest.raises(ValueError, match="out of range"):
        ShardedIndexSampler(n, replicas, replicas)
