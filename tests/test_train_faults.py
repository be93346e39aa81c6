"""Faults and bad inputs the training loop must not let through silently (issue 9): a non-finite loss
or non-finite weights never reach checkpoint.pth, a second run cannot share an output folder, a
refused resume leaves the folder as it was, an unreadable data set is an error, divergence is flagged."""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

from ssl_xcit.dino.loss import DINOLoss
from ssl_xcit.errors import UserError
from ssl_xcit.engine.checkpoint import CheckpointError
from ssl_xcit.train.loop import NonFiniteLossError, train
from tests.train_helpers import tiny_config

REPO = Path(__file__).resolve().parents[1]


def _events(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]


def _count_optimizer_steps(monkeypatch, after=None) -> dict:
    """Wrap AdamW.step: count the updates actually applied; ``after(n, optimizer)`` runs after the n-th."""
    original = torch.optim.AdamW.step
    calls = {"n": 0}

    def counting(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        calls["n"] += 1
        if after is not None:
            after(calls["n"], self)
        return out
    monkeypatch.setattr(torch.optim.AdamW, "step", counting)
    return calls


# ---- 1. a non-finite loss or non-finite weights never reach the checkpoint

def test_non_finite_loss_is_caught_before_backward_and_the_message_is_true(cifar_small, tmp_path, monkeypatch):
    original = DINOLoss.forward
    forwards = {"n": 0}

    def nan_on_third(self, *args, **kwargs):
        forwards["n"] += 1
        loss = original(self, *args, **kwargs)
        return loss * float("nan") if forwards["n"] == 3 else loss
    monkeypatch.setattr(DINOLoss, "forward", nan_on_third)
    updates = _count_optimizer_steps(monkeypatch)
    out = tmp_path / "run"
    with pytest.raises(NonFiniteLossError) as info:
        train(tiny_config(cifar_small, out, save_every_steps=1))
    assert updates["n"] == 2                      # the third step's update was never applied
    message = str(info.value)
    assert "\n" not in message and "global step 2" in message and "no update" in message
    assert "holds global step 2" in message       # what checkpoint.pth really holds
    assert isinstance(info.value, UserError)       # one line + exit 2 on the command line
    assert torch.load(out / "checkpoint.pth", weights_only=True)["global_step"] == 2


def test_weights_that_are_not_finite_are_never_saved(cifar_small, tmp_path, monkeypatch):
    """A finite loss can still leave inf weights behind (lr far too high): the save must refuse."""
    def poison_second_update(n, optimizer):
        if n == 2:
            with torch.no_grad():
                optimizer.param_groups[0]["params"][0].fill_(float("inf"))
    _count_optimizer_steps(monkeypatch, after=poison_second_update)
    out = tmp_path / "run"
    with pytest.raises(NonFiniteLossError, match="not finite.*global step 2"):
        train(tiny_config(cifar_small, out, save_every_steps=1))
    state = torch.load(out / "checkpoint.pth", weights_only=True)
    assert state["global_step"] == 1
    for part in ("student", "teacher"):
        assert all(torch.isfinite(v).all() for v in state[part].values() if v.is_floating_point()), part


# ---- 3. one training per output folder

HOLDER = """
import sys, time
from ssl_xcit.engine.lock import OutputDirLock
lock = OutputDirLock(sys.argv[1]).acquire()
print("ready", flush=True)
time.sleep(120)
"""


def test_a_second_training_in_the_same_output_dir_is_refused_naming_the_holder(cifar_small, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdout=subprocess.PIPE, text=True,
                              cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout.readline().strip() == "ready"
        with pytest.raises(UserError) as info:
            train(tiny_config(cifar_small, out, max_steps=1))
        message = str(info.value)
        assert f"pid {holder.pid}" in message and socket.gethostname() in message and "since" in message
        assert "\n" not in message
        assert not (out / "config.yaml").exists() and not (out / "log.jsonl").exists()
    finally:
        holder.kill()
        holder.wait()
    # the holder died without releasing (kill -9): its lock is stale and a new run takes it over
    result = train(tiny_config(cifar_small, out, max_steps=1))
    assert result.status == "finished"
    takeover = [e for e in _events(out) if e["event"] == "lock_taken_over"]
    assert len(takeover) == 1 and takeover[0]["pid"] == holder.pid


def test_the_lock_is_released_when_the_run_ends_even_on_error(cifar_small, tmp_path):
    from ssl_xcit.engine.lock import OutputDirLock
    out = tmp_path / "run"
    train(tiny_config(cifar_small, out, max_steps=1))
    with pytest.raises(CheckpointError):                         # a refused resume ...
        train(tiny_config(cifar_small, out, batch_size_per_gpu=3))
    lock = OutputDirLock(out).acquire()                          # ... released its lock too
    assert lock.took_over is None                                # and left no record behind
    lock.release()


def test_a_record_from_another_host_is_live_while_its_heartbeat_moves(tmp_path):
    """flock may not work across NFS hosts: a record naming another host blocks while it is
    refreshed, and is taken over once its heartbeat has stopped for ``stale_after_s``."""
    from ssl_xcit.engine.lock import LOCK_NAME, OutputDirLock, OutputDirLocked
    (tmp_path / LOCK_NAME).write_text(json.dumps({"host": "node-other", "pid": 4242, "since": time.time() - 60}))
    fresh = OutputDirLock(tmp_path, stale_after_s=30.0, wait_s=0.0)
    with pytest.raises(OutputDirLocked, match="host node-other, pid 4242, since"):
        fresh.acquire()
    old = time.time() - 100
    os.utime(tmp_path / LOCK_NAME, (old, old))                   # no sign of life for 100 s
    lock = OutputDirLock(tmp_path, stale_after_s=30.0, wait_s=0.0).acquire()
    assert lock.took_over is not None and lock.took_over.host == "node-other"
    record = json.loads((tmp_path / LOCK_NAME).read_text())
    assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
    lock.release()
    assert (tmp_path / LOCK_NAME).read_text() == ""


# ---- 4. a refused resume changes nothing and says why in one line

def test_resume_with_another_arch_is_one_line_and_leaves_config_yaml(cifar_small, tmp_path):
    out = tmp_path / "run"
    train(tiny_config(cifar_small, out, max_steps=1))
    before = (out / "config.yaml").read_text()
    log_before = (out / "log.jsonl").read_text()
    with pytest.raises(CheckpointError) as info:
        train(tiny_config(cifar_small, out, arch="xcit_tiny_12_p16"))
    message = str(info.value)
    assert "\n" not in message and len(message) < 400
    assert "xcit_nano_12_p16" in message and "xcit_tiny_12_p16" in message and str(out / "checkpoint.pth") in message
    assert (out / "config.yaml").read_text() == before
    assert (out / "log.jsonl").read_text() == log_before


def test_refused_resume_with_another_batch_leaves_config_yaml(cifar_small, tmp_path):
    out = tmp_path / "run"
    train(tiny_config(cifar_small, out, max_steps=1))
    before = (out / "config.yaml").read_text()
    with pytest.raises(CheckpointError):
        train(tiny_config(cifar_small, out, batch_size_per_gpu=3))
    assert (out / "config.yaml").read_text() == before


def test_resume_with_another_head_is_one_line(cifar_small, tmp_path):
    out = tmp_path / "run"
    train(tiny_config(cifar_small, out, max_steps=1))
    with pytest.raises(CheckpointError, match=r"does not fit this run's model.*head") as info:
        train(tiny_config(cifar_small, out, out_dim=128))
    assert "\n" not in str(info.value) and len(str(info.value)) < 500


# ---- 7. a data set with no (or few) readable images

def _garbage_copy(src: Path, dst: Path, n_bad: int) -> Path:
    shutil.copytree(src / "train", dst, symlinks=False)
    files = sorted(dst.glob("*/*.jpg"))
    for f in files[:n_bad]:
        f.unlink()
        f.write_bytes(b"not an image at all")
    return dst


def test_a_data_set_without_one_readable_image_is_an_error(cifar_small, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(cifar_small / "train", data, symlinks=False)
    for cls in sorted(data.iterdir())[1:]:
        shutil.rmtree(cls)
    files = sorted(data.glob("*/*.jpg"))
    for f in files:
        f.unlink()
        f.write_bytes(b"not an image at all")
    out = tmp_path / "run"
    with pytest.raises(UserError) as info:
        train(tiny_config(data, out, max_images=0, epochs=1, warmup_epochs=0))
    message = str(info.value)
    assert f"all {len(files)} images of {data}" in message
    assert f"{len(files)} x cannot identify image file" in message and "nothing to train on" in message
    assert not (out / "checkpoint.pth").exists()


def _tallies(text: str) -> int:
    """The sum of the "N x reason" and "N read fine now" tallies in a message."""
    return sum(int(n) for n in re.findall(r"(\d+) x ", text)) + sum(int(n) for n in re.findall(r"(\d+) read fine", text))


def test_the_unreadable_tallies_add_up_to_the_count_they_follow(cifar_small, tmp_path):
    """"all 8 images tried of the 11 ... (10 x cannot identify, 1 x truncated)": the tallies were of a
    second look at all 11, which the message did not say. Each tally now follows the count it adds up to."""
    from ssl_xcit.data.folders import ImageFiles
    from ssl_xcit.engine.unreadable import unreadable_message
    data = tmp_path / "eleven"
    data.mkdir()
    real = sorted((cifar_small / "train" / "cat").iterdir())
    for i in range(10):
        (data / f"{i:02d}.jpg").write_bytes(b"not an image at all")
    (data / "10.jpg").write_bytes(real[0].read_bytes()[:300])              # a truncated JPEG
    message = unreadable_message(ImageFiles(data, progress=False), loaded=0, skipped=8)
    assert message.startswith(f"all 8 images tried of the 11 in {data} failed to load (all 11 checked again: "
                              "10 x cannot identify image file, 1 x "), message
    assert _tallies(message) == 11
    four = tmp_path / "four"                  # failed when tried, two of them read fine on the second look
    four.mkdir()
    for i in range(2):
        (four / f"{i}.jpg").write_bytes(b"junk")
        shutil.copy(real[i].resolve(), four / f"{i + 2}.jpg")
    message = unreadable_message(ImageFiles(four, progress=False), loaded=0, skipped=4)
    assert f"all 4 images of {four} failed to load (2 x cannot identify image file, 2 read fine now)" in message
    assert _tallies(message) == 4


def test_unreadable_batches_in_a_row_stop_the_run_before_the_epoch_ends(cifar_small, tmp_path):
    data = _garbage_copy(cifar_small, tmp_path / "data", n_bad=200)
    out = tmp_path / "run"
    with pytest.raises(UserError, match=r"all 20 images tried of the 200 in .*20 steps in a row"):
        train(tiny_config(data, out, max_images=0, batch_size_per_gpu=1, epochs=1, warmup_epochs=0))
    assert not (out / "checkpoint.pth").exists()


def test_a_data_set_where_most_images_fail_is_flagged(cifar_small, tmp_path):
    data = _garbage_copy(cifar_small, tmp_path / "data", n_bad=170)          # 170 of 200 unreadable
    out = tmp_path / "run"
    with pytest.warns(RuntimeWarning, match=r"of \d+ images tried failed to load .*cannot identify image file"):
        train(tiny_config(data, out, max_images=0, max_steps=3, batch_size_per_gpu=8, warmup_epochs=0))
    assert [e for e in _events(out) if e["event"] == "unreadable_images_warning"]


# ---- 11. a diverging run is flagged once

def test_diverging_loss_warning_fires_once_with_the_knob(tmp_path):
    from ssl_xcit.train.health import warn_if_diverging
    from ssl_xcit.engine.logger import RunLogger
    logger = RunLogger(tmp_path, enabled=True, tensorboard=False)
    ln_k = math.log(256)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not warn_if_diverging({"loss": 2.0 * ln_k}, 256, 5, logger, True, lr=1e-3)   # high but plausible
    with pytest.warns(RuntimeWarning, match=r"diverging.*loss 4\.00e\+04.*ln\(out_dim\).*lower lr"):
        assert warn_if_diverging({"loss": 4e4}, 256, 5, logger, True, lr=1e3)
    assert [e["event"] for e in _events(tmp_path)] == ["divergence_warning"]


def test_a_run_with_a_huge_lr_is_flagged_as_diverging(cifar_small, tmp_path):
    out = tmp_path / "run"
    with pytest.warns(RuntimeWarning, match="diverging"):
        train(tiny_config(cifar_small, out, lr=1e3, norm_last_layer=False, max_steps=8))   # loss ~60 at step 8
    assert len([e for e in _events(out) if e["event"] == "divergence_warning"]) == 1


# ---- issue 26: a diverging run keeps the last checkpoint saved before the divergence began

def _rms(state: dict) -> float:
    tensors = [t.double() for t in state["student"].values() if t.is_floating_point()]
    return math.sqrt(sum(float(t.pow(2).sum()) for t in tensors) / sum(t.numel() for t in tensors))


def test_an_exploding_step_never_overwrites_the_healthy_checkpoint(cifar_small, tmp_path, capsys):
    """lr=1e8 without clipping: the loss of the step that explodes the weights is still finite (it is
    computed before the update), so only the weights tell. The step is not saved over the healthy
    checkpoint, and the error that follows says which step it holds and that resuming is safe."""
    out = tmp_path / "run"
    train(tiny_config(cifar_small, out, max_steps=2, save_every_steps=1))
    healthy = torch.load(out / "checkpoint.pth", weights_only=True)
    assert healthy["global_step"] == 2
    with pytest.raises(NonFiniteLossError) as info:
        train(tiny_config(cifar_small, out, max_steps=6, save_every_steps=1, lr=1e8, clip_grad=0.0))
    message = str(info.value)
    assert "holds global step 2" in message and "diverge" in message and "weights grew" in message
    assert "fp32" not in message, "the run is already fp32"
    kept = torch.load(out / "checkpoint.pth", weights_only=True)
    assert kept["global_step"] == 2 and _rms(kept) == _rms(healthy)
    assert [e["checkpoint_step"] for e in _events(out) if e["event"] == "checkpoint_kept"] == [2]
    assert "checkpoint.pth is not overwritten from now on" in capsys.readouterr().out
    result = train(tiny_config(cifar_small, out, max_steps=4, save_every_steps=1))   # resumes from step 2
    assert result.global_step == 4 and math.isfinite(result.last_loss)


def test_after_the_divergence_warning_checkpoints_are_kept(cifar_small, tmp_path):
    out = tmp_path / "run"
    with pytest.warns(RuntimeWarning, match="diverging"):
        train(tiny_config(cifar_small, out, lr=1e3, norm_last_layer=False, max_steps=8, save_every_steps=2))
    warned_at = [e["global_step"] for e in _events(out) if e["event"] == "divergence_warning"][0]
    saved = torch.load(out / "checkpoint.pth", weights_only=True)["global_step"]
    assert saved < warned_at, "a checkpoint written after the warning replaced the healthy one"
    kept = [e for e in _events(out) if e["event"] == "checkpoint_kept"]
    assert kept and kept[0]["checkpoint_step"] == saved


def test_the_non_finite_message_advises_fp32_only_to_mixed_precision_runs(cifar_small, tmp_path, monkeypatch):
    original = DINOLoss.forward
    monkeypatch.setattr(DINOLoss, "forward", lambda self, *a, **k: original(self, *a, **k) * float("nan"))
    for precision, advised in (("fp32", False), ("bf16", True)):
        with pytest.raises(NonFiniteLossError) as info:
            train(tiny_config(cifar_small, tmp_path / precision, precision=precision, max_steps=2))
        assert ("precision=fp32" in str(info.value)) == advised, str(info.value)


# ---- issue 26: starts that fail

def test_a_start_that_fails_on_its_data_leaves_no_output_folder(cifar_small, tmp_path):
    out = tmp_path / "new" / "run"
    with pytest.raises(ValueError, match="fewer than one global batch"):
        train(tiny_config(cifar_small, out, max_images=3, batch_size_per_gpu=4))
    assert not out.exists()
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="fewer than one global batch"):
        train(tiny_config(cifar_small, existing, max_images=3, batch_size_per_gpu=4))
    assert (existing / "notes.txt").read_text() == "mine"   # a folder it did not create is left alone


def test_too_few_images_under_recipe_auto_names_a_key(cifar_small, tmp_path):
    with pytest.raises(ValueError) as info:
        train(tiny_config(cifar_small, tmp_path / "run", max_images=3, batch_size_per_gpu=4, recipe="auto"))
    assert "batch_size_per_gpu" in str(info.value) and "drop_last" not in str(info.value)


@pytest.mark.parametrize("output_dir", ["/sys/ssl_xcit_run", "/sys/kernel"])
def test_an_output_folder_that_cannot_be_written_is_one_line(cifar_small, output_dir, capsys):
    from ssl_xcit import cli
    with pytest.raises(SystemExit) as stop:   # launch/train.py's own path, in this process
        cli.run("ssl_xcit.commands.train:main", [f"data_path={cifar_small}", f"output_dir={output_dir}",
                                               "arch=xcit_nano_12_p16", "device=cpu"], prog="launch/train.py")
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert stop.value.code == 2 and len(lines) == 1 and output_dir in lines[0] and "cannot" in lines[0], err


def test_log_jsonl_stays_strict_json_when_a_value_is_not_finite(tmp_path):
    from ssl_xcit.engine.logger import RunLogger
    logger = RunLogger(tmp_path, tensorboard=False)
    logger.scalars(3, {"loss": float("nan"), "grad_norm": float("inf"), "lr": 0.1}, 0)
    line = (tmp_path / "log.jsonl").read_text().strip()
    record = json.loads(line, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c} in {line}"))
    assert record["loss"] is None and record["grad_norm"] is None and record["lr"] == 0.1
