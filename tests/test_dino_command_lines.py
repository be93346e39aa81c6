"""DINO's command lines work as pasted (issue 25): training takes ``--key value`` / ``--key=value`` and
DINO's own flags; the evaluation tools take DINO's flag names; ``launch/submit.py`` takes
run_with_submitit.py's. The README commands of facebookresearch/dino, paths changed, run end to end."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ssl_xcit import cli
from ssl_xcit.commands import flags
from ssl_xcit.engine.config import config_fields
from ssl_xcit.train.config import DinoConfig, load_config, user_set_keys
from ssl_xcit.commands.train import build_parser, parse_config
from tests.conftest import make_subset

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------- training
def test_patch_size_on_xcit_names():
    from ssl_xcit.models.zoo import arch_with_patch
    assert arch_with_patch("xcit_small_12_p8", 8) == "xcit_small_12_p8"
    assert arch_with_patch("xcit_small_12", 8) == "xcit_small_12_p8"       # DINO's --arch + --patch_size
    assert arch_with_patch("vit_small", 16) == "vit_small"                 # not a name: left to the name check
    with pytest.raises(ValueError, match="use xcit_medium_24_p16"):
        arch_with_patch("xcit_medium_24_p8", 16)


def test_dino_flags_and_key_value_give_the_same_config(tmp_path):
    dino = ["--arch", "xcit_small_12_p8", "--data_path", str(tmp_path), "--output_dir=out", "--epochs", "100",
            "--lr", "1e-3", "--use_fp16", "false", "--norm_last_layer", "False", "--global_crops_scale", "0.4", "1.",
            "--local_crops_scale=0.05,0.4", "--momentum_teacher", "0.9995", "--warmup_teacher_temp_epochs", "30",
            "--batch_size_per_gpu", "32", "--saveckp_freq", "20", "--drop_path_rate", "0.2", "--weight_decay_end",
            "0.3", "--freeze_last_layer", "2", "--local_crops_number", "6", "--seed", "3", "--num_workers", "4",
            "--dist_url", "env://", "--local_rank=2", "--patch_size", "8", "--sync-bn", "--optim.min_lr", "2e-6"]
    ours = ["arch=xcit_small_12_p8", f"data_path={tmp_path}", "output_dir=out", "epochs=100", "lr=1e-3",
            "precision=fp32", "norm_last_layer=false", "global_crops_scale=[0.4,1.0]", "local_crops_scale=[0.05,0.4]",
            "momentum_teacher=0.9995", "warmup_teacher_temp_epochs=30", "batch_size_per_gpu=32", "saveckp_freq=20",
            "drop_path_rate=0.2", "weight_decay_end=0.3", "freeze_last_layer=2", "local_crops_number=6", "seed=3",
            "num_workers=4", "sync_bn=true", "min_lr=2e-6"]
    a, b = parse_config(dino), load_config(None, ours)
    assert a.to_dict() == b.to_dict() and user_set_keys(a) == user_set_keys(b)
    assert a.data.global_crops_scale == (0.4, 1.0) and a.run.precision == "fp32" and a.model.norm_last_layer is False
    assert parse_config(["--use_fp16", "true"]).run.precision == "fp16"
    assert parse_config(["lr=1e-3", "--lr", "2e-3"]).optim.lr == 2e-3        # a later word wins
    assert parse_config(["--lr", "2e-3", "lr=1e-3"]).optim.lr == 1e-3
    assert parse_config(["--arch", "xcit_nano_12", "--patch_size", "8"]).model.arch == "xcit_nano_12_p8"
    assert parse_config(["--fused", "null", "--compile"]).optim.fused is None


@pytest.mark.parametrize("argv, message", [
    (["--lrr", "1e-3"], "unknown option --lrr; did you mean --lr"),
    (["--batch_size", "8"], "--batch_size_per_gpu?"),
    (["--lr"], "--lr needs 1 value"),
    (["--global_crops_scale", "0.4"], "--global_crops_scale needs 2 values"),
    (["--global_crops_scale=0.4,0.6,1"], "--global_crops_scale takes 2 numbers"),
    (["--norm_last_layer=maybe"], "--norm_last_layer: expected true/on/1/yes or false/off/0/no, got 'maybe'"),
    (["--lr", "fast"], "optim.lr must be a number, got 'fast'"),
    (["--arch", "xcit_small_12_p16", "--patch_size", "8"], "xcit_small_12_p16 has patch 16, not 8"),
    (["--patch_size", "8"], "--patch_size 8 does not match the arch: xcit_small_12_p16 has patch 16"),  # default
    (["--arch", "xcit_nano_12", "--patch_size", "4"], "unknown model name 'xcit_nano_12'"),
    (["--optimizer", "lars"], "optimizer must be adamw or sgd"),
])
def test_bad_flags_are_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as stop:
        cli.run("ssl_xcit.commands.train:main", argv, prog="launch/train.py")
    err = capsys.readouterr().err
    assert stop.value.code == 2 and len(err.strip().splitlines()) == 1 and message in err, err


def test_help_lists_every_config_key_with_its_default_and_meaning():
    text = " ".join(build_parser().format_help().split())
    cfg = DinoConfig()
    for section, f, _ in config_fields(DinoConfig):
        default = getattr(getattr(cfg, section), f.name)
        shown = flags._shown(default)
        assert f"--{f.name} " in text, f.name
        assert f.metadata["help"] and f"{' '.join(f.metadata['help'].split())} (default: {shown})" in text, f.name
    for dino_only in ("--use_fp16", "--patch_size", "--dist_url", "--config"):
        assert dino_only in text


# ---------------------------------------------------------------------------------- DINO's README runs
@pytest.fixture(scope="module")
def tiny_images(cifar_root, tmp_path_factory) -> Path:
    return make_subset(cifar_root, tmp_path_factory.mktemp("tiny"), 4, 2)   # 40 train / 20 val images


@pytest.fixture(scope="module")
def dino_run(tiny_images, tmp_path_factory) -> Path:
    """DINO's README training command (``main_dino.py --arch ... --data_path ... --output_dir ...``, here
    ``launch/train.py``, as torch.distributed.launch calls it: ``--local_rank=0``), with DINO's own flags
    making it tiny and our keys in the same spelling."""
    out = tmp_path_factory.mktemp("dino_run")
    cmd = [sys.executable, str(REPO / "launch" / "train.py"), "--local_rank=0",
           "--arch", "xcit_nano_12_p16", "--data_path", str(tiny_images / "train"), "--output_dir", str(out),
           "--epochs", "1", "--batch_size_per_gpu", "4", "--local_crops_number", "2", "--out_dim", "256",
           "--use_fp16", "false", "--norm_last_layer", "false", "--global_crops_scale", "0.4", "1.",
           "--local_crops_scale", "0.05", "0.4", "--momentum_teacher", "0.996", "--warmup_teacher_temp_epochs", "0",
           "--num_workers", "0", "--seed", "0", "--saveckp_freq", "0",
           "--global_crops_size", "32", "--local_crops_size", "16", "--head_hidden_dim", "64",
           "--head_bottleneck_dim", "32", "--max_steps", "2", "--device", "cpu", "--tensorboard", "false",
           "--report", "false", "--recipe", "off"]
    proc = subprocess.run(cmd, cwd=out, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_dinos_training_command_runs(dino_run):
    used = json.loads(json.dumps(__import__("yaml").safe_load((dino_run / "config.yaml").read_text())))
    assert used["model"]["arch"] == "xcit_nano_12_p16" and used["model"]["norm_last_layer"] is False
    assert used["data"]["global_crops_scale"] == [0.4, 1.0] and used["run"]["precision"] == "fp32"
    state = torch.load(dino_run / "checkpoint.pth", weights_only=True)
    assert state["global_step"] == 2


def _eval(script: str, argv: list[str], capsys) -> dict:
    module = __import__(f"eval.{script}", fromlist=["main"])
    report = cli.run(module.main, argv, prog=f"eval/{script}.py")
    capsys.readouterr()
    return report


def test_dinos_knn_command_runs(dino_run, tiny_images, tmp_path, capsys):
    ckpt = str(dino_run / "checkpoint.pth")
    common = ["--nb_knn", "5", "10", "--temperature", "0.07", "--batch_size_per_gpu", "32", "--num_workers", "0",
              "--use_cuda", "false", "--local_rank=0", "--output_dir", str(tmp_path / "out")]
    first = _eval("eval_knn", ["--pretrained_weights", ckpt, "--checkpoint_key", "teacher", "--data_path",
                               str(tiny_images), "--arch", "xcit_nano_12_p16", "--patch_size", "16",
                               "--dump_features", str(tmp_path / "feats"), *common], capsys)
    again = _eval("eval_knn", ["--load_features", str(tmp_path / "feats"), *common], capsys)
    assert first["checkpoint"] == ckpt and first["checkpoint_key"] == "teacher" and first["num_val"] == 20
    assert first["crop_size"] == 224 and set(first["results"]) == {"5", "10"}   # DINO's eval resolution
    assert again["results"] == first["results"]
    warmer = _eval("eval_knn", ["--load_features", str(tmp_path / "feats"), "--nb_knn", "5", "--temperature",
                                "0.5", "--output_dir", str(tmp_path / "t")], capsys)
    assert warmer["temperature"] == 0.5


def test_dinos_linear_command_runs(dino_run, tiny_images, tmp_path, capsys):
    report = _eval("eval_linear", [
        "--pretrained_weights", str(dino_run / "checkpoint.pth"), "--checkpoint_key", "student", "--data_path",
        str(tiny_images), "--arch", "xcit_nano_12_p16", "--patch_size", "16", "--n_last_blocks", "1",
        "--avgpool_patchtokens", "false", "--epochs", "1", "--lr", "0.001", "--batch_size_per_gpu", "32",
        "--num_workers", "0", "--val_freq", "1", "--num_labels", "10", "--output_dir", str(tmp_path), "--dist_url",
        "env://", "--local_rank=0"], capsys)
    assert report["checkpoint_key"] == "student" and report["n_last_blocks"] == 1
    assert report["avgpool_patchtokens"] is False and report["num_classes"] == 10
    assert json.loads((tmp_path / "linear.json").read_text())["top1"] == report["top1"]


@pytest.mark.parametrize("script, argv, message", [
    ("eval_knn", ["--pretrained_weights", "x.pth", "--data_path", ".", "--arch", "xcit_nano_12_p16",
                  "--patch_size", "8"], "--patch_size 8 does not match --arch: xcit_nano_12_p16 has patch 16, not 8"),
    ("eval_knn", ["--use_cuda", "maybe"], "--use_cuda"),
    ("eval_linear", ["--pretrained_weights", "x.pth", "--data_path", ".", "--avgpool_patchtokens", "2"],
     "--avgpool_patchtokens"),
])
def test_bad_dino_eval_flags_are_one_line(script, argv, message, capsys):
    module = __import__(f"eval.{script}", fromlist=["main"])
    with pytest.raises(SystemExit) as stop:
        cli.run(module.main, argv, prog=f"eval/{script}.py")
    err = capsys.readouterr().err
    assert stop.value.code == 2 and len(err.strip().splitlines()) == 1 and message in err, err


# ------------------------------------------------------------------------------------------- SLURM
def test_run_with_submitit_flags(tmp_path):
    from ssl_xcit.commands.submit import prepare
    _, prep = prepare(["--nodes", "2", "--ngpus", "8", "--use_volta32", "--timeout", "2800", "--partition", "learnfair",
                       "--comment", "deadline", "--config", str(REPO / "configs" / "dino_xcit_small_12_p16.yaml"),
                       f"data_path={tmp_path}", f"output_dir={tmp_path / 'out'}"])
    spec = prep.spec
    assert (spec.nodes, spec.gpus_per_node, spec.tasks_per_node, spec.timeout_min) == (2, 8, 8, 2800)
    assert (spec.constraint, spec.partition, spec.comment) == ("volta32gb", "learnfair", "deadline")


def test_run_with_submitit_takes_dinos_training_flags_and_recipe_names(tmp_path):
    """DINO's README: ``python run_with_submitit.py --nodes 2 --ngpus 8 --arch ... --data_path ...
    --output_dir ...``: the training words are read by launch/train.py's own code, so the job trains
    the config the same words give launch/train.py."""
    from ssl_xcit.commands.submit import prepare
    from ssl_xcit.train.config import user_set_keys
    words = ["--arch", "xcit_small_12_p16", "--data_path", str(tmp_path), "--output_dir", str(tmp_path / "out"),
             "--epochs", "100", "--teacher_temp", "0.07"]
    _, prep = prepare(["--nodes", "2", "--ngpus", "8", *words])
    job, local = prep.task.job_config(), parse_config(words)
    assert job.to_dict() == local.to_dict() and user_set_keys(job) == user_set_keys(local)
    assert (job.model.arch, job.optim.epochs, job.dino.teacher_temp) == ("xcit_small_12_p16", 100, 0.07)
    _, by_name = prepare(["--dry-run", "--config", "quickstart", f"data_path={tmp_path}"])
    assert by_name.task.job_config().model.arch == "xcit_nano_12_p8"   # a packaged recipe, by name
