"""The DINO training loop, readable top to bottom: build data, models, loss, optimizer and
schedules; resume if the output folder holds a checkpoint; run the epochs; checkpoint atomically.
"""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from ssl_xcit import distributed as dist_utils
from ssl_xcit.distributed import pick_device
from ssl_xcit.data.folders import ImageFiles, collate_skip_corrupt
from ssl_xcit.data.multicrop import DinoMultiCrop, MultiCropConfig
from ssl_xcit.data.sampler import ResumableDistributedSampler
from ssl_xcit.data.sources import resolve_data_path
from ssl_xcit.dino.ema import copy_student_to_teacher
from ssl_xcit.dino.head import DINOHead
from ssl_xcit.dino.loss import DINOLoss
from ssl_xcit.dino.multicrop import MultiCropForward
from ssl_xcit.dino.optim import param_groups_for_weight_decay
from ssl_xcit.dino.schedules import cosine_schedule
from ssl_xcit.models import get_model
from ssl_xcit.train.checkpoint import (CHECKPOINT_NAME, CheckpointError, capture_rng_state, load_checkpoint,
                                       restore_rng_state, save_checkpoint)
from ssl_xcit.train.config import DinoConfig
from ssl_xcit.train.logger import RunLogger
from ssl_xcit.train.step import StepHParams, train_step
from ssl_xcit.train.sync_bn import convert_sync_batchnorm


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is left untouched."""


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
        raise ValueError("data_path is empty: give data_path=/path/to/images (a folder or a .tar.gz)")
    root = resolve_data_path(data_path)
    return root / "train" if (root / "train").is_dir() else root


def build_dataset(cfg: DinoConfig) -> ImageFiles:
    d = cfg.data
    transform = DinoMultiCrop(MultiCropConfig(
        global_crops_size=d.global_crops_size, global_crops_scale=tuple(d.global_crops_scale),
        local_crops_number=d.local_crops_number, local_crops_size=d.local_crops_size,
        local_crops_scale=tuple(d.local_crops_scale), blur_probs=tuple(d.blur_probs),
        solarize_prob=d.solarize_prob))
    dataset = ImageFiles(training_images_root(d.data_path), transform=transform)
    if d.max_images and d.max_images < len(dataset):
        # evenly spread over the sorted listing, so a class-folder tree keeps every class
        keep = np.linspace(0, len(dataset) - 1, d.max_images).round().astype(np.int64)
        dataset.select(keep)
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


def build_schedules(cfg: DinoConfig, steps_per_epoch: int, world_size: int) -> Schedules:
    o = cfg.optim
    global_batch = o.batch_size_per_gpu * world_size
    base_lr = o.lr * global_batch / 256.0   # linear scaling rule
    return Schedules(
        lr=cosine_schedule(base_lr, o.min_lr, o.epochs, steps_per_epoch, warmup_epochs=o.warmup_epochs),
        weight_decay=cosine_schedule(o.weight_decay, o.weight_decay_end, o.epochs, steps_per_epoch),
        teacher_momentum=cosine_schedule(cfg.dino.momentum_teacher, 1.0, o.epochs, steps_per_epoch),
    )


def build_optimizer(cfg: DinoConfig, student: nn.Module) -> torch.optim.Optimizer:
    groups = param_groups_for_weight_decay(student)
    for group in groups:  # groups built with weight_decay 0 keep it: the wd schedule skips them
        group["apply_weight_decay"] = group.get("weight_decay", None) != 0.0
    if cfg.optim.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=0.0, foreach=True)
    return torch.optim.SGD(groups, lr=0.0, momentum=0.9, foreach=True)


def train(cfg: DinoConfig, stop_requested: Callable[[], bool] | None = None) -> TrainResult:
    """Run (or resume) DINO pretraining as configured. Distributed when a process group is up."""
    rank, world_size = dist_utils.get_rank(), dist_utils.get_world_size()
    is_main = rank == 0
    device = pick_device(cfg.run.device)
    if cfg.run.deterministic:
        torch.use_deterministic_algorithms(True)
    torch.manual_seed(cfg.run.seed)   # the same initial weights on every rank (student and teacher)
    np.random.seed(cfg.run.seed)

    output_dir = Path(cfg.run.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = output_dir / CHECKPOINT_NAME
    logger = RunLogger(output_dir, enabled=is_main, tensorboard=cfg.run.tensorboard)
    if is_main:
        (output_dir / "config.yaml").write_text(cfg.to_yaml())

    # ---- data: multi-crop views of unlabelled images; each sample seeded by its global position
    dataset = build_dataset(cfg)
    sampler = ResumableDistributedSampler(len(dataset), cfg.optim.batch_size_per_gpu, num_replicas=world_size,
                                          rank=rank, shuffle=True, seed=cfg.run.seed)
    steps_per_epoch = sampler.steps_per_epoch
    if steps_per_epoch == 0:
        raise ValueError(f"{len(dataset)} images are fewer than one global batch of "
                         f"{cfg.optim.batch_size_per_gpu * world_size}: lower batch_size_per_gpu")
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

    ncrops = 2 + cfg.data.local_crops_number
    dino_loss = DINOLoss(cfg.model.out_dim, ncrops, warmup_teacher_temp=cfg.dino.warmup_teacher_temp,
                         teacher_temp=cfg.dino.teacher_temp,
                         warmup_teacher_temp_epochs=cfg.dino.warmup_teacher_temp_epochs,
                         nepochs=cfg.optim.epochs, student_temp=cfg.dino.student_temp,
                         center_momentum=cfg.dino.center_momentum).to(device)
    optimizer = build_optimizer(cfg, student)
    scaler = torch.amp.GradScaler(device.type) if cfg.run.precision == "fp16" else None
    schedules = build_schedules(cfg, steps_per_epoch, world_size)
    total_steps = cfg.optim.epochs * steps_per_epoch
    if cfg.run.max_steps:
        total_steps = min(total_steps, cfg.run.max_steps)

    # ---- resume: everything that shapes the next step comes back from the checkpoint
    global_step = 0
    if ckpt_path.exists():
        state = load_checkpoint(ckpt_path, map_location="cpu")
        saved_steps = state.get("steps_per_epoch", steps_per_epoch)
        converted_from = None
        if saved_steps != steps_per_epoch:
            # another global batch (e.g. a requeued job on fewer nodes): continue at the same place of
            # the same epoch's data order when the images already seen fill whole new batches
            where = (f"{ckpt_path} was written with {saved_steps} steps per epoch, this run has "
                     f"{steps_per_epoch} ({len(dataset)} images, global batch "
                     f"{cfg.optim.batch_size_per_gpu * world_size})")
            if "sampler" not in state:
                raise CheckpointError(f"{where}: resume with the same images, batch_size_per_gpu and number "
                                      "of processes, or use a new output_dir")
            try:
                sampler.load_state_dict(state["sampler"], strict=True)
            except (KeyError, ValueError) as err:
                raise CheckpointError(f"{where}, and the position cannot be carried over: {err}. Resume "
                                      "with the old batch size or from an epoch-end checkpoint, or use a "
                                      "new output_dir") from None
            converted_from = saved_steps
        student.load_state_dict(state["student"])
        teacher.load_state_dict(state["teacher"])
        optimizer.load_state_dict(state["optimizer"])
        dino_loss.load_state_dict(state["dino_loss"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        global_step = int(state["global_step"])
        if converted_from is not None:
            global_step = sampler.epoch * steps_per_epoch + sampler.start_step
        restore_rng_state(state["rng"][min(rank, len(state["rng"]) - 1)] if isinstance(state["rng"], list)
                          else state["rng"])
        epoch, step_in_epoch = divmod(global_step, steps_per_epoch)
        if is_main:
            msg = (f"resumed from {ckpt_path} at global step {global_step} "
                   f"(epoch {epoch}, step {step_in_epoch} of {steps_per_epoch})")
            print(f"[ssl_xcit] {msg}", flush=True)
            if converted_from is not None:
                print(f"[ssl_xcit] the checkpoint had {converted_from} steps per epoch: same images of the "
                      f"epoch done, position converted (lr schedule scaled to the new global batch)", flush=True)
            logger.event("resume", checkpoint=str(ckpt_path), global_step=global_step, epoch=epoch,
                         step=step_in_epoch, converted_from_steps_per_epoch=converted_from)
    elif is_main:
        logger.event("start", images=len(dataset), world_size=world_size, steps_per_epoch=steps_per_epoch,
                     total_steps=total_steps, arch=cfg.model.arch)

    def checkpoint_state() -> dict:
        rng_states = [capture_rng_state()]
        if world_size > 1:   # every rank's RNG, so drop-path masks continue exactly on each rank
            gathered: list = [None] * world_size
            torch.distributed.all_gather_object(gathered, rng_states[0])
            rng_states = gathered
        return {"student": student.state_dict(), "teacher": teacher.state_dict(),
                "optimizer": optimizer.state_dict(), "dino_loss": dino_loss.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else {},
                "epoch": global_step // steps_per_epoch, "global_step": global_step,
                "steps_per_epoch": steps_per_epoch, "rng": rng_states, "config": cfg.to_dict(),
                # the data position in sampler terms, so a run with another global batch can resume
                "sampler": {**sampler.state_dict(), "epoch": global_step // steps_per_epoch,
                            "start_step": global_step % steps_per_epoch}}

    def save(extra_name: str | None = None) -> Path:
        state = checkpoint_state()   # collective under DDP: every rank takes part
        if is_main:
            save_checkpoint(state, ckpt_path)
            if extra_name:
                save_checkpoint(state, output_dir / extra_name)
        dist_utils.barrier()
        return ckpt_path

    status, last_loss, last_ckpt = "finished", float("nan"), None
    images_seen, skipped_images, t_last = 0, 0, time.perf_counter()
    try:
        while global_step < total_steps:
            epoch, start_step = divmod(global_step, steps_per_epoch)
            sampler.set_epoch(epoch)
            sampler.set_start_step(start_step)
            steps_this_epoch = min(steps_per_epoch, total_steps - epoch * steps_per_epoch)
            progress = _progress(is_main, start_step, steps_this_epoch, epoch, cfg.optim.epochs)
            for batch in loader:
                if global_step >= total_steps or global_step - epoch * steps_per_epoch >= steps_this_epoch:
                    break
                skipped_images += batch.n_skipped
                if dist_utils.any_rank(batch.is_empty, device):
                    # every image of some rank's batch was unreadable: all ranks skip the step together
                    global_step += 1
                    continue
                crops = [c.to(device, non_blocking=True) for c in batch.crops]
                hp = StepHParams(lr=float(schedules.lr[global_step]),
                                 weight_decay=float(schedules.weight_decay[global_step]),
                                 teacher_momentum=float(schedules.teacher_momentum[global_step]),
                                 epoch=epoch, clip_grad=cfg.optim.clip_grad,
                                 freeze_last_layer=cfg.optim.freeze_last_layer)
                out = train_step(crops, student_ddp, teacher, dino_loss, optimizer, scaler, hp,
                                 cfg.run.precision)
                loss_value = out.loss.item()
                stop_here = stop_requested() if stop_requested is not None else False
                bad_loss, stop_here = dist_utils.any_rank_flags(not math.isfinite(loss_value), stop_here, device=device)
                if bad_loss:
                    raise NonFiniteLossError(
                        f"non-finite loss ({loss_value}) at global step {global_step} (epoch {epoch}); "
                        f"stopping without overwriting {ckpt_path}. Lower lr, raise warmup, or use fp32.")
                global_step += 1
                last_loss = loss_value
                images_seen += batch.crops[0].shape[0] * world_size
                if progress is not None:
                    progress.update(1)
                    progress.set_postfix(loss=f"{loss_value:.4f}", lr=f"{hp.lr:.2e}")
                if global_step % cfg.run.log_every_steps == 0 or global_step == total_steps:
                    now = time.perf_counter()
                    values = {"loss": loss_value, "lr": hp.lr, "weight_decay": hp.weight_decay,
                              "teacher_momentum": hp.teacher_momentum,
                              "teacher_temp": float(dino_loss.temperature(epoch)),
                              "grad_norm": out.grad_norm.item(),
                              "teacher_entropy": out.teacher_entropy.item(),
                              "teacher_kl_uniform": out.teacher_kl_uniform.item(),
                              "images_per_s": images_seen / max(now - t_last, 1e-9)}
                    logger.scalars(global_step, values, epoch)
                    _warn_if_collapsed(values, cfg.model.out_dim, global_step, logger, is_main)
                    images_seen, t_last = 0, now
                if stop_here:
                    last_ckpt = save()
                    status = "stopped"
                    if is_main:
                        print(f"[ssl_xcit] stop requested: saved {ckpt_path} at global step {global_step}",
                              flush=True)
                        logger.event("stopped", global_step=global_step, checkpoint=str(ckpt_path))
                    return TrainResult(status, global_step // steps_per_epoch, global_step, last_ckpt, last_loss)
                if cfg.run.save_every_steps and global_step % cfg.run.save_every_steps == 0:
                    last_ckpt = save()
            if progress is not None:
                progress.close()
            end_of_epoch = global_step % steps_per_epoch == 0
            if end_of_epoch or global_step >= total_steps:
                done_epoch = (global_step - 1) // steps_per_epoch
                keep = (f"checkpoint{done_epoch:04d}.pth" if end_of_epoch and cfg.run.saveckp_freq
                        and (done_epoch + 1) % cfg.run.saveckp_freq == 0 else None)
                last_ckpt = save(keep)
                skipped = int(dist_utils.all_reduce_sum(
                    torch.tensor([skipped_images], dtype=torch.float64, device=device)).item())
                if skipped and is_main:
                    print(f"[ssl_xcit] epoch {done_epoch}: skipped {skipped} unreadable images "
                          "(warnings above name them)", flush=True)
                logger.event("epoch_end", epoch=done_epoch, global_step=global_step, loss=last_loss,
                             skipped_images=skipped)
                skipped_images = 0
                logger.flush()
        if is_main:
            logger.event("finished", global_step=global_step, checkpoint=str(ckpt_path))
        return TrainResult(status, global_step // steps_per_epoch, global_step, last_ckpt or ckpt_path, last_loss)
    finally:
        logger.close()


def _progress(is_main: bool, start: int, total: int, epoch: int, epochs: int):
    if not is_main:
        return None
    import sys
    from tqdm.auto import tqdm
    # redraw at most every 30 s into a log file (SLURM, CI), so logs stay readable
    interval = 0.1 if sys.stderr.isatty() else 30.0
    return tqdm(total=total, initial=start, desc=f"epoch {epoch + 1}/{epochs}", dynamic_ncols=True,
                leave=False, mininterval=interval)


def _warn_if_collapsed(values: dict, out_dim: int, step: int, logger: RunLogger, is_main: bool) -> None:
    """DINO collapses two ways: a uniform teacher (entropy at ln K, loss near ln K) or one
    dominant prototype (teacher KL from uniform near ln K). Either shows here before k-NN does."""
    if not is_main or step < 50:
        return
    ln_k = math.log(out_dim)
    uniform = values["teacher_entropy"] > 0.98 * ln_k and abs(values["loss"] - ln_k) < 0.02 * ln_k
    one_hot = values["teacher_kl_uniform"] > 0.98 * ln_k
    if uniform or one_hot:
        kind = "uniform teacher output" if uniform else "one prototype dominates the teacher output"
        msg = (f"run looks collapsed at global step {step}: {kind} (loss {values['loss']:.3f}, "
               f"entropy {values['teacher_entropy']:.3f}, ln(out_dim) {ln_k:.3f})")
        warnings.warn(msg, RuntimeWarning, stacklevel=2)
        logger.event("collapse_warning", global_step=step, kind=kind)
