"""Frozen-backbone feature extraction shared by k-NN, the cached linear probe and the exporter.

Under torchrun every rank extracts one contiguous shard of the dataset (no image twice) and the
rows are gathered on rank 0 by dataset index, so the result is the same as one process's.
Corrupt images are skipped (and counted): the returned ``indices`` say which images the rows are.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ssl_xcit import distributed as du
from ssl_xcit.errors import UserError
from ssl_xcit.evaluate.backbone import OUTPUT_NAMES, backbone_outputs
from ssl_xcit.evaluate.runtime import comm_device, gather_rows, shard_sampler

logger = logging.getLogger(__name__)


class WithIndex(Dataset):
    """Items as ``(image, label, index)`` or ``None``, whatever the wrapped dataset returns.

    ImageFiles already returns that; a torchvision-style ``(image, label)`` dataset gains the index.
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        item = self.dataset[i]
        if item is None:
            return None
        if len(item) == 3:
            return item
        if len(item) == 2:
            return item[0], int(item[1]), i
        raise TypeError(f"dataset item {i} has {len(item)} fields; expected (image, label) or "
                        "(image, label, index)")


def feature_loader(dataset: Dataset, indices: Sequence[int] | torch.utils.data.Sampler, batch_size: int,
                   num_workers: int, device: torch.device | str) -> DataLoader:
    """An in-order loader over ``indices`` that drops corrupt images (``collate_skip_corrupt``)."""
    from ssl_xcit.data.folders import collate_skip_corrupt
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    return DataLoader(WithIndex(dataset), batch_size=batch_size, sampler=indices, num_workers=num_workers,
                      collate_fn=collate_skip_corrupt, pin_memory=torch.device(device).type == "cuda",
                      persistent_workers=False)


def iter_outputs(model: nn.Module, loader: DataLoader, names: Sequence[str], device: torch.device | str,
                 n_last_blocks: int = 1, dtype: torch.dtype = torch.float32, progress: bool = True,
                 desc: str = "features", extra: Callable[[torch.Tensor], dict] | None = None
                 ) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor, int]]:
    """Per batch: ``(outputs on the CPU in dtype, labels, dataset indices, corrupt images skipped)``.
    ``extra(images)``: more named outputs of the same batch (the export's dense maps)."""
    from tqdm import tqdm
    show = progress and du.is_main_process()
    for batch in tqdm(loader, desc=desc, disable=not show, unit="batch", dynamic_ncols=True):
        if batch.images is None:  # every image of the batch was corrupt
            yield {}, batch.labels, batch.indices, batch.n_skipped
            continue
        images = batch.images.to(device, non_blocking=True)
        out = backbone_outputs(model, images, names, n_last_blocks)
        if extra is not None:
            with torch.no_grad():
                out.update(extra(images))
        yield ({k: v.float().cpu().to(dtype) for k, v in out.items()}, batch.labels, batch.indices,
               batch.n_skipped)


@dataclass
class Extracted:
    """Rows of one extraction, sorted by dataset index."""

    outputs: dict[str, torch.Tensor]  # name -> (N, ...)
    labels: torch.Tensor  # (N,) int64; -1 in a folder without classes
    indices: torch.Tensor  # (N,) int64 dataset indices (corrupt images missing)
    n_skipped: int


def extract_outputs(model: nn.Module, dataset: Dataset, names: Sequence[str], batch_size: int = 128,
                    device: torch.device | str = "cpu", num_workers: int = 4, n_last_blocks: int = 1,
                    dtype: torch.dtype = torch.float32, progress: bool = True, desc: str = "features",
                    distributed: bool = True) -> Extracted | None:
    """Several backbone outputs over ``dataset``; under torchrun, sharded and gathered on rank 0.

    Returns ``None`` on ranks other than 0 when distributed (only rank 0 holds the gathered rows).
    The backbone is moved to ``device`` and must be in eval mode (checked: a train-mode BatchNorm
    in XCiT's patch embedding would change the weights it is meant to measure).
    """
    names = tuple(dict.fromkeys(names))
    if not names or any(n not in OUTPUT_NAMES for n in names):
        raise ValueError(f"names must be a non-empty subset of {OUTPUT_NAMES}, got {names}")
    if model.training:
        raise ValueError("extract the features of a frozen backbone: call model.eval() first")
    if len(dataset) == 0:
        raise ValueError("cannot extract features of an empty dataset")
    model.to(device)
    sharded = distributed and du.get_world_size() > 1
    sampler = shard_sampler(len(dataset)) if sharded else range(len(dataset))
    loader = feature_loader(dataset, sampler, batch_size, num_workers, device)
    parts: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    labels, indices, skipped = [], [], 0
    for out, lab, idx, n_skip in iter_outputs(model, loader, names, device, n_last_blocks, dtype, progress, desc):
        skipped += n_skip
        if not out:
            continue
        for n in names:
            parts[n].append(out[n])
        labels.append(lab)
        indices.append(idx)
    idx_t = torch.cat(indices) if indices else torch.zeros(0, dtype=torch.long)
    lab_t = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long)
    local = {n: torch.cat(p) if p else torch.zeros(0, dtype=dtype) for n, p in parts.items()}
    if sharded:
        skipped_t = du.all_reduce_sum(torch.tensor([skipped], dtype=torch.long,
                                                   device=comm_device()))
        skipped = int(skipped_t.item())
        if not parts[names[0]]:  # an empty shard still has to send rows of the right shape
            local = _empty_like_outputs(model, dataset, names, device, n_last_blocks, dtype)
        gathered = {n: gather_rows(local[n], idx_t)[0] for n in names}
        labs, order = gather_rows(lab_t, idx_t)
        if du.get_rank() != 0:
            return None
        local, lab_t, idx_t = gathered, labs, order
    else:
        order = torch.argsort(idx_t)
        local = {n: v[order] for n, v in local.items()}
        lab_t, idx_t = lab_t[order], idx_t[order]
    if skipped:
        logger.warning("%s: %d corrupt image(s) skipped; %d rows extracted", desc, skipped, idx_t.numel())
    if idx_t.numel() == 0:
        raise NoReadableImagesError(f"{desc}: every image was unreadable; no features extracted")
    return Extracted(outputs=local, labels=lab_t, indices=idx_t, n_skipped=skipped)


class NoReadableImagesError(UserError, RuntimeError):
    """Not one image of the data set could be read: nothing to extract (one line, not a traceback)."""


def _empty_like_outputs(model: nn.Module, dataset: Dataset, names: Sequence[str], device, n_last_blocks: int,
                        dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Zero-row outputs of the right trailing shape, from one readable image of the dataset."""
    for i in range(len(dataset)):
        item = WithIndex(dataset)[i]
        if item is not None:
            out = backbone_outputs(model, item[0].unsqueeze(0).to(device), names, n_last_blocks)
            return {k: v[:0].float().cpu().to(dtype) for k, v in out.items()}
    raise NoReadableImagesError("every image of the dataset is unreadable; no features extracted")


def extract_features(model: nn.Module, dataset: Dataset, batch_size: int = 128, device: torch.device | str = "cpu",
                     num_workers: int = 4, which: str | Sequence[str] = "cls", n_last_blocks: int = 1,
                     dtype: torch.dtype = torch.float32, return_indices: bool = False, progress: bool = True,
                     desc: str = "features"):
    """``(features (N, D), labels (N,))`` [+ ``indices (N,)``] of a frozen backbone over ``dataset``.

    ``which``: one of ``cls``, ``last_blocks``, ``avgpool``, ``patch`` (see
    :mod:`ssl_xcit.evaluate.backbone`) or a sequence of 2-D outputs concatenated per image (e.g.
    ``("last_blocks", "avgpool")``, DINO's linear-probe input). Rows are sorted by dataset index;
    corrupt images are skipped. Under torchrun the result is on rank 0 and ``None``s elsewhere.
    """
    names = (which,) if isinstance(which, str) else tuple(which)
    if len(names) > 1 and "patch" in names:
        raise ValueError("'patch' tokens are 3-D and cannot be concatenated with other outputs")
    ext = extract_outputs(model, dataset, names, batch_size, device, num_workers, n_last_blocks, dtype,
                          progress, desc)
    if ext is None:
        return (None, None, None) if return_indices else (None, None)
    feats = ext.outputs[names[0]] if len(names) == 1 else torch.cat([ext.outputs[n] for n in names], dim=1)
    return (feats, ext.labels, ext.indices) if return_indices else (feats, ext.labels)


class SideBySide(nn.Module):
    """Several backbones as one: ``forward`` returns their CLS features (B, D_i) side by side, and
    ``widths`` records each D_i (set by the first forward pass)."""

    def __init__(self, models: Sequence[nn.Module]) -> None:
        super().__init__()
        self.parts = nn.ModuleList(models)
        self.widths: list[int] = []

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        from ssl_xcit.evaluate.backbone import backbone_outputs
        feats = [backbone_outputs(m, images, ("cls",))["cls"] for m in self.parts]
        self.widths = [f.shape[1] for f in feats]
        return torch.cat(feats, dim=1)


def extract_features_each(models: Sequence[nn.Module], dataset: Dataset, batch_size: int = 128,
                          device: torch.device | str = "cpu", num_workers: int = 4, progress: bool = True,
                          desc: str = "features") -> tuple[list[torch.Tensor] | None, torch.Tensor | None]:
    """``([CLS features (N, D_i) of each model], labels (N,))`` from ONE pass over ``dataset``.

    Why: each image is read, decoded and resized once for all the backbones, not once per backbone.
    Scoring a trained backbone beside its random start (the quickstart's k-NN) on photos much larger
    than the evaluation size, decoding cost as much as the forward pass of a small backbone. Each
    model sees exactly the batches :func:`extract_features` would give it alone (same loader, same
    order, same skipped images), so its features are the same bit for bit. Under torchrun as
    :func:`extract_features`: on rank 0, ``(None, None)`` elsewhere.
    """
    if not models:
        raise ValueError("extract_features_each needs at least one model")
    if any(m.training for m in models):
        raise ValueError("extract the features of frozen backbones: call model.eval() first")
    both = SideBySide(models).eval()
    feats, labels = extract_features(both, dataset, batch_size, device, num_workers, "cls", progress=progress,
                                     desc=desc)
    if feats is None:
        return None, None
    return [f.contiguous() for f in torch.split(feats, both.widths, dim=1)], labels
