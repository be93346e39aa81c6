"""Fine-tuning that starts from its start's linear probe (LP-FT: ``head_init=probe``,
``backbone_lr_scale``) and fine-tuning for a wall-clock budget (``time_budget_minutes``): issue 33."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ssl_xcit.finetune.build import build_optimizer
from ssl_xcit.finetune.loop import train
from ssl_xcit.models import build_model
from tests.test_finetune import _built, ft_config


def _events(folder: Path, name: str) -> list[dict]:
    return [e for e in map(json.loads, (folder / "log.jsonl").read_text().splitlines()) if e["event"] == name]


@pytest.fixture(scope="module")
def start_file(tmp_path_factory) -> Path:
    """A 'pretrained' xcit_nano_12_p16 backbone file (seeded random weights: what matters here is
    that the head is fitted on *its* features and that they stay the file's)."""
    torch.manual_seed(11)
    path = tmp_path_factory.mktemp("start") / "backbone.pth"
    torch.save(build_model("xcit_nano_12_p16", num_classes=0).state_dict(), path)
    return path


def _features(model: torch.nn.Module, dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """The head's inputs computed apart from the code under test: XCiT's normed CLS token of every
    image, in one batch (the probe's grid is chosen on 4 held-out images here: ties between its
    settings must not flip on the last bit of a feature)."""
    model.eval()
    items = [dataset[i] for i in range(len(dataset))]
    with torch.no_grad():
        x = model.forward_features(torch.stack([image for image, _, _ in items]))[:, 0]
    return x, torch.tensor([label for _, label, _ in items])


def test_the_fitted_head_is_the_cached_probe_and_step_0_scores_it(cifar_small, start_file, tmp_path):
    from ssl_xcit.evaluate.linear import CachedConfig, cached_linear_eval, evaluate_heads
    out = tmp_path / "run"
    train(ft_config(cifar_small, out, pretrained_weights=str(start_file), head_init="probe", max_steps=1,
                    epochs=1, max_val_images=0))
    fitted = _events(out, "head_fitted")[0]
    # the cached probe fitted here on features computed apart, then scored by the probe's own code
    ft = _built(ft_config(cifar_small, tmp_path / "check", pretrained_weights=str(start_file)))
    train_set = ft.train_set
    train_set.transform = ft.val_set.transform
    x, y = _features(ft.model, train_set)
    probe = cached_linear_eval(x, y, x[:1], y[:1], len(ft.classes), CachedConfig(seed=3))
    assert (fitted["lr"], fitted["weight_decay"]) == (probe["selected"]["lr"], probe["selected"]["weight_decay"])
    saved = torch.load(out / "checkpoint.pth", weights_only=True)
    vx, vy = _features(ft.model, ft.val_set)
    top1, _ = evaluate_heads(probe["weight"][None].double(), probe["bias"][None].double(), vx.double(), vy)
    assert fitted["top1"] == pytest.approx(float(top1[0]), abs=1e-9)
    assert saved["pretrained"]["head_fit"]["holdout_top1"] == probe["selected"]["holdout_top1"]
    assert fitted["images"] == len(train_set) == 40
    vals = _events(out, "val")
    assert vals and all(v["start_probe_top1"] == fitted["top1"] for v in vals)   # beside every result


def test_fitting_the_head_leaves_the_backbone_as_the_file_has_it(cifar_small, start_file, tmp_path):
    from ssl_xcit.finetune.probe_head import fit_probe_head
    ft = _built(ft_config(cifar_small, tmp_path / "run", pretrained_weights=str(start_file)))
    before = {k: v.clone() for k, v in ft.model.state_dict().items()}
    fitted = fit_probe_head(ft.model, ft.train_set, ft.val_set.transform, len(ft.classes), torch.device("cpu"))
    after = ft.model.state_dict()
    changed = sorted(k for k in before if not torch.equal(before[k], after[k]))
    assert changed == ["head.bias", "head.weight"]          # BatchNorm statistics included: untouched
    assert torch.equal(after["head.weight"], fitted.weight) and ft.model.training   # the mode comes back


def test_backbone_lr_scale_multiplies_only_the_backbone_on_top_of_layer_decay(cifar_small, tmp_path):
    plain = _built(ft_config(cifar_small, tmp_path / "a", layer_decay=0.75))
    scaled_cfg = ft_config(cifar_small, tmp_path / "b", layer_decay=0.75, backbone_lr_scale=0.1)
    scaled = build_optimizer(scaled_cfg, plain.model)
    names = {id(p): n for n, p in plain.model.named_parameters()}
    base = {names[id(p)]: g["lr_scale"] for g in plain.optimizer.param_groups for p in g["params"]}
    now = {names[id(p)]: g["lr_scale"] for g in scaled.param_groups for p in g["params"]}
    assert now.keys() == base.keys()
    for name, scale in base.items():
        want = scale if name.startswith("head.") else 0.1 * scale
        assert now[name] == pytest.approx(want, rel=1e-12), name
    assert len({g["lr_scale"] for g in plain.optimizer.param_groups}) > 2   # layer decay was really on


def test_lpft_stops_and_resumes_bit_for_bit_and_fits_the_head_once(cifar_small, start_file, tmp_path, capsys):
    common = dict(pretrained_weights=str(start_file), head_init="probe", backbone_lr_scale=0.3, epochs=2)
    straight = tmp_path / "straight"
    train(ft_config(cifar_small, straight, **common))
    pieces, calls = tmp_path / "pieces", {"n": 0}

    def stop_at_three() -> bool:
        calls["n"] += 1
        return calls["n"] == 3
    assert train(ft_config(cifar_small, pieces, **common), stop_requested=stop_at_three).status == "stopped"
    assert train(ft_config(cifar_small, pieces, **common)).status == "finished"
    a = torch.load(straight / "checkpoint.pth", weights_only=True)
    b = torch.load(pieces / "checkpoint.pth", weights_only=True)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert len(_events(pieces, "head_fitted")) == 1
    assert b["pretrained"]["probe"]["top1"] == _events(pieces, "head_fitted")[0]["top1"]


@pytest.mark.parametrize("bad, says", [
    ({"head_init": "probe"}, "head_init=probe fits the head on the pretrained start's features"),
    ({"head_init": "linear"}, "head_init must be one of random | probe"),
    ({"backbone_lr_scale": 0}, "backbone_lr_scale must be in (0, 1]"),
    ({"time_budget_minutes": 1, "max_steps": 5}, "set one length: time_budget_minutes or max_steps"),
    ({"time_budget_minutes": -1}, "time_budget_minutes must be >= 0")])
def test_bad_lpft_and_budget_settings_are_refused_in_one_line(cifar_small, tmp_path, bad, says):
    from ssl_xcit.engine.config import ConfigError
    with pytest.raises(ConfigError, match=None) as err:
        ft_config(cifar_small, tmp_path / "run", **bad).validate()
    assert says in str(err.value) and "\n" not in str(err.value)


# ---- time_budget_minutes

def test_planned_steps_fit_the_budget_and_a_set_epochs_caps_them():
    from ssl_xcit.finetune.budget import SAFETY, planned_steps
    assert planned_steps(1.0, 0.5, 10, 100) == int(SAFETY * 120)
    assert planned_steps(1.0, 0.5, 10, 3) == 30
    assert planned_steps(0.001, 10.0, 10, 100) == 1


@pytest.mark.parametrize("seconds, short", [(0.05, False), (30.0, True)])
def test_recipe_auto_plans_for_the_steps_the_budget_holds(cifar_small, tmp_path, monkeypatch, seconds, short):
    """The length the budget gives decides recipe: auto's length-dependent values, as epochs or
    max_steps do: a step measured slow makes a short run (no mixup, the short-run lr), a fast one a
    long run (DeiT's mixup/cutmix kept)."""
    from ssl_xcit.finetune import build as build_module
    from ssl_xcit.finetune import recipe
    monkeypatch.setattr(build_module, "step_seconds", lambda *a, **k: seconds)
    from ssl_xcit.train.config import load_config
    from ssl_xcit.finetune.config import FinetuneConfig
    overrides = {"arch": "xcit_nano_12_p16", "input_size": 32, "batch_size_per_gpu": 8, "num_workers": 0,
                 "device": "cpu", "precision": "fp32", "tensorboard": False, "data_path": str(cifar_small),
                 "output_dir": str(tmp_path / "run"), "labels_per_class": 4, "time_budget_minutes": 10}
    cfg = load_config(None, [f"{k}={v}" for k, v in overrides.items()], schema=FinetuneConfig)   # epochs unset
    ft = _built(cfg)
    steps = int(0.95 * 600 / seconds)
    assert ft.cfg.run.max_steps == steps == ft.total_steps == len(ft.lr)   # the cosine laid over the plan
    assert ft.cfg.optim.epochs >= steps / (40 // 8)
    assert (ft.cfg.mixup.mixup == 0.0) is short and (ft.cfg.optim.lr == recipe.SHORT_RUN_LR) is short


def test_a_budgeted_run_plans_from_its_pace_and_resumes_with_its_plan(cifar_small, tmp_path, monkeypatch, capsys):
    from ssl_xcit.engine import budget as clock
    monkeypatch.setattr(clock, "SKIP_STEPS", 1)
    monkeypatch.setattr(clock, "PROBE_STEPS", 2)
    out = tmp_path / "run"
    cfg = dict(time_budget_minutes=0.2, epochs=50, warmup_epochs=0)
    calls = {"n": 0}

    def stop_at_five() -> bool:
        calls["n"] += 1
        return calls["n"] == 5
    assert train(ft_config(cifar_small, out, **cfg), stop_requested=stop_at_five).status == "stopped"
    saved = torch.load(out / "checkpoint.pth", weights_only=True)
    planned, spent = saved["config"]["run"]["max_steps"], saved["trained_seconds"]
    assert planned > 0 and spent > 0
    assert "time budget 0.2 min" in capsys.readouterr().out
    result = train(ft_config(cifar_small, out, **cfg))
    final = torch.load(out / "checkpoint.pth", weights_only=True)
    assert result.status == "finished" and final["trained_seconds"] >= spent
    assert final["config"]["run"]["max_steps"] == planned or _events(out, "time_budget_spent")
    assert final["global_step"] <= planned


def test_recipe_auto_fine_tunes_a_pretrained_start_from_its_probe_and_a_random_one_as_before():
    from ssl_xcit.finetune.recipe import LPFT_BACKBONE_LR_SCALE, choose
    for epochs in (3, 50):
        pretrained = choose(2000, 32, 8, epochs=epochs, pretrained=True)
        assert pretrained["optim.head_init"].value == "probe"
        assert pretrained["optim.backbone_lr_scale"].value == LPFT_BACKBONE_LR_SCALE < 1.0
        assert "optim.freeze_norm_stats" not in pretrained    # measured: no better on average (recipe.py)
        lpft = {"optim.head_init", "optim.backbone_lr_scale"}
        assert not lpft & set(choose(2000, 32, 8, epochs, pretrained=False))


def test_freeze_norm_stats_keeps_the_starts_batchnorm_statistics_while_the_weights_learn(cifar_small, start_file,
                                                                                        tmp_path):
    out = tmp_path / "run"
    train(ft_config(cifar_small, out, pretrained_weights=str(start_file), freeze_norm_stats=True, epochs=1))
    start = torch.load(start_file, weights_only=True)
    end = torch.load(out / "checkpoint.pth", weights_only=True)["model"]
    stats = [k for k in start if k.endswith(("running_mean", "running_var"))]
    weights = [k.replace("running_mean", "weight") for k in stats if k.endswith("running_mean")]
    assert stats and all(torch.equal(start[k], end[k]) for k in stats)
    assert any(not torch.equal(start[k], end[k]) for k in weights)    # BatchNorm's affine weights did learn
    free = tmp_path / "free"
    train(ft_config(cifar_small, free, pretrained_weights=str(start_file), epochs=1))
    moved = torch.load(free / "checkpoint.pth", weights_only=True)["model"]
    assert any(not torch.equal(start[k], moved[k]) for k in stats)   # without it they follow the batches


def test_the_probe_is_the_first_best_checkpoint_and_a_run_that_does_not_pass_it_says_so(cifar_small, start_file,
                                                                                         tmp_path, capsys):
    out = tmp_path / "run"
    train(ft_config(cifar_small, out, pretrained_weights=str(start_file), head_init="probe", epochs=1, lr=1e-9,
                    min_lr=1e-9, freeze_norm_stats=True, max_val_images=0))   # a run that cannot move
    best = torch.load(out / "checkpoint_best.pth", weights_only=True)
    fitted, vals = _events(out, "head_fitted")[0], _events(out, "val")
    assert vals[-1]["top1"] == fitted["top1"]                  # it did not move ...
    assert best["global_step"] == 0 and best["best"]["top1"] == fitted["top1"]   # ... so the probe is the best
    assert "did not pass the start's linear probe" in capsys.readouterr().out
    assert _events(out, "finetuning_not_paid")
    moved = tmp_path / "moved"
    train(ft_config(cifar_small, moved, pretrained_weights=str(start_file), head_init="probe", epochs=3, lr=0.05,
                    max_val_images=0))
    vals = _events(moved, "val")
    top = max(v["top1"] for v in vals)
    best = torch.load(moved / "checkpoint_best.pth", weights_only=True)
    if top > _events(moved, "head_fitted")[0]["top1"]:      # passed: the best is a fine-tuned step, nothing said
        assert best["global_step"] == min(v["global_step"] for v in vals if v["top1"] == top)
        assert not _events(moved, "finetuning_not_paid")
    else:
        assert best["global_step"] == 0 and _events(moved, "finetuning_not_paid")
