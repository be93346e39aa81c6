"""Publishing a backbone where people load models (issue 25): ``python -m ssl_xcit.publish`` writes the
folder timm reads (``model.safetensors`` in timm's names, ``config.json``, a model card from the run
folder), and timm alone, in a process that never imports ssl_xcit, gives the features
``ssl_xcit.load_backbone`` gives. ``--push-to-hub`` is tested against a local stand-in of
huggingface_hub: no network."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ssl_xcit import cli, load_backbone
from ssl_xcit.commands.publish import main as publish_main
from ssl_xcit.train.loop import train
from tests.train_helpers import tiny_config

TIMM_NAME = "xcit_nano_12_p16_224"


@pytest.fixture(scope="module")
def run(cifar_small, tmp_path_factory) -> Path:
    """A tiny real run: 3 steps, the k-NN monitor at steps 0 and 2, and an evaluation result file."""
    out = tmp_path_factory.mktemp("run")
    train(tiny_config(cifar_small, out, max_steps=3, eval_every_steps=2, eval_data_path=str(cifar_small),
                      eval_max_images=20))
    return out


def _publish(capsys, *argv) -> str:
    cli.run(publish_main, [str(a) for a in argv], prog="python -m ssl_xcit.publish")
    return capsys.readouterr().out


def test_timm_alone_gives_load_backbones_features(run, tmp_path, capsys):
    out = tmp_path / "pub"
    _publish(capsys, run / "checkpoint.pth", out, "--license", "apache-2.0")
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    torch.save(x, tmp_path / "x.pt")
    script = textwrap.dedent(f"""
        import sys, timm, torch
        x = torch.load({str(tmp_path / 'x.pt')!r})
        a = timm.create_model({TIMM_NAME!r}, pretrained=True, num_classes=0,
                              pretrained_cfg_overlay=dict(file={str(out / 'model.safetensors')!r})).eval()
        b = timm.create_model("local-dir:" + {str(out)!r}, pretrained=True).eval()
        with torch.no_grad():
            torch.save({{"overlay": a(x), "local_dir": b(x), "data": timm.data.resolve_data_config({{}}, model=b)}},
                       {str(tmp_path / 'y.pt')!r})
        assert "ssl_xcit" not in sys.modules
    """)
    env = {**os.environ, "PYTHONPATH": "", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.load(tmp_path / "y.pt", weights_only=False)
    with torch.no_grad():
        ref = load_backbone(run / "checkpoint.pth")(x)
    assert ref.shape == (3, 128)
    assert (got["overlay"] - ref).abs().max().item() <= 1e-5
    assert (got["local_dir"] - ref).abs().max().item() <= 1e-5
    # timm's preprocessing: the run's resolution (32 px), DINO's resize ratio, bicubic, ImageNet statistics
    assert got["data"]["input_size"] == (3, 32, 32) and got["data"]["interpolation"] == "bicubic"
    assert got["data"]["crop_pct"] == pytest.approx(32 / 37, abs=1e-4)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architecture"] == TIMM_NAME and cfg["num_features"] == 128 and cfg["num_classes"] == 0
    assert cfg["pretrained_cfg"]["license"] == "apache-2.0" and list(cfg["pretrained_cfg"]["mean"]) == [0.485, 0.456, 0.406]
    assert "tag" not in cfg["pretrained_cfg"] and "hf_hub_id" not in cfg["pretrained_cfg"]   # not timm's own weights


def test_student_and_teacher_are_the_checkpoints_networks(run, tmp_path, capsys):
    state = torch.load(run / "checkpoint.pth", weights_only=True)
    for flag, key in (([], "teacher"), (["--student"], "student")):
        out = tmp_path / key
        _publish(capsys, run / "checkpoint.pth", out, *flag)
        published = load_file(out / "model.safetensors")
        own = {k[len("backbone."):]: v for k, v in state[key].items() if k.startswith("backbone.")}
        assert published.keys() == own.keys()          # timm's key names are this project's
        assert all(torch.equal(published[k], own[k]) for k in own), key
        assert f"**{key}** backbone" in (out / "README.md").read_text()
    assert any(not torch.equal(state["teacher"][k], state["student"][k]) for k in state["teacher"])


def test_the_model_card_says_what_the_run_folder_holds(run, tmp_path, capsys):
    folder = tmp_path / "copy"
    folder.mkdir()
    for name in ("checkpoint.pth", "config.yaml", "log.jsonl"):
        (folder / name).symlink_to(run / name)
    (folder / "knn.json").write_text(json.dumps({
        "tool": "knn", "checkpoint": str(folder / "checkpoint.pth"), "checkpoint_key": "teacher", "num_train": 200,
        "num_val": 100, "num_classes": 10, "results": {"20": {"top1": 31.25, "top5": 77.5}}}))
    (folder / "linear.json").write_text(json.dumps({
        "tool": "linear", "mode": "full", "checkpoint": "elsewhere/checkpoint0001.pth", "checkpoint_key": "teacher",
        "data_path": "/data/cifar10", "top1": 42.125, "top5": 88.0, "num_train": 200, "num_val": 100, "num_classes": 10}))
    os.utime(folder / "linear.json", (1_780_000_000, 1_780_000_000))          # 2026-05-28 UTC
    (folder / "notes.json").write_text(json.dumps({"top1": 99.0}))              # not an evaluation result
    _publish(capsys, folder / "checkpoint.pth", tmp_path / "pub")
    card = (tmp_path / "pub" / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: timm\nlicense: unknown\n")
    assert "| knn (k=20) | 31.25 | 77.50 | 200 train / 100 val images, 10 classes; `knn.json` |" in card
    assert "| linear (full) | 42.12 | 88.00 | 200 train / 100 val images of `/data/cifar10`, 10 classes" in card
    assert "| linear (full) | 42.12 | 88.00 |" in card and "measured on `checkpoint0001.pth`, not the file published" in card
    assert "2026-05-28" in card and "99.00" not in card
    events = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    knn = [e for e in events if e["event"] == "knn"]
    assert [e["global_step"] for e in knn] == [0, 2, 3]
    for e in knn:
        assert f"teacher, step {e['global_step']}) | {e['top1']:.2f} | {e['top5']:.2f} |" in card
    start = next(e for e in events if e["event"] == "start")
    assert f"{start['images']} images" in card and "3 optimizer steps" in card and "xcit_nano_12_p16" in card
    assert "```yaml\nmodel:\n  arch: xcit_nano_12_p16" in card


def test_a_checkpoint_without_a_run_folder_says_so(tmp_path, capsys):
    from ssl_xcit.models import get_model
    torch.save(get_model("xcit_nano_12_p16", num_classes=0).state_dict(), tmp_path / "backbone.pth")
    _publish(capsys, tmp_path / "backbone.pth", tmp_path / "pub", "--img-size", "64")
    card = (tmp_path / "pub" / "README.md").read_text()
    assert "no training config was found" in card and "No evaluation figures were found" in card
    assert json.loads((tmp_path / "pub" / "config.json").read_text())["pretrained_cfg"]["input_size"] == [3, 64, 64]


@pytest.fixture
def fake_hub(monkeypatch):
    """A local stand-in of huggingface_hub: records the calls, checks the folder while it is uploaded."""
    calls = []

    class HfApi:
        def __init__(self, token=None):
            calls.append(("init", token))

        def create_repo(self, repo_id, private=False, exist_ok=False):
            calls.append(("create_repo", repo_id, private, exist_ok))
            return types.SimpleNamespace(repo_id=repo_id)

        def upload_folder(self, repo_id, folder_path, commit_message=None):
            files = sorted(p.name for p in Path(folder_path).iterdir())
            card = (Path(folder_path) / "README.md").read_text()
            calls.append(("upload_folder", repo_id, str(folder_path), files, "hf-hub:" + repo_id in card))
            return f"https://huggingface.co/{repo_id}/commit/0"
    monkeypatch.setitem(sys.modules, "huggingface_hub", types.SimpleNamespace(HfApi=HfApi))
    return calls


def test_push_to_hub_uploads_the_folder(run, tmp_path, fake_hub, capsys):
    out = tmp_path / "pub"
    printed = _publish(capsys, run / "checkpoint.pth", out, "--push-to-hub", "me/tiny-xcit", "--private")
    assert fake_hub == [("init", None), ("create_repo", "me/tiny-xcit", True, True),
                        ("upload_folder", "me/tiny-xcit", str(out), ["README.md", "config.json", "model.safetensors"],
                         True)]
    assert "uploaded to me/tiny-xcit" in printed


def test_nothing_is_uploaded_unless_asked(run, tmp_path, fake_hub, capsys):
    _publish(capsys, run / "checkpoint.pth", tmp_path / "pub")
    assert fake_hub == []


@pytest.mark.parametrize("case, message", [
    ("no_hub", "needs huggingface_hub: pip install huggingface_hub"),
    ("busy_folder", "holds other files (checkpoint.pth"),
    ("file_as_folder", "is a file; give a folder"),
    ("missing", "checkpoint file not found"),
    ("bad_size", "--img-size must be positive"),
])
def test_bad_input_is_one_line(run, tmp_path, monkeypatch, capsys, case, message):
    ckpt, out, extra = run / "checkpoint.pth", tmp_path / "pub", []
    if case == "no_hub":
        monkeypatch.setitem(sys.modules, "huggingface_hub", None)   # import fails
        extra = ["--push-to-hub", "me/x"]
    elif case == "busy_folder":
        out = run
    elif case == "file_as_folder":
        out.write_text("x")
    elif case == "missing":
        ckpt = tmp_path / "nothing.pth"
    else:
        extra = ["--img-size", "0"]
    with pytest.raises(SystemExit) as stop:
        cli.run(publish_main, [str(ckpt), str(out), *extra], prog="publish")
    err = capsys.readouterr().err
    assert stop.value.code == 2 and len(err.strip().splitlines()) == 1 and message in err, err
    if case == "no_hub":
        assert not out.exists()        # refused before anything was written
