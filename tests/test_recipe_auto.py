"""recipe=auto: the rules (a data set and a budget give the documented values), user values win,
large data sets are left alone, and the training loop applies, prints and records the choices;
time_budget_minutes plans the steps once and a resumed run keeps the plan."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from ssl_xcit.train import recipe
from ssl_xcit.engine.budget import TimeBudget
from ssl_xcit.train.config import ConfigError, load_config, user_set_keys
from ssl_xcit.train.recipe import AUTO_MAX_IMAGES, DataFacts, apply_auto, choose, teacher_momentum

from train_helpers import load_weights, assert_same_weights, tiny_overrides


# ---------------------------------------------------------------- the rules
@pytest.mark.parametrize("images, out_dim", [(500, 1024), (6400, 1024), (50_000, 4096), (150_000, 8192)])
def test_prototypes_follow_the_number_of_images(images, out_dim):
    c = choose(DataFacts(images, 32), steps=1000, embed_dim=128, patch_size=8)
    assert c["model.out_dim"].value == out_dim
    # the documented rule, computed independently: images / 16 as a power of two in [1024, 65536]
    assert out_dim == min(65536, max(1024, 2 ** round(math.log2(images / 16))))


@pytest.mark.parametrize("side, patch, global_size, local_size", [
    (32, 8, 32, 16), (36, 8, 32, 16), (96, 16, 96, 48), (64, 8, 64, 24), (500, 16, 224, 96), (224, 8, 224, 96)])
def test_crops_follow_the_image_size_and_patch(side, patch, global_size, local_size):
    c = choose(DataFacts(10_000, side), steps=1000, embed_dim=192, patch_size=patch)
    assert c["data.global_crops_size"].value == global_size
    assert c["data.local_crops_size"].value == local_size
    assert global_size % patch == 0 and local_size % patch == 0


@pytest.mark.parametrize("steps, momentum", [(100, 0.975), (400, 0.975), (1000, 0.99), (2500, 0.996),
                                             (100_000, 0.996), (600, 0.9833)])
def test_teacher_momentum_keeps_the_ema_window_a_tenth_of_the_run(steps, momentum):
    assert teacher_momentum(steps).value == momentum
    window = 1 / (1 - momentum)
    assert window <= max(40, steps / 10) + 1


def test_every_choice_says_why():
    c = choose(DataFacts(6400, 32), steps=200, embed_dim=128, patch_size=8)
    assert {"model.out_dim", "model.use_bn_in_head", "dino.momentum_teacher", "data.global_crops_size",
            "dino.koleo_loss_weight"} <= set(c)
    assert c["dino.koleo_loss_weight"].value > 0
    assert all(len(choice.reason) > 20 for choice in c.values())


# ---------------------------------------------------------------- applying: user values win
def _cfg(*overrides):
    return load_config(None, ["arch=xcit_nano_12_p8", "data_path=x", *overrides])


def test_user_values_win_and_defaults_are_filled():
    cfg = _cfg("out_dim=777", "momentum_teacher=0.9")
    assert {"model.out_dim", "dino.momentum_teacher", "model.arch"} <= user_set_keys(cfg)
    applied = apply_auto(cfg, DataFacts(6400, 32), 200, user_set_keys(cfg))
    assert cfg.model.out_dim == 777 and cfg.dino.momentum_teacher == 0.9
    assert "model.out_dim" not in applied and "dino.momentum_teacher" not in applied
    assert cfg.model.use_bn_in_head is True and cfg.data.global_crops_size == 32   # DINO's defaults: False, 224


def test_a_clamped_momentum_says_it_was_clamped_and_to_what():
    """A 4-step run's reason said "about 10% of the 4 steps" for a 40-step window (0.975, the floor)."""
    short = teacher_momentum(4)
    assert short.value == 0.975 and "about 10%" not in short.reason
    assert short.reason.startswith("clamped to the lowest momentum 0.975 (an EMA window of 40 steps): 10% of the "
                                   "4 steps would be a window of 0.4 steps"), short.reason
    long = teacher_momentum(100_000)
    assert long.value == 0.996 and long.reason.startswith("clamped to DINO's momentum 0.996 (an EMA window of 250 "
                                                          "steps): 10% of the 100,000 steps would be a window of "
                                                          "10,000 steps"), long.reason
    assert teacher_momentum(1000).reason.startswith("an EMA window 1/(1-m) of 100 steps: about 10% of the 1,000")


def test_the_teacher_momentum_stays_put_unless_the_user_says_otherwise():
    from ssl_xcit.train.loop import build_schedules
    cfg = _cfg("epochs=1")
    apply_auto(cfg, DataFacts(6400, 32), 400, user_set_keys(cfg))
    assert cfg.dino.final_momentum_teacher == cfg.dino.momentum_teacher == teacher_momentum(400).value
    assert cfg.dino.koleo_loss_weight == recipe.KOLEO_WEIGHT
    momentum = build_schedules(cfg, steps_per_epoch=400, world_size=1).teacher_momentum
    assert len(momentum) == 400 and momentum.min() == momentum.max() == pytest.approx(0.975)

    cfg = _cfg("momentum_teacher=0.996")                 # the user's start: the end follows it
    apply_auto(cfg, DataFacts(6400, 32), 400, user_set_keys(cfg))
    assert cfg.dino.final_momentum_teacher == 0.996
    cfg = _cfg("epochs=1", "final_momentum_teacher=1.0", "koleo_loss_weight=0")       # DINO's way, asked for
    apply_auto(cfg, DataFacts(6400, 32), 400, user_set_keys(cfg))
    assert cfg.dino.final_momentum_teacher == 1.0 and cfg.dino.koleo_loss_weight == 0
    momentum = build_schedules(cfg, steps_per_epoch=400, world_size=1).teacher_momentum
    assert momentum[0] == pytest.approx(0.975) and momentum[-1] == pytest.approx(1.0, abs=1e-6)

    cfg = _cfg()                                          # a time budget's plan moves both
    recipe.replan(cfg, 4000, 400, user_set_keys(cfg))
    assert cfg.dino.momentum_teacher == cfg.dino.final_momentum_teacher == 0.996
    cfg = _cfg("final_momentum_teacher=1.0")
    recipe.replan(cfg, 4000, 400, user_set_keys(cfg))
    assert (cfg.dino.momentum_teacher, cfg.dino.final_momentum_teacher) == (0.996, 1.0)


def test_a_time_budget_plan_sets_the_lr_warmup_from_the_planned_steps():
    """epochs=100 caps a time-budgeted run; the plan (here 1,000 steps of 195 per epoch: 6 epochs)
    decides the warm-up, a tenth of the planned epochs, not 10 of the configured 100 (which would
    warm the lr up over all of a run shorter than 1,950 steps); a warm-up the user set stays."""
    from ssl_xcit.train.loop import build_schedules
    cfg = _cfg("epochs=100")
    apply_auto(cfg, DataFacts(50_000, 32), 100 * 195, user_set_keys(cfg))
    assert cfg.optim.warmup_epochs == 10
    recipe.replan(cfg, 1000, 195, user_set_keys(cfg))
    assert cfg.optim.warmup_epochs == 0
    lr = build_schedules(cfg, steps_per_epoch=195, world_size=1, total_steps=1000).lr
    assert lr[0] == lr.max() and lr[-1] < 0.01 * lr[0]     # no warm-up; the cosine reaches min_lr
    recipe.replan(cfg, 6000, 195, user_set_keys(cfg))       # 31 epochs: 3 of warm-up
    assert cfg.optim.warmup_epochs == 3
    lr = build_schedules(cfg, steps_per_epoch=195, world_size=1, total_steps=6000).lr
    assert int(lr.argmax()) == 3 * 195 - 1 or int(lr.argmax()) == 3 * 195
    cfg = _cfg("epochs=100", "warmup_epochs=20")
    recipe.replan(cfg, 1000, 195, user_set_keys(cfg))
    assert cfg.optim.warmup_epochs == 20
    with pytest.raises(ConfigError, match="final_momentum_teacher must be in"):
        _cfg("final_momentum_teacher=1.5")


def test_values_from_a_config_file_count_as_set(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("model:\n  arch: xcit_nano_12_p8\n  out_dim: 2048\ndata:\n  global_crops_size: 64\n")
    cfg = load_config(path, ["data_path=x"])
    apply_auto(cfg, DataFacts(6400, 32), 200, user_set_keys(cfg))
    assert cfg.model.out_dim == 2048 and cfg.data.global_crops_size == 64
    assert cfg.model.use_bn_in_head is True


def test_large_data_sets_and_recipe_off_are_left_as_written():
    for cfg, facts in ((_cfg(), DataFacts(AUTO_MAX_IMAGES, 400)), (_cfg("recipe=off"), DataFacts(6400, 32))):
        before = cfg.to_dict()
        assert apply_auto(cfg, facts, 200, user_set_keys(cfg)) == {}
        assert cfg.to_dict() == before


def test_bad_recipe_and_budget_values_are_one_line_errors():
    with pytest.raises(ConfigError, match="recipe must be auto or off"):
        _cfg("recipe=fast")
    with pytest.raises(ConfigError, match="time_budget_minutes must be >= 0"):
        _cfg("time_budget_minutes=-1")


# ---------------------------------------------------------------- in the training loop
def _auto_overrides(data, out, **extra):
    """The tiny test run, but leaving the values recipe=auto chooses unset."""
    chosen = {"out_dim", "head_hidden_dim", "global_crops_size", "local_crops_size", "drop_path_rate", "recipe"}
    keep = [o for o in tiny_overrides(data, out, **extra) if o.split("=")[0] not in chosen]
    return keep + ["recipe=auto"]


def test_the_loop_applies_prints_and_records_the_choices(cifar_small, tmp_path, capsys):
    from ssl_xcit.train.loop import train
    out = tmp_path / "auto"
    cfg = load_config(None, _auto_overrides(cifar_small, out, max_steps=2, epochs=1))
    result = train(cfg)
    assert result.status == "finished"
    assert cfg.model.out_dim == 65536        # the caller's config is left as given
    printed = capsys.readouterr().out
    assert "recipe: auto chose these" in printed and "model.out_dim: 1024" in printed
    text = (out / "config.yaml").read_text()
    written = yaml.safe_load(text)            # the choices are the values, their reasons comments
    assert written["model"]["out_dim"] == 1024 and written["model"]["use_bn_in_head"] is True
    assert written["data"]["global_crops_size"] == 32
    assert "#   model.use_bn_in_head: True  # BatchNorm" in text
    events = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert any(e.get("event") == "recipe_auto" for e in events)
    # the checkpoint holds the model the choices built
    assert load_weights(out)["student.head.last_layer.parametrizations.weight.original1"].shape[0] == 1024


def test_time_budget_plans_once_and_a_resumed_run_keeps_the_plan(cifar_small, tmp_path):
    from ssl_xcit.train.loop import train
    common = dict(batch_size_per_gpu=4, max_images=64, log_every_steps=1)
    straight, split = tmp_path / "straight", tmp_path / "split"
    ov = [o for o in _auto_overrides(cifar_small, straight, **common) if not o.startswith("epochs=")]
    first = train(load_config(None, ov + ["time_budget_minutes=0.15"]))
    assert first.status == "finished"
    events = [json.loads(line) for line in (straight / "log.jsonl").read_text().splitlines()]
    planned = [e for e in events if e.get("event") == "time_budget_planned"]
    assert len(planned) == 1
    plans = planned + [e for e in events if e.get("event") == "time_budget_replanned"]   # at most 2 re-plans
    assert len(plans) <= 3 and all(a["global_step"] < b["global_step"] for a, b in zip(plans, plans[1:]))
    steps = first.global_step
    assert steps <= plans[-1]["planned_steps"]
    written = yaml.safe_load((straight / "config.yaml").read_text())
    assert written["run"]["max_steps"] == plans[-1]["planned_steps"]
    # a stop part-way, then the same command again: the saved plan and schedules carry on (no new probe)
    ov = [o for o in _auto_overrides(cifar_small, split, **common) if not o.startswith("epochs=")]
    calls = iter([False] * 13 + [True])   # after the plan (step 11)
    stopped = train(load_config(None, ov + ["time_budget_minutes=0.15"]), stop_requested=lambda: next(calls, False))
    assert stopped.status == "stopped" and stopped.global_step == 14
    plan = yaml.safe_load((split / "config.yaml").read_text())["run"]["max_steps"]
    resumed = train(load_config(None, ov + ["time_budget_minutes=0.15"]))
    assert resumed.status == "finished"
    events = [json.loads(line) for line in (split / "log.jsonl").read_text().splitlines()]
    assert len([e for e in events if e.get("event") == "time_budget_planned"]) == 1
    assert yaml.safe_load((split / "config.yaml").read_text())["run"]["max_steps"] == plan


def test_time_budget_clock_counts_earlier_runs():
    b = TimeBudget(1.0, trained_seconds=59.5)
    b.start()
    assert not b.spent or b.elapsed >= 60
    assert TimeBudget(1.0, trained_seconds=61).spent
    plan = None
    b = TimeBudget(1.0)
    b.start()
    from ssl_xcit.engine.budget import PROBE_STEPS, SKIP_STEPS
    for step in range(1, SKIP_STEPS + PROBE_STEPS):
        assert b.step_done(step) is None
    plan = b.step_done(SKIP_STEPS + PROBE_STEPS)
    assert plan is not None and plan > SKIP_STEPS + PROBE_STEPS


class _Clock:
    """A fake ``time.perf_counter`` for the budget: each step takes ``pace`` seconds."""
    def __init__(self):
        self.now, self.pace = 1000.0, 1.0

    def __call__(self):
        return self.now


def _run_under_budget(monkeypatch, minutes, probe_pace, later_pace, planned_steps=None):
    """Simulate the loop: a step, then ``step_done``; stop at the plan or when the clock is spent.
    Returns (steps run, seconds used, plans returned as (step, plan))."""
    from ssl_xcit.engine import budget as budget_mod    # the clock's module (DINO's and fine-tuning's)
    clock = _Clock()
    monkeypatch.setattr(budget_mod.time, "perf_counter", clock)
    b = TimeBudget(minutes, planned_steps=planned_steps)
    b.start()
    plans, step, total = [], 0, planned_steps or 10**9
    while step < total and not b.spent:
        step += 1
        clock.now += probe_pace if step <= budget_mod.SKIP_STEPS + budget_mod.PROBE_STEPS else later_pace
        plan = b.step_done(step)
        if plan is not None:
            plans.append((step, plan))
            b.planned_steps = total = max(plan, step + 1)
    return step, b.elapsed, plans


@pytest.mark.parametrize("later_pace", [0.5, 1.0, 1.6])
def test_time_budget_replans_from_the_pace_after_the_probe(monkeypatch, later_pace):
    """A probe at 1 s/step and a run at another pace afterwards: the re-plans at a third and two
    thirds of the plan end the run by its plan, at 93-100% of the budget. The probe's plan alone
    (114 steps) would end at 55% of the budget at 0.5 s/step, and at 1.6 s/step the clock would
    cut the run at step 78 of 114, mid-schedule."""
    from ssl_xcit.engine.budget import REPLAN_AT
    steps, used, plans = _run_under_budget(monkeypatch, minutes=2, probe_pace=1.0, later_pace=later_pace)
    assert len(plans) == 1 + len(REPLAN_AT)
    first_step, first_plan = plans[0]
    assert first_plan == first_step + int(0.95 * (120 - first_step * 1.0) / 1.0)   # the probe's plan
    for (step, _), share, (_, plan_before) in zip(plans[1:], REPLAN_AT, plans):
        assert step == math.ceil(share * plan_before)                              # re-planned where said
    assert steps == plans[-1][1], "the run ended by its plan, not by the clock"
    assert 0.93 * 120 <= used <= 120


def test_a_resumed_budget_keeps_its_plan(monkeypatch):
    steps, _, plans = _run_under_budget(monkeypatch, minutes=2, probe_pace=1.0, later_pace=0.5, planned_steps=60)
    assert plans == [] and steps == 60


def test_data_facts_read_sizes_from_headers_without_decoding(tmp_path, monkeypatch):
    """The median shorter side comes from the image headers (folders and shards); no image is
    decoded, and a dataset that can only ``load`` still works."""
    from PIL import Image
    from ssl_xcit.data import make_shards as ms
    from ssl_xcit.data.folders import ImageFiles
    from ssl_xcit.data.shards import ShardImages

    sizes = [(40, 30), (64, 80), (50, 50), (120, 90), (33, 200)]          # shorter sides 30 80 50 90 33
    for i, (w, h) in enumerate(sizes):
        folder = tmp_path / "src" / "train" / f"c{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (w, h), (i * 40, 0, 0)).save(folder / f"{i}.{'png' if i % 2 else 'jpg'}")
    ms.make_shards(tmp_path / "src", tmp_path / "shards", "1MB", progress=False)
    expected = sorted(min(s) for s in sizes)[len(sizes) // 2]              # 50
    folder_ds = ImageFiles(tmp_path / "src" / "train", progress=False)
    shard_ds = ShardImages(tmp_path / "shards" / "train")

    def no_decode(self, index):
        raise AssertionError("data_facts decoded an image")
    monkeypatch.setattr(ImageFiles, "load", no_decode)
    monkeypatch.setattr(ShardImages, "load", no_decode)
    for ds in (folder_ds, shard_ds):
        assert recipe.data_facts(ds) == DataFacts(images=5, image_side=expected)
        assert sorted(ds.image_size(i) for i in range(len(ds))) == sorted(sizes)

    class LoadOnly:                                                         # no image_size: decoded
        def __len__(self):
            return len(sizes)

        def load(self, i):
            return Image.new("RGB", sizes[i])
    assert recipe.data_facts(LoadOnly()) == DataFacts(images=5, image_side=expected)
