"""k steps + resume + (n-k) steps gives bitwise the same weights as n steps straight (CPU, fp32)."""
import json

import pytest
import torch

from ssl_xcit.train.loop import train
from tests.train_helpers import assert_same_weights, load_weights, tiny_config


def test_resume_is_bitwise_exact(cifar_small, tmp_path):
    straight = tmp_path / "straight"
    result = train(tiny_config(cifar_small, straight))
    assert result.status == "finished" and result.global_step == 12   # 24 images / 4 = 6 steps x 2 epochs

    pieces = tmp_path / "pieces"
    first = train(tiny_config(cifar_small, pieces, max_steps=4))     # mid-epoch 0
    assert first.global_step == 4
    calls = {"n": 0}

    def stop_after_four_more() -> bool:
        calls["n"] += 1
        return calls["n"] == 4
    second = train(tiny_config(cifar_small, pieces), stop_requested=stop_after_four_more)
    assert second.status == "stopped" and second.global_step == 8      # mid-epoch 1
    third = train(tiny_config(cifar_small, pieces))
    assert third.status == "finished" and third.global_step == 12

    assert_same_weights(load_weights(straight), load_weights(pieces), exact=True)
    events = [json.loads(line) for line in (pieces / "log.jsonl").read_text().splitlines()]
    resumes = [e for e in events if e["event"] == "resume"]
    assert [e["global_step"] for e in resumes] == [4, 8]
    # the per-step losses of the pieces are the straight run's losses, step for step
    def losses(folder):
        return {e["global_step"]: e["loss"] for e in map(json.loads, (folder / "log.jsonl").read_text().splitlines())
                if e["event"] == "train"}
    assert losses(pieces) == losses(straight)


def test_weights_actually_change_and_teacher_trails_student(cifar_small, tmp_path):
    """Guards the test above: a run that never updated anything would also 'resume exactly'."""
    from ssl_xcit.train.loop import build_models
    cfg = tiny_config(cifar_small, tmp_path / "run", max_steps=3)
    torch.manual_seed(cfg.run.seed)
    initial_student, _ = build_models(cfg)
    train(cfg)
    w = load_weights(tmp_path / "run")
    init = initial_student.state_dict()
    key = "backbone.blocks.0.attn.qkv.weight"
    assert not torch.equal(w[f"student.{key}"], init[key])
    assert not torch.equal(w[f"teacher.{key}"], w[f"student.{key}"])


def test_random_bytes_as_checkpoint_get_the_one_readers_message(tmp_path):
    """Resume reads checkpoint.pth through the same checked reader as evaluation: random bytes are
    "not a PyTorch checkpoint" in one line, not torch's advice to re-run with weights_only=False."""
    import random

    from ssl_xcit.models.checkpoints import CheckpointError as ModelsCheckpointError, read_checkpoint
    from ssl_xcit.engine.checkpoint import CheckpointError, load_checkpoint
    assert CheckpointError is ModelsCheckpointError       # one class, re-exported by train.checkpoint
    noise = tmp_path / "checkpoint.pth"
    noise.write_bytes(random.Random(0).randbytes(4096))
    with pytest.raises(CheckpointError) as resumed:
        load_checkpoint(noise)
    with pytest.raises(CheckpointError) as evaluated:
        read_checkpoint(noise)
    assert str(resumed.value) == str(evaluated.value)
    assert str(resumed.value).startswith(f"{noise} is not a PyTorch checkpoint (")
    assert "\n" not in str(resumed.value) and "Re-running" not in str(resumed.value)
    assert "file an issue" not in str(resumed.value)


def test_a_folder_is_named_as_a_folder_not_a_missing_checkpoint(cifar_small, tmp_path):
    from ssl_xcit.engine.checkpoint import CheckpointError, load_checkpoint
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "nothing.pth")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoint.pth").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"run is a folder, not a checkpoint file; did you mean .*run/checkpoint\.pth"):
        load_checkpoint(tmp_path / "run")
    out = tmp_path / "folder_ckpt"
    (out / "checkpoint.pth").mkdir(parents=True)     # the run meets a folder where its checkpoint goes
    with pytest.raises(CheckpointError, match=r"checkpoint\.pth is a folder, not a checkpoint file"):
        train(tiny_config(cifar_small / "train", out))
