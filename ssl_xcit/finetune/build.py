"""The pieces of a fine-tuning run, built from its config: the labelled images (few-label subset,
timm's transforms), the classifier (from any file ``load_backbone`` reads, or random for a
baseline), its EMA, timm's AdamW with layer-wise lr decay, the lr schedule and timm's mixup/cutmix.
:class:`Finetune` holds them and is what the run machinery (:mod:`ssl_xcit.engine.run`)
checkpoints and resumes; the loop that trains them is :mod:`ssl_xcit.finetune.loop`.
"""
from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from ssl_xcit.data.folders import collate_skip_corrupt
from ssl_xcit.dino.schedules import cosine_schedule
from ssl_xcit.evaluate.datasets import transform_for
from ssl_xcit.finetune.config import FinetuneConfig, check_input_size
from ssl_xcit.finetune.data import few_labels, labelled_splits, train_transform
from ssl_xcit.finetune import recipe as recipe_rules
from ssl_xcit.finetune.budget import FinetuneBudget, planned_steps, step_seconds
from ssl_xcit.engine.budget import TimeBudget
from ssl_xcit.models import build_model
from ssl_xcit.models.checkpoints import infer_arch, load_into, load_state_source
from ssl_xcit.models.zoo import resolve_arch
from ssl_xcit.engine.build import configured_steps, place_models, seed_this_rank, training_loader, training_sampler
from ssl_xcit.engine.checkpoint import CheckpointError, require_parts, state_dict_mismatch
from ssl_xcit.engine.step import make_scaler
from ssl_xcit.engine.config import MAX_EPOCHS, ConfigError, user_set_keys
from ssl_xcit.engine.run import Run


@dataclass
class Finetune:
    """What fine-tuning trains and on what: the run's :class:`~ssl_xcit.engine.run.Trainable`."""
    cfg: FinetuneConfig
    train_set: Any
    val_set: Any
    sampler: Any
    loader: DataLoader
    model: nn.Module
    model_ddp: nn.Module
    ema: Any                              # timm ModelEmaV3, or None
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    lr: np.ndarray                        # per step
    mixup: Any                            # timm Mixup, or None
    criterion: nn.Module
    classes: list[str]
    total_steps: int
    recipe: str | None = None
    pretrained: dict | None = None        # the file fine-tuned from: path, sha256, format, what loaded
    best: dict = field(default_factory=dict)   # the best validation so far: top1, top5, global_step
    budget: FinetuneBudget | None = None  # time_budget_minutes: the clock and its plans

    def config_text(self) -> str:
        text = self.cfg.to_yaml()
        if self.pretrained:
            p = self.pretrained
            text += f"# pretrained_weights: {p['path']} (sha256 {p['sha256']}, format {p['format']}): {p['loaded']}\n"
        if self.recipe:
            text += "".join(f"# {line}\n" for line in self.recipe.splitlines())
        return text

    # ---- the Trainable protocol
    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "ema": self.ema.module.state_dict() if self.ema else None,
                "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else {},
                "best": dict(self.best), "classes": list(self.classes), "pretrained": self.pretrained,
                "trained_seconds": self.budget.clock.elapsed if self.budget is not None else None}

    def check_fits(self, state: dict[str, Any], path: Path) -> None:
        require_parts(state, path, ("model", "optimizer"), "fine-tuning")
        if list(state.get("classes", self.classes)) != list(self.classes):
            raise CheckpointError(f"{path} was fine-tuned on other classes ({len(state['classes'])}: "
                                  f"{', '.join(state['classes'][:4])} ...): resume on the same data, or use a new "
                                  "output_dir")
        mismatch = state_dict_mismatch(state["model"], self.model.state_dict())
        if mismatch is not None:
            saved = state.get("config", {}).get("model", {}).get("arch", "another model")
            raise CheckpointError(f"{path} holds a {saved} run that does not fit this one ({mismatch}): resume "
                                  f"with the settings in {path.parent / 'config.yaml'}, or use a new output_dir")
        if (state.get("ema") is None) != (self.ema is None):
            raise CheckpointError(f"{path} was written with model_ema={state.get('ema') is not None}: resume with "
                                  "the same model_ema, or use a new output_dir")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        if self.ema is not None:
            self.ema.module.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.best = dict(state.get("best") or {})

    def weights(self) -> list[torch.Tensor]:
        models = [self.model] + ([self.ema.module] if self.ema is not None else [])
        return [t for m in models for t in m.state_dict().values() if t.is_floating_point()]


def build_finetune(cfg: FinetuneConfig, run: Run) -> Finetune:
    """Data, model (+ pretrained weights), EMA, optimizer, schedule and mixup, in a fixed order."""
    train_set, val_set = labelled_splits(cfg.data.data_path)
    _arch_of_saved_run(cfg, run)
    start = run.pretrained_start(cfg.model.pretrained_weights, lambda: _read_start(cfg, run))
    budget = _open_budget(cfg, run)   # a saved plan sets max_steps: the recipe below is the one the run had
    snapshot = copy.deepcopy(cfg) if budget is not None else None   # the config as given, before recipe: auto
    recipe = recipe_rules.apply(cfg, train_set, _run_epochs(cfg, train_set, run.world_size))
    if budget is not None and budget.clock.planned_steps is None:
        recipe = _plan_budget(cfg, snapshot, run, train_set)
    train_set.select(few_labels(train_set.targets, cfg.data.train_fraction, cfg.data.labels_per_class, cfg.run.seed))
    sampler = training_sampler(train_set, cfg.optim.batch_size_per_gpu, run.world_size, run.rank, cfg.run.seed)
    total_steps = configured_steps(cfg, sampler.steps_per_epoch)
    _check_freeze(cfg, total_steps)
    check_input_size(cfg)   # the arch is known now (a file's, or the run's on resume)
    model = build_model(cfg.model.arch, num_classes=len(train_set.classes), drop_path_rate=cfg.model.drop_path_rate,
                        img_size=cfg.data.input_size)
    pretrained = _load_pretrained(model, start, cfg, run) if start and "loaded" not in start else start
    config = model.data_config
    train_set.transform = train_transform(cfg, config["mean"], config["std"])
    val_set.transform = transform_for(config)
    loader = training_loader(train_set, sampler, cfg.optim.batch_size_per_gpu, cfg.data.num_workers, run.device,
                             cfg.run.seed)
    seed_this_rank(cfg.run.seed, run.rank)   # from here per rank: drop-path masks and mixup's draws differ
    model, _, model_ddp = place_models(model, None, cfg.run, run)
    return Finetune(cfg=cfg, train_set=train_set, val_set=val_set, sampler=sampler, loader=loader, model=model,
                    model_ddp=model_ddp, ema=_ema(model, cfg), optimizer=build_optimizer(cfg, model),
                    scaler=make_scaler(cfg.run.precision, run.device),
                    lr=lr_schedule(cfg, sampler.steps_per_epoch, run.world_size, total_steps),
                    mixup=_mixup(cfg, len(train_set.classes)),
                    criterion=_criterion(cfg), classes=list(train_set.classes), total_steps=total_steps,
                    recipe=recipe, pretrained=pretrained, budget=budget)


def _open_budget(cfg: FinetuneConfig, run: Run) -> FinetuneBudget | None:
    """The run's clock with ``time_budget_minutes``; on resume, the plan and time its checkpoint saved."""
    if cfg.optim.time_budget_minutes <= 0:
        return None
    saved = run.saved_state()
    planned = ((saved or {}).get("config") or {}).get("run", {}).get("max_steps") or None
    if planned:
        cfg.run.max_steps = planned
        cfg.optim.epochs = max(cfg.optim.epochs, (saved["config"].get("optim") or {}).get("epochs", 0))
    spent = float((saved or {}).get("trained_seconds") or 0.0)
    return FinetuneBudget(TimeBudget(cfg.optim.time_budget_minutes, spent, planned_steps=planned))


def _plan_budget(cfg: FinetuneConfig, snapshot: FinetuneConfig, run: Run, train_set: Any) -> str | None:
    """The steps the budget holds at the pace of this model on this machine (timed on a throwaway
    copy at the chosen input size), then ``recipe: auto`` applied again, from the config as given,
    for a run of that length. Returns the recipe's text."""
    state = torch.random.get_rng_state()   # the run draws the same numbers as without a budget
    probe = build_model(cfg.model.arch, num_classes=len(train_set.classes), img_size=cfg.data.input_size)
    seconds = step_seconds(probe, cfg.optim.batch_size_per_gpu, cfg.data.input_size, len(train_set.classes),
                           run.device, cfg.run.precision)
    torch.random.set_rng_state(state)
    labelled = len(few_labels(train_set.targets, cfg.data.train_fraction, cfg.data.labels_per_class, cfg.run.seed))
    per_epoch = max(1, labelled // (cfg.optim.batch_size_per_gpu * run.world_size))
    max_epochs = cfg.optim.epochs if "optim.epochs" in user_set_keys(cfg) else MAX_EPOCHS
    steps = planned_steps(cfg.optim.time_budget_minutes, seconds, per_epoch, max_epochs)
    for section in ("model", "data", "mixup", "optim"):   # the first pass's length-dependent choices undone
        setattr(cfg, section, copy.deepcopy(getattr(snapshot, section)))
    cfg.run.max_steps = steps
    cfg.optim.epochs = max(cfg.optim.epochs, -(-steps // per_epoch))
    if run.is_main:
        print(f"[ssl_xcit] time budget {cfg.optim.time_budget_minutes:g} min: about {steps:,} steps fit ("
              f"{seconds:.3f} s a step measured here before the run); recipe: auto plans for them, and the "
              "run plans again from its real pace", flush=True)
    return recipe_rules.apply(cfg, train_set, _run_epochs(cfg, train_set, run.world_size))


def _run_epochs(cfg: FinetuneConfig, train_set: Any, world_size: int) -> float:
    """The run's length in passes over its labelled images, however it is given: ``epochs``, or
    ``max_steps`` when that ends the run sooner (a user's "250 steps" is a 4-epoch run on 4,000
    labels, and recipe: auto must plan for that, not for the 100 epochs it will never reach)."""
    if not cfg.run.max_steps:
        return float(cfg.optim.epochs)
    labelled = len(few_labels(train_set.targets, cfg.data.train_fraction, cfg.data.labels_per_class, cfg.run.seed))
    steps_per_epoch = max(1, labelled // (cfg.optim.batch_size_per_gpu * world_size))
    return min(float(cfg.optim.epochs), cfg.run.max_steps / steps_per_epoch)


def _check_freeze(cfg: FinetuneConfig, total_steps: int) -> None:
    """Refuse a freeze that covers the whole run. Such a run never updates the backbone: it is a linear
    probe (with augmentation and a schedule meant for fine-tuning) named fine-tuning, whose checkpoint
    and card would claim a fine-tuned model. Refused rather than run, because the user asked for
    fine-tuning and eval/eval_linear.py is the tool (cached features, lr sweep) for a probe."""
    freeze = cfg.optim.freeze_backbone_steps
    if freeze and freeze >= total_steps:
        raise ConfigError(f"freeze_backbone_steps={freeze} covers the whole run ({total_steps} steps): the backbone "
                          f"would never be fine-tuned; set freeze_backbone_steps below {total_steps} (e.g. "
                          f"{max(1, total_steps // 5)}), or use eval/eval_linear.py for a linear probe")


def _arch_of_saved_run(cfg: FinetuneConfig, run: Run) -> None:
    """On resume, the arch the run was built with (its checkpoint's config), when the command line
    names none: a run started with no ``arch`` took its pretrained file's, and the same command (after
    SIGTERM, kill -9 or a SLURM requeue) must rebuild that model, not the default one."""
    saved = run.saved_state()
    if saved is None or "model.arch" in user_set_keys(cfg):
        return
    arch = ((saved.get("config") or {}).get("model") or {}).get("arch") or (saved.get("pretrained") or {}).get("arch")
    if arch:
        cfg.model.arch = arch


def _read_start(cfg: FinetuneConfig, run: Run) -> dict:
    """The facts of the file a new run starts from (the weights are read when the model exists);
    the file's arch is taken when the user set none."""
    from ssl_xcit.atomic import file_sha256
    path = cfg.model.pretrained_weights
    weights = load_state_source(path, checkpoint_key=cfg.model.checkpoint_key)
    arch = resolve_arch(weights.arch) if weights.arch else infer_arch(weights.state_dict, path)
    if "model.arch" not in user_set_keys(cfg):
        cfg.model.arch = arch
    elif resolve_arch(cfg.model.arch) != arch:
        raise ConfigError(f"pretrained_weights {path} holds an {arch} backbone, this run's arch is {cfg.model.arch}: "
                          f"set arch={arch} (or leave arch unset to take the file's)")
    facts = {"path": path, "sha256": file_sha256(path), "format": weights.format, "arch": arch, "weights": weights}
    probe = start_probe(path, cfg.model.checkpoint_key)
    if probe is not None:
        facts["probe"] = probe
        if run.is_main:
            print(f"[ssl_xcit] the start's linear probe: top-1 {probe['top1']:.2f}% ({probe['on']}): fine-tuning "
                  "pays where its val top-1 passes it", flush=True)
    return facts


def start_probe(path: str, checkpoint_key: str = "teacher") -> dict | None:
    """The linear probe of the start, when ``eval/eval_linear.py`` left one beside it (``linear.json``
    measuring this very file and network): the baseline a fine-tuning result must beat to have paid,
    shown beside every validation. ``None`` when there is none (nothing is guessed)."""
    import json
    from ssl_xcit.evaluate.linear import RESULT_NAME
    found = Path(path).resolve().parent / RESULT_NAME
    try:
        r = json.loads(found.read_text())
    except (OSError, ValueError):
        return None
    same = (isinstance(r, dict) and isinstance(r.get("top1"), (int, float))
            and Path(str(r.get("checkpoint", ""))).resolve() == Path(path).resolve()
            and r.get("checkpoint_key", checkpoint_key) in (checkpoint_key, None))
    if not same:
        return None
    on = (f"{r.get('mode', '?')} mode, {r.get('num_train', '?')} train / {r.get('num_val', '?')} val images of "
          f"{r.get('data_path', '?')}; {found}")
    return {"top1": float(r["top1"]), "on": on, "file": str(found)}


def _load_pretrained(model: nn.Module, start: dict, cfg: FinetuneConfig, run: Run) -> dict:
    """Copy the file's backbone into the classifier (strict); its classifier head only when it fits."""
    weights = start.pop("weights")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # load_into warns about the head: said below, in one line
        report = load_into(model, weights, strict=True)
    head = {"loaded": "the file's classifier head", "dropped": "a new head (the file's has another number of "
            "classes)", "not in checkpoint": "a new head (the file has none)"}.get(report.head, "a new head")
    start["loaded"] = f"backbone ({cfg.model.checkpoint_key if weights.format in ('dino', 'ssl_xcit') else 'the file'}), {head}"
    if run.is_main:
        print(f"[ssl_xcit] fine-tuning {cfg.model.arch} from {start['path']} ({weights.format}): {start['loaded']}",
              flush=True)
    return start


def build_optimizer(cfg: FinetuneConfig, model: nn.Module) -> torch.optim.Optimizer:
    """timm's AdamW: no weight decay on biases, norms and timm's ``no_weight_decay()`` names, and
    layer-wise lr decay from the model's own ``group_matcher`` (each group's ``lr_scale``)."""
    from timm.optim import create_optimizer_v2
    layer_decay = cfg.optim.layer_decay if cfg.optim.layer_decay < 1.0 else None
    optimizer = create_optimizer_v2(model, opt="adamw", lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay,
                                    layer_decay=layer_decay)
    for group in optimizer.param_groups:
        group["apply_weight_decay"] = False   # constant weight decay (DeiT): the lr alone is scheduled
    if cfg.optim.backbone_lr_scale < 1.0:
        scale_backbone_lr(optimizer, model, cfg.optim.backbone_lr_scale)
    return optimizer


def scale_backbone_lr(optimizer: torch.optim.Optimizer, model: nn.Module, scale: float) -> None:
    """Split each param group into its head and backbone parameters, the backbone's ``lr_scale``
    multiplied by ``scale`` (LP-FT: the fitted head adapts at the full lr while the pretrained
    features move slowly). Groups keep their order, so a checkpoint's optimizer state fits."""
    head = {id(p) for p in model.get_classifier().parameters()}
    groups = []
    for group in optimizer.param_groups:
        for is_head in (True, False):
            params = [p for p in group["params"] if (id(p) in head) == is_head]
            if params:
                g = {**group, "params": params}
                g["lr_scale"] = group.get("lr_scale", 1.0) * (1.0 if is_head else scale)
                groups.append(g)
    optimizer.param_groups.clear()
    for g in groups:
        optimizer.add_param_group(g)


def lr_schedule(cfg: FinetuneConfig, steps_per_epoch: int, world_size: int, total_steps: int | None = None
                ) -> np.ndarray:
    """Cosine from ``lr`` (per 256 images, scaled to the global batch) to ``min_lr``, after a linear
    warm-up, laid over the steps the run makes (``total_steps``: ``max_steps`` when it ends the run
    before ``epochs`` do, so the cosine ends where the run ends instead of being cut mid-warm-up)."""
    o = cfg.optim
    base_lr = o.lr * o.batch_size_per_gpu * world_size / 256.0
    total = total_steps or o.epochs * steps_per_epoch
    warmup = min(min(o.warmup_epochs, o.epochs) * steps_per_epoch, total)
    return cosine_schedule(base_lr, o.min_lr, total, 1, warmup_epochs=warmup)


def _ema(model: nn.Module, cfg: FinetuneConfig):
    if not cfg.model.model_ema:
        return None
    from timm.utils import ModelEmaV3
    return ModelEmaV3(model, decay=cfg.model.model_ema_decay)


def _mixup(cfg: FinetuneConfig, num_classes: int):
    x = cfg.mixup
    if x.mixup <= 0 and x.cutmix <= 0:
        return None
    from timm.data import Mixup
    return Mixup(mixup_alpha=x.mixup, cutmix_alpha=x.cutmix, prob=x.mixup_prob, switch_prob=x.mixup_switch_prob,
                 mode="batch", label_smoothing=x.smoothing, num_classes=num_classes)


def _criterion(cfg: FinetuneConfig) -> nn.Module:
    """Soft targets with mixup/cutmix (timm's SoftTargetCrossEntropy), else label smoothing."""
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
    if cfg.mixup.mixup > 0 or cfg.mixup.cutmix > 0:
        return SoftTargetCrossEntropy()
    return LabelSmoothingCrossEntropy(cfg.mixup.smoothing) if cfg.mixup.smoothing > 0 else nn.CrossEntropyLoss()


def val_loader(ft: Finetune, run: Run) -> DataLoader:
    """This rank's shard of the val images (``max_val_images`` evenly spread), in order; its own
    generator, so validating never moves the training's random streams (exact resume)."""
    from ssl_xcit.data.subsets import evenly_spread
    from ssl_xcit.evaluate.runtime import shard_sampler
    if ft.cfg.data.max_val_images:
        ft.val_set.select(evenly_spread(len(ft.val_set), ft.cfg.data.max_val_images))
    return DataLoader(ft.val_set, batch_size=ft.cfg.eval.eval_batch_size, sampler=shard_sampler(len(ft.val_set)),
                      num_workers=min(ft.cfg.data.num_workers, 2), collate_fn=collate_skip_corrupt,
                      generator=torch.Generator())
