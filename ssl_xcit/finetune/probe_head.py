"""Linear probe, then fine-tune (LP-FT, Kumar et al. 2022): the classifier head is fitted on the
frozen start's features before any weight of the backbone moves.

Why: a new head starts random, and its first gradients reach the backbone as noise large enough
to undo part of what pretraining learned; on few labels and few steps, what is undone is not
relearned, so fine-tuning ended *below* the linear probe of its own start (issue 33: 26.8-35.7 vs a
39.0 probe on 2,000 CIFAR-10 labels). Fitting the head first makes step 0 the probe itself, and
with the backbone learning at a fraction of the head's lr (``backbone_lr_scale``) fine-tuning
starts from the probe's answer and moves from there.

The head is fitted exactly as ``eval/eval_linear.py --mode cached`` fits its probe (centre-crop
features, no augmentation, its lr x weight-decay grid chosen on a held-out 10% of the labelled
images, then retrained on all of them), so the two tools mean the same by "the start's probe".
The features are what the classifier's head reads: ``forward_head(forward_features(x), pre_logits=True)``.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ssl_xcit import distributed as dist_utils
from ssl_xcit.dino.ema import unwrap


@dataclass
class FittedHead:
    weight: torch.Tensor          # (classes, dim)
    bias: torch.Tensor            # (classes,)
    images: int                   # labelled images the features came from
    selected: dict                # the probe grid's choice: lr, weight_decay, holdout_top1

    def describe(self) -> str:
        s = self.selected
        return (f"the classifier head was fitted on the frozen start's features of {self.images:,} labelled images "
                f"(cached linear probe: lr {s['lr']:g}, weight decay {s['weight_decay']:g}, held-out top-1 "
                f"{s['holdout_top1']:.2f}%) before fine-tuning: step 0 is the start's linear probe")


@torch.no_grad()
def head_features(model: nn.Module, dataset: Any, device: torch.device, batch_size: int = 256,
                  num_workers: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(features (N, D), labels (N,))``: what the classifier's head reads for each image of
    ``dataset`` (its transform applied; unreadable images skipped), the model in eval mode."""
    from ssl_xcit.evaluate.features import feature_loader
    core = unwrap(model)
    was_training = core.training
    core.eval()
    feats, labels = [], []
    try:
        for batch in feature_loader(dataset, range(len(dataset)), batch_size, num_workers, device):
            if batch.images is None:
                continue
            x = core.forward_features(batch.images.to(device))
            feats.append(core.forward_head(x, pre_logits=True).float().cpu())
            labels.append(batch.labels)
    finally:
        core.train(was_training)
    if not feats:
        raise ValueError("no readable labelled image to fit the classifier head on")
    return torch.cat(feats), torch.cat(labels)


def fit_probe_head(model: nn.Module, train_set: Any, val_transform: Any, num_classes: int, device: torch.device,
                   seed: int = 0, num_workers: int = 0) -> FittedHead:
    """Fit the head of ``model`` on its frozen features of the labelled ``train_set`` (read through
    ``val_transform``: centre crops, as the cached probe), set it in place and return what was done.
    Under DDP rank 0 fits and every rank receives its head (the same start everywhere)."""
    from ssl_xcit.evaluate.linear import CachedConfig, cached_linear_eval
    head = unwrap(model).get_classifier()
    if dist_utils.is_main_process():
        images = copy.copy(train_set)
        images.transform = val_transform
        x, y = head_features(model, images, device, num_workers=num_workers)
        fit = cached_linear_eval(x, y, x[:1], y[:1], num_classes, CachedConfig(seed=seed))
        weight, bias = fit["weight"], fit["bias"]
        selected = {k: fit["selected"][k] for k in ("lr", "weight_decay", "holdout_top1")}
        n = len(x)
    else:
        weight, bias, selected, n = torch.zeros_like(head.weight), torch.zeros_like(head.bias), {}, 0
    with torch.no_grad():
        head.weight.copy_(weight.to(head.weight))
        head.bias.copy_(bias.to(head.bias))
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.broadcast(head.weight.data, src=0)
            torch.distributed.broadcast(head.bias.data, src=0)
    return FittedHead(head.weight.detach().cpu().clone(), head.bias.detach().cpu().clone(), n, selected)
