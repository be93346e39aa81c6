"""2 gloo processes with batch 2 each == 1 process with batch 4 (same global batch, same crops)."""
import os
import socket
import time

import pytest
import torch
import torch.multiprocessing as mp

from ssl_xcit.engine.launch import run_training
from tests.train_helpers import assert_same_weights, load_weights, tiny_config

STEPS = 3
# SGD, not AdamW: Adam divides by sqrt(v), so a near-zero gradient's float-order noise (all-reduce vs
# one process) can move its weight by up to ~lr; SGD keeps the noise at float rounding, so the
# comparison can be tight while the weights move far beyond it (large steps).
FAST = {"warmup_epochs": 0, "lr": 20.0, "optimizer": "sgd"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, port: int, data, out):
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    run_training(tiny_config(data, out, batch_size_per_gpu=2, max_steps=STEPS, drop_path_rate=0.0, **FAST))


def test_two_process_ddp_equals_one_process(cifar_small, tmp_path):
    torch.set_num_threads(1)
    single = tmp_path / "single"
    run_training(tiny_config(cifar_small, single, batch_size_per_gpu=4, max_steps=STEPS, drop_path_rate=0.0, **FAST))
    double = tmp_path / "ddp"
    mp.spawn(_rank_main, args=(_free_port(), cifar_small, double), nprocs=2)
    a, b = load_weights(single), load_weights(double)
    # the centre is the all-reduced teacher mean: equal only if both ranks' halves were combined
    torch.testing.assert_close(a["center"], b["center"], rtol=1e-4, atol=1e-6)
    assert_same_weights(a, b, exact=False, atol=1e-5)
    # and training moved the weights well beyond that tolerance (the comparison can fail)
    from ssl_xcit.train.loop import build_models
    torch.manual_seed(3)
    init, _ = build_models(tiny_config(cifar_small, tmp_path / "unused", drop_path_rate=0.0))
    moved = (a["student.backbone.blocks.0.attn.qkv.weight"] - init.state_dict()["backbone.blocks.0.attn.qkv.weight"]).abs().max()
    assert moved > 1e-3, moved


def _rank_nan_main(rank: int, port: int, data, out, results):
    """Rank 1 alone sees a NaN loss at its second step: both ranks must stop there, unupdated."""
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from ssl_xcit.dino.loss import DINOLoss
    from ssl_xcit.train.loop import NonFiniteLossError
    original, calls, updates = DINOLoss.forward, {"n": 0}, {"n": 0}

    def nan_on_rank1(self, *args, **kwargs):
        calls["n"] += 1
        loss = original(self, *args, **kwargs)
        return loss * float("nan") if rank == 1 and calls["n"] == 2 else loss
    DINOLoss.forward = nan_on_rank1
    step = torch.optim.AdamW.step

    def counting(self, *args, **kwargs):
        updates["n"] += 1
        return step(self, *args, **kwargs)
    torch.optim.AdamW.step = counting
    try:
        run_training(tiny_config(data, out, batch_size_per_gpu=2, max_steps=STEPS, drop_path_rate=0.0))
        results.put((rank, "finished", updates["n"]))
    except NonFiniteLossError as err:
        results.put((rank, str(err), updates["n"]))


@pytest.mark.heavy
def test_a_non_finite_loss_on_one_rank_stops_every_rank_before_the_update(cifar_small, tmp_path):
    results = mp.get_context("spawn").SimpleQueue()
    mp.spawn(_rank_nan_main, args=(_free_port(), cifar_small, tmp_path / "ddp", results), nprocs=2)
    got = sorted(results.get() for _ in range(2))
    assert [r for r, _, _ in got] == [0, 1]
    for rank, message, updates in got:
        assert "global step 1" in message and "no update applied" in message, (rank, message)
        assert updates == 1, (rank, updates)     # the second step's update ran on neither rank
    assert "on another rank" in got[0][1] and "(nan)" in got[1][1]   # each rank's message is true


def _rank_monitor_main(rank: int, port: int, data, out, monitor: bool):
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    keys = dict(eval_every_steps=2, eval_data_path=str(data), eval_max_images=20, eval_knn_k=5,
                eval_crop_size=32, eval_resize=32, eval_batch_size=10) if monitor else {}
    run_training(tiny_config(data / "train", out, batch_size_per_gpu=2, max_steps=STEPS, **keys))


@pytest.mark.heavy
def test_the_knn_monitor_under_ddp_leaves_the_training_unchanged(cifar_small, tmp_path):
    """Both ranks embed a shard at the same steps (a rank that skipped would hang the other); the run
    ends bit for bit as the same 2-process run without the monitor, and rank 0 logged the curve."""
    import json
    for name, monitor in (("plain", False), ("watched", True)):
        mp.spawn(_rank_monitor_main, args=(_free_port(), cifar_small, tmp_path / name, monitor), nprocs=2)
    assert_same_weights(load_weights(tmp_path / "plain"), load_weights(tmp_path / "watched"))
    records = [json.loads(line) for line in (tmp_path / "watched" / "log.jsonl").read_text().splitlines()]
    assert [r["global_step"] for r in records if r["event"] == "knn"] == [0, 2, 3]
    assert (tmp_path / "watched" / "knn.png").is_file()


def _rank_budget_main(rank: int, port: int, data, out, results):
    """A time-budgeted run whose rank 1 reads a clock 15% fast: each rank's own plan differs, so
    only rank 0's broadcast plan, at the same steps on both, keeps the ranks in step."""
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import time
    from ssl_xcit.train import budget
    if rank == 1:
        real, start = time.perf_counter, time.perf_counter()
        budget.time = type("FastClock", (), {"perf_counter": staticmethod(lambda: start + (real() - start) * 1.15)})
    plans, step_done = [], budget.TimeBudget.step_done

    def recording(self, global_step):
        plan = step_done(self, global_step)
        if plan is not None:
            plans.append(global_step)
        return plan
    budget.TimeBudget.step_done = recording
    result = run_training(tiny_config(data, out, batch_size_per_gpu=2, epochs=50, drop_path_rate=0.0,
                                      local_crops_number=0, time_budget_minutes=0.3))
    results.put((rank, result.status, result.global_step, plans))


def test_a_time_budget_plans_and_replans_at_the_same_steps_on_every_rank(cifar_small, tmp_path):
    ctx = mp.get_context("spawn")
    results, port = ctx.SimpleQueue(), _free_port()
    procs = [ctx.Process(target=_rank_budget_main, args=(r, port, cifar_small, tmp_path / "ddp", results))
             for r in range(2)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + 180
    for p in procs:
        p.join(timeout=max(0.0, deadline - time.monotonic()))
    hung = [p for p in procs if p.is_alive()]
    for p in hung:
        p.kill()
    assert not hung and all(p.exitcode == 0 for p in procs), "a rank hung or failed"
    (_, status0, steps0, plans0), (_, status1, steps1, plans1) = sorted(results.get() for _ in range(2))
    assert status0 == status1 == "finished" and steps0 == steps1
    assert plans0 == plans1 and len(plans0) >= 2, (plans0, plans1)   # the plan and at least one re-plan
