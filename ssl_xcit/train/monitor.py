"""k-NN of the teacher while DINO trains: "is it learning?" answered by a curve that rises.

Every ``eval_every_steps`` steps and/or every ``eval_every_epochs`` epochs (and once before the
first step, and once after the last), the teacher's backbone embeds a fixed, evenly spread subset
of ``eval_data_path``'s train/ and val/ (``eval_max_images`` of each) and DINO's weighted k-NN
(k = ``eval_knn_k``, T = 0.07, :mod:`ssl_xcit.evaluate.knn`) gives top-1 and top-5. Under torchrun
every rank embeds its shard (:func:`ssl_xcit.evaluate.features.extract_features`) and rank 0 votes
and logs (``log.jsonl`` records ``{"event": "knn", "top1": ..}``, TensorBoard ``knn/top1``); at the
end ``knn.png`` plots the curve.

It must not change the training it watches. An evaluation runs with the teacher in eval mode
(its BatchNorm uses, and does not update, its running statistics) and then restores every
module's mode and every buffer; the torch (CPU and CUDA), NumPy and Python random streams are
saved and restored around it (the evaluation's DataLoader draws a seed from the global generator).

For the training loop (all ranks call; each call is a no-op unless an evaluation is due)::

    monitor = KnnMonitor.from_config(cfg, steps_per_epoch, device, run)   # None when off; logs through the run
    monitor.before_training(teacher.backbone, global_step)   # step 0 only: the random start
    monitor.after_step(teacher.backbone, global_step)        # after each optimizer step
    monitor.after_training(teacher.backbone, global_step)    # last point + knn.png
"""
from __future__ import annotations

import contextlib
import random
import time
from pathlib import Path
from typing import Iterator, Protocol

import numpy as np
import torch
from torch import nn

from ssl_xcit import distributed as du
from ssl_xcit.data.subsets import evenly_spread
from ssl_xcit.errors import UserError
from ssl_xcit.train.config import ConfigError, DinoConfig

TEMPERATURE = 0.07


@contextlib.contextmanager
def evaluation_without_side_effects(module: nn.Module) -> Iterator[nn.Module]:
    """``module`` in eval mode inside; afterwards every submodule's mode, every buffer and the torch
    (CPU + initialised CUDA devices), NumPy and Python random states are as they were before."""
    modes = [(m, m.training) for m in module.modules()]
    buffers = [(b, b.detach().clone()) for b in module.buffers()]
    py_state, np_state = random.getstate(), np.random.get_state()
    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    try:
        with torch.random.fork_rng(devices=cuda):
            module.eval()
            yield module
    finally:
        for m, mode in modes:
            m.training = mode
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
        random.setstate(py_state)
        np.random.set_state(np_state)


class ScalarLog(Protocol):
    """Where the monitor's records go: a :class:`~ssl_xcit.engine.logger.RunLogger`, or the
    :class:`~ssl_xcit.engine.run.Run` that forwards to its logs once they are open."""

    def scalars(self, step: int, values: dict[str, float], epoch: int, group: str = "train") -> None: ...


class KnnMonitor:
    """Weighted k-NN top-1 of a backbone on fixed train/val subsets, at scheduled steps."""

    def __init__(self, data_path: str, *, every_epochs: int = 0, every_steps: int = 0, steps_per_epoch: int = 0,
                 max_images: int = 0, k: int = 20, crop_size: int = 224, resize: int | None = None,
                 batch_size: int = 128, num_workers: int = 0, device: torch.device | str = "cpu",
                 logger: ScalarLog | None = None, output_dir: str | Path | None = None) -> None:
        from ssl_xcit.evaluate import datasets
        if every_epochs and steps_per_epoch <= 0:
            raise ValueError("every_epochs needs steps_per_epoch")
        self.every_epochs, self.every_steps, self.steps_per_epoch = every_epochs, every_steps, steps_per_epoch
        self.k, self.batch_size, self.num_workers = k, batch_size, num_workers
        self.device, self.logger = torch.device(device), logger
        self.output_dir = Path(output_dir) if output_dir is not None else None
        try:
            root = datasets.resolve_root(data_path)
        except (FileNotFoundError, UserError) as err:   # missing, or a file that is no archive: name the key
            raise ConfigError(f"eval_data_path {data_path}: {err}; the k-NN monitor needs a folder (or .tar.gz "
                              "of one) with train/<class>/ and val/<class>/ images") from None
        missing = [split for split in ("train", "val") if not (root / split).is_dir()]
        if missing:
            raise ConfigError(f"eval_data_path {data_path} has no {' or '.join(s + '/' for s in missing)} "
                              "folder: the k-NN monitor needs labelled train/<class>/ and val/<class>/ images")
        if resize is not None and resize < crop_size:   # said in config keys (eval_transform says --resize)
            raise ConfigError(f"eval_resize ({resize}) must be >= the k-NN crop size ({crop_size}: eval_crop_size, "
                              "or global_crops_size when that is 0)")
        transform = datasets.eval_transform(crop_size, resize)
        from ssl_xcit.data.sources import open_image_dataset   # a folder or tar shards
        self.train_set = open_image_dataset(root / "train", transform, progress=False)
        self.val_set = open_image_dataset(root / "val", transform, progress=False)
        if not self.train_set.classes:
            raise ConfigError(f"eval_data_path {data_path}: train/ has no class folders; the k-NN monitor "
                              "needs labelled images (train/<class>/<image>)")
        try:
            self.classes = datasets.check_same_classes(self.train_set, self.val_set, root)
        except ValueError as err:
            raise ConfigError(f"eval_data_path: {err}") from None
        for ds in (self.train_set, self.val_set):
            ds.select(evenly_spread(len(ds), max_images))
        if k > len(self.train_set):
            raise ConfigError(f"eval_knn_k={k} exceeds the {len(self.train_set)} train images of {root}")
        self.history: list[dict] = []   # rank 0: {"global_step", "epoch", "top1", "top5", "seconds"}
        self._last_step: int | None = None

    @classmethod
    def from_config(cls, cfg: DinoConfig, steps_per_epoch: int, device: torch.device | str,
                    logger: ScalarLog | None = None) -> "KnnMonitor | None":
        """The monitor the config asks for, or ``None`` when eval_every_epochs and _steps are 0."""
        e = cfg.eval
        if not (e.eval_every_epochs or e.eval_every_steps):
            return None
        return cls(e.eval_data_path, every_epochs=e.eval_every_epochs, every_steps=e.eval_every_steps,
                   steps_per_epoch=steps_per_epoch, max_images=e.eval_max_images, k=e.eval_knn_k,
                   crop_size=e.eval_crop_size or cfg.data.global_crops_size, resize=e.eval_resize or None,
                   batch_size=e.eval_batch_size, num_workers=cfg.data.num_workers, device=device, logger=logger,
                   output_dir=cfg.run.output_dir)

    # ------------------------------------------------------------------ schedule
    def due(self, global_step: int) -> bool:
        """Whether an evaluation is scheduled after optimizer step ``global_step`` (counted from 1)."""
        if global_step <= 0 or global_step == self._last_step:
            return False
        by_steps = self.every_steps > 0 and global_step % self.every_steps == 0
        by_epochs = (self.every_epochs > 0 and global_step % self.steps_per_epoch == 0
                     and (global_step // self.steps_per_epoch) % self.every_epochs == 0)
        return by_steps or by_epochs

    def before_training(self, backbone: nn.Module, global_step: int) -> dict | None:
        """The starting point of the curve, for a run that starts at step 0 (not on resume)."""
        return self.evaluate(backbone, global_step) if global_step == 0 else None

    def after_step(self, backbone: nn.Module, global_step: int) -> dict | None:
        return self.evaluate(backbone, global_step) if self.due(global_step) else None

    def after_training(self, backbone: nn.Module, global_step: int) -> dict | None:
        """The final teacher's point (unless just taken) and, on rank 0, the figure ``knn.png``."""
        result = self.evaluate(backbone, global_step) if global_step != self._last_step else None
        if du.get_rank() == 0 and self.output_dir is not None:
            self.write_figure(self.output_dir / "knn.png")
        return result

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, backbone: nn.Module, global_step: int) -> dict | None:
        """Embed the subsets with ``backbone`` and vote; the record on rank 0, ``None`` elsewhere."""
        from ssl_xcit.evaluate.features import extract_features
        from ssl_xcit.evaluate.knn import knn_classifier
        start = time.perf_counter()
        self._last_step = global_step
        with evaluation_without_side_effects(backbone):
            feats = [extract_features(backbone, ds, self.batch_size, self.device, self.num_workers, which="cls",
                                      progress=False, desc=f"k-NN monitor {split}")
                     for split, ds in (("train", self.train_set), ("val", self.val_set))]
            if du.get_rank() != 0:
                return None
            (train_f, train_y), (val_f, val_y) = feats
            result = knn_classifier(train_f, train_y, val_f, val_y, ks=[self.k], temperature=TEMPERATURE,
                                    num_classes=len(self.classes))[self.k]
        epoch = (global_step - 1) // self.steps_per_epoch if self.steps_per_epoch and global_step else 0
        record = {"global_step": global_step, "epoch": epoch, "top1": result["top1"], "top5": result["top5"],
                  "seconds": time.perf_counter() - start}
        self.history.append(record)
        if self.logger is not None:
            self.logger.scalars(global_step, {k: record[k] for k in ("top1", "top5", "seconds")}, epoch,
                                group="knn")
        return record

    def write_figure(self, path: str | Path) -> Path | None:
        """``knn.png``: top-1 against the step, from ``log.jsonl`` (so a resumed run's earlier points
        are in it) or, without a log, from this process's own history."""
        from ssl_xcit.evaluate.report import read_log
        from ssl_xcit.evaluate.report_plots import plot_knn
        records = []
        if self.output_dir is not None and (self.output_dir / "log.jsonl").is_file():
            records = [r for r in read_log(self.output_dir / "log.jsonl").records if r.get("event") == "knn"]
        records = records or [{"event": "knn", **r} for r in self.history]
        return plot_knn(records, path, k=self.k) if records else None
