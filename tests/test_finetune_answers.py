"""Issue 33's wrong answers of fine-tuning and publishing, each pinned by a test that failed before
its fix: resuming a run started without ``arch``, a freeze longer than the run, the model card of a
fine-tuned classifier, bad flag values and input sizes, BatchNorm statistics while frozen."""
from __future__ import annotations

import json

import numpy as np
from pathlib import Path

import pytest
import torch

from ssl_xcit.finetune.config import FinetuneConfig
from ssl_xcit.finetune.loop import train
from ssl_xcit.train.config import load_config


@pytest.fixture(scope="module")
def dino_ckpt(cifar_small, tmp_path_factory) -> Path:
    """A one-step DINO run of xcit_nano_12_p16 (not the fine-tuning default arch)."""
    from tests.train_helpers import tiny_config
    from ssl_xcit.train.loop import train as pretrain
    out = tmp_path_factory.mktemp("dino")
    pretrain(tiny_config(cifar_small, out, max_steps=1))
    return out / "checkpoint.pth"


def no_arch_config(data: Path, out: Path, **overrides) -> FinetuneConfig:
    """A fine-tuning command line with no ``arch``: the pretrained file's is taken."""
    base = {"input_size": 32, "epochs": 1, "batch_size_per_gpu": 8, "num_workers": 0, "device": "cpu",
            "precision": "fp32", "tensorboard": False, "report": False, "log_every_steps": 1, "seed": 3,
            "data_path": str(data), "output_dir": str(out), "labels_per_class": 4, "warmup_epochs": 0,
            "max_val_images": 20, "recipe": "off"}
    base.update(overrides)
    return load_config(None, [f"{k}={v}" for k, v in base.items()], schema=FinetuneConfig)


def test_a_run_started_without_arch_resumes_with_the_same_command(cifar_small, dino_ckpt, tmp_path):
    """The same words after a stop (SIGTERM says 'run the same command to resume', a SLURM requeue
    runs them again) rebuild the file's arch, not the default xcit_small_12_p16."""
    out = tmp_path / "run"
    words = dict(pretrained_weights=str(dino_ckpt))
    calls = {"n": 0}

    def stop_at_two() -> bool:
        calls["n"] += 1
        return calls["n"] == 2
    assert train(no_arch_config(cifar_small, out, **words), stop_requested=stop_at_two).status == "stopped"
    assert torch.load(out / "checkpoint.pth", weights_only=True)["config"]["model"]["arch"] == "xcit_nano_12_p16"
    again = train(no_arch_config(cifar_small, out, **words))
    assert again.status == "finished" and again.global_step == 5


def test_a_freeze_as_long_as_the_run_is_refused_in_one_line(cifar_small, tmp_path, capsys):
    from ssl_xcit import cli
    out = tmp_path / "run"
    words = [f"data_path={cifar_small}", f"output_dir={out}", "arch=xcit_nano_12_p16", "device=cpu",
             "num_workers=0", "input_size=32", "labels_per_class=4", "batch_size_per_gpu=8", "epochs=1",
             "recipe=off", "report=false", "tensorboard=false"]   # 40 images / 8: 5 steps
    with pytest.raises(SystemExit) as stop:
        cli.run("ssl_xcit.commands.train:finetune_main", [*words, "freeze_backbone_steps=5"], prog="launch/finetune.py")
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and len(err.splitlines()) == 1, err
    assert "freeze_backbone_steps=5" in err and "5 steps" in err and "eval_linear" in err
    assert not out.exists()
    with pytest.raises(SystemExit) as stop:   # max_steps shortens the run: counted too
        cli.run("ssl_xcit.commands.train:finetune_main", [*words, "freeze_backbone_steps=3", "max_steps=3"],
                prog="launch/finetune.py")
    assert stop.value.code == 2 and "covers the whole run (3 steps)" in capsys.readouterr().err


# ---- publishing: the documented lines, a fine-tuned classifier

def _documented_lines() -> list[str]:
    """The local-dir line exactly as README.md and ``python -m ssl_xcit.publish --help`` write it."""
    import re
    from ssl_xcit.commands.publish import build_parser
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    lines = re.findall(r'`(timm\.create_model\("local-dir:hub/s12"[^`]*)`', readme)
    lines += [m.replace("OUT_DIR", "hub/s12") for m in
              re.findall(r"(timm\.create_model\('local-dir:OUT_DIR'[^)]*\))", build_parser().description)]
    assert len(lines) == 2, lines
    return lines


def test_the_documented_timm_line_loads_the_published_weights(dino_ckpt, tmp_path, capsys):
    """As written in the README and --help: without pretrained=True timm builds random weights."""
    import os
    import subprocess
    import sys
    from ssl_xcit import cli, load_backbone
    from ssl_xcit.commands.publish import main as publish_main
    cli.run(publish_main, [str(dino_ckpt), str(tmp_path / "hub" / "s12")], prog="python -m ssl_xcit.publish")
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    torch.save(x, tmp_path / "x.pt")
    with torch.no_grad():
        ref = load_backbone(dino_ckpt)(x)
    for i, line in enumerate(_documented_lines()):
        script = (f"import timm, torch\nmodel = {line}\nmodel.eval()\n"
                  f"with torch.no_grad():\n    torch.save(model(torch.load('x.pt')), 'y{i}.pt')\n")
        proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": "", "OMP_NUM_THREADS": "1"}, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert (torch.load(tmp_path / f"y{i}.pt", weights_only=True) - ref).abs().max().item() <= 1e-5, line


@pytest.fixture(scope="module")
def finetuned(cifar_small, dino_ckpt, tmp_path_factory) -> Path:
    """A 5-step fine-tuning run from the DINO checkpoint, validated at its end."""
    out = tmp_path_factory.mktemp("ft")
    train(no_arch_config(cifar_small, out, pretrained_weights=str(dino_ckpt)))
    return out


def _publish_cli(capsys, *argv) -> tuple[int, str, str]:
    from ssl_xcit import cli
    from ssl_xcit.commands.publish import main as publish_main
    capsys.readouterr()
    try:
        cli.run(publish_main, [str(a) for a in argv], prog="python -m ssl_xcit.publish",
                hints={"keep_head": "publish it without --keep-head"})
        code = 0
    except SystemExit as stop:
        code = stop.code
    got = capsys.readouterr()
    return code, got.out, got.err


def test_a_fine_tuned_classifier_is_published_as_one_with_a_card_that_says_so(finetuned, dino_ckpt, cifar_small,
                                                                               tmp_path, capsys):
    import timm
    from ssl_xcit.models import build_model
    out = tmp_path / "clf"
    assert _publish_cli(capsys, finetuned / "checkpoint.pth", out, "--keep-head")[0] == 0
    saved = torch.load(finetuned / "checkpoint.pth", weights_only=True)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_classes"] == 10 and cfg["label_names"] == saved["classes"]
    ours = build_model("xcit_nano_12_p16", num_classes=10).eval()
    ours.load_state_dict(saved["model"])
    theirs = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (theirs(x) - ours(x)).abs().max().item() <= 1e-5       # the logits, head included
    card = (out / "README.md").read_text()
    (last_val,) = [e for e in map(json.loads, (finetuned / "log.jsonl").read_text().splitlines())
                   if e["event"] == "val"][-1:]
    assert "fine-tuned" in card and f"{last_val['top1']:.2f}% top-1" in card
    assert str(dino_ckpt) in card and str(cifar_small) in card and "4 labelled images per class" in card
    for wrong in ("pretrained without labels", "no labels used", "global crops None", "DINO self-supervised"):
        assert wrong not in card, wrong
    assert "image-classification" in card and "logits = model" in card
    mode = lambda name: (out / name).stat().st_mode & 0o777   # noqa: E731
    assert mode("model.safetensors") == mode("config.json") == mode("README.md")


def test_a_fine_tuned_backbone_and_a_head_that_is_not_there(finetuned, dino_ckpt, tmp_path, capsys):
    out = tmp_path / "backbone"
    assert _publish_cli(capsys, finetuned / "checkpoint.pth", out)[0] == 0
    assert json.loads((out / "config.json").read_text())["num_classes"] == 0
    card = (out / "README.md").read_text()
    assert "classifier head removed" in card and "no labels used" not in card
    code, _, err = _publish_cli(capsys, dino_ckpt, tmp_path / "dino_head", "--keep-head")
    assert code == 2 and "no classifier head" in err and "without --keep-head" in err and len(err.splitlines()) == 1


def test_continuing_dino_from_a_fine_tuned_checkpoint_says_it_has_one_network(finetuned, cifar_small, tmp_path,
                                                                              capsys):
    from tests.train_helpers import tiny_config
    from ssl_xcit.train.loop import train as pretrain
    capsys.readouterr()
    pretrain(tiny_config(cifar_small, tmp_path / "dino2", max_steps=1,
                         pretrained_weights=str(finetuned / "checkpoint.pth")))
    said = capsys.readouterr().out
    assert "backbones from ssl_xcit file" in said and "student from its student" not in said
    saved = torch.load(finetuned / "checkpoint.pth", weights_only=True)["model"]
    start = torch.load(tmp_path / "dino2" / "checkpoint.pth", weights_only=True)
    assert start["global_step"] == 1 and saved["cls_token"].shape == (1, 1, 128)


# ---- launch/submit.py checks the start file like the data

@pytest.mark.parametrize("tool", [["finetune"], []])
def test_a_dry_run_names_the_files_arch_and_refuses_a_missing_file(tool, dino_ckpt, cifar_small, tmp_path, capsys):
    from ssl_xcit.commands.submit import main
    base = ["--dry-run", *tool, f"data_path={cifar_small}", f"output_dir={tmp_path / 'run'}"]
    assert main([*base, f"pretrained_weights={dino_ckpt}"]) == 0
    out = capsys.readouterr().out
    assert "xcit_nano_12_p16 into" in out and "xcit_small_12_p16" not in out.split("\n")[0]
    assert main([*base, f"pretrained_weights={tmp_path / 'nope.pth'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pretrained_weights" in err and "nope.pth does not exist" in err
    assert main([*base, f"pretrained_weights={dino_ckpt}", "arch=xcit_tiny_12_p16"]) == 2
    err = capsys.readouterr().err
    assert "xcit_nano_12_p16" in err and "xcit_tiny_12_p16" in err
    assert not (tmp_path / "run").exists()


# ---- command lines: one line that names the flag

@pytest.mark.parametrize("entry, argv, flag", [
    ("ssl_xcit.commands.train:main", ["--norm_last_layer", "maybe"], "--norm_last_layer"),
    ("ssl_xcit.commands.train:main", ["--use_bn_in_head", "maybe", "epochs=1"], "--use_bn_in_head"),
    ("ssl_xcit.commands.train:main", ["--use_fp16", "perhaps"], "--use_fp16"),
    ("ssl_xcit.commands.train:finetune_main", ["--model_ema", "maybe"], "--model_ema"),
])
def test_a_bad_boolean_flag_value_names_the_flag_and_its_values(entry, argv, flag, capsys):
    from ssl_xcit import cli
    with pytest.raises(SystemExit) as stop:
        cli.run(entry, argv, prog="launch/x.py")
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and len(err.splitlines()) == 1, err
    assert flag in err and "true" in err and "false" in err and repr(argv[1]) in err


def test_a_boolean_flag_still_takes_no_value_before_an_override():
    from ssl_xcit.commands.train import parse_config
    cfg = parse_config(["--norm_last_layer", "epochs=3", "--use_fp16", "--use_bn_in_head", "false"])
    assert cfg.model.norm_last_layer is True and cfg.optim.epochs == 3
    assert cfg.run.precision == "fp16" and cfg.model.use_bn_in_head is False


def test_an_input_size_the_patches_do_not_tile_is_one_line(cifar_small, dino_ckpt, tmp_path, capsys):
    from ssl_xcit import cli
    base = [f"data_path={cifar_small}", f"output_dir={tmp_path / 'out'}", "device=cpu", "num_workers=0",
            "input_size=30", "max_steps=1"]
    for extra in ([], [f"pretrained_weights={dino_ckpt}"]):   # the default arch; the file's (known when built)
        with pytest.raises(SystemExit) as stop:
            cli.run("ssl_xcit.commands.train:finetune_main", [*base, *extra], prog="launch/finetune.py")
        err = capsys.readouterr().err.strip()
        assert stop.value.code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
        assert "input_size=30 is not divisible by the patch size 16" in err
    assert not (tmp_path / "out").exists()


# ---- the fine-tuning report page names what a classifier has

def test_a_fine_tuning_report_titles_its_loss_and_attention_as_a_classifiers(finetuned, tmp_path, monkeypatch):
    import shutil
    from ssl_xcit.evaluate import attention_plots
    from ssl_xcit.evaluate.report import write_report
    run = tmp_path / "ft"
    shutil.copytree(finetuned, run)
    choices = ("recipe: auto chose these for 40 labelled images of median side 32 px (a value you set always wins):\n"
               "  optim.lr: 0.004  # a short run <needs> more\n  mixup.mixup: 0.0  # a short run never over-fits")
    with open(run / "log.jsonl", "a") as log:
        log.write(json.dumps({"event": "recipe_auto", "time": 1.0, "choices": choices}) + "\n")
    titles = []
    real_save = attention_plots.save_figure

    def keep_title(fig, path, **kw):
        titles.append(fig._suptitle.get_text() if fig._suptitle else "")
        return real_save(fig, path, **kw)
    monkeypatch.setattr(attention_plots, "save_figure", keep_title)
    page = write_report(run).read_text()
    assert "DINO loss" not in page and "Cross-entropy loss" in page
    assert titles and titles[-1].startswith("model's mean class-attention") and "teacher" not in titles[-1]
    assert ("<ul><li>optim.lr: 0.004  # a short run &lt;needs&gt; more</li><li>mixup.mixup: 0.0  # a short run never "
            "over-fits</li></ul>") in page


# ---- evaluation tools: workers sized to the machine

def test_the_evaluation_tools_default_workers_fit_the_machine(monkeypatch):
    import os
    from ssl_xcit.commands import options
    from ssl_xcit.evaluate.classification import ClassificationConfig
    from ssl_xcit.commands.options import default_workers
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})      # a 2-core machine
    assert default_workers() == 2 and default_workers(8) == 2
    assert ClassificationConfig(model="m", checkpoint="none", data_path="d").num_workers == 2
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(32)))
    assert default_workers() == 4 and default_workers(8) == 8
    assert options.default_workers.__module__ == "ssl_xcit.evaluate.inputs"   # torch-free, below the commands


def test_eval_knn_on_this_machine_gives_no_dataloader_worker_warning(cifar_small, tmp_path):
    """PyTorch warns when the workers exceed its suggested maximum (the usable cores)."""
    import subprocess
    import sys
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-W", "always", str(repo / "eval" / "eval_knn.py"), "--checkpoint",
                           "xcit_nano_12_p16", "--data-path", str(cifar_small), "--crop-size", "32",
                           "--output-dir", str(tmp_path / "knn"), "--nb-knn", "5"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={**__import__("os").environ, "PYTHONPATH": str(repo)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "worker processes in total" not in proc.stderr and "suggested max number of worker" not in proc.stderr


# ---- a run's length, however given, is what recipe: auto and the schedule plan for

def test_max_steps_is_the_length_recipe_auto_and_the_lr_schedule_plan_for(cifar_small, tmp_path):
    from ssl_xcit.finetune.build import build_finetune
    from ssl_xcit.finetune.recipe import SHORT_RUN_LR
    from ssl_xcit.engine.run import Run
    words = [f"data_path={cifar_small}", f"output_dir={tmp_path / 'run'}", "arch=xcit_nano_12_p16", "num_workers=0",
             "labels_per_class=4", "batch_size_per_gpu=8", "device=cpu"]     # 40 images: 5 steps an epoch

    def built(*extra):
        cfg = load_config(None, [*words, *extra], schema=FinetuneConfig)
        return build_finetune(cfg, Run(cfg, 0, 1, torch.device("cpu")))
    by_steps, by_epochs = built("max_steps=10"), built("epochs=2")     # the same 10 steps, said two ways
    for ft in (by_steps, by_epochs):
        o, x = ft.cfg.optim, ft.cfg.mixup
        assert (x.mixup, x.cutmix, ft.cfg.data.reprob, o.lr, o.warmup_epochs) == (0.0, 0.0, 0.0, SHORT_RUN_LR, 0)
        assert ft.total_steps == 10 and len(ft.lr) == 10
    assert "max_steps=10 ends it before epochs=100" in by_steps.recipe
    np.testing.assert_allclose(by_steps.lr, by_epochs.lr, rtol=1e-12)       # one cosine over the 10 steps
    base = SHORT_RUN_LR * 8 / 256
    assert by_steps.lr[0] == pytest.approx(base) and by_steps.lr[-1] < 0.05 * base   # ends where the run ends


def test_dino_training_says_once_that_max_steps_stops_it_inside_its_schedule(cifar_small, tmp_path, capsys):
    from tests.train_helpers import tiny_config
    from ssl_xcit.train.loop import train as pretrain
    capsys.readouterr()
    pretrain(tiny_config(cifar_small, tmp_path / "cut", max_steps=2, epochs=2, warmup_epochs=1))   # 6 a epoch
    said = capsys.readouterr().out
    assert said.count("max_steps=2 stops the run at 17% of the 12 steps") == 1 and "inside the lr warm-up" in said
    events = [json.loads(line) for line in (tmp_path / "cut" / "log.jsonl").read_text().splitlines()]
    assert [e["planned_steps"] for e in events if e["event"] == "schedule_cut"] == [12]
    pretrain(tiny_config(cifar_small, tmp_path / "whole", epochs=1, max_steps=6))
    assert "stops the run at" not in capsys.readouterr().out       # max_steps = the schedules' length: silent


def test_the_starts_linear_probe_stands_beside_every_validation(cifar_small, tmp_path, capsys):
    import shutil
    from tests.train_helpers import tiny_config
    from ssl_xcit.evaluate.report import write_report
    from ssl_xcit.train.loop import train as pretrain
    dino = tmp_path / "dino"
    pretrain(tiny_config(cifar_small, dino, max_steps=1))
    start = dino / "checkpoint.pth"
    (dino / "linear.json").write_text(json.dumps({"tool": "linear", "checkpoint": str(start), "checkpoint_key": "teacher",
                                                  "top1": 31.5, "mode": "cached", "num_train": 200, "num_val": 100,
                                                  "data_path": str(cifar_small)}))
    out = tmp_path / "ft"
    capsys.readouterr()
    train(no_arch_config(cifar_small, out, pretrained_weights=str(start)))
    said = capsys.readouterr().out
    assert "the start's linear probe: top-1 31.50%" in said
    (val,) = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if '"event": "val"' in line]
    assert val["start_probe_top1"] == 31.5
    assert f"the start's linear probe 31.50% ({val['top1'] - 31.5:+.2f})" in said
    assert "the start&#x27;s linear probe: 31.50%" in write_report(out).read_text()   # html-escaped
    other = tmp_path / "other"          # a probe of another file is not this start's: not shown
    shutil.copytree(dino, other)
    capsys.readouterr()
    train(no_arch_config(cifar_small, tmp_path / "ft2", pretrained_weights=str(other / "checkpoint.pth")))
    assert "linear probe" not in capsys.readouterr().out
