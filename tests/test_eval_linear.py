"""Linear probes: the batched-heads trainer against torch's own SGD, separable data, a frozen backbone
that stays frozen, exact resume, and the command line on a tiny real image folder."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ssl_xcit.commands import linear as linear_command, options
from ssl_xcit.evaluate import backbone, linear, runtime
from conftest import make_subset

REPO = Path(__file__).resolve().parents[1]
ARCH = "xcit_nano_12_p16"



def reference_sgd_head(x, y, num_classes, lr, wd, epochs, batch_size, seed, momentum=0.9):
    """One head the ordinary way: nn.Linear + torch.optim.SGD + CosineAnnealingLR, float64."""
    gen = torch.Generator().manual_seed(seed)
    lin = nn.Linear(x.shape[1], num_classes).double()
    with torch.no_grad():
        lin.weight.copy_(torch.randn(num_classes, x.shape[1], generator=gen, dtype=torch.float64) * 0.01)
        lin.bias.zero_()
    opt = torch.optim.SGD(lin.parameters(), lr=lr, momentum=momentum, weight_decay=wd)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs, eta_min=0)
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        for s in range(0, len(x), batch_size):
            idx = order[s:s + batch_size]
            loss = F.cross_entropy(lin(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
    return lin.weight.detach(), lin.bias.detach()


def test_batched_heads_equal_independent_torch_sgd_runs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(53, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (53,), generator=g)
    lrs, wds = [0.5, 0.05, 0.2], [0.0, 1e-2, 1e-3]
    weight, bias = linear.train_linear_heads(x, y, 4, lrs, wds, epochs=4, batch_size=16, seed=7)
    assert weight.shape == (3, 4, 6) and bias.shape == (3, 4)
    for h, (lr, wd) in enumerate(zip(lrs, wds)):
        w_ref, b_ref = reference_sgd_head(x, y, 4, lr, wd, epochs=4, batch_size=16, seed=7)
        torch.testing.assert_close(weight[h], w_ref, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(bias[h], b_ref, rtol=1e-9, atol=1e-12)
    # heads with different settings really end up different
    assert not torch.allclose(weight[0], weight[1])


def _blobs(n_per_class, classes=4, dim=16, seed=0, spread=0.3):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=g) * 3
    y = torch.arange(classes).repeat_interleave(n_per_class)
    x = centres[y] + spread * torch.randn(len(y), dim, generator=g)
    return x, y


def test_linearly_separable_features_reach_100_percent():
    tx, ty = _blobs(60)
    vx, vy = _blobs(25)
    vx = vx + 0.05 * torch.randn(vx.shape, generator=torch.Generator().manual_seed(9))
    cfg = linear.CachedConfig(lrs=(1e-3, 1e-1, 1.0), wds=(0.0, 1e-4), epochs=30, batch_size=32, seed=1)
    res = linear.cached_linear_eval(tx, ty, vx, vy, 4, cfg)
    assert res["mode"] == "cached" and "NOT DINO" in res["protocol"]
    assert res["top1"] == pytest.approx(100.0) and res["top5"] == pytest.approx(100.0)
    assert len(res["grid"]) == 6 and res["num_holdout"] == 24 and res["num_fit"] == 216
    # the held-out choice is the grid point with the best held-out accuracy
    assert res["selected"]["holdout_top1"] == max(g["holdout_top1"] for g in res["grid"])


def test_cached_probe_is_not_trivially_perfect_on_random_labels():
    tx, _ = _blobs(50)
    ty = torch.randint(0, 4, (200,), generator=torch.Generator().manual_seed(3))
    vx, _ = _blobs(25, seed=4)
    vy = torch.randint(0, 4, (100,), generator=torch.Generator().manual_seed(5))
    res = linear.cached_linear_eval(tx, ty, vx, vy, 4, linear.CachedConfig(lrs=(0.1,), wds=(0.0,), epochs=10,
                                                                          batch_size=32))
    assert res["top1"] < 60


def test_evaluate_heads_counts_top1_and_top5():
    weight = torch.eye(6)[None]  # logits = features
    bias = torch.zeros(1, 6)
    x = torch.tensor([[0.0, 5, 4, 3, 2, 1], [6, 5, 4, 3, 2, 1.0]])
    top1, top5 = linear.evaluate_heads(weight, bias, x, torch.tensor([1, 5]))
    assert top1.tolist() == [50.0] and top5.tolist() == [50.0]


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="one weight decay per learning rate"):
        linear.train_linear_heads(torch.zeros(4, 2), torch.zeros(4, dtype=torch.long), 2, [0.1], [], 1, 2)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\)"):
        linear.train_linear_heads(torch.zeros(4, 2), torch.full((4,), 3), 2, [0.1], [0.0], 1, 2)
    with pytest.raises(ValueError, match="holdout must be in"):   # the library names its parameter
        linear.cached_linear_eval(torch.zeros(4, 2), torch.zeros(4, dtype=torch.long), torch.zeros(1, 2),
                                  torch.zeros(1, dtype=torch.long), 2, linear.CachedConfig(holdout=1.5))
    with pytest.raises(ValueError, match="--epochs must be positive"):
        linear_command.main(["--checkpoint", ARCH, "--data-path", ".", "--epochs", "0"])


def test_probe_input_uses_last_cls_tokens():
    model = backbone.load_frozen_backbone(ARCH)
    x = torch.randn(2, 3, 32, 32)
    assert linear.default_n_last_blocks(model) == 1  # XCiT: DINO probes the final CLS feature
    one = linear.probe_input(model, x, 1, False)
    torch.testing.assert_close(one, model(x))
    two = linear.probe_input(model, x, 2, True)
    assert two.shape == (2, 3 * backbone.embed_dim(model))
    torch.testing.assert_close(two[:, backbone.embed_dim(model):2 * backbone.embed_dim(model)], model(x))
    with pytest.raises(ValueError, match="n_last_blocks=3"):
        linear.probe_input(model, x, 3, False)


# ------------------------------------------------------------------------------------------- full mode
@pytest.fixture(scope="module")
def tiny_folder(cifar_root, tmp_path_factory):
    return make_subset(cifar_root, tmp_path_factory.mktemp("lin_tiny"), 3, 2)  # 30 train / 20 val


def _full_args(data, out, epochs=1, extra=()):
    """The library's settings as the command line fills them."""
    args = options.parse("eval_linear", ["--checkpoint", ARCH, "--data-path", str(data), "--mode", "full",
                                         "--crop-size", "32", "--batch-size", "8", "--num-workers", "0",
                                         "--device", "cpu", "--output-dir", str(out), "--epochs", str(epochs),
                                         "--no-progress", "--lr", "0.5", *extra], check=False)
    return linear.with_defaults(options.settings(linear.LinearSettings, args))


def test_full_mode_never_changes_the_backbone(tiny_folder, tmp_path):
    env = runtime.setup_env("cpu", 0)
    model = backbone.load_frozen_backbone(ARCH)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    args = _full_args(tiny_folder, tmp_path, extra=["--n-last-blocks", "2", "--avgpool-patchtokens"])
    res = linear.full_linear_eval(args, env, tmp_path, model=model)
    after = model.state_dict()
    assert before.keys() == after.keys()
    for k in before:  # weights and BatchNorm running statistics of the patch embedding
        assert torch.equal(before[k], after[k]), k
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    ckpt = torch.load(tmp_path / linear.CHECKPOINT_NAME, weights_only=True)
    assert ckpt["epoch"] == 1
    assert ckpt["probe"]["linear.weight"].shape == (10, 3 * 128)  # 2 CLS tokens + mean patch token
    # the probe itself did train: SGD took steps (non-zero momentum)
    assert all(s["momentum_buffer"].abs().sum() > 0 for s in ckpt["optimizer"]["state"].values())
    assert res["mode"] == "full" and res["best"] is not None and res["last"]["epoch"] == 0


def test_full_mode_resumes_exactly_after_an_interruption(tiny_folder, tmp_path, monkeypatch):
    env = runtime.setup_env("cpu", 0)
    straight = linear.full_linear_eval(_full_args(tiny_folder, tmp_path / "a", epochs=2), env, tmp_path / "a")
    real_epoch = linear._train_epoch
    calls = {"n": 0}

    def crash_on_second(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("simulated preemption")
        return real_epoch(*a, **kw)

    monkeypatch.setattr(linear, "_train_epoch", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        linear.full_linear_eval(_full_args(tiny_folder, tmp_path / "b", epochs=2), env, tmp_path / "b")
    assert torch.load(tmp_path / "b" / linear.CHECKPOINT_NAME, weights_only=True)["epoch"] == 1
    monkeypatch.setattr(linear, "_train_epoch", real_epoch)
    resumed = linear.full_linear_eval(_full_args(tiny_folder, tmp_path / "b", epochs=2), env, tmp_path / "b")
    a = torch.load(tmp_path / "a" / linear.CHECKPOINT_NAME, weights_only=True)
    b = torch.load(tmp_path / "b" / linear.CHECKPOINT_NAME, weights_only=True)
    for k in a["probe"]:
        assert torch.equal(a["probe"][k], b["probe"][k]), k
    assert straight["best"] == resumed["best"] and straight["last"] == resumed["last"]
    # a different probe in the same folder is refused instead of silently mixed in
    with pytest.raises(ValueError, match="different linear probe"):
        linear.full_linear_eval(_full_args(tiny_folder, tmp_path / "b", epochs=3), env, tmp_path / "b")


def test_an_unreadable_probe_checkpoint_is_one_line_naming_the_file(tiny_folder, tmp_path):
    """A torn or foreign file where the probe resumes from stops the run before any training, naming it."""
    env = runtime.setup_env("cpu", 0)
    (tmp_path / linear.CHECKPOINT_NAME).write_bytes(b"not a torch file")
    with pytest.raises(ValueError) as err:
        linear.full_linear_eval(_full_args(tiny_folder, tmp_path, epochs=1), env, tmp_path)
    message = str(err.value)
    assert str(tmp_path / linear.CHECKPOINT_NAME) in message and "unreadable" in message
    assert "\n" not in message and "delete it" in message


def test_full_mode_says_its_weight_decay_and_stops_when_the_probe_diverges(tiny_folder, tmp_path):
    """The protocol line said "no weight decay" whatever --weight-decay was; a probe whose loss is no
    longer finite is stopped with one line, not trained on for the remaining epochs and reported."""
    env = runtime.setup_env("cpu", 0)
    res = linear.full_linear_eval(_full_args(tiny_folder, tmp_path / "wd", extra=["--weight-decay", "0.001"]),
                                  env, tmp_path / "wd")
    assert "weight decay 0.001" in res["protocol"] and "no weight decay" not in res["protocol"]
    assert "no weight decay" in linear.full_protocol(0.0)
    with pytest.raises(linear.EvalInputError, match=r"diverged in epoch \d \(train loss (nan|inf)\): lr 1e\+38, "
                                                    r"scaled to .*; pass a lower lr"):
        linear.full_linear_eval(_full_args(tiny_folder, tmp_path / "lr", epochs=3, extra=["--lr", "1e38"]),
                                env, tmp_path / "lr")


# ------------------------------------------------------------------------------------------- CLI
def test_cli_cached_mode_on_real_images(cifar_small, tmp_path):
    report = linear_command.main(["--checkpoint", ARCH, "--data-path", str(cifar_small), "--crop-size", "32",
                          "--num-workers", "0", "--device", "cpu", "--output-dir", str(tmp_path),
                          "--epochs", "3", "--batch-size", "64", "--lr-grid", "0.01", "1.0", "--wd-grid", "0",
                          "--no-progress"])
    saved = json.loads((tmp_path / "linear.json").read_text())
    assert saved["mode"] == "cached" and "NOT DINO" in saved["protocol"]
    assert saved["top1"] == report["top1"] and 0 <= saved["top1"] <= saved["top5"] <= 100
    assert saved["num_train"] == 200 and saved["num_val"] == 100 and saved["num_holdout"] == 20
    assert len(saved["grid"]) == 2 and saved["n_last_blocks"] == 1 and saved["arch"] == ARCH   # not null
    assert saved["data_path"] == str(cifar_small)


def test_cli_full_mode_writes_best_and_last(tiny_folder, tmp_path):
    report = linear_command.main(["--checkpoint", ARCH, "--data-path", str(tiny_folder), "--mode", "full",
                          "--crop-size", "32", "--batch-size", "8", "--num-workers", "0", "--device", "cpu",
                          "--output-dir", str(tmp_path), "--epochs", "2", "--no-progress"])
    saved = json.loads((tmp_path / "linear.json").read_text())
    assert saved["mode"] == "full" and saved["protocol"].startswith("DINO linear probe")
    assert saved["best"]["top1"] >= saved["last"]["top1"] and saved["last"]["epoch"] == 1
    assert saved["top1"] == saved["best"]["top1"] == report["top1"]
    assert [h["epoch"] for h in saved["history"]] == [0, 1] and saved["arch"] == ARCH


def test_script_help_runs_without_install(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "eval" / "eval_linear.py"), "--help"], cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": "", "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "--mode" in proc.stdout and "--n-last-blocks" in proc.stdout


def test_backbone_outputs_same_for_project_xcit_and_plain_timm_xcit():
    """Two routes to the same numbers: ssl_xcit's forward_features_all and hooks on timm's blocks."""
    import timm
    ours = backbone.load_frozen_backbone(ARCH)
    plain = timm.create_model("xcit_nano_12_p16_224", num_classes=0).eval()
    plain.load_state_dict(ours.state_dict())
    x = torch.randn(3, 3, 48, 32)
    names = ("cls", "last_blocks", "avgpool", "patch")
    a = backbone.backbone_outputs(ours, x, names, n_last_blocks=2)
    b = backbone.backbone_outputs(plain, x, names, n_last_blocks=2)
    for n in names:
        torch.testing.assert_close(a[n], b[n], rtol=1e-5, atol=1e-6)
    assert a["patch"].shape == (3, 6, 128) and a["last_blocks"].shape == (3, 256)
    torch.testing.assert_close(a["last_blocks"][:, 128:], plain(x), rtol=1e-5, atol=1e-6)
