"""What the three evaluation tools share: command-line flags, device/distributed set-up, the frozen
backbone, eval transforms, and the backbone outputs a linear probe or an export can ask for.

Backbone outputs (:func:`backbone_outputs`):

* ``cls``: the final, normed CLS feature (B, D) -- what ``model(x)`` returns and what DINO's k-NN
  and DINO's XCiT linear probe use.
* ``last_blocks``: the CLS token after each of the last ``n`` blocks that carry one, each passed
  through the final norm, concatenated (B, n*D). In XCiT only the class-attention blocks (2 in
  every published XCiT) carry a CLS token, so ``n`` is at most 2 there; ``n = 1`` equals ``cls``.
* ``avgpool``: the mean of the final normed patch tokens (B, D).
* ``patch``: the final normed patch tokens (B, P, D).
"""
from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ssl_xcit import distributed as du

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
OUTPUT_NAMES = ("cls", "last_blocks", "avgpool", "patch")


# flags and input checks live in the torch-free options module (fast --help); the tools and
# export.py reach them through this module as before
from ssl_xcit.evaluate.options import (EvalInputError, add_backbone_args, add_data_args,  # noqa: E402,F401
                                       add_runtime_args, check_positive, pick_device)


# --------------------------------------------------------------------------------------------- runtime
@dataclass(frozen=True)
class EvalEnv:
    """Where this process runs: its device and its place among the ranks."""

    device: torch.device
    rank: int = 0
    world_size: int = 1
    owns_group: bool = False  # this tool started the process group, so it ends it

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_env(device: str = "auto", seed: int = 0) -> EvalEnv:
    """Join the torchrun process group (if any), pick the device, and seed every generator.

    Seeding before the backbone is built makes a random-init backbone identical on all ranks.
    """
    had_group = dist.is_available() and dist.is_initialized()
    info = du.init_distributed(device)
    dev = pick_device(device, info.local_rank)  # cuda without a GPU: one line
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    seed_everything(seed)
    return EvalEnv(device=dev, rank=info.rank, world_size=info.world_size,
                   owns_group=info.world_size > 1 and not had_group)


def teardown_env(env: EvalEnv) -> None:
    """End the process group if this tool started it (a caller's own group is left alone)."""
    if env.owns_group:
        du.cleanup()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def comm_device(default: torch.device | None = None) -> torch.device:
    """The device collectives need: the current GPU under NCCL, the CPU under gloo."""
    if du.get_world_size() > 1 and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return default if default is not None else torch.device("cpu")


def default_output_dir(checkpoint: str | None, fallback: str | os.PathLike = "outputs") -> Path:
    """Next to the checkpoint file; for a model name (random init) ``outputs/<name>``."""
    if checkpoint and Path(checkpoint).is_file():
        return Path(checkpoint).resolve().parent
    name = Path(checkpoint).name if checkpoint else "eval"
    return Path(fallback) / name


# --------------------------------------------------------------------------------------------- backbone
def load_frozen_backbone(checkpoint: str, arch: str | None = None, checkpoint_key: str = "teacher",
                         device: torch.device | str = "cpu", seed: int = 0,
                         crop_size: int | None = None) -> nn.Module:
    """The backbone in eval mode with gradients off: evaluation never changes its weights.

    A model name gives a random-init backbone drawn from ``seed`` alone (the caller's random
    state is left untouched), so every rank and every resumed run evaluates the same network.
    ``crop_size`` is checked against the backbone's patch size before any image is read.
    """
    from ssl_xcit.models import load_backbone
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = load_backbone(checkpoint, arch=arch, checkpoint_key=checkpoint_key)
    patch = getattr(model, "patch_size", None)
    if crop_size is not None and isinstance(patch, int) and crop_size % patch:
        raise EvalInputError(f"--crop-size {crop_size} is not divisible by the patch size {patch} of "
                             f"{getattr(model, 'arch', type(model).__name__)}: use a multiple of {patch} "
                             f"(e.g. {max(patch, crop_size // patch * patch)})")
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model.to(device)


def embed_dim(model: nn.Module) -> int:
    for attr in ("embed_dim", "num_features"):
        value = getattr(model, attr, None) or getattr(_token_core(model, required=False), attr, None)
        if isinstance(value, int):
            return value
    raise AttributeError(f"{type(model).__name__} exposes neither embed_dim nor num_features")


def _token_core(model: nn.Module, required: bool = True) -> nn.Module | None:
    """The module that holds the transformer (``forward_features``, ``norm``, ``blocks``).

    Searched rather than assumed, so a wrapper around a timm/official XCiT or a DINO ViT works.
    """
    for m in (model, *model.modules()):
        if (callable(getattr(m, "forward_features", None)) and isinstance(getattr(m, "norm", None), nn.Module)
                and isinstance(getattr(m, "blocks", None), nn.Sequential | nn.ModuleList)):
            return m
    if required:
        raise TypeError(f"{type(model).__name__} has no transformer with forward_features/norm/blocks: "
                        "only the 'cls' output (model(x)) is available for it")
    return None


def _cls_blocks(core: nn.Module) -> Sequence[nn.Module]:
    """Blocks whose output carries a CLS token at position 0."""
    cab = getattr(core, "cls_attn_blocks", None)
    if cab is not None and len(cab) > 0:
        return list(cab)  # XCiT: the patch blocks have no CLS token
    return list(core.blocks)  # ViT: every block does


def max_last_blocks(model: nn.Module) -> int:
    return len(_cls_blocks(_token_core(model)))


def backbone_outputs(model: nn.Module, images: torch.Tensor, names: Iterable[str],
                     n_last_blocks: int = 1) -> dict[str, torch.Tensor]:
    """The outputs ``names`` (see module doc) of one forward pass, without gradients."""
    names = tuple(names)
    bad = [n for n in names if n not in OUTPUT_NAMES]
    if bad:
        raise ValueError(f"unknown backbone output(s) {bad}; choose from {OUTPUT_NAMES}")
    with torch.no_grad():
        if set(names) <= {"cls"}:
            return {"cls": _as_features(model(images), model)}
        core = _token_core(model)
        blocks = _cls_blocks(core)
        want_blocks = "last_blocks" in names
        if want_blocks and not 1 <= n_last_blocks <= len(blocks):
            raise ValueError(f"n_last_blocks={n_last_blocks} but this backbone has {len(blocks)} block(s) "
                             "carrying a CLS token (XCiT: its class-attention blocks)")
        if callable(getattr(core, "forward_features_all", None)):  # ssl_xcit.models.XCiT: one pass, named
            return _from_all(core.forward_features_all(images), names, n_last_blocks)
        captured: list[torch.Tensor] = []
        hooks = []
        if want_blocks:
            for blk in blocks[len(blocks) - n_last_blocks:]:
                hooks.append(blk.register_forward_hook(
                    lambda _m, _i, out: captured.append(out[:, 0])))
        try:
            tokens = core.forward_features(images)
        finally:
            for h in hooks:
                h.remove()
        if tokens.dim() != 3:
            raise TypeError(f"{type(core).__name__}.forward_features returned shape {tuple(tokens.shape)}; "
                            "expected tokens (B, 1+P, D)")
        prefix = int(getattr(core, "num_prefix_tokens", 1))
        out: dict[str, torch.Tensor] = {}
        if "cls" in names:
            out["cls"] = tokens[:, 0]
        if want_blocks:
            out["last_blocks"] = torch.cat([core.norm(c) for c in captured], dim=-1)
        if "avgpool" in names:
            out["avgpool"] = tokens[:, prefix:].mean(dim=1)
        if "patch" in names:
            out["patch"] = tokens[:, prefix:]
        return out


def _from_all(feats: dict, names: tuple[str, ...], n_last_blocks: int) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    if "cls" in names:
        out["cls"] = feats["cls"]
    if "last_blocks" in names:
        out["last_blocks"] = torch.cat(list(feats["cls_blocks"][-n_last_blocks:]), dim=-1)
    if "avgpool" in names:
        out["avgpool"] = feats["patch_tokens"].mean(dim=1)
    if "patch" in names:
        out["patch"] = feats["patch_tokens"]
    return out


def _as_features(out: object, model: nn.Module) -> torch.Tensor:
    if isinstance(out, (tuple, list)):
        out = out[0]
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise TypeError(f"{type(model).__name__}(x) must return the CLS feature (B, D), got "
                        f"{getattr(out, 'shape', type(out).__name__)}")
    return out


# --------------------------------------------------------------------------------------------- data
def resize_for(crop_size: int, resize: int | None = None) -> int:
    """DINO's ratio: resize 256 for a 224 crop, scaled for other crop sizes."""
    check_positive(crop_size, "--crop-size")
    if resize is None:
        return int(round(crop_size * 256 / 224))
    check_positive(resize, "--resize")
    if resize < crop_size:
        raise EvalInputError(f"--resize {resize} is smaller than --crop-size {crop_size}")
    return resize


def eval_transform(crop_size: int = 224, resize: int | None = None):
    """Resize (bicubic) -> centre crop -> tensor -> ImageNet normalisation, DINO's eval transform."""
    from torchvision import transforms as T
    return T.Compose([T.Resize(resize_for(crop_size, resize), interpolation=T.InterpolationMode.BICUBIC),
                      T.CenterCrop(crop_size), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def train_transform(crop_size: int = 224):
    """RandomResizedCrop + horizontal flip, DINO's linear-probe training transform."""
    from torchvision import transforms as T
    check_positive(crop_size, "--crop-size")
    return T.Compose([T.RandomResizedCrop(crop_size), T.RandomHorizontalFlip(), T.ToTensor(),
                      T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def resolve_root(data_path: str | os.PathLike) -> Path:
    """A folder as-is, or a .tar/.tar.gz unpacked once (ssl_xcit.data.sources)."""
    from ssl_xcit.data.sources import resolve_data_path
    return Path(resolve_data_path(data_path))


def open_images(root: str | os.PathLike, transform, progress: bool | None = None) -> "torch.utils.data.Dataset":
    """The project's image dataset: a folder (class or flat layout) or tar shards; ``None`` for corrupt files.
    ``progress=False`` silences the listing's progress bar (``--no-progress``)."""
    from ssl_xcit.data.sources import open_image_dataset
    return open_image_dataset(root, transform, progress=progress)


def open_split(data_root: Path, split: str, transform, need_labels: bool = True, progress: bool | None = None):
    folder = Path(data_root) / split
    if not folder.is_dir():
        raise FileNotFoundError(f"--data-path {data_root} has no {split}/ folder (expected train/ and val/)")
    ds = open_images(folder, transform, progress)
    if need_labels and not getattr(ds, "classes", None):
        raise EvalInputError(f"{folder} has no class sub-folders: this evaluation needs labelled images "
                             f"({folder}/<class>/<image>)")
    return ds


def check_same_classes(train_ds, val_ds, data_root: Path) -> list[str]:
    if list(train_ds.classes) != list(val_ds.classes):
        only_t = sorted(set(train_ds.classes) - set(val_ds.classes))
        only_v = sorted(set(val_ds.classes) - set(train_ds.classes))
        raise EvalInputError(f"{data_root}: train/ and val/ class folders differ (only in train: {only_t[:5]}, "
                         f"only in val: {only_v[:5]}); labels would not match")
    return list(train_ds.classes)


# --------------------------------------------------------------------------------------------- sharding
def shard_sampler(n: int, env_world: int | None = None, env_rank: int | None = None):
    """This rank's contiguous shard of ``range(n)`` (each index on exactly one rank)."""
    from ssl_xcit.data.sampler import ShardedIndexSampler
    world = du.get_world_size() if env_world is None else env_world
    rank = du.get_rank() if env_rank is None else env_rank
    return ShardedIndexSampler(n, world, rank)


def gather_rows(rows: torch.Tensor, indices: torch.Tensor, chunk_rows: int = 65536
                ) -> tuple[torch.Tensor, torch.Tensor] | tuple[None, None]:
    """Collect every rank's ``rows`` on rank 0, ordered by their dataset ``indices``.

    Ranks may hold different counts (shards of unequal size, corrupt files dropped); rows are
    padded to the largest count and sent in chunks so no rank needs all of them on the GPU at once.
    Returns ``(rows, indices)`` sorted by index on rank 0 and ``(None, None)`` on the others.
    """
    if rows.shape[0] != indices.shape[0]:
        raise ValueError(f"gather_rows: {rows.shape[0]} rows but {indices.shape[0]} indices")
    world = du.get_world_size()
    if world == 1:
        order = torch.argsort(indices)
        return rows[order], indices[order]
    dev = comm_device()
    count = torch.tensor([rows.shape[0]], device=dev, dtype=torch.long)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    counts_l = [int(c.item()) for c in counts]
    most = max(counts_l)
    pad_rows = torch.zeros((most, *rows.shape[1:]), dtype=rows.dtype)
    pad_rows[: rows.shape[0]] = rows.cpu()
    pad_idx = torch.full((most,), -1, dtype=torch.long)
    pad_idx[: indices.shape[0]] = indices.cpu()
    rank = du.get_rank()
    got_rows: list[list[torch.Tensor]] = [[] for _ in range(world)]
    got_idx: list[list[torch.Tensor]] = [[] for _ in range(world)]
    for start in range(0, max(most, 1), chunk_rows):
        for src, got in ((pad_rows, got_rows), (pad_idx, got_idx)):
            piece = src[start:start + chunk_rows].to(dev).contiguous()
            bucket = [torch.empty_like(piece) for _ in range(world)] if rank == 0 else None
            dist.gather(piece, bucket, dst=0)
            if rank == 0:
                for r in range(world):
                    got[r].append(bucket[r].cpu())
    if rank != 0:
        return None, None
    all_rows = torch.cat([torch.cat(got_rows[r])[: counts_l[r]] for r in range(world)])
    all_idx = torch.cat([torch.cat(got_idx[r])[: counts_l[r]] for r in range(world)])
    if torch.unique(all_idx).numel() != all_idx.numel():
        raise RuntimeError("gather_rows: the same dataset index came from two ranks (overlapping shards)")
    order = torch.argsort(all_idx)
    return all_rows[order], all_idx[order]


def open_splits(args):
    """``(train_ds, val_ds, classes)`` for the tools that read train/ and val/ (k-NN, linear):
    DINO's eval transform on both splits, the same classes checked."""
    root = resolve_root(args.data_path)
    tf = eval_transform(args.crop_size, args.resize)
    progress = False if getattr(args, "no_progress", False) else None
    train_ds = open_split(root, "train", tf, progress=progress)
    val_ds = open_split(root, "val", tf, progress=progress)
    return train_ds, val_ds, check_same_classes(train_ds, val_ds, root)


def open_splits_and_backbone(args, env: EvalEnv):
    """The frozen backbone, then :func:`open_splits`: ``(train_ds, val_ds, classes, model)``. The
    checkpoint first: a bad one is reported in seconds, before a large folder is listed."""
    model = load_frozen_backbone(args.checkpoint, args.arch, args.checkpoint_key, env.device, seed=args.seed,
                                 crop_size=args.crop_size)
    train_ds, val_ds, classes = open_splits(args)
    return train_ds, val_ds, classes, model
