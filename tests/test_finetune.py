"""Fine-tuning (issue 23): timm's recipe pieces, exact stop-and-resume, validation and the best
checkpoint, few-label subsets, and the run machinery it shares with pretraining."""
from __future__ import annotations

import json
import math
from fnmatch import fnmatch
from pathlib import Path

import numpy as np
import pytest
import torch

from ssl_xcit.finetune.build import build_finetune, build_optimizer
from ssl_xcit.finetune.config import FinetuneConfig
from ssl_xcit.finetune.data import LabelledDataError, check_labels, few_labels
from ssl_xcit.finetune.loop import train
from ssl_xcit.train.config import load_config
from ssl_xcit.engine.run import Run

REPO = Path(__file__).resolve().parents[1]


def ft_config(data: Path, out: Path, **overrides):
    base = {"arch": "xcit_nano_12_p16", "input_size": 32, "epochs": 2, "batch_size_per_gpu": 8, "num_workers": 0,
            "device": "cpu", "precision": "fp32", "tensorboard": False, "report": False, "log_every_steps": 1,
            "seed": 3, "data_path": str(data), "output_dir": str(out), "labels_per_class": 4, "warmup_epochs": 1,
            "max_val_images": 40, "recipe": "off"}   # DeiT's pieces as written (a 2-epoch run's auto turns mixup off)
    base.update(overrides)
    return load_config(None, [f"{k}={v}" for k, v in base.items()], schema=FinetuneConfig)


def _built(cfg):
    torch.manual_seed(cfg.run.seed)
    return build_finetune(cfg, Run(cfg, 0, 1, torch.device("cpu")))


def _events(folder: Path, name: str) -> list[dict]:
    return [e for e in map(json.loads, (folder / "log.jsonl").read_text().splitlines()) if e["event"] == name]


# ---- the recipe's pieces are timm's

def test_mixup_cutmix_targets_are_timms_and_each_row_sums_to_one(cifar_small, tmp_path):
    from timm.data import Mixup
    from timm.loss import SoftTargetCrossEntropy
    ft = _built(ft_config(cifar_small, tmp_path / "run"))
    assert isinstance(ft.mixup, Mixup) and isinstance(ft.criterion, SoftTargetCrossEntropy)
    assert (ft.mixup.mixup_alpha, ft.mixup.cutmix_alpha, ft.mixup.label_smoothing) == (0.8, 1.0, 0.1)
    np.random.seed(0)
    images, labels = torch.randn(8, 3, 32, 32), torch.arange(8) % 10
    for _ in range(6):   # mixup and cutmix batches
        _, targets = ft.mixup(images.clone(), labels.clone())
        torch.testing.assert_close(targets.double().sum(1), torch.ones(8, dtype=torch.float64))
        assert targets.min() >= 0.1 / 10 - 1e-7   # label smoothing puts mass on every class
        assert (targets > 0.1 / 10 + 1e-6).sum(1).max() <= 2    # at most the two mixed labels stand out


def test_train_transform_is_deits_randaugment_and_random_erasing(cifar_small, tmp_path):
    from timm.data.auto_augment import RandAugment
    from timm.data.random_erasing import RandomErasing
    ft = _built(ft_config(cifar_small, tmp_path / "run"))
    steps = ft.train_set.transform.transforms
    (augment,) = [t for t in steps if isinstance(t, RandAugment)]
    assert augment.num_layers == 2 and {op.name for op in augment.ops} >= {"PosterizeIncreasing", "SolarizeIncreasing"}
    (erasing,) = [t for t in steps if isinstance(t, RandomErasing)]
    assert erasing.probability == 0.25


def test_posterize_at_full_magnitude_gives_the_published_black_image():
    """Pillow 13 refuses 0 bits, which DeiT's magnitudes reach; the recipe's black image is kept."""
    from PIL import Image
    from ssl_xcit.finetune.data import train_transform
    cfg = load_config(None, ["input_size=32"], schema=FinetuneConfig)
    transform = train_transform(cfg, (0.5,) * 3, (0.5,) * 3)
    augment = next(t for t in transform.transforms if hasattr(t, "ops"))
    op = next(o for o in augment.ops if o.name == "PosterizeIncreasing")
    out = op.aug_fn(Image.new("RGB", (8, 8), (200, 100, 50)), 0)
    assert np.asarray(out).max() == 0
    assert np.asarray(op.aug_fn(Image.new("RGB", (8, 8), (200, 100, 50)), 2)).tolist()[0][0] == [192, 64, 0]


def _layer(name: str, depth: int, n_ca: int = 2) -> int:
    """BEiT's layer ids, written out for XCiT: stem 0, XCA block i is i + 1, class-attention block j
    is depth + 1 + j, the final norm with the last of them, the head on top (L = depth + n_ca + 1)."""
    if name.startswith(("cls_token", "pos_embed", "patch_embed")):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    if name.startswith("cls_attn_blocks."):
        return depth + 1 + int(name.split(".")[1])
    if name.startswith("norm."):
        return depth + n_ca
    return depth + n_ca + 1


def test_layer_decay_gives_each_block_the_documented_lr(cifar_small, tmp_path):
    from ssl_xcit.models import build_model
    from ssl_xcit.engine.step import apply_schedules
    cfg = ft_config(cifar_small, tmp_path / "run", layer_decay=0.75)
    model = build_model("xcit_nano_12_p16", num_classes=10)
    opt = build_optimizer(cfg, model)
    apply_schedules(opt, 2e-3, 0.0)
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    wd_of = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    depth, top = 12, 12 + 2 + 1
    for name, p in model.named_parameters():
        assert lr_of[id(p)] == pytest.approx(2e-3 * 0.75 ** (top - _layer(name, depth))), name
        no_decay = p.ndim <= 1 or any(fnmatch(name, pat) for pat in model.no_weight_decay())   # timm's rule
        assert wd_of[id(p)] == (0.0 if no_decay else 0.05), name


# ---- the loop

def test_stop_and_resume_equals_a_straight_run_bit_for_bit(cifar_small, tmp_path):
    """Mixup/cutmix, RandAugment, drop path, the EMA and a mid-epoch validation all draw or read
    state: the pieces must still give the straight run's weights and losses exactly."""
    common = dict(model_ema=True, model_ema_decay=0.9, eval_every_steps=3, drop_path_rate=0.1)
    straight = tmp_path / "straight"
    train(ft_config(cifar_small, straight, **common))
    pieces, calls = tmp_path / "pieces", {"n": 0}

    def stop_at_four() -> bool:
        calls["n"] += 1
        return calls["n"] == 4
    assert train(ft_config(cifar_small, pieces, **common), stop_requested=stop_at_four).status == "stopped"
    assert train(ft_config(cifar_small, pieces, **common)).status == "finished"
    a = torch.load(straight / "checkpoint.pth", weights_only=True)
    b = torch.load(pieces / "checkpoint.pth", weights_only=True)
    for part in ("model", "ema"):
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), f"{part}.{key}"
    losses = {e["global_step"]: e["loss"] for e in _events(straight, "train")}
    assert {e["global_step"]: e["loss"] for e in _events(pieces, "train")} == losses
    first = {k: v for k, v in a["model"].items()}
    assert not torch.equal(first["head.weight"], a["ema"]["head.weight"])   # the EMA trails: it is kept


def test_validation_events_best_checkpoint_and_eval_classification_agree(cifar_small, tmp_path, capsys):
    from ssl_xcit.evaluate.classification import ClassificationConfig, run as classify
    out = tmp_path / "run"
    train(ft_config(cifar_small, out, epochs=3, eval_every_steps=2, max_val_images=0))
    vals = _events(out, "val")
    steps_per_epoch = 40 // 8
    assert [v["global_step"] for v in vals][-1] == 3 * steps_per_epoch        # the last one at the end
    assert {steps_per_epoch, 2 * steps_per_epoch} <= {v["global_step"] for v in vals}   # each epoch
    assert all(v["images"] == 100 for v in vals)
    best = max(vals, key=lambda v: v["top1"])
    saved_best = torch.load(out / "checkpoint_best.pth", weights_only=True)
    assert saved_best["global_step"] == best["global_step"] and saved_best["best"]["top1"] == best["top1"]
    capsys.readouterr()
    last = classify(ClassificationConfig(model="xcit_nano_12_p16", checkpoint=str(out / "checkpoint.pth"),
                                         data_path=str(cifar_small), num_workers=0, device="cpu"))
    assert last["top1"] == pytest.approx(vals[-1]["top1"], abs=1e-9) and last["n_images"] == 100
    assert list(last["img_size"]) == [32, 32]    # read from the checkpoint: the resolution it trained at


def test_finetuning_from_a_dino_run_loads_its_teacher_backbone_and_a_new_head(cifar_small, tmp_path, capsys):
    from tests.train_helpers import tiny_config
    from ssl_xcit.train.loop import train as pretrain
    dino = tmp_path / "dino"
    pretrain(tiny_config(cifar_small, dino, max_steps=2))
    ft = _built(ft_config(cifar_small, tmp_path / "run", pretrained_weights=str(dino / "checkpoint.pth")))
    teacher = torch.load(dino / "checkpoint.pth", weights_only=True)["teacher"]
    for key, value in ft.model.state_dict().items():
        if not key.startswith("head."):
            assert torch.equal(value, teacher[f"backbone.{key}"]), key
    assert "backbone (teacher), a new head (the file has none)" in capsys.readouterr().out
    assert ft.pretrained["sha256"] and "sha256" in ft.config_text()


# ---- few labels

def test_few_labels_are_evenly_spread_per_class_and_fixed_by_the_seed():
    targets = np.repeat(np.arange(10), 100)
    a = few_labels(targets, per_class=7, seed=1)
    assert len(a) == 70 and np.bincount(targets[a]).tolist() == [7] * 10
    assert np.array_equal(a, few_labels(targets, per_class=7, seed=1))
    assert not np.array_equal(a, few_labels(targets, per_class=7, seed=2))
    gaps = np.diff(a[targets[a] == 0])
    assert gaps.max() - gaps.min() <= 1 and gaps.min() >= 100 // 7   # evenly spread over the class
    ten = few_labels(targets, fraction=0.1, seed=0)
    assert np.bincount(targets[ten]).tolist() == [10] * 10
    with pytest.raises(LabelledDataError, match="class 0 has only 100 train images"):
        few_labels(targets, per_class=101)


def test_a_run_with_labels_per_class_trains_on_that_many(cifar_small, tmp_path):
    out = tmp_path / "run"
    train(ft_config(cifar_small, out, labels_per_class=2, epochs=1, batch_size_per_gpu=4))
    (start,) = _events(out, "start")
    assert start["images"] == 20 and start["classes"] == 10


# ---- bad inputs

def test_labelled_data_errors_name_the_problem(cifar_small, tmp_path):
    from ssl_xcit.finetune.data import labelled_splits
    import shutil
    no_val = tmp_path / "no_val"
    shutil.copytree(cifar_small / "train", no_val / "train", symlinks=True)
    with pytest.raises(LabelledDataError, match="has no val/ folder"):
        labelled_splits(str(no_val))
    missing = tmp_path / "missing"
    shutil.copytree(cifar_small, missing, symlinks=True)
    shutil.rmtree(missing / "val" / "cat")
    with pytest.raises(LabelledDataError, match="only in train/: cat"):
        labelled_splits(str(missing))

    class Fake:
        classes = ["a", "b"]
        targets = [0, 1, 2]
    with pytest.raises(LabelledDataError, match="label 2, outside the 2 classes"):
        check_labels(Fake(), Fake(), tmp_path)


def test_a_finetuning_runs_report_page_shows_validation_and_its_start(cifar_small, tmp_path):
    from tests.train_helpers import tiny_config
    from ssl_xcit.train.loop import train as pretrain
    dino = tmp_path / "dino"
    pretrain(tiny_config(cifar_small, dino, max_steps=2))
    out = tmp_path / "run"
    train(ft_config(cifar_small, out, epochs=1, report=True, pretrained_weights=str(dino / "checkpoint.pth")))
    page = (out / "report" / "index.html").read_text()
    assert "<h1>Fine-tuning run" in page and "<h2>Validation</h2>" in page and (out / "report" / "val.png").is_file()
    assert "k-NN of the teacher" not in page and "Attention maps of the model" in page
    assert "Started from " + str(dino / "checkpoint.pth") in page and "sha256" in page
    assert "(pretrained_weights)" in page   # the attention rows start from the file, not a random network


# ---- the command line and the launcher

def _one_line(capsys, argv: list[str]) -> str:
    from ssl_xcit import cli
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        cli.run("ssl_xcit.commands.train:finetune_main", argv, prog="launch/finetune.py")
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_bad_inputs_are_one_line(cifar_small, tmp_path, capsys):
    import shutil
    from tests.train_helpers import tiny_config
    from ssl_xcit.train.loop import train as pretrain
    base = [f"output_dir={tmp_path / 'out'}", "device=cpu", "num_workers=0", "input_size=32", "epochs=1"]
    train_only = tmp_path / "train_only"
    shutil.copytree(cifar_small / "train", train_only / "train", symlinks=True)
    assert "has no val/ folder" in _one_line(capsys, [f"data_path={train_only}", *base])
    missing = tmp_path / "missing"
    shutil.copytree(cifar_small, missing, symlinks=True)
    shutil.rmtree(missing / "val" / "frog")
    assert "only in train/: frog" in _one_line(capsys, [f"data_path={missing}", *base])
    pretrain(tiny_config(cifar_small, tmp_path / "dino", max_steps=1))
    err = _one_line(capsys, [f"data_path={cifar_small}", f"pretrained_weights={tmp_path / 'dino' / 'checkpoint.pth'}",
                             "arch=xcit_tiny_12_p16", *base])
    assert "xcit_nano_12_p16" in err and "xcit_tiny_12_p16" in err
    assert "train_fraction" in _one_line(capsys, [f"data_path={cifar_small}", "train_fraction=1.5", *base])
    assert not (tmp_path / "out").exists()


def test_dino_style_flags_and_key_values_make_the_same_config(tmp_path):
    from ssl_xcit.commands.train import FINETUNE, parse_config
    a = parse_config(["--lr", "1e-3", "--data_path", str(tmp_path), "--layer_decay=0.65", "--model_ema"],
                     command=FINETUNE)
    b = parse_config(["lr=1e-3", f"data_path={tmp_path}", "layer_decay=0.65", "model_ema=true"], command=FINETUNE)
    assert a.to_dict() == b.to_dict() and isinstance(a, FinetuneConfig)


def test_a_finetuning_job_through_submit_runs_the_command_line_s_config(cifar_small, tmp_path):
    import contextlib
    import io
    from ssl_xcit.commands.submit import prepare, submit
    from ssl_xcit.train.config import user_set_keys
    from ssl_xcit.commands.train import FINETUNE, parse_config
    from tests.slurm_cluster import wait_until
    words = [f"data_path={cifar_small}", f"output_dir={tmp_path / 'job'}", "arch=xcit_nano_12_p16", "device=cpu",
             "num_workers=0", "labels_per_class=2", "batch_size_per_gpu=10", "epochs=1", "report=false"]
    local = parse_config(words, command=FINETUNE)
    _, prepared = prepare(["--cluster", "local", "finetune", *words])
    job = prepared.task.job_config()
    assert job.to_dict() == local.to_dict() and user_set_keys(job) == user_set_keys(local)
    with contextlib.redirect_stdout(io.StringIO()):
        sub = submit(["--cluster", "local", "finetune", *words])
    wait_until(sub.job.done, 600, "local fine-tuning job")
    assert sub.job.exception() is None, sub.job.paths.stderr.read_text()
    assert _events(tmp_path / "job", "finished") and _events(tmp_path / "job", "val")


def test_recipe_auto_fits_the_input_to_the_images_and_drops_layer_decay_from_random_weights(cifar_small, tmp_path):
    from ssl_xcit.finetune.recipe import SHORT_RUN_LR
    words = [f"data_path={cifar_small}", f"output_dir={tmp_path / 'run'}", "arch=xcit_nano_12_p16", "epochs=40",
             "num_workers=0"]
    random_start = _built(load_config(None, words, schema=FinetuneConfig))
    assert (random_start.cfg.data.input_size, random_start.cfg.optim.warmup_epochs) == (32, 2)
    assert random_start.cfg.optim.layer_decay == 1.0 and "optim.layer_decay" in random_start.recipe
    mine = _built(load_config(None, [*words, "input_size=48", "layer_decay=0.9"], schema=FinetuneConfig))
    assert (mine.cfg.data.input_size, mine.cfg.optim.layer_decay) == (48, 0.9)   # a value set always wins
    assert (random_start.cfg.mixup.mixup, random_start.cfg.optim.lr) == (0.8, 5e-4)   # 40 epochs: DeiT's values
    short = _built(load_config(None, [*words, "epochs=2", "cutmix=0.5"], schema=FinetuneConfig))
    o, x = short.cfg.optim, short.cfg.mixup
    assert (x.mixup, x.cutmix, short.cfg.data.reprob, o.lr, o.layer_decay) == (0.0, 0.5, 0.0, SHORT_RUN_LR, 1.0)


def test_recipe_auto_for_a_short_run_from_pretrained_weights_drops_layer_decay_and_mixing():
    from ssl_xcit.finetune.recipe import SHORT_RUN_EPOCHS, choose
    short = choose(5000, 32, 8, epochs=SHORT_RUN_EPOCHS - 1, pretrained=True)
    assert short["optim.layer_decay"].value == 1.0
    assert short["mixup.mixup"].value == short["mixup.cutmix"].value == short["data.reprob"].value == 0.0
    long = choose(5000, 32, 8, epochs=SHORT_RUN_EPOCHS, pretrained=True)
    assert not {"optim.layer_decay", "mixup.mixup", "optim.lr"} & set(long)    # DeiT's / BEiT's values stay


def test_head_only_steps_leave_the_pretrained_backbone_and_train_the_head(cifar_small, tmp_path):
    from tests.train_helpers import tiny_config
    from ssl_xcit.train.loop import train as pretrain
    dino = tmp_path / "dino"
    pretrain(tiny_config(cifar_small, dino, max_steps=1))
    out = tmp_path / "run"
    cfg = ft_config(cifar_small, out, pretrained_weights=str(dino / "checkpoint.pth"), freeze_backbone_steps=3,
                    max_steps=4, epochs=1, drop_path_rate=0.0)   # a freeze as long as the run is refused
    initial_head = _built(cfg).model.state_dict()["head.weight"]    # the same seed draws the same head
    calls = {"n": 0}

    def stop_after_three() -> bool:
        calls["n"] += 1
        return calls["n"] == 3
    assert train(cfg, stop_requested=stop_after_three).status == "stopped"   # saved at step 3, still frozen
    start = torch.load(dino / "checkpoint.pth", weights_only=True)["teacher"]
    ft = torch.load(out / "checkpoint.pth", weights_only=True)["model"]
    from ssl_xcit.models import build_model
    params = set(build_model("xcit_nano_12_p16", num_classes=10).state_dict())   # BatchNorm statistics too
    assert any(k.endswith("running_mean") for k in params)
    for key in params - {"head.weight", "head.bias"}:
        assert torch.equal(ft[key], start[f"backbone.{key}"]), key
    assert not torch.equal(ft["head.weight"], initial_head)


def _ddp_rank(rank: int, port: int, data: Path, out: Path) -> None:
    import os
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from ssl_xcit.engine.launch import run_training
    run_training(ft_config(data, out, batch_size_per_gpu=4, max_steps=3, epochs=1))


@pytest.mark.heavy
def test_a_finetuning_run_under_two_ddp_processes(cifar_small, tmp_path):
    """torchrun's environment, two processes: the run finishes with its val event, one checkpoint
    written by rank 0, and the global batch is both ranks' (2 x 4)."""
    import torch.multiprocessing as mp
    from tests.test_train_ddp import _free_port
    mp.spawn(_ddp_rank, args=(_free_port(), cifar_small, tmp_path / "ddp"), nprocs=2)
    assert _events(tmp_path / "ddp", "finished")[-1]["global_step"] == 3
    val = _events(tmp_path / "ddp", "val")[-1]
    assert val["global_step"] == 3 and 0 <= val["top1"] <= val["top5"] <= 100
    assert _events(tmp_path / "ddp", "start")[-1]["world_size"] == 2
    saved = torch.load(tmp_path / "ddp" / "checkpoint.pth", weights_only=True)
    assert all(torch.isfinite(v).all() for v in saved["model"].values() if v.is_floating_point())
