"""Linear probes of a frozen backbone: DINO's protocol (``mode='full'``) and a fast grid on cached
features (``mode='cached'``, the default).

``full`` -- DINO's ``eval_linear.py``: the backbone in eval mode without gradients; one linear
layer (no BatchNorm, weights N(0, 0.01), bias 0) on the concatenated CLS tokens of the last
``n_last_blocks`` blocks (+ the mean patch token with ``avgpool_patchtokens``); SGD momentum
0.9, lr = ``lr`` * global batch / 256, cosine to 0 over 100 epochs, weight decay 0;
RandomResizedCrop + flip for training, resize + centre crop for val; best and last val accuracy.
Resumable: ``linear_checkpoint.pth`` in the output folder is written atomically every epoch and
picked up by the next run. These are the numbers to compare with DINO's.

``n_last_blocks`` default: DINO uses 4 for ViT-S and 1 (+ avgpool) for ViT-B. For XCiT, DINO
(and facebookresearch/xcit) probe the final CLS feature alone -- in XCiT only the 2
class-attention blocks carry a CLS token -- so the default here is 1 for XCiT, 4 otherwise.

``cached`` -- minutes instead of hours: features of the centre crops are extracted once (no
augmentation), a grid of learning rates x weight decays trains one linear head each, all heads at
once in one batched matmul, chosen on a held-out 10 % of train, then the chosen setting is
retrained on all of train and reported on val. Good for tracking runs and sweeping; not DINO's
protocol (no augmentation), and every output says so.
"""
from __future__ import annotations

import itertools
import logging
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ssl_xcit import distributed as du
from ssl_xcit.evaluate import backbone, datasets, runtime
from ssl_xcit.errors import SETTING, hinted, named
from ssl_xcit.evaluate.inputs import (DEFAULT_LR_GRID, DEFAULT_WD_GRID, EvalInputError, SourceSettings,
                                      check_positive)
from ssl_xcit.atomic import atomic_torch_save, atomic_write_json

logger = logging.getLogger(__name__)

CHECKPOINT_NAME = "linear_checkpoint.pth"
RESULT_NAME = "linear.json"
PROTOCOLS = {
    "full": "DINO linear probe: frozen backbone, augmented training (RandomResizedCrop + flip), "
            "SGD momentum 0.9, cosine lr, no weight decay",   # DINO's; full_protocol() says another one
    "cached": "cached-feature linear probe: centre-crop features without augmentation, lr/wd grid "
              "chosen on a held-out split of train, retrained on all of train; NOT DINO's protocol",
}


def full_protocol(weight_decay: float) -> str:
    """The full mode's protocol line, with the weight decay the probe used (DINO's is none)."""
    if not weight_decay:
        return PROTOCOLS["full"]
    return PROTOCOLS["full"].replace("no weight decay", f"weight decay {weight_decay:g} (DINO: none)")


# --------------------------------------------------------------------------------------------- shared
def default_n_last_blocks(model: nn.Module) -> int:
    core = backbone._token_core(model, required=False)
    is_xcit = core is not None and getattr(core, "cls_attn_blocks", None) is not None
    return 1 if is_xcit or core is None else min(4, backbone.max_last_blocks(model))


def probe_outputs(n_last_blocks: int, avgpool: bool) -> tuple[str, ...]:
    """The backbone outputs a probe reads; n=1 without avgpool is the final CLS (any backbone)."""
    if n_last_blocks == 1 and not avgpool:
        return ("cls",)
    return ("last_blocks", "avgpool") if avgpool else ("last_blocks",)


def probe_input(model: nn.Module, images: torch.Tensor, n_last_blocks: int, avgpool: bool) -> torch.Tensor:
    names = probe_outputs(n_last_blocks, avgpool)
    out = backbone.backbone_outputs(model, images, names, n_last_blocks)
    return torch.cat([out[n] for n in names], dim=1)


class LinearProbe(nn.Module):
    """One linear layer, DINO's initialisation (weights N(0, 0.01), bias 0)."""

    def __init__(self, in_dim: int, num_classes: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_dim, num_classes)
        nn.init.normal_(self.linear.weight, mean=0.0, std=0.01)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.flatten(1))


def topk_hits(logits: torch.Tensor, targets: torch.Tensor, ks: Sequence[int] = (1, 5)) -> list[int]:
    """Number of rows whose target is among the top-k logits, per k (k capped at the class count)."""
    kmax = min(max(ks), logits.shape[-1])
    top = logits.topk(kmax, dim=-1).indices
    hit = top == targets[..., None]
    return [int(hit[..., :min(k, kmax)].any(dim=-1).sum()) for k in ks]


# --------------------------------------------------------------------------------------------- cached
def cosine_lr(base: torch.Tensor | float, epoch: int, epochs: int):
    """The per-epoch cosine schedule of torch's CosineAnnealingLR (eta_min 0), in closed form."""
    return base * 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))


def train_linear_heads(x: torch.Tensor, y: torch.Tensor, num_classes: int, lrs: Sequence[float],
                       wds: Sequence[float], epochs: int, batch_size: int, momentum: float = 0.9,
                       seed: int = 0, progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Train ``len(lrs)`` linear heads at once on features ``x`` (N, D); head h uses lrs[h], wds[h].

    Each head is exactly what ``nn.Linear`` + ``torch.optim.SGD(momentum, weight_decay)`` +
    ``CosineAnnealingLR(epochs)`` stepped per epoch would give on the same batches (tested): the
    summed loss keeps heads independent. Randomness, from one generator seeded with ``seed``:
    the initial weight (C, D) ~ N(0, 0.01) shared by all heads, then one ``randperm(N)`` per epoch
    (the last partial batch is kept). Returns weights (H, C, D) and biases (H, C) on ``x.device``.
    """
    if len(lrs) != len(wds) or not lrs:
        raise ValueError(f"need one weight decay per learning rate, got {len(lrs)} lrs and {len(wds)} wds")
    if x.dim() != 2 or len(x) != len(y):
        raise ValueError(f"features must be (N, D) with one label each, got {tuple(x.shape)} and {tuple(y.shape)}")
    if y.numel() and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}); got [{int(y.min())}, {int(y.max())}]")
    check_positive(epochs, "epochs")
    check_positive(batch_size, "batch size")
    from tqdm import tqdm
    dev, dtype = x.device, torch.float64 if x.dtype == torch.float64 else torch.float32
    n, d = x.shape
    h = len(lrs)
    gen = torch.Generator().manual_seed(seed)
    w0 = torch.randn(num_classes, d, generator=gen, dtype=torch.float64).mul_(0.01)
    weight = w0.to(dev, dtype).expand(h, -1, -1).clone().requires_grad_(True)
    bias = torch.zeros(h, num_classes, device=dev, dtype=dtype, requires_grad=True)
    lr0 = torch.tensor(list(lrs), device=dev, dtype=dtype)
    wd = torch.tensor(list(wds), device=dev, dtype=dtype)
    bufs = [torch.zeros_like(weight), torch.zeros_like(bias)]
    y = y.to(dev)
    for epoch in tqdm(range(epochs), desc=f"{h} linear heads", disable=not progress, unit="epoch"):
        lr = cosine_lr(lr0, epoch, epochs)
        order = torch.randperm(n, generator=gen).to(dev)
        for s in range(0, n, batch_size):
            idx = order[s:s + batch_size]
            xb, yb = x[idx].to(dtype), y[idx]
            logits = torch.matmul(xb, weight.transpose(1, 2)) + bias[:, None, :]  # (H, B, C)
            loss = F.cross_entropy(logits.reshape(-1, num_classes), yb.repeat(h), reduction="sum") / len(idx)
            g_w, g_b = torch.autograd.grad(loss, (weight, bias))
            with torch.no_grad():
                for p, g, buf, shape in ((weight, g_w, bufs[0], (h, 1, 1)), (bias, g_b, bufs[1], (h, 1))):
                    buf.mul_(momentum).add_(g + wd.view(shape) * p)
                    p.sub_(lr.view(shape) * buf)
    return weight.detach(), bias.detach()


def evaluate_heads(weight: torch.Tensor, bias: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                   batch_size: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-1 and top-5 accuracy (percent) of every head, shape (H,) each."""
    hits = torch.zeros(2, weight.shape[0], dtype=torch.long)
    with torch.no_grad():
        for s in range(0, len(x), batch_size):
            xb = x[s:s + batch_size].to(weight.device, weight.dtype)
            yb = y[s:s + batch_size].to(weight.device)
            logits = torch.matmul(xb, weight.transpose(1, 2)) + bias[:, None, :]
            kmax = min(5, logits.shape[-1])
            top = logits.topk(kmax, dim=-1).indices  # (H, B, k)
            hit = top == yb[None, :, None]
            hits[0] += hit[..., 0].sum(dim=1).cpu()
            hits[1] += hit.any(dim=-1).sum(dim=1).cpu()
    n = max(len(x), 1)
    return 100.0 * hits[0].double() / n, 100.0 * hits[1].double() / n


@dataclass(frozen=True)
class CachedConfig:
    lrs: tuple[float, ...] = DEFAULT_LR_GRID  # base lrs, scaled by batch / 256 like the full mode
    wds: tuple[float, ...] = DEFAULT_WD_GRID
    epochs: int = 100
    batch_size: int = 1024
    holdout: float = 0.1
    seed: int = 0
    momentum: float = 0.9


def cached_linear_eval(train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor,
                       num_classes: int, cfg: CachedConfig = CachedConfig(), progress: bool = False) -> dict:
    """Grid on a held-out split of train, retrain the winner on all of train, report val."""
    if not 0.0 < cfg.holdout < 1.0:
        raise named(EvalInputError, f"{SETTING} must be in (0, 1), got {cfg.holdout}", "holdout")
    n = len(train_x)
    n_hold = max(1, int(round(cfg.holdout * n)))
    if n - n_hold < 1:
        raise EvalInputError(f"{n} train features are too few to hold out {cfg.holdout:.0%}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed + 1))
    hold, fit = perm[:n_hold].to(train_x.device), perm[n_hold:].to(train_x.device)
    grid = list(itertools.product(cfg.lrs, cfg.wds))
    scale = cfg.batch_size / 256.0
    lrs = [lr * scale for lr, _ in grid]
    wds = [wd for _, wd in grid]
    w, b = train_linear_heads(train_x[fit], train_y[fit], num_classes, lrs, wds, cfg.epochs, cfg.batch_size,
                              cfg.momentum, cfg.seed, progress)
    hold_top1, hold_top5 = evaluate_heads(w, b, train_x[hold], train_y[hold])
    best = int(torch.argmax(hold_top1))  # first maximum: the smallest lr/wd among equals
    best_lr, best_wd = grid[best]
    w, b = train_linear_heads(train_x, train_y, num_classes, [lrs[best]], [best_wd], cfg.epochs, cfg.batch_size,
                              cfg.momentum, cfg.seed, progress)
    val_top1, val_top5 = evaluate_heads(w, b, val_x, val_y)
    return {
        "mode": "cached", "protocol": PROTOCOLS["cached"],
        "top1": float(val_top1[0]), "top5": float(val_top5[0]),
        "selected": {"lr": best_lr, "weight_decay": best_wd, "scaled_lr": lrs[best],
                     "holdout_top1": float(hold_top1[best])},
        "grid": [{"lr": lr, "weight_decay": wd, "holdout_top1": float(t1), "holdout_top5": float(t5)}
                 for (lr, wd), t1, t5 in zip(grid, hold_top1, hold_top5)],
        "num_fit": len(fit), "num_holdout": n_hold, "num_train": n, "num_val": len(val_x),
        "config": asdict(cfg), "weight": w[0].cpu(), "bias": b[0].cpu(),
    }


# --------------------------------------------------------------------------------------------- full
def _train_epoch(model, probe, loader, optimizer, env, n_last_blocks, avgpool, progress, epoch) -> float:
    from tqdm import tqdm
    probe.train()
    total, count = 0.0, 0
    for batch in tqdm(loader, desc=f"linear epoch {epoch}", disable=not (progress and env.is_main),
                      unit="batch", dynamic_ncols=True):
        if batch.images is None:
            continue
        images = batch.images.to(env.device, non_blocking=True)
        targets = batch.labels.to(env.device, non_blocking=True)
        feats = probe_input(model, images, n_last_blocks, avgpool)  # no_grad inside
        loss = F.cross_entropy(probe(feats), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += float(loss.detach()) * len(targets)
        count += len(targets)
    stats = du.all_reduce_sum(torch.tensor([total, count], dtype=torch.float64, device=runtime.comm_device()))
    return float(stats[0] / max(stats[1], 1))


def _validate(model, probe, loader, env, n_last_blocks, avgpool, progress) -> dict[str, float]:
    from tqdm import tqdm
    probe.eval()
    hits = torch.zeros(3, dtype=torch.float64)
    with torch.no_grad():
        for batch in tqdm(loader, desc="linear val", disable=not (progress and env.is_main), unit="batch",
                          dynamic_ncols=True):
            if batch.images is None:
                continue
            images = batch.images.to(env.device, non_blocking=True)
            targets = batch.labels.to(env.device, non_blocking=True)
            logits = probe(probe_input(model, images, n_last_blocks, avgpool))
            t1, t5 = topk_hits(logits, targets)
            hits += torch.tensor([t1, t5, len(targets)], dtype=torch.float64)
    hits = du.all_reduce_sum(hits.to(runtime.comm_device())).cpu()
    n = max(float(hits[2]), 1.0)
    return {"top1": 100.0 * float(hits[0]) / n, "top5": 100.0 * float(hits[1]) / n}


@dataclass
class LinearSettings(SourceSettings):
    """A linear probe as :func:`evaluate_linear` runs it (the backbone and images: ``SourceSettings``)."""

    mode: str = "cached"                 # cached: the lr/wd grid on features; full: DINO's protocol
    n_last_blocks: int | None = None     # CLS tokens of the last n blocks (None: 1 for XCiT, as DINO; 4 else)
    avgpool_patchtokens: bool = False    # append the mean patch token
    epochs: int = 100
    lr: float = 0.001                    # full: base lr, scaled by global batch / 256
    weight_decay: float = 0.0            # full
    val_freq: int = 1                    # full: validate every n epochs
    lr_grid: list[float] = field(default_factory=lambda: list(DEFAULT_LR_GRID))   # cached
    wd_grid: list[float] = field(default_factory=lambda: list(DEFAULT_WD_GRID))   # cached
    holdout: float = 0.1                 # cached: share of train used to choose lr/wd
    extract_batch_size: int = 128        # cached: images per feature-extraction step


def _frozen_model(s: LinearSettings, env: runtime.EvalEnv, model: nn.Module | None) -> nn.Module:
    """The backbone of ``s.checkpoint``, or the caller's ``model``, which must already be frozen."""
    if model is None:
        model = backbone.load_frozen_backbone(s.checkpoint, s.arch, s.checkpoint_key, env.device,
                                             seed=s.seed, crop_size=s.crop_size)
    elif model.training or any(p.requires_grad for p in model.parameters()):
        raise ValueError("the backbone must be frozen: model.eval() and requires_grad_(False)")
    return model.to(env.device)


def _loaders(train_ds, val_ds, s: LinearSettings, env: runtime.EvalEnv):
    """(train sampler, train loader, val loader): the train split shuffled per epoch across ranks, the
    val split sharded in order."""
    from torch.utils.data import DataLoader, DistributedSampler

    from ssl_xcit.data.folders import collate_skip_corrupt
    from ssl_xcit.evaluate.features import WithIndex
    sampler = DistributedSampler(WithIndex(train_ds), num_replicas=env.world_size, rank=env.rank, shuffle=True,
                                 seed=s.seed, drop_last=False)
    pin = env.device.type == "cuda"
    train_loader = DataLoader(WithIndex(train_ds), batch_size=s.batch_size, sampler=sampler,
                              num_workers=s.num_workers, collate_fn=collate_skip_corrupt, pin_memory=pin,
                              drop_last=False)
    val_loader = DataLoader(WithIndex(val_ds), batch_size=s.batch_size,
                            sampler=runtime.shard_sampler(len(val_ds)),
                            num_workers=s.num_workers, collate_fn=collate_skip_corrupt, pin_memory=pin)
    return sampler, train_loader, val_loader


def _resume(ckpt_path: Path, fingerprint: dict, probe: nn.Module, optimizer, scheduler, env: runtime.EvalEnv):
    """(start epoch, best, last, history): from ``ckpt_path`` when it holds this same probe, else a fresh start.
    A file that cannot be read or belongs to another probe is a one-line :class:`EvalInputError`."""
    if not ckpt_path.is_file():
        return 0, None, None, []
    try:
        state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same advice
        raise hinted(EvalInputError, f"{ckpt_path} is unreadable ({type(err).__name__}); delete it to start the "
                     "probe over", "or pass another output_dir", needs="output_dir") from err
    saved = state.get("fingerprint") or {}
    if saved != fingerprint:
        diff = {k: (saved.get(k), v) for k, v in fingerprint.items() if saved.get(k) != v}
        raise hinted(EvalInputError, f"{ckpt_path} belongs to a different linear probe (saved vs now: {diff}); "
                     "delete it", "or pass another output_dir", needs="output_dir")
    probe.load_state_dict(state["probe"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if env.is_main:
        print(f"resuming the linear probe from {ckpt_path} at epoch {state['epoch']}")
    return state["epoch"], state["best"], state["last"], state["history"]


def _new_probe(dim: int, num_classes: int, seed: int, env: runtime.EvalEnv) -> tuple[nn.Module, nn.Module]:
    """The probe (its initial weights from ``seed`` only) and the probe as training calls it (DDP)."""
    with torch.random.fork_rng(devices=[]):  # the initial probe depends on the seed only
        torch.manual_seed(seed)
        probe = LinearProbe(dim, num_classes).to(env.device)
    ddp_probe: nn.Module = probe
    if env.world_size > 1:
        ddp_probe = nn.parallel.DistributedDataParallel(
            probe, device_ids=[env.device.index] if env.device.type == "cuda" else None)
    return probe, ddp_probe


def full_linear_eval(s: LinearSettings, env: runtime.EvalEnv, out_dir: Path,
                     model: nn.Module | None = None) -> dict:
    """DINO's protocol; ``model`` (frozen) overrides ``s.checkpoint`` (tests, notebooks)."""
    root = datasets.resolve_root(s.data_path)
    train_ds = datasets.open_split(root, "train", datasets.probe_train_transform(s.crop_size))
    val_ds = datasets.open_split(root, "val", datasets.eval_transform(s.crop_size, s.resize))
    classes = datasets.check_same_classes(train_ds, val_ds, root)
    model = _frozen_model(s, env, model)
    n_last = s.n_last_blocks or default_n_last_blocks(model)
    if n_last > 1:
        backbone.check_n_last_blocks(model, n_last)
    dim = backbone.embed_dim(model) * (n_last + int(s.avgpool_patchtokens))
    probe, ddp_probe = _new_probe(dim, len(classes), s.seed, env)
    lr = s.lr * s.batch_size * env.world_size / 256.0
    optimizer = torch.optim.SGD(probe.parameters(), lr=lr, momentum=0.9, weight_decay=s.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, s.epochs, eta_min=0)
    sampler, train_loader, val_loader = _loaders(train_ds, val_ds, s, env)
    fingerprint = {"checkpoint": str(s.checkpoint), "checkpoint_key": s.checkpoint_key, "arch": s.arch,
                   "n_last_blocks": n_last, "avgpool_patchtokens": bool(s.avgpool_patchtokens),
                   "in_dim": dim, "num_classes": len(classes), "epochs": s.epochs, "lr": s.lr,
                   "global_batch": s.batch_size * env.world_size, "weight_decay": s.weight_decay,
                   "crop_size": s.crop_size}
    ckpt_path = out_dir / CHECKPOINT_NAME
    start_epoch, best, last, history = _resume(ckpt_path, fingerprint, probe, optimizer, scheduler, env)
    progress = s.progress
    for epoch in range(start_epoch, s.epochs):
        sampler.set_epoch(epoch)
        # augmentation randomness from (seed, epoch, rank) alone: a resumed run draws the same crops
        torch.manual_seed(s.seed * 1_000_003 + epoch * 1009 + env.rank)
        loss = _train_epoch(model, ddp_probe, train_loader, optimizer, env, n_last, s.avgpool_patchtokens,
                            progress, epoch)
        if not math.isfinite(loss):   # nothing more to learn: say so now, not after the remaining epochs
            raise hinted(EvalInputError, f"the linear probe diverged in epoch {epoch} (train loss {loss}): lr "
                         f"{s.lr:g}, scaled to {lr:g}", "pass a lower lr", needs="lr")
        scheduler.step()
        entry = {"epoch": epoch, "train_loss": loss, "lr": optimizer.param_groups[0]["lr"]}
        if (epoch + 1) % s.val_freq == 0 or epoch + 1 == s.epochs:
            last = {"epoch": epoch, **_validate(model, probe, val_loader, env, n_last,
                                                s.avgpool_patchtokens, progress)}
            if best is None or last["top1"] > best["top1"]:
                best = dict(last)
            entry.update(val_top1=last["top1"], val_top5=last["top5"])
            if env.is_main:
                print(f"epoch {epoch}: val top-1 {last['top1']:.2f} top-5 {last['top5']:.2f} "
                      f"(best top-1 {best['top1']:.2f})")
        history.append(entry)
        if env.is_main:
            atomic_torch_save({"epoch": epoch + 1, "probe": probe.state_dict(),
                               "optimizer": optimizer.state_dict(),
                               "scheduler": scheduler.state_dict(), "best": best, "last": last,
                               "history": history, "fingerprint": fingerprint}, ckpt_path)
        du.barrier()
    return {"mode": "full", "arch": getattr(model, "arch", None) or s.arch,
            "protocol": full_protocol(s.weight_decay), "top1": best["top1"] if best else None,
            "top5": best["top5"] if best else None, "best": best, "last": last, "epochs": s.epochs,
            "n_last_blocks": n_last, "avgpool_patchtokens": bool(s.avgpool_patchtokens), "lr": s.lr,
            "scaled_lr": lr, "global_batch": s.batch_size * env.world_size, "weight_decay": s.weight_decay,
            "num_classes": len(classes), "num_train": len(train_ds), "num_val": len(val_ds), "history": history,
            "checkpoint_file": str(ckpt_path)}


# --------------------------------------------------------------------------------------------- the tool
def with_defaults(s: LinearSettings) -> LinearSettings:
    """``s`` with the batch size each mode defaults to (128 full, as DINO; 1024 cached); a copy."""
    if s.batch_size is not None:
        return s
    return replace(s, batch_size=128 if s.mode == "full" else 1024)


def _cached(s: LinearSettings, env: runtime.EvalEnv) -> dict | None:
    from ssl_xcit.evaluate.features import extract_features
    train_ds, val_ds, classes, model = datasets.open_splits_and_backbone(s, env)
    n_last = s.n_last_blocks or default_n_last_blocks(model)
    if n_last > 1:
        backbone.check_n_last_blocks(model, n_last)
    which = probe_outputs(n_last, s.avgpool_patchtokens)
    feats = {}
    for split, ds in (("train", train_ds), ("val", val_ds)):
        feats[split] = extract_features(model, ds, s.extract_batch_size, env.device, s.num_workers,
                                        which=which, n_last_blocks=n_last, progress=s.progress,
                                        desc=f"linear {split} features")
    if not env.is_main:
        return None
    cfg = CachedConfig(lrs=tuple(s.lr_grid), wds=tuple(s.wd_grid), epochs=s.epochs,
                       batch_size=s.batch_size, holdout=s.holdout, seed=s.seed)
    (tx, ty), (vx, vy) = feats["train"], feats["val"]
    res = cached_linear_eval(tx.to(env.device), ty, vx.to(env.device), vy, len(classes), cfg,
                             progress=s.progress)
    res.update(n_last_blocks=n_last, avgpool_patchtokens=bool(s.avgpool_patchtokens), num_classes=len(classes),
               arch=getattr(model, "arch", None) or s.arch)   # the arch used, also when inferred
    return res


def evaluate_linear(s: LinearSettings) -> dict:
    """The linear probe ``s`` asks for (``s.mode``: full or cached); ``linear.json`` written to
    ``s.output_dir`` and returned (``{}`` on ranks other than 0)."""
    s = with_defaults(s)
    env = runtime.setup_env(s.device, s.seed)
    try:
        out_dir = Path(s.output_dir) if s.output_dir else runtime.default_output_dir(s.checkpoint)
        if s.mode == "full":
            res = full_linear_eval(s, env, out_dir)
        else:
            res = _cached(s, env)
        if not env.is_main or res is None:
            return {}
        report = {"tool": "linear", "checkpoint": str(s.checkpoint), "arch": s.arch,
                  "checkpoint_key": s.checkpoint_key, "data_path": s.data_path and str(s.data_path),
                  "crop_size": s.crop_size,
                  "resize": datasets.resize_for(s.crop_size, s.resize),
                  **{k: v for k, v in res.items() if k not in ("weight", "bias")}}
        out_file = atomic_write_json(out_dir / RESULT_NAME, report, indent=2)
        print(f"linear probe ({report['mode']} mode: {report['protocol']})")
        print(f"val top-1 {report['top1']:.2f}  top-5 {report['top5']:.2f}")
        print(f"written {out_file}")
        report["output"] = str(out_file)
        return report
    finally:
        runtime.teardown_env(env)
