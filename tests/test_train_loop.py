"""The training loop's contract: outputs, bad input, non-finite losses, corrupt images, collapse."""
import json
import math
import shutil

import pytest
import torch

from ssl_xcit.dino.loss import DINOLoss
from ssl_xcit.train.health import warn_if_collapsed
from ssl_xcit.train.loop import NonFiniteLossError, train
from ssl_xcit.engine.logger import RunLogger
from tests.train_helpers import tiny_config


def _events(folder):
    return [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]


def test_output_folder_holds_config_log_tensorboard_and_checkpoint(cifar_small, tmp_path):
    out = tmp_path / "run"
    result = train(tiny_config(cifar_small, out, max_steps=2, tensorboard=True))
    assert result.status == "finished" and result.global_step == 2
    assert "arch: xcit_nano_12_p16" in (out / "config.yaml").read_text()
    train_records = [e for e in _events(out) if e["event"] == "train"]
    assert [e["global_step"] for e in train_records] == [1, 2]
    for key in ("loss", "lr", "weight_decay", "teacher_momentum", "teacher_temp", "grad_norm",
                "images_per_s", "teacher_entropy", "teacher_kl_uniform"):
        assert math.isfinite(train_records[-1][key]), key
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    state = torch.load(out / "checkpoint.pth", weights_only=True)
    assert state["format"] == "ssl_xcit" and state["global_step"] == 2
    assert state["config"]["model"]["arch"] == "xcit_nano_12_p16"
    # evaluation tools read the training checkpoint directly (teacher by default)
    from ssl_xcit import load_backbone
    backbone = load_backbone(out / "checkpoint.pth")
    teacher_qkv = state["teacher"]["backbone.blocks.0.attn.qkv.weight"]
    assert torch.equal(backbone.state_dict()["blocks.0.attn.qkv.weight"], teacher_qkv)


def test_non_finite_loss_stops_with_the_step_and_keeps_the_good_checkpoint(cifar_small, tmp_path, monkeypatch):
    out = tmp_path / "run"
    original = DINOLoss.forward
    calls = {"n": 0}

    def flaky(self, student_output, teacher_output, epoch, update_center=True):
        calls["n"] += 1
        loss = original(self, student_output, teacher_output, epoch, update_center)
        return loss * float("nan") if calls["n"] == 3 else loss
    monkeypatch.setattr(DINOLoss, "forward", flaky)
    with pytest.raises(NonFiniteLossError, match="global step 2"):
        train(tiny_config(cifar_small, out, save_every_steps=1))
    state = torch.load(out / "checkpoint.pth", weights_only=True)
    assert state["global_step"] == 2
    assert all(torch.isfinite(v).all() for v in state["student"].values() if v.is_floating_point())


def test_corrupt_images_are_skipped_and_counted(cifar_small, tmp_path):
    data = tmp_path / "data" / "train"
    shutil.copytree(cifar_small / "train", data, symlinks=False)
    victims = sorted(data.glob("*/*.jpg"))[:3]
    victims[0].write_bytes(b"not an image")
    victims[1].write_bytes(victims[2].read_bytes()[:100])       # truncated JPEG
    victims[2].unlink()
    victims[2].write_text("plain text")
    out = tmp_path / "run"
    train(tiny_config(data.parent, out, max_images=0, batch_size_per_gpu=40, epochs=1, warmup_epochs=0))
    epoch_end = [e for e in _events(out) if e["event"] == "epoch_end"]
    assert epoch_end[-1]["skipped_images"] == 3


@pytest.mark.parametrize("make, message", [
    (lambda p: p / "missing", "does not exist|not found|No such"),
    (lambda p: p.mkdir() or p, "no images|empty"),
])
def test_missing_or_empty_data_is_one_clear_error(tmp_path, make, message):
    path = make(tmp_path / "data")
    with pytest.raises((FileNotFoundError, ValueError), match=message):
        train(tiny_config(path, tmp_path / "run"))


def test_too_few_images_for_a_batch(cifar_small, tmp_path):
    with pytest.raises(ValueError, match="batch"):
        train(tiny_config(cifar_small, tmp_path / "run", max_images=3, batch_size_per_gpu=4))


def test_collapse_warning_fires_for_both_collapse_modes_only(tmp_path, capsys):
    from ssl_xcit.train.config import load_config
    cfg = load_config(None, ["out_dim=1024", "batch_size_per_gpu=32"])
    ln_k = math.log(1024)
    healthy = {"loss": 0.98 * ln_k, "teacher_entropy": 0.89 * ln_k, "teacher_kl_uniform": 0.02 * ln_k}
    uniform = {"loss": ln_k + 0.5, "teacher_entropy": 0.975 * ln_k, "teacher_kl_uniform": 0.001}
    one_hot = {"loss": 0.1, "teacher_entropy": 0.01, "teacher_kl_uniform": 0.81 * ln_k}
    for values, kind, knob in ((uniform, "uniform teacher output", "lower teacher_temp"),
                               (one_hot, "one prototype dominates", "raise teacher_temp")):
        folder = tmp_path / kind.split()[0]
        folder.mkdir()
        logger = RunLogger(folder, enabled=True, tensorboard=False)
        with pytest.warns(RuntimeWarning, match=kind):
            assert warn_if_collapsed(values, cfg, 100, logger, True)
        line = capsys.readouterr().out.strip()
        assert line.startswith("[ssl_xcit] warning: run looks collapsed at global step 100: " + kind), line
        assert knob in line and len(line.splitlines()) == 1
        [event] = _events(folder)
        assert (event["event"], event["global_step"]) == ("collapse_warning", 100)
        assert kind in event["kind"] and knob in event["knob"]
        # a later start of the same run (same log.jsonl) is not told again, and says it need not be asked
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert warn_if_collapsed(values, cfg, 150, RunLogger(folder, enabled=True, tensorboard=False), True)
        assert len(_events(folder)) == 1 and capsys.readouterr().out == ""
    logger = RunLogger(tmp_path, enabled=True, tensorboard=False)
    small_batch = load_config(None, ["out_dim=1024", "batch_size_per_gpu=4"])
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not warn_if_collapsed(healthy, cfg, 100, logger, True)
        assert not warn_if_collapsed(uniform, cfg, 19, logger, True)           # too early to judge
        assert not warn_if_collapsed(uniform, cfg, 100, logger, False)         # not rank 0
        assert not warn_if_collapsed(one_hot, small_batch, 100, logger, True)  # 4 images: KL not judged
    assert not (tmp_path / "log.jsonl").exists() and capsys.readouterr().out == ""


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_steps_run_and_checkpoint_the_scaler(cifar_small, tmp_path, precision):
    out = tmp_path / precision
    result = train(tiny_config(cifar_small, out, max_steps=2, precision=precision, warmup_epochs=0))
    assert math.isfinite(result.last_loss)
    state = torch.load(out / "checkpoint.pth", weights_only=True)
    assert bool(state["scaler"]) == (precision == "fp16")   # fp16 keeps its loss scale across resumes
    assert all(v.dtype == torch.float32 for v in state["student"].values() if v.is_floating_point())


@pytest.mark.heavy
def test_compiled_backbones_train_and_keep_plain_checkpoint_keys(cifar_small, tmp_path):
    out = tmp_path / "compiled"
    result = train(tiny_config(cifar_small, out, max_steps=2, compile=True, warmup_epochs=0))
    assert math.isfinite(result.last_loss)
    state = torch.load(out / "checkpoint.pth", weights_only=True)
    assert not [k for k in state["student"] if "_orig_mod" in k]


def test_resume_with_another_global_batch_continues_at_the_same_data_position(cifar_small, tmp_path):
    """A requeued job with another batch (or number of processes) picks up where the data order
    stood: 3 steps of 4 images = 12 images of epoch 0 = 6 steps of 2; then it runs to the end."""
    out = tmp_path / "run"
    train(tiny_config(cifar_small, out, max_steps=3))                      # 24 images: 6 steps per epoch
    saved = torch.load(out / "checkpoint.pth", weights_only=True)
    assert saved["sampler"]["epoch"] == 0 and saved["sampler"]["start_step"] == 3
    result = train(tiny_config(cifar_small, out, batch_size_per_gpu=2))   # 12 steps per epoch
    resume = [e for e in _events(out) if e["event"] == "resume"][-1]
    assert (resume["global_step"], resume["epoch"], resume["step"]) == (6, 0, 6)
    assert resume["converted_from_steps_per_epoch"] == 6
    assert result.status == "finished" and result.global_step == 24       # 2 epochs x 12 steps


def test_resume_with_a_batch_that_splits_the_seen_images_is_a_clear_error(cifar_small, tmp_path):
    from ssl_xcit.engine.checkpoint import CheckpointError
    out = tmp_path / "run"
    train(tiny_config(cifar_small, out, max_steps=1))                      # 4 images seen
    with pytest.raises(CheckpointError, match="6 steps per epoch.*8.*not a multiple of the new global batch 3"):
        train(tiny_config(cifar_small, out, batch_size_per_gpu=3))


def test_resume_of_a_checkpoint_without_sampler_state_and_another_batch_is_refused(cifar_small, tmp_path):
    from ssl_xcit.engine.checkpoint import CheckpointError
    out = tmp_path / "run"
    train(tiny_config(cifar_small, out, max_steps=1))
    state = torch.load(out / "checkpoint.pth", weights_only=True)
    del state["sampler"]                                                    # as written before this field
    torch.save(state, out / "checkpoint.pth")
    with pytest.raises(CheckpointError, match="steps per epoch.*same images, batch_size_per_gpu"):
        train(tiny_config(cifar_small, out, batch_size_per_gpu=2))