"""The DINO training loop, readable top to bottom, in the pieces of DINO's ``train_dino`` and
``train_one_epoch``: lock the output folder; build data, models, loss, optimizer and schedules
(:func:`_build`); resume if the folder holds a checkpoint, checking that it fits before anything is
written (:func:`_resume`); open the logs; run the epochs (:func:`_train_epochs`,
:func:`_train_one_epoch`, :func:`_end_epoch`), checkpointing atomically (:func:`_save`). When the
``eval`` keys ask for it, the k-NN monitor (:mod:`ssl_xcit.train.monitor`) scores the teacher before
the first step, on its schedule and at the end, without changing the training; a finished run
writes its report page (:mod:`ssl_xcit.evaluate.report`, ``report=false`` turns it off).

What never gets through silently: a non-finite loss (caught before ``backward``, no update applied)
or non-finite weights (never saved); a second run in the same folder (:mod:`ssl_xcit.train.lock`);
a data set whose images do not load (an error, or a warning when most fail); a diverging or
collapsed run (warnings in the log). Those checks live in :mod:`ssl_xcit.train.health`.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from ssl_xcit import distributed as dist_utils
from ssl_xcit.distributed import pick_device
from ssl_xcit.data.folders import Batch, ImageFiles, collate_skip_corrupt
from ssl_xcit.data.gpu_multicrop import BatchedMultiCrop
from ssl_xcit.data.multicrop import DinoMultiCrop, MultiCropConfig
from ssl_xcit.data.subsets import evenly_spread
from ssl_xcit.data.sampler import ResumableDistributedSampler
from ssl_xcit.data.sources import open_image_dataset, resolve_data_path
from ssl_xcit.dino.ema import copy_student_to_teacher
from ssl_xcit.dino.head import DINOHead
from ssl_xcit.dino.loss import DINOLoss
from ssl_xcit.dino.multicrop import MultiCropForward
from ssl_xcit.dino.optim import gradient_clip_groups, param_groups_for_weight_decay
from ssl_xcit.dino.schedules import cosine_schedule
from ssl_xcit.errors import UserError
from ssl_xcit.evaluate.report import write_report_at_end_of_run
from ssl_xcit.models import get_model
from ssl_xcit.train.checkpoint import (CHECKPOINT_NAME, CheckpointError, capture_rng_state, load_checkpoint,
                                       restore_rng_state, save_checkpoint)
from ssl_xcit.train import recipe as recipe_rules
from ssl_xcit.train.budget import TimeBudget
from ssl_xcit.train.config import MAX_EPOCHS, ConfigError, DinoConfig, user_set_keys, validate
from ssl_xcit.train.health import unreadable_message, warn_if_collapsed, warn_if_diverging, warn_if_mostly_unreadable
from ssl_xcit.train.lock import OutputDirLock
from ssl_xcit.train.logger import RunLogger
from ssl_xcit.train.monitor import KnnMonitor
from ssl_xcit.train.step import StepHParams, apply_update, forward_loss
from ssl_xcit.train.sync_bn import convert_sync_batchnorm


class NonFiniteLossError(UserError, RuntimeError):
    """The loss or the weights became NaN or infinite: no update applied, nothing saved; the
    message says what checkpoint.pth holds."""


class DataSetError(UserError, ValueError):
    """The images cannot be trained on: none given, too few for a batch, none readable."""


# a run whose batches are all unreadable this many steps in a row stops (rather than at epoch end)
MAX_EMPTY_STEPS_IN_A_ROW = 20


@dataclass
class TrainResult:
    status: str                 # "finished" or "stopped" (a stop request, e.g. SLURM preemption)
    epoch: int                  # epoch the run was in when it returned
    global_step: int            # optimizer steps done in total
    checkpoint: Path | None     # the checkpoint written last
    last_loss: float = float("nan")


@dataclass
class Schedules:
    lr: np.ndarray
    weight_decay: np.ndarray
    teacher_momentum: np.ndarray


def training_images_root(data_path: str) -> Path:
    """``data_path`` itself, or its ``train/`` folder when it holds the usual train/val split."""
    if not data_path:
        raise DataSetError("data_path is empty: give data_path=/path/to/images (a folder or a .tar.gz)")
    root = resolve_data_path(data_path)
    return root / "train" if (root / "train").is_dir() else root


def multicrop_config(cfg: DinoConfig) -> MultiCropConfig:
    d = cfg.data
    return MultiCropConfig(
        global_crops_size=d.global_crops_size, global_crops_scale=tuple(d.global_crops_scale),
        local_crops_number=d.local_crops_number, local_crops_size=d.local_crops_size,
        local_crops_scale=tuple(d.local_crops_scale), blur_probs=tuple(d.blur_probs),
        solarize_prob=d.solarize_prob)


def open_training_images(cfg: DinoConfig) -> ImageFiles:
    """The training images (folder or tar shards; ``max_images`` evenly spread), no transform yet."""
    d = cfg.data
    dataset = open_image_dataset(training_images_root(d.data_path))
    if d.max_images and d.max_images < len(dataset):
        dataset.select(evenly_spread(len(dataset), d.max_images))   # every class kept, in proportion
    return dataset


def build_models(cfg: DinoConfig) -> tuple[MultiCropForward, MultiCropForward]:
    """Student (with stochastic depth) and teacher (without), each backbone + DINO head; the
    teacher starts as an exact copy of the student and never receives gradients."""
    m = cfg.model
    def head(embed_dim: int) -> DINOHead:
        return DINOHead(embed_dim, m.out_dim, use_bn=m.use_bn_in_head, norm_last_layer=m.norm_last_layer,
                        nlayers=m.head_nlayers, hidden_dim=m.head_hidden_dim, bottleneck_dim=m.head_bottleneck_dim)
    student_backbone = get_model(m.arch, num_classes=0, drop_path_rate=m.drop_path_rate)
    teacher_backbone = get_model(m.arch, num_classes=0)
    embed_dim = student_backbone.embed_dim
    student = MultiCropForward(student_backbone, head(embed_dim))
    teacher = MultiCropForward(teacher_backbone, head(embed_dim))
    copy_student_to_teacher(student, teacher)
    return student, teacher


def build_schedules(cfg: DinoConfig, steps_per_epoch: int, world_size: int,
                    total_steps: int | None = None) -> Schedules:
    """DINO's per-step schedules over ``epochs`` (or, for a time budget, over ``total_steps``)."""
    o = cfg.optim
    global_batch = o.batch_size_per_gpu * world_size
    base_lr = o.lr * global_batch / 256.0   # linear scaling rule
    # a time budget plans a number of steps: each step is one "epoch" of one iteration
    warmup_epochs = min(o.warmup_epochs, o.epochs)   # a default longer than the run: all of it
    epochs, per_epoch, warmup = ((o.epochs, steps_per_epoch, warmup_epochs) if total_steps is None else
                                 (total_steps, 1, min(warmup_epochs * steps_per_epoch, total_steps)))
    return Schedules(
        lr=cosine_schedule(base_lr, o.min_lr, epochs, per_epoch, warmup_epochs=warmup),
        weight_decay=cosine_schedule(o.weight_decay, o.weight_decay_end, epochs, per_epoch),
        teacher_momentum=cosine_schedule(cfg.dino.momentum_teacher, cfg.dino.final_momentum_teacher, epochs,
                                         per_epoch),
    )


def resolved_config(cfg: DinoConfig, world_size: int = 1) -> DinoConfig:
    """The config a run of ``cfg`` will use: a copy with ``recipe: auto``'s choices filled in (it
    reads the training images' number and sizes), e.g. to evaluate at the resolution it will train at."""
    cfg = copy.deepcopy(cfg)
    dataset = open_training_images(cfg)
    sampler = ResumableDistributedSampler(len(dataset), cfg.optim.batch_size_per_gpu, num_replicas=world_size,
                                          rank=0, shuffle=True, seed=cfg.run.seed)
    _apply_recipe(cfg, dataset, _configured_steps(cfg, sampler.steps_per_epoch))
    return cfg


def _configured_steps(cfg: DinoConfig, steps_per_epoch: int) -> int:
    """Optimizer steps of the run as configured: ``epochs`` of the sampler's steps, capped by max_steps."""
    total = cfg.optim.epochs * steps_per_epoch
    return min(total, cfg.run.max_steps) if cfg.run.max_steps else total


def _apply_recipe(cfg: DinoConfig, dataset: ImageFiles, steps: int) -> str | None:
    """``recipe: auto`` on fewer than ``AUTO_MAX_IMAGES`` images: every value the user left unset is
    fit to the data and the run's ``steps`` (in place); returns the choices with their reasons
    (``None``: nothing chosen). It never changes the batch, epochs or max_steps, which ``steps`` comes from."""
    if cfg.run.recipe != "auto" or len(dataset) >= recipe_rules.AUTO_MAX_IMAGES:
        return None
    facts = recipe_rules.data_facts(dataset)
    applied = recipe_rules.apply_auto(cfg, facts, steps, user_set_keys(cfg))
    try:
        validate(cfg)
    except ConfigError as err:
        raise ConfigError(f"recipe=auto chose values that do not fit the rest of the config ({err}): set "
                          "them yourself or use recipe=off") from None
    return recipe_rules.describe(applied, facts, steps) if applied else None


def build_optimizer(cfg: DinoConfig, student: nn.Module) -> torch.optim.Optimizer:
    groups = param_groups_for_weight_decay(student)
    for group in groups:  # groups built with weight_decay 0 keep it: the wd schedule skips them
        group["apply_weight_decay"] = group.get("weight_decay", None) != 0.0
    # fused: one kernel for the whole update (the same AdamW/SGD math); by default on CUDA, where
    # per-tensor launches cost most. Elsewhere foreach, which keeps CPU results as they were.
    fused = cfg.optim.fused
    if fused is None:
        fused = next(student.parameters()).device.type == "cuda"
    kernels = {"fused": True} if fused else {"foreach": True}
    if cfg.optim.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=0.0, **kernels)
    return torch.optim.SGD(groups, lr=0.0, momentum=0.9, **kernels)


def build_loss(cfg: DinoConfig) -> DINOLoss:
    return DINOLoss(cfg.model.out_dim, 2 + cfg.data.local_crops_number,
                    warmup_teacher_temp=cfg.dino.warmup_teacher_temp, teacher_temp=cfg.dino.teacher_temp,
                    warmup_teacher_temp_epochs=cfg.dino.warmup_teacher_temp_epochs,
                    nepochs=cfg.optim.epochs, student_temp=cfg.dino.student_temp,
                    center_momentum=cfg.dino.center_momentum)


@dataclass
class _Counters:
    """What the loop counts besides steps: images read and skipped, for the logs and data checks."""
    images_seen: int = 0          # since the last log record (images/s)
    t_last: float = 0.0
    epoch_loaded: int = 0         # images of this epoch that loaded
    epoch_skipped: int = 0        # ... and that did not
    run_loaded: int = 0           # since this process started (rank-local)
    run_skipped: int = 0
    empty_steps_in_a_row: int = 0
    warned_unreadable: bool = False
    warned_diverging: bool = False
    warned_collapse: bool = False     # once per run: also true once log.jsonl holds an earlier warning


@dataclass
class _Run:
    """Everything one training run holds: built by :func:`_build`, advanced by the loop's pieces."""
    cfg: DinoConfig
    rank: int
    world_size: int
    device: torch.device
    dataset: ImageFiles
    sampler: ResumableDistributedSampler
    loader: DataLoader
    student: MultiCropForward
    teacher: MultiCropForward
    student_ddp: nn.Module
    dino_loss: DINOLoss
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    schedules: Schedules
    clip_groups: list[list[nn.Parameter]]   # gradients clipped as one tensor (fused q/k/v: official XCiT)
    steps_per_epoch: int
    total_steps: int
    global_step: int = 0
    saved_step: int | None = None    # the global step checkpoint.pth holds (None: there is none)
    last_loss: float = float("nan")
    last_ckpt: Path | None = None
    logger: RunLogger | None = None
    monitor: KnnMonitor | None = None     # k-NN of the teacher while training (None: eval keys off)
    counters: _Counters = field(default_factory=_Counters)
    device_augment: BatchedMultiCrop | None = None   # augment=gpu: the batch's crops are made on the device
    recipe: str | None = None             # recipe=auto: what it chose and why (config.yaml comments)
    budget: TimeBudget | None = None      # time_budget_minutes > 0: the clock and the planned steps

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def output_dir(self) -> Path:
        return Path(self.cfg.run.output_dir)

    @property
    def ckpt_path(self) -> Path:
        return self.output_dir / CHECKPOINT_NAME

    @property
    def epoch(self) -> int:
        return self.global_step // self.steps_per_epoch


def train(cfg: DinoConfig, stop_requested: Callable[[], bool] | None = None) -> TrainResult:
    """Run (or resume) DINO pretraining as configured. Distributed when a process group is up.

    ``stop_requested`` is polled once a step (all ranks agree on it): when true, the run saves a
    checkpoint at that step boundary and returns with status ``"stopped"``.
    """
    cfg = copy.deepcopy(cfg)   # recipe=auto and a time budget fill in values: the caller's config stays as given
    rank, world_size = dist_utils.get_rank(), dist_utils.get_world_size()
    device = pick_device(cfg.run.device)
    if cfg.run.deterministic:
        torch.use_deterministic_algorithms(True)
    torch.manual_seed(cfg.run.seed)   # the same initial weights on every rank (student and teacher)
    np.random.seed(cfg.run.seed)
    Path(cfg.run.output_dir).mkdir(parents=True, exist_ok=True)
    lock = _lock_output_dir(Path(cfg.run.output_dir), rank, device)
    run = None
    try:
        run = _build(cfg, rank, world_size, device)
        resumed = _resume(run)          # refuses before anything in output_dir is written
        # every rank: under torchrun each embeds a shard of the k-NN images (a bad eval_data_path stops here too)
        run.monitor = KnnMonitor.from_config(cfg, run.steps_per_epoch, device)
        _open_logs(run, resumed, lock)
        result = _train_epochs(run, stop_requested)
        return result
    finally:
        if run is not None and run.logger is not None:
            run.logger.close()
        if lock is not None:
            lock.release()


def _lock_output_dir(output_dir: Path, rank: int, device: torch.device) -> OutputDirLock | None:
    """Rank 0 takes the folder's lock (the other ranks are the same run); all ranks agree on refusal."""
    lock, refusal = None, None
    if rank == 0:
        try:
            lock = OutputDirLock(output_dir).acquire()
        except (UserError, OSError) as err:   # raised after the other ranks know, so none waits
            refusal = err
    (refused,) = dist_utils.any_rank_flags(refusal is not None, device=device)
    if refusal is not None:
        raise refusal
    if refused:
        raise UserError(f"rank 0 could not lock {output_dir}: another training uses it (rank 0 says who)")
    return lock


def _build(cfg: DinoConfig, rank: int, world_size: int, device: torch.device) -> _Run:
    """Data, models, loss, optimizer, scaler and schedules, in the order that fixes the RNG streams."""
    # ---- data: multi-crop views of unlabelled images; each sample seeded by its global position
    dataset = open_training_images(cfg)
    sampler = ResumableDistributedSampler(len(dataset), cfg.optim.batch_size_per_gpu, num_replicas=world_size,
                                          rank=rank, shuffle=True, seed=cfg.run.seed)
    steps_per_epoch = sampler.steps_per_epoch
    if steps_per_epoch == 0:
        raise DataSetError(f"{len(dataset)} images are fewer than one global batch of "
                           f"{cfg.optim.batch_size_per_gpu * world_size}: lower batch_size_per_gpu")
    total_steps = _configured_steps(cfg, steps_per_epoch)
    recipe = _apply_recipe(cfg, dataset, total_steps)    # recipe=auto: values fit to these images and steps
    # augment=gpu: the loader decodes and draws each crop's parameters; the crops are made on the device
    device_augment = BatchedMultiCrop(multicrop_config(cfg)) if cfg.data.augment == "gpu" else None
    dataset.transform = device_augment.loader_transform if device_augment else DinoMultiCrop(multicrop_config(cfg))
    loader = DataLoader(dataset, batch_size=cfg.optim.batch_size_per_gpu, sampler=sampler,
                        num_workers=cfg.data.num_workers, collate_fn=collate_skip_corrupt,
                        pin_memory=device.type == "cuda", drop_last=False,
                        persistent_workers=False,
                        generator=torch.Generator().manual_seed(cfg.run.seed))  # keeps the global RNG untouched

    # ---- models: student and teacher; synchronised BatchNorm and DDP when distributed
    student, teacher = build_models(cfg)
    torch.manual_seed(cfg.run.seed + rank)   # from here per rank: stochastic depth masks differ across ranks
    np.random.seed(cfg.run.seed + rank)
    if world_size > 1 and cfg.run.sync_bn:
        student = convert_sync_batchnorm(student, device)
        teacher = convert_sync_batchnorm(teacher, device)
    student.to(device)
    teacher.to(device)
    if cfg.run.compile:
        # in place (nn.Module.compile), so state_dict keys stay plain; static shapes give one
        # graph per crop resolution (global and local), each compiled once
        student.backbone.compile(dynamic=False)
        teacher.backbone.compile(dynamic=False)
    student_ddp: nn.Module = student
    if world_size > 1:
        student_ddp = nn.parallel.DistributedDataParallel(
            student, device_ids=[device.index] if device.type == "cuda" else None)
    teacher.train()  # DINO's teacher normalises with its own batch statistics

    budget = TimeBudget(cfg.optim.time_budget_minutes) if cfg.optim.time_budget_minutes > 0 else None
    if budget is not None and "optim.epochs" not in user_set_keys(cfg):
        total_steps = MAX_EPOCHS * steps_per_epoch   # until planned (after a few steps): the budget decides
    return _Run(cfg=cfg, rank=rank, world_size=world_size, device=device, dataset=dataset, sampler=sampler,
                loader=loader, student=student, teacher=teacher, student_ddp=student_ddp,
                dino_loss=build_loss(cfg).to(device), optimizer=build_optimizer(cfg, student),
                scaler=torch.amp.GradScaler(device.type) if cfg.run.precision == "fp16" else None,
                schedules=build_schedules(cfg, steps_per_epoch, world_size),
                clip_groups=gradient_clip_groups(student), steps_per_epoch=steps_per_epoch, total_steps=total_steps,
                device_augment=device_augment, recipe=recipe, budget=budget)


def _resume(run: _Run) -> dict | None:
    """Load checkpoint.pth if there is one: everything that shapes the next step comes back.

    Every check comes before any state changes and before anything is written, so a refused resume
    leaves the folder as it was. Returns what to log about it (``None``: a fresh start).
    """
    ckpt_path, steps_per_epoch = run.ckpt_path, run.steps_per_epoch
    if not ckpt_path.exists():
        return None
    state = load_checkpoint(ckpt_path, map_location="cpu")
    _check_models_fit(run, state)
    saved_steps = state.get("steps_per_epoch", steps_per_epoch)
    converted_from = None
    if saved_steps != steps_per_epoch:
        # another global batch (e.g. a requeued job on fewer nodes): continue at the same place of
        # the same epoch's data order when the images already seen fill whole new batches
        where = (f"{ckpt_path} was written with {saved_steps} steps per epoch, this run has "
                 f"{steps_per_epoch} ({len(run.dataset)} images, global batch "
                 f"{run.cfg.optim.batch_size_per_gpu * run.world_size})")
        if "sampler" not in state:
            raise CheckpointError(f"{where}: resume with the same images, batch_size_per_gpu and number "
                                  "of processes, or use a new output_dir")
        try:
            run.sampler.load_state_dict(state["sampler"], strict=True)
        except (KeyError, ValueError) as err:
            raise CheckpointError(f"{where}, and the position cannot be carried over: {err}. Resume "
                                  "with the old batch size or from an epoch-end checkpoint, or use a "
                                  "new output_dir") from None
        converted_from = saved_steps
    run.student.load_state_dict(state["student"])
    run.teacher.load_state_dict(state["teacher"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.dino_loss.load_state_dict(state["dino_loss"])
    if run.scaler is not None and state.get("scaler"):
        run.scaler.load_state_dict(state["scaler"])
    run.global_step = run.saved_step = int(state["global_step"])
    if converted_from is not None:
        run.global_step = run.sampler.epoch * steps_per_epoch + run.sampler.start_step
    rng = state["rng"]
    restore_rng_state(rng[min(run.rank, len(rng) - 1)] if isinstance(rng, list) else rng)
    if run.budget is not None:
        _resume_budget(run, state)
    epoch, step_in_epoch = divmod(run.global_step, steps_per_epoch)
    return {"checkpoint": str(ckpt_path), "global_step": run.global_step, "epoch": epoch, "step": step_in_epoch,
            "converted_from_steps_per_epoch": converted_from}


def _resume_budget(run: _Run, state: dict) -> None:
    """A time-budgeted run goes on with the steps it planned (the same schedules: exact resume) and
    the training time it already spent."""
    saved = state.get("config", {})
    planned = saved.get("run", {}).get("max_steps") or None
    if planned and saved.get("optim", {}).get("time_budget_minutes"):
        cfg = run.cfg
        cfg.run.max_steps, cfg.optim.epochs = planned, saved["optim"]["epochs"]
        cfg.dino.momentum_teacher = saved["dino"]["momentum_teacher"]
        cfg.dino.final_momentum_teacher = saved["dino"].get("final_momentum_teacher", 1.0)
        cfg.optim.warmup_epochs = saved["optim"].get("warmup_epochs", cfg.optim.warmup_epochs)
        run.total_steps = planned
        run.schedules = build_schedules(cfg, run.steps_per_epoch, run.world_size, total_steps=planned)
    run.budget = TimeBudget(run.cfg.optim.time_budget_minutes, state.get("trained_seconds") or 0.0,
                            planned_steps=planned)


def _check_models_fit(run: _Run, state: dict) -> None:
    """One line when the checkpoint's student/teacher do not fit this run's models (other arch, head)."""
    saved_arch = state.get("config", {}).get("model", {}).get("arch", "unknown")
    for part, model in (("student", run.student), ("teacher", run.teacher)):
        mismatch = _state_dict_mismatch(state[part], model.state_dict())
        if mismatch is None:
            continue
        if saved_arch != run.cfg.model.arch:
            raise CheckpointError(f"{run.ckpt_path} holds an arch={saved_arch} run, this run asks for "
                                  f"arch={run.cfg.model.arch}: resume with arch={saved_arch}, or use a new output_dir")
        raise CheckpointError(f"{run.ckpt_path} does not fit this run's model ({part}: {mismatch}): resume "
                              f"with the settings in {run.output_dir / 'config.yaml'}, or use a new output_dir")


def _state_dict_mismatch(saved: dict, here: dict) -> str | None:
    missing = [k for k in here if k not in saved]
    unexpected = [k for k in saved if k not in here]
    reshaped = [k for k in here if k in saved and tuple(saved[k].shape) != tuple(here[k].shape)]
    if not (missing or unexpected or reshaped):
        return None
    parts = [f"{len(keys)} {what} (e.g. {keys[0]})" for keys, what in
             ((missing, "missing"), (unexpected, "unexpected")) if keys]
    if reshaped:
        k = reshaped[0]
        parts.append(f"{len(reshaped)} of another shape (e.g. {k}: saved {tuple(saved[k].shape)}, "
                     f"here {tuple(here[k].shape)})")
    return ", ".join(parts)


def _open_logs(run: _Run, resumed: dict | None, lock: OutputDirLock | None) -> None:
    """config.yaml, log.jsonl and TensorBoard, written only now that the run is accepted."""
    cfg = run.cfg
    run.logger = logger = RunLogger(run.output_dir, enabled=run.is_main, tensorboard=cfg.run.tensorboard)
    if run.monitor is not None:
        run.monitor.logger = logger
    run.counters.t_last = time.perf_counter()
    if not run.is_main:
        return
    (run.output_dir / "config.yaml").write_text(_config_text(run))
    if run.recipe and resumed is None:
        print(f"[ssl_xcit] {run.recipe}", flush=True)
        logger.event("recipe_auto", choices=run.recipe)
    if lock is not None and lock.took_over is not None:
        old = lock.took_over
        print(f"[ssl_xcit] took over the lock of a training that is gone ({old.describe()})", flush=True)
        logger.event("lock_taken_over", host=old.host, pid=old.pid, since=old.since)
    if resumed is None:
        logger.event("start", images=len(run.dataset), world_size=run.world_size,
                     steps_per_epoch=run.steps_per_epoch, total_steps=run.total_steps, arch=cfg.model.arch)
        return
    print(f"[ssl_xcit] resumed from {resumed['checkpoint']} at global step {resumed['global_step']} "
          f"(epoch {resumed['epoch']}, step {resumed['step']} of {run.steps_per_epoch})", flush=True)
    if resumed["converted_from_steps_per_epoch"] is not None:
        print(f"[ssl_xcit] the checkpoint had {resumed['converted_from_steps_per_epoch']} steps per epoch: "
              "same images of the epoch done, position converted (lr schedule scaled to the new global batch)",
              flush=True)
    logger.event("resume", **resumed)


def _train_epochs(run: _Run, stop_requested: Callable[[], bool] | None) -> TrainResult:
    """The epochs from the run's position to ``total_steps``; returns early on a stop request.
    A finished run ends with the k-NN monitor's last point and knn.png, then the report page."""
    if run.monitor is not None:
        run.monitor.before_training(run.teacher.backbone, run.global_step)   # step 0 only: the random start
    if run.budget is not None:
        run.budget.start()
    while run.global_step < run.total_steps:
        if _train_one_epoch(run, stop_requested):
            return TrainResult("stopped", run.epoch, run.global_step, run.last_ckpt, run.last_loss)
        _end_epoch(run)
    if run.monitor is not None:
        run.monitor.after_training(run.teacher.backbone, run.global_step)
    if run.is_main:
        run.logger.event("finished", global_step=run.global_step, checkpoint=str(run.ckpt_path))
        if run.cfg.run.report:
            write_report_at_end_of_run(run.output_dir)    # never raises: a warning names the retry command
    return TrainResult("finished", run.epoch, run.global_step, run.last_ckpt or run.ckpt_path, run.last_loss)


def _train_one_epoch(run: _Run, stop_requested: Callable[[], bool] | None) -> bool:
    """The steps of one epoch from the run's position. True when a stop was requested (and saved)."""
    cfg, spe = run.cfg, run.steps_per_epoch
    epoch, start_step = divmod(run.global_step, spe)
    run.sampler.set_epoch(epoch)
    run.sampler.set_start_step(start_step)
    steps_this_epoch = min(spe, run.total_steps - epoch * spe)
    progress = _progress(run.is_main, start_step, steps_this_epoch, epoch, cfg.optim.epochs)
    try:
        for batch in run.loader:
            if run.global_step >= run.total_steps or run.global_step - epoch * spe >= steps_this_epoch:
                break
            if _count_and_skip_empty(run, batch):
                continue    # every image of some rank's batch was unreadable: all ranks skip the step
            hp = StepHParams(lr=float(run.schedules.lr[run.global_step]),
                             weight_decay=float(run.schedules.weight_decay[run.global_step]),
                             teacher_momentum=float(run.schedules.teacher_momentum[run.global_step]),
                             epoch=epoch, clip_grad=cfg.optim.clip_grad,
                             freeze_last_layer=cfg.optim.freeze_last_layer,
                             koleo_loss_weight=cfg.dino.koleo_loss_weight)
            crops = _crops_on_device(run, batch)
            loss = forward_loss(crops, run.student_ddp, run.teacher, run.dino_loss, hp, cfg.run.precision)
            loss_value = loss.item()
            stop_here = stop_requested() if stop_requested is not None else False
            bad_loss, stop_here = dist_utils.any_rank_flags(not math.isfinite(loss_value), stop_here,
                                                            device=run.device)
            if bad_loss:   # before backward, as DINO: no update from this batch reaches the weights
                where = (f"({loss_value})" if not math.isfinite(loss_value)
                         else f"on another rank (here {loss_value:.4g})")
                raise NonFiniteLossError(f"non-finite loss {where} at global step {run.global_step} "
                                         f"(epoch {epoch}): stopped, no update applied; {_checkpoint_holds(run)}. "
                                         "Lower lr, raise warmup_epochs, set clip_grad, or use fp32")
            out = apply_update(loss, run.student_ddp, run.teacher, run.dino_loss, run.optimizer, run.scaler, hp,
                               run.clip_groups)
            run.global_step += 1
            run.last_loss = loss_value
            run.counters.images_seen += len(batch) * run.world_size
            _monitor_after_step(run)
            if run.budget is not None:
                _budget_after_step(run)
            if progress is not None:
                progress.update(1)
                progress.set_postfix(loss=f"{loss_value:.4f}", lr=f"{hp.lr:.2e}")
            if run.global_step % cfg.run.log_every_steps == 0 or run.global_step == run.total_steps:
                _log_step(run, hp, out, loss_value, epoch)
            if stop_here:
                _save(run)
                if run.is_main:
                    print(f"[ssl_xcit] stop requested: saved {run.ckpt_path} at global step {run.global_step}",
                          flush=True)
                    run.logger.event("stopped", global_step=run.global_step, checkpoint=str(run.ckpt_path))
                return True
            if cfg.run.save_every_steps and run.global_step % cfg.run.save_every_steps == 0:
                _save(run)
    finally:
        if progress is not None:
            progress.close()
    return False


def _crops_on_device(run: _Run, batch: Batch) -> list[torch.Tensor]:
    """The batch's crops on ``run.device``: made there from uint8 images (augment=gpu) or moved there."""
    if run.device_augment is not None:
        return run.device_augment(batch.images, batch.params, run.device)
    return [c.to(run.device, non_blocking=True) for c in batch.crops]


def _monitor_after_step(run: _Run) -> None:
    """The k-NN monitor's evaluation when one is due (every rank); its time is left out of images/s."""
    if run.monitor is None:
        return
    start = time.perf_counter()
    run.monitor.after_step(run.teacher.backbone, run.global_step)
    run.counters.t_last += time.perf_counter() - start


def _count_and_skip_empty(run: _Run, batch: Batch) -> bool:
    """Count loaded and unreadable images. When some rank's batch has none that loaded, every rank
    skips the step (it counts as done) and True is returned; many such steps in a row are an error."""
    c = run.counters
    c.epoch_loaded += len(batch)
    c.epoch_skipped += batch.n_skipped
    c.run_loaded += len(batch)
    c.run_skipped += batch.n_skipped
    if not dist_utils.any_rank(batch.is_empty, run.device):
        c.empty_steps_in_a_row = 0
        return False
    run.global_step += 1
    c.empty_steps_in_a_row += 1
    if c.empty_steps_in_a_row >= MAX_EMPTY_STEPS_IN_A_ROW:
        loaded, skipped = _all_ranks_sum(run, c.run_loaded, c.run_skipped)
        raise DataSetError(unreadable_message(run.dataset, loaded, skipped, extra=f"{c.empty_steps_in_a_row} "
                                              "steps in a row had a batch without one readable image"))
    return True


def _log_step(run: _Run, hp: StepHParams, out, loss_value: float, epoch: int) -> None:
    """One log record (log.jsonl, TensorBoard) and the health warnings that read it."""
    c, cfg = run.counters, run.cfg
    now = time.perf_counter()
    values = {"loss": loss_value, "lr": hp.lr, "weight_decay": hp.weight_decay,
              "teacher_momentum": hp.teacher_momentum,
              "teacher_temp": float(run.dino_loss.temperature(epoch)),
              "grad_norm": out.grad_norm.item(),
              "teacher_entropy": out.teacher_entropy.item(),
              "teacher_kl_uniform": out.teacher_kl_uniform.item(),
              "images_per_s": c.images_seen / max(now - c.t_last, 1e-9)}
    if out.koleo is not None:
        values["koleo"] = out.koleo.item()
    run.logger.scalars(run.global_step, values, epoch)
    if not c.warned_collapse:
        c.warned_collapse = warn_if_collapsed(values, cfg, run.global_step, run.logger, run.is_main)
    if not c.warned_diverging:
        c.warned_diverging = warn_if_diverging(values, cfg.model.out_dim, run.global_step, run.logger,
                                               run.is_main, lr=cfg.optim.lr)
    _warn_once_if_mostly_unreadable(run, c.run_loaded, c.run_skipped, min_tried=16)
    c.images_seen, c.t_last = 0, now


def _budget_after_step(run: _Run) -> None:
    """``time_budget_minutes``: plan the steps once the first ones are timed and re-plan them at a
    third and two thirds of the plan (rank 0's plan for all ranks), then stop at the planned step,
    or earlier when the clock says the budget is spent."""
    budget, cfg = run.budget, run.cfg
    before = run.total_steps
    planned = budget.step_done(run.global_step)
    if planned is not None:
        planned = dist_utils.broadcast_int(planned, device=run.device)
        if "optim.epochs" in user_set_keys(cfg):
            planned = min(planned, cfg.optim.epochs * run.steps_per_epoch)
        planned = max(planned, run.global_step + 1)
        budget.planned_steps = planned           # rank 0's plan on every rank: the re-plan steps agree
    if planned is not None and (not budget.replans or planned != before):
        run.total_steps = cfg.run.max_steps = planned
        cfg.optim.epochs = max(cfg.optim.epochs, -(-planned // run.steps_per_epoch))
        if run.recipe is not None:
            recipe_rules.replan(cfg, planned, run.steps_per_epoch, user_set_keys(cfg))
        run.schedules = build_schedules(cfg, run.steps_per_epoch, run.world_size, total_steps=planned)
        if run.is_main:
            what = "planned" if not budget.replans else f"re-planned from the pace so far (were {before:,})"
            msg = (f"time budget {cfg.optim.time_budget_minutes:g} min: {planned:,} steps {what} "
                   f"({budget.elapsed:.1f} s spent on the first {run.global_step}); schedules laid over them "
                   f"(lr warm-up {cfg.optim.warmup_epochs} epoch(s), teacher momentum {cfg.dino.momentum_teacher})")
            print(f"[ssl_xcit] {msg}", flush=True)
            run.logger.event("time_budget_replanned" if budget.replans else "time_budget_planned",
                             global_step=run.global_step, planned_steps=planned,
                             teacher_momentum=cfg.dino.momentum_teacher, warmup_epochs=cfg.optim.warmup_epochs)
            (run.output_dir / "config.yaml").write_text(_config_text(run))
    if dist_utils.any_rank_flags(budget.spent, device=run.device)[0] and run.global_step < run.total_steps:
        if run.is_main:
            print(f"[ssl_xcit] time budget spent at step {run.global_step} of {run.total_steps}", flush=True)
            run.logger.event("time_budget_spent", global_step=run.global_step, planned_steps=run.total_steps)
        run.total_steps = run.global_step


def _config_text(run: _Run) -> str:
    """config.yaml: the values the run uses, with recipe=auto's choices and reasons as comments."""
    text = run.cfg.to_yaml()
    if run.recipe:
        text += "".join(f"# {line}\n" for line in run.recipe.splitlines())
    return text


def _end_epoch(run: _Run) -> None:
    """At an epoch's end (or the run's): check that images loaded, save, log the epoch."""
    spe, c = run.steps_per_epoch, run.counters
    end_of_epoch = run.global_step % spe == 0
    if not (end_of_epoch or run.global_step >= run.total_steps):
        return
    done_epoch = (run.global_step - 1) // spe
    loaded, skipped = _all_ranks_sum(run, c.epoch_loaded, c.epoch_skipped)
    if loaded == 0:
        raise DataSetError(unreadable_message(run.dataset, loaded, skipped))
    _warn_once_if_mostly_unreadable(run, loaded, skipped, min_tried=1)
    keep = (f"checkpoint{done_epoch:04d}.pth" if end_of_epoch and run.cfg.run.saveckp_freq
            and (done_epoch + 1) % run.cfg.run.saveckp_freq == 0 else None)
    _save(run, keep)
    if skipped and run.is_main:
        print(f"[ssl_xcit] epoch {done_epoch}: skipped {skipped} unreadable images "
              "(warnings above name them)", flush=True)
    run.logger.event("epoch_end", epoch=done_epoch, global_step=run.global_step, loss=run.last_loss,
                     skipped_images=skipped)
    c.epoch_loaded = c.epoch_skipped = 0
    run.logger.flush()


def _warn_once_if_mostly_unreadable(run: _Run, loaded: int, skipped: int, min_tried: int) -> None:
    c = run.counters
    if not c.warned_unreadable:
        c.warned_unreadable = warn_if_mostly_unreadable(run.dataset, loaded, skipped, min_tried, run.logger,
                                                        run.is_main, run.global_step)


def _all_ranks_sum(run: _Run, *counts: int) -> tuple[int, ...]:
    total = dist_utils.all_reduce_sum(torch.tensor(counts, dtype=torch.float64, device=run.device))
    return tuple(int(v) for v in total.tolist())


# ---- checkpoints

def _checkpoint_state(run: _Run) -> dict:
    rng_states = [capture_rng_state()]
    if run.world_size > 1:   # every rank's RNG, so drop-path masks continue exactly on each rank
        gathered: list = [None] * run.world_size
        torch.distributed.all_gather_object(gathered, rng_states[0])
        rng_states = gathered
    gs, spe = run.global_step, run.steps_per_epoch
    return {"student": run.student.state_dict(), "teacher": run.teacher.state_dict(),
            "optimizer": run.optimizer.state_dict(), "dino_loss": run.dino_loss.state_dict(),
            "scaler": run.scaler.state_dict() if run.scaler is not None else {},
            "epoch": gs // spe, "global_step": gs,
            "steps_per_epoch": spe, "rng": rng_states, "config": run.cfg.to_dict(),
            "trained_seconds": run.budget.elapsed if run.budget is not None else None,
            # the data position in sampler terms, so a run with another global batch can resume
            "sampler": {**run.sampler.state_dict(), "epoch": gs // spe, "start_step": gs % spe}}


def _save(run: _Run, extra_name: str | None = None) -> Path:
    """Write checkpoint.pth (and ``extra_name``) atomically; never weights that are not finite."""
    (bad,) = dist_utils.any_rank_flags(not _weights_finite(run), device=run.device)
    if bad:
        raise NonFiniteLossError(f"student or teacher weights are not finite after global step {run.global_step} "
                                 f"(last loss {run.last_loss:.4g}): stopped without saving them; "
                                 f"{_checkpoint_holds(run)}. Lower lr, raise warmup_epochs, or set clip_grad")
    state = _checkpoint_state(run)   # collective under DDP: every rank takes part
    if run.is_main:
        save_checkpoint(state, run.ckpt_path)
        if extra_name:
            save_checkpoint(state, run.output_dir / extra_name)
    dist_utils.barrier()
    run.saved_step, run.last_ckpt = run.global_step, run.ckpt_path
    return run.ckpt_path


def _weights_finite(run: _Run) -> bool:
    tensors = [t for model in (run.student, run.teacher) for t in model.state_dict().values()
               if t.is_floating_point()]
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())


def _checkpoint_holds(run: _Run) -> str:
    """What checkpoint.pth holds now, for messages that stop the run (they must be true)."""
    if run.saved_step is None:
        return f"no checkpoint was written ({run.ckpt_path} does not exist)"
    return (f"{run.ckpt_path} holds global step {run.saved_step}, not overwritten (if the loss was already "
            "climbing, resume from an earlier checkpoint or start again with another lr)")


# ---- progress bar

def _progress(is_main: bool, start: int, total: int, epoch: int, epochs: int):
    if not is_main:
        return None
    import sys
    from tqdm.auto import tqdm
    # redraw at most every 30 s into a log file (SLURM, CI), so logs stay readable
    interval = 0.1 if sys.stderr.isatty() else 30.0
    return tqdm(total=total, initial=start, desc=f"epoch {epoch + 1}/{epochs}", dynamic_ncols=True,
                leave=False, mininterval=interval)
