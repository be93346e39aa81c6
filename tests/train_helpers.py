"""Tiny DINO configs for tests: nano XCiT, 32-px global / 16-px local crops, a small head."""
from __future__ import annotations

from pathlib import Path

import torch

from ssl_xcit.train.config import DinoConfig, load_config


def tiny_overrides(data_path: Path, output_dir: Path, **overrides) -> list[str]:
    """The tiny run as ``key=value`` strings, for command lines (``launch/train.py``, ``entry.main``)."""
    base = {
        "arch": "xcit_nano_12_p16", "out_dim": 256, "head_hidden_dim": 64, "head_bottleneck_dim": 32,
        "global_crops_size": 32, "local_crops_size": 16, "local_crops_number": 2,
        "batch_size_per_gpu": 4, "epochs": 2, "warmup_epochs": 1, "max_images": 24,
        "num_workers": 0, "precision": "fp32", "device": "cpu", "tensorboard": False, "report": False,
        "log_every_steps": 1, "drop_path_rate": 0.1, "data_path": str(data_path),
        "output_dir": str(output_dir), "seed": 3,
        "recipe": "off",   # the values as written: tests of recipe=auto set it themselves
    }
    base.update(overrides)
    return [f"{k}={v}" for k, v in base.items()]


def tiny_config(data_path: Path, output_dir: Path, **overrides) -> DinoConfig:
    return load_config(None, tiny_overrides(data_path, output_dir, **overrides))


def load_weights(output_dir: Path) -> dict[str, torch.Tensor]:
    state = torch.load(Path(output_dir) / "checkpoint.pth", weights_only=True)
    out = {f"student.{k}": v for k, v in state["student"].items()}
    out.update({f"teacher.{k}": v for k, v in state["teacher"].items()})
    out["center"] = state["dino_loss"]["center"]
    return out


def assert_same_weights(a: dict, b: dict, exact: bool = True, atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if exact:
            assert torch.equal(a[key], b[key]), f"{key} differs"
        else:
            torch.testing.assert_close(a[key], b[key], atol=atol, rtol=1e-4, msg=lambda m: f"{key}: {m}")
