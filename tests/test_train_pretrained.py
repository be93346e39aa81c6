"""``pretrained_weights=FILE`` (issue 24): a new DINO run starts from a file's weights, head and centre
where they fit, says what it took and why not the rest, records the file, and resumes bit for bit."""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import pytest
import torch
import yaml

from ssl_xcit.train.build import build_dino
from ssl_xcit.train.config import ConfigError, load_config
from ssl_xcit.train.loop import build_models, train
from ssl_xcit.engine.run import Run
from tests.train_helpers import assert_same_weights, load_weights, tiny_config, tiny_overrides

REPO = Path(__file__).resolve().parents[1]


def _to_official(backbone: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm's XCiT names -> facebookresearch/xcit's (DINO's): ``pos_embed`` -> ``pos_embeder``, the
    class attention's q, k, v fused into one ``qkv`` (written here independently of the reader)."""
    out: dict[str, torch.Tensor] = {}
    for k, v in backbone.items():
        m = re.fullmatch(r"(cls_attn_blocks\.\d+\.attn)\.([qkv])\.(weight|bias)", k)
        if m and m.group(2) == "q":
            base, kind = m.group(1), m.group(3)
            out[f"{base}.qkv.{kind}"] = torch.cat([backbone[f"{base}.{n}.{kind}"] for n in "qkv"])
        elif m:
            continue
        elif k.startswith("pos_embed."):
            out["pos_embeder." + k[len("pos_embed."):]] = v
        else:
            out[k] = v
    return out


def _to_old_weight_norm(head: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our head's parametrised last layer -> the ``weight_g`` / ``weight_v`` names DINO's files hold."""
    names = {"last_layer.parametrizations.weight.original0": "last_layer.weight_g",
             "last_layer.parametrizations.weight.original1": "last_layer.weight_v"}
    return {names.get(k, k): v for k, v in head.items()}


def _official_dino_file(cfg, path: Path, seed: int = 11) -> dict:
    """A DINO training checkpoint in the official layout (main_dino.py's save_dict), with student and
    teacher different from each other and from a fresh start, and a non-zero centre."""
    torch.manual_seed(seed)
    student, teacher = build_models(cfg)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.01 * torch.randn_like(p))
    nets = {}
    for name, net, prefix in (("student", student, "module."), ("teacher", teacher, "")):
        sd = net.state_dict()
        backbone = _to_official({k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")})
        head = _to_old_weight_norm({k[len("head."):]: v for k, v in sd.items() if k.startswith("head.")})
        nets[name] = {**{f"{prefix}backbone.{k}": v for k, v in backbone.items()},
                      **{f"{prefix}head.{k}": v for k, v in head.items()}}
    center = torch.randn(1, cfg.model.out_dim)
    state = {"student": nets["student"], "teacher": nets["teacher"], "optimizer": {}, "epoch": 3,
             "args": argparse.Namespace(arch="xcit_nano_12_p16", norm_last_layer=True, out_dim=cfg.model.out_dim),
             "dino_loss": {"center": center}}
    torch.save(state, path)
    return {"teacher": teacher.state_dict(), "student": student.state_dict(), "center": center}


def _built(cfg) -> object:
    """DINO's pieces as a new run builds them (no folder written)."""
    run = Run(cfg, 0, 1, torch.device("cpu"))
    torch.manual_seed(cfg.run.seed)
    return build_dino(cfg, run)


def test_an_official_dino_checkpoint_starts_the_teacher_exactly_where_the_file_left_it(cifar_small, tmp_path, capsys):
    base = tiny_config(cifar_small, tmp_path / "unused")
    expected = _official_dino_file(base, tmp_path / "dino_checkpoint.pth")
    cfg = tiny_config(cifar_small, tmp_path / "run", pretrained_weights=str(tmp_path / "dino_checkpoint.pth"))
    dino = _built(cfg)
    for name, net in (("teacher", dino.teacher), ("student", dino.student)):
        got = net.state_dict()
        assert got.keys() == expected[name].keys()
        for key, value in expected[name].items():
            assert torch.equal(got[key], value), f"{name}.{key} differs from the file"
    assert torch.equal(dino.loss.center, expected["center"])
    said = capsys.readouterr().out
    assert "student from its student, teacher from its teacher" in said and "DINO heads from the file" in said
    assert "loss centre from the file" in said


def test_teacher_key_puts_the_files_teacher_into_both_networks(cifar_small, tmp_path):
    base = tiny_config(cifar_small, tmp_path / "unused")
    expected = _official_dino_file(base, tmp_path / "dino.pth")
    dino = _built(tiny_config(cifar_small, tmp_path / "run", pretrained_weights=str(tmp_path / "dino.pth"),
                              pretrained_checkpoint_key="teacher"))
    for key, value in expected["teacher"].items():
        assert torch.equal(dino.student.state_dict()[key], value), key


def test_a_backbone_only_file_gives_both_backbones_and_a_fresh_head_said_and_chosen_for(cifar_small, tmp_path, capsys):
    from safetensors.torch import save_file
    torch.manual_seed(5)
    source, _ = build_models(tiny_config(cifar_small, tmp_path / "unused"))
    backbone = {k: v.contiguous() for k, v in source.backbone.state_dict().items()}
    save_file(backbone, str(tmp_path / "model.safetensors"))
    cfg = tiny_config(cifar_small, tmp_path / "run", pretrained_weights=str(tmp_path / "model.safetensors"),
                      recipe="auto")
    dino = _built(cfg)
    for net in (dino.student, dino.teacher):
        for key, value in backbone.items():
            assert torch.equal(net.backbone.state_dict()[key], value), key
    assert_same_weights(dino.student.head.state_dict(), dino.teacher.head.state_dict())
    said = capsys.readouterr().out
    assert "fresh DINO head (the file has no DINO head" in said
    assert dino.cfg.optim.freeze_backbone_steps > 0 and dino.cfg.dino.center_init == "teacher"
    assert "optim.freeze_backbone_steps" in dino.recipe and "dino.center_init" in dino.recipe


def test_a_head_of_another_shape_starts_fresh_with_the_reason(cifar_small, tmp_path, capsys):
    base = tiny_config(cifar_small, tmp_path / "unused")
    _official_dino_file(base, tmp_path / "dino.pth")
    dino = _built(tiny_config(cifar_small, tmp_path / "run", pretrained_weights=str(tmp_path / "dino.pth"),
                              out_dim=128))
    assert "fresh DINO head (the file's head does not fit this run's" in capsys.readouterr().out
    assert_same_weights(dino.student.head.state_dict(), dino.teacher.head.state_dict())
    assert torch.count_nonzero(dino.loss.center) == 0


def test_recipe_auto_takes_the_files_head_and_arch(cifar_small, tmp_path):
    base = tiny_config(cifar_small, tmp_path / "unused", out_dim=512, head_hidden_dim=96)
    _official_dino_file(base, tmp_path / "dino.pth")
    overrides = [o for o in tiny_overrides(cifar_small, tmp_path / "run", recipe="auto",
                                           pretrained_weights=str(tmp_path / "dino.pth"))
                 if not o.startswith(("arch=", "out_dim=", "head_hidden_dim="))]
    dino = _built(load_config(None, overrides))
    assert dino.cfg.model.arch == "xcit_nano_12_p16"
    assert (dino.cfg.model.out_dim, dino.cfg.model.head_hidden_dim) == (512, 96)
    assert "DINO heads from the file" in dino.pretrained["loaded"]


def test_another_arch_than_the_files_is_one_line_naming_both(cifar_small, tmp_path, capsys):
    from ssl_xcit import cli
    base = tiny_config(cifar_small, tmp_path / "unused")
    _official_dino_file(base, tmp_path / "dino.pth")
    with pytest.raises(SystemExit) as stop:   # launch/train.py's own path, in this process
        cli.run("ssl_xcit.commands.train:main", tiny_overrides(cifar_small, tmp_path / "run", arch="xcit_tiny_12_p16",
                                                             pretrained_weights=str(tmp_path / "dino.pth")),
                prog="launch/train.py")
    err = capsys.readouterr().err
    lines = err.strip().split("\n")    # a folder listing's progress bar may come first (cleared with \r)
    assert stop.value.code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert "xcit_nano_12_p16" in lines[0] and "xcit_tiny_12_p16" in lines[0], err
    assert not (tmp_path / "run").exists()


def test_a_continued_run_records_the_file_and_resumes_bit_for_bit_without_it(cifar_small, tmp_path, capsys):
    base = tiny_config(cifar_small, tmp_path / "unused")
    _official_dino_file(base, tmp_path / "dino.pth")
    weights = str(tmp_path / "dino.pth")
    straight, pieces = tmp_path / "straight", tmp_path / "pieces"
    train(tiny_config(cifar_small, straight, pretrained_weights=weights, recipe="auto"))
    calls = {"n": 0}

    def stop_after_five() -> bool:
        calls["n"] += 1
        return calls["n"] == 5
    first = train(tiny_config(cifar_small, pieces, pretrained_weights=weights, recipe="auto"),
                  stop_requested=stop_after_five)
    assert first.status == "stopped"
    from ssl_xcit.atomic import file_sha256
    sha = file_sha256(weights)
    Path(weights).rename(tmp_path / "moved.pth")     # a resumed run does not read the file again
    capsys.readouterr()
    train(tiny_config(cifar_small, pieces, pretrained_weights=weights, recipe="auto"))
    assert "pretrained_weights=" in capsys.readouterr().out and "is not used again"
    assert_same_weights(load_weights(straight), load_weights(pieces), exact=True)
    saved = torch.load(pieces / "checkpoint.pth", weights_only=True)["pretrained"]
    assert saved["sha256"] == sha and saved["path"] == weights and saved["format"] == "dino"
    text = (pieces / "config.yaml").read_text()
    assert f"sha256 {sha}" in text and yaml.safe_load(text)["model"]["pretrained_weights"] == weights


def test_naive_values_as_written_keep_dinos_defaults(cifar_small, tmp_path):
    """recipe=off: DINO's values as written (what the benchmark calls naive), the file still loads."""
    base = tiny_config(cifar_small, tmp_path / "unused")
    _official_dino_file(base, tmp_path / "dino.pth")
    dino = _built(tiny_config(cifar_small, tmp_path / "run", pretrained_weights=str(tmp_path / "dino.pth")))
    assert dino.cfg.optim.backbone_lr_scale == 1.0 and dino.cfg.optim.freeze_backbone_steps == 0
    assert dino.recipe is None and "DINO heads from the file" in dino.pretrained["loaded"]


def test_frozen_backbone_steps_leave_the_backbone_and_train_the_head(cifar_small, tmp_path):
    out = tmp_path / "run"
    cfg = tiny_config(cifar_small, out, max_steps=2, freeze_backbone_steps=2, drop_path_rate=0.0)
    torch.manual_seed(cfg.run.seed)
    initial, _ = build_models(cfg)
    train(cfg)
    w = load_weights(out)
    init = dict(initial.named_parameters())    # parameters: BatchNorm's running statistics still move
    assert all(torch.equal(w[f"student.{k}"], v) for k, v in init.items() if k.startswith("backbone."))
    assert not torch.equal(w["student.head.mlp.0.weight"], init["head.mlp.0.weight"])


def test_backbone_lr_scale_scales_the_backbone_groups_only(cifar_small, tmp_path):
    from ssl_xcit.train.build import build_optimizer
    from ssl_xcit.engine.step import apply_schedules
    cfg = tiny_config(cifar_small, tmp_path / "run", backbone_lr_scale=0.1)
    student, _ = build_models(cfg)
    opt = build_optimizer(cfg, student)
    apply_schedules(opt, 1e-3, 0.04)
    backbone = {id(p) for p in student.backbone.parameters()}
    for group in opt.param_groups:
        ids = {id(p) for p in group["params"]}
        expected = 1e-4 if ids <= backbone else 1e-3
        assert ids <= backbone or not ids & backbone
        assert group["lr"] == pytest.approx(expected)
    assert sum(len(g["params"]) for g in opt.param_groups) == sum(p.requires_grad for p in student.parameters())


def test_center_init_teacher_sets_the_centre_to_the_teachers_mean_output(cifar_small, tmp_path):
    cfg = tiny_config(cifar_small, tmp_path / "run", center_init="teacher", center_momentum=0.0)
    dino = _built(cfg)
    torch.manual_seed(0)
    crops = [torch.randn(4, 3, 32, 32) for _ in range(2)]
    dino.init_center_from_teacher(crops, "fp32")
    with torch.no_grad():
        expected = dino.teacher(crops).double().mean(0, keepdim=True)
    torch.testing.assert_close(dino.loss.center.double(), expected, rtol=1e-5, atol=1e-6)


def test_pretrained_weights_is_pinned_to_an_absolute_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, ["pretrained_weights=w.pth"])
    assert cfg.model.pretrained_weights == str(tmp_path / "w.pth")
    with pytest.raises(ConfigError, match="pretrained_checkpoint_key"):
        load_config(None, ["pretrained_checkpoint_key=both"])


def _rank_main(rank: int, port: int, data, out, weights):
    import os
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from ssl_xcit.engine.launch import run_training
    run_training(tiny_config(data, out, batch_size_per_gpu=2, max_steps=3, pretrained_weights=weights,
                             recipe="auto"))


@pytest.mark.heavy
def test_a_continued_run_under_two_ddp_processes_and_a_submitted_job(cifar_small, tmp_path):
    import torch.multiprocessing as mp
    from tests.test_train_ddp import _free_port
    from tests.slurm_cluster import wait_until
    from ssl_xcit.commands.submit import submit
    base = tiny_config(cifar_small, tmp_path / "unused")
    expected = _official_dino_file(base, tmp_path / "dino.pth")
    weights = str(tmp_path / "dino.pth")
    mp.spawn(_rank_main, args=(_free_port(), cifar_small, tmp_path / "ddp", weights), nprocs=2)
    events = [json.loads(line) for line in (tmp_path / "ddp" / "log.jsonl").read_text().splitlines()]
    assert events[-1]["event"] == "finished" and events[-1]["global_step"] == 3
    saved = torch.load(tmp_path / "ddp" / "checkpoint.pth", weights_only=True)
    assert saved["pretrained"]["format"] == "dino"
    moved = (saved["teacher"]["backbone.blocks.0.attn.qkv.weight"]
             - expected["teacher"]["backbone.blocks.0.attn.qkv.weight"]).abs().max()
    assert 0 < moved < 0.05   # the file's teacher, moved a little by 3 steps (a fresh one is far)
    sub = submit(["--cluster", "local", *tiny_overrides(cifar_small, tmp_path / "job", max_steps=3,
                                                         pretrained_weights=weights, recipe="auto")])
    wait_until(sub.job.done, 600, "local job")
    assert sub.job.exception() is None, sub.job.paths.stderr.read_text()
    assert torch.load(tmp_path / "job" / "checkpoint.pth", weights_only=True)["pretrained"]["sha256"] == \
        saved["pretrained"]["sha256"]
