"""The k-NN monitor (ssl_xcit.train.monitor) and its config keys.

The monitor must not change the training it watches: a call leaves the torch / NumPy / Python
random streams and the teacher (weights, BatchNorm statistics, train mode) exactly as they were.
Its top-1 is checked against a brute-force float64 weighted k-NN written here.
"""
from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
import yaml

from ssl_xcit.evaluate.features import extract_features
from ssl_xcit.models import build_model
from ssl_xcit.train.config import ConfigError, config_from_dict, load_config
from ssl_xcit.engine.logger import RunLogger
from ssl_xcit.data.subsets import evenly_spread
from ssl_xcit.train.monitor import KnnMonitor, evaluation_without_side_effects

ARCH = "xcit_nano_12_p8"


def _teacher() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(ARCH, num_classes=0).train()   # DINO's teacher runs in train mode


def _monitor(data, tmp_path, **kw) -> KnnMonitor:
    args = dict(every_steps=5, steps_per_epoch=10, max_images=40, k=5, crop_size=32, resize=32, batch_size=20,
                num_workers=0, logger=RunLogger(tmp_path, tensorboard=True), output_dir=tmp_path)
    args.update(kw)
    return KnnMonitor(str(data), **args)


def _rng_snapshot():
    return (torch.get_rng_state().clone(), np.random.get_state()[1].copy(), random.getstate())


def test_monitor_leaves_rng_and_teacher_untouched(cifar_small, tmp_path):
    teacher = _teacher()
    monitor = _monitor(cifar_small, tmp_path, num_workers=1)   # a worker process, as in training
    torch.manual_seed(123), np.random.seed(123), random.seed(123)
    before_rng = _rng_snapshot()
    before_sd = {k: v.clone() for k, v in teacher.state_dict().items()}
    modes = [m.training for m in teacher.modules()]
    record = monitor.evaluate(teacher, global_step=5)
    assert 0.0 <= record["top1"] <= 100.0
    after_rng = _rng_snapshot()
    assert torch.equal(before_rng[0], after_rng[0])
    assert np.array_equal(before_rng[1], after_rng[1]) and before_rng[2] == after_rng[2]
    after_sd = teacher.state_dict()
    assert all(torch.equal(before_sd[k], after_sd[k]) for k in before_sd)
    assert [m.training for m in teacher.modules()] == modes
    # the test can fail: the same extraction without the guard moves the RNG, and a train-mode
    # forward moves the BatchNorm statistics of XCiT's patch embedding
    extract_features(teacher.eval(), monitor.val_set, 20, "cpu", 0, progress=False)
    teacher.train()
    assert not torch.equal(before_rng[0], torch.get_rng_state())
    with torch.no_grad():
        teacher(torch.randn(2, 3, 32, 32))
    assert any(not torch.equal(before_sd[k], v) for k, v in teacher.state_dict().items() if "running" in k)


def test_guard_restores_modes_buffers_and_rng_even_on_error():
    teacher = _teacher()
    teacher.patch_embed.eval()   # a submodule in its own mode stays so
    modes = [m.training for m in teacher.modules()]
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    state = torch.get_rng_state().clone()
    with pytest.raises(RuntimeError):
        with evaluation_without_side_effects(teacher):
            assert not teacher.training
            torch.rand(3)
            teacher.train()
            teacher(torch.randn(2, 3, 32, 32))   # would update running stats
            raise RuntimeError("boom")
    assert [m.training for m in teacher.modules()] == modes
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert torch.equal(state, torch.get_rng_state())


def _brute_force_top1(model, train_set, val_set, k: int, t: float = 0.07) -> float:
    """DINO's weighted vote in float64, features from model(x) one image at a time."""
    def feats(ds):
        xs, ys = [], []
        for i in range(len(ds)):
            img, label, _ = ds[i]
            with torch.no_grad():
                xs.append(model(img[None]).double()[0])
            ys.append(label)
        f = torch.stack(xs)
        return f / f.norm(dim=1, keepdim=True), torch.tensor(ys)
    (tf, ty), (vf, vy) = feats(train_set), feats(val_set)
    sims = vf @ tf.T
    top, idx = sims.topk(k, dim=1)
    votes = torch.zeros(len(vy), 10, dtype=torch.float64).scatter_add_(1, ty[idx], torch.exp(top / t))
    return 100.0 * (votes.argmax(1) == vy).double().mean().item()


def test_monitor_top1_matches_a_brute_force_knn_and_is_logged(cifar_small, tmp_path):
    teacher = _teacher()
    monitor = _monitor(cifar_small, tmp_path)
    assert len(monitor.train_set) == 40 and len(monitor.val_set) == 40
    assert len(set(monitor.val_set.targets)) == 10          # evenly spread keeps every class
    record = monitor.evaluate(teacher, global_step=10)
    expected = _brute_force_top1(teacher.eval(), monitor.train_set, monitor.val_set, k=5)
    assert record["top1"] == pytest.approx(expected, abs=100.0 / 40 + 1e-9)   # at most one tie apart
    assert record["epoch"] == 0 and record["global_step"] == 10
    monitor.logger.flush()
    lines = [json.loads(s) for s in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert lines[-1]["event"] == "knn" and lines[-1]["top1"] == record["top1"]
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_schedule_of_evaluations(cifar_small, tmp_path, monkeypatch):
    monitor = _monitor(cifar_small, tmp_path, every_steps=3, every_epochs=1, steps_per_epoch=4)
    calls = []
    monkeypatch.setattr(monitor, "evaluate", lambda backbone, step: (calls.append(step), monitor.__setattr__(
        "_last_step", step))[1])
    monitor.before_training(None, 0)
    for step in range(1, 11):
        monitor.after_step(None, step)
    monitor.after_training(None, 10)
    monitor.after_training(None, 10)   # twice: no second evaluation at the same step
    assert calls == [0, 3, 4, 6, 8, 9, 10]
    resumed = _monitor(cifar_small, tmp_path, every_epochs=2, every_steps=0, steps_per_epoch=4)
    assert resumed.before_training(None, 6) is None          # a resumed run has its start point
    assert [s for s in range(1, 17) if resumed.due(s)] == [8, 16]


def test_after_training_writes_the_figure(cifar_small, tmp_path):
    monitor = _monitor(cifar_small, tmp_path, max_images=20)
    teacher = _teacher()
    monitor.before_training(teacher, 0)
    monitor.after_training(teacher, 7)
    assert [r["global_step"] for r in monitor.history] == [0, 7]
    from PIL import Image
    with Image.open(tmp_path / "knn.png") as im:
        assert im.size[0] > 300


def test_monitor_errors_name_the_problem(cifar_small, tmp_path):
    with pytest.raises(ConfigError) as info:        # in the config's keys: training has no --resize
        _monitor(cifar_small, tmp_path, crop_size=32, resize=16)
    assert str(info.value).startswith("eval_resize (16) must be >= the k-NN crop size (32") and "--" not in str(info.value)
    with pytest.raises(ConfigError, match="eval_knn_k=50 exceeds the 20 train images"):
        _monitor(cifar_small, tmp_path, max_images=20, k=50)
    with pytest.raises(ConfigError, match="eval_data_path .*train has no train/ or val/ folder"):
        _monitor(cifar_small / "train", tmp_path)
    # a path that is not there, or a file that is no archive: the message names the config key too
    for where in (tmp_path / "nowhere", tmp_path / "notes.txt"):
        (tmp_path / "notes.txt").write_text("x")
        with pytest.raises(ConfigError) as info:
            _monitor(where, tmp_path)
        assert str(info.value).startswith(f"eval_data_path {where}: data path {where} ") and "\n" not in str(info.value)
    flat = tmp_path / "flat"
    for split in ("train", "val"):
        (flat / split).mkdir(parents=True)
        for img in sorted((cifar_small / split / "cat").iterdir())[:6]:
            (flat / split / img.name).symlink_to(img)
    with pytest.raises(ConfigError, match="train/ has no class folders"):
        _monitor(flat, tmp_path)
    other = tmp_path / "other"
    for split, classes in (("train", ("cat", "dog")), ("val", ("cat", "ship"))):
        for cls in classes:
            (other / split / cls).mkdir(parents=True)
            for img in sorted((cifar_small / split / cls).iterdir())[:6]:
                (other / split / cls / img.name).symlink_to(img)
    with pytest.raises(ConfigError, match="class folders differ"):
        _monitor(other, tmp_path, k=3)


def test_evenly_spread():
    assert evenly_spread(10, 0).tolist() == list(range(10))
    assert evenly_spread(10, 3).tolist() == [0, 4, 9]      # 4.5 rounds to even, as numpy does
    assert len(set(evenly_spread(1000, 37).tolist())) == 37


# ------------------------------------------------------------------ config keys
def test_eval_config_keys(tmp_path, cifar_small):
    cfg = load_config(None, ["eval_every_epochs=2", f"eval_data_path={cifar_small}", "eval.eval_knn_k=10",
                             "eval_max_images=500"])
    assert (cfg.eval.eval_every_epochs, cfg.eval.eval_knn_k, cfg.eval.eval_max_images) == (2, 10, 500)
    again = config_from_dict(yaml.safe_load(cfg.to_yaml()))
    assert again.eval == cfg.eval
    assert load_config(None, []).eval.eval_every_epochs == 0          # off by default
    assert KnnMonitor.from_config(load_config(None, []), 10, "cpu") is None
    cfg = load_config(None, ["eval_every_steps=5", f"eval_data_path={cifar_small}", "eval_max_images=20",
                             "global_crops_size=32", "eval_resize=32", "eval_knn_k=3"])
    m = KnnMonitor.from_config(cfg, steps_per_epoch=7, device="cpu")
    assert (m.every_steps, m.k, len(m.train_set)) == (5, 3, 20)
    assert m.val_set[0][0].shape == (3, 32, 32)


@pytest.mark.parametrize("overrides, message", [
    (["eval_every_epochs=1"], "need eval_data_path"),
    (["eval_every_steps=-1"], "eval_every_steps must be >= 0"),
    (["eval_knn_k=0"], "eval_knn_k must be positive"),
    (["eval_crop_size=64", "eval_resize=32"], "eval_resize (32) must be >= eval_crop_size (64)"),
    (["eval_knnk=3"], "did you mean"),
])
def test_eval_config_errors(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert message in str(err.value)


# ------------------------------------------------------------------ under torchrun
def _rank_main(rank: int, port: int, data, out):
    import os
    import torch.distributed as dist
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        teacher = _teacher()
        monitor = _monitor(data, out, logger=RunLogger(out, enabled=rank == 0, tensorboard=False))
        before = torch.get_rng_state().clone()
        record = monitor.evaluate(teacher, global_step=5)
        assert torch.equal(before, torch.get_rng_state())
        assert (record is None) == (rank != 0)      # rank 0 votes; the others only embed their shard
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.heavy
def test_monitor_sharded_over_two_ranks_equals_one_process(cifar_small, tmp_path):
    import socket
    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    single = _monitor(cifar_small, tmp_path / "one", logger=None).evaluate(_teacher(), global_step=5)
    (tmp_path / "two").mkdir()
    mp.spawn(_rank_main, args=(port, cifar_small, tmp_path / "two"), nprocs=2)
    logged = [json.loads(s) for s in (tmp_path / "two" / "log.jsonl").read_text().splitlines()]
    assert [r["event"] for r in logged] == ["knn"]
    assert logged[0]["top1"] == pytest.approx(single["top1"], abs=100.0 / 40 + 1e-9)
    assert logged[0]["top5"] == pytest.approx(single["top5"], abs=100.0 / 40 + 1e-9)
