"""DINO's pieces, built from the config in the order that fixes the RNG streams: the images and
their multi-crop views, student and teacher (backbone + DINO head), the loss with its centre, the
optimizer and the schedules, with ``recipe: auto``'s choices filled in first. :class:`Dino` holds
them and is what the run machinery (:mod:`ssl_xcit.engine.run`) checkpoints and resumes; the loop
that trains them is :mod:`ssl_xcit.train.loop`.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from ssl_xcit.data.folders import Batch, ImageFiles
from ssl_xcit.data.gpu_multicrop import BatchedMultiCrop
from ssl_xcit.data.multicrop import DinoMultiCrop, MultiCropConfig
from ssl_xcit.data.sampler import ResumableDistributedSampler
from ssl_xcit.data.sources import open_image_dataset, resolve_data_path
from ssl_xcit.data.subsets import evenly_spread
from ssl_xcit.dino.ema import copy_student_to_teacher
from ssl_xcit.dino.head import DINOHead
from ssl_xcit.dino.loss import DINOLoss
from ssl_xcit.dino.multicrop import MultiCropForward
from ssl_xcit.dino.optim import gradient_clip_groups, param_groups_for_weight_decay
from ssl_xcit.dino.schedules import cosine_schedule
from ssl_xcit.engine.build import configured_steps, place_models, seed_this_rank, training_loader, training_sampler
from ssl_xcit.engine.checkpoint import CheckpointError, require_parts, state_dict_mismatch
from ssl_xcit.engine.run import DataSetError, Run
from ssl_xcit.engine.step import make_scaler
from ssl_xcit.models import get_model
from ssl_xcit.train import recipe as recipe_rules
from ssl_xcit.train.config import ConfigError, DinoConfig, user_set_keys, validate
from ssl_xcit.train.pretrained import PretrainedFile, check_arch, load_into_dino, read_pretrained


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
    sampler = training_sampler(dataset, cfg.optim.batch_size_per_gpu, world_size, 0, cfg.run.seed)
    facts = read_pretrained(cfg.model.pretrained_weights, cfg.model.pretrained_checkpoint_key).facts() \
        if cfg.model.pretrained_weights else None
    apply_recipe(cfg, dataset, configured_steps(cfg, sampler.steps_per_epoch), facts)
    return cfg


def apply_recipe(cfg: DinoConfig, dataset: ImageFiles, steps: int, pretrained: dict | None = None) -> str | None:
    """``recipe: auto`` on fewer than ``AUTO_MAX_IMAGES`` images: every value the user left unset is
    fit to the data and the run's ``steps`` (in place), and to the ``pretrained`` file it continues
    from (:meth:`~ssl_xcit.train.pretrained.PretrainedFile.facts`); returns the choices with their
    reasons (``None``: nothing chosen). It never changes the batch, epochs or max_steps, which
    ``steps`` comes from. The file's arch is taken, under any recipe, when the user set none."""
    if pretrained is not None:
        if "model.arch" not in user_set_keys(cfg):
            cfg.model.arch = pretrained["arch"]
        check_arch(pretrained, cfg.model.arch)
        validate(cfg)
    if cfg.run.recipe != "auto" or len(dataset) >= recipe_rules.AUTO_MAX_IMAGES:
        return None
    facts = recipe_rules.data_facts(dataset)
    applied = recipe_rules.apply_auto(cfg, facts, steps, user_set_keys(cfg), pretrained)
    try:
        validate(cfg)
    except ConfigError as err:
        raise ConfigError(f"recipe=auto chose values that do not fit the rest of the config ({err}): set "
                          "them yourself or use recipe=off") from None
    return recipe_rules.describe(applied, facts, steps) if applied else None


def build_optimizer(cfg: DinoConfig, student: nn.Module) -> torch.optim.Optimizer:
    groups = param_groups_for_weight_decay(student)
    if cfg.optim.backbone_lr_scale != 1.0:   # a pretrained backbone learns slower than its head
        groups = _scaled_backbone_groups(groups, student, cfg.optim.backbone_lr_scale)
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


def _scaled_backbone_groups(groups: list[dict], student: nn.Module, scale: float) -> list[dict]:
    """Each group split in the student's backbone (``lr_scale`` = ``scale``) and the rest."""
    backbone = {id(p) for p in student.backbone.parameters()}
    out = []
    for group in groups:
        for in_backbone, lr_scale in ((True, scale), (False, 1.0)):
            params = [p for p in group["params"] if (id(p) in backbone) == in_backbone]
            if params:
                out.append({**group, "params": params, "lr_scale": lr_scale})
    return out


def build_loss(cfg: DinoConfig) -> DINOLoss:
    return DINOLoss(cfg.model.out_dim, 2 + cfg.data.local_crops_number,
                    warmup_teacher_temp=cfg.dino.warmup_teacher_temp, teacher_temp=cfg.dino.teacher_temp,
                    warmup_teacher_temp_epochs=cfg.dino.warmup_teacher_temp_epochs,
                    nepochs=cfg.optim.epochs, student_temp=cfg.dino.student_temp,
                    center_momentum=cfg.dino.center_momentum)


@dataclass
class Dino:
    """What DINO trains and on what: the run's :class:`~ssl_xcit.engine.run.Trainable`."""
    cfg: DinoConfig
    dataset: ImageFiles
    sampler: ResumableDistributedSampler
    loader: DataLoader
    student: MultiCropForward
    teacher: MultiCropForward
    student_ddp: nn.Module
    loss: DINOLoss
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    schedules: Schedules
    clip_groups: list[list[nn.Parameter]]   # gradients clipped as one tensor (fused q/k/v: official XCiT)
    total_steps: int
    device_augment: BatchedMultiCrop | None = None   # augment=gpu: the batch's crops are made on the device
    recipe: str | None = None             # recipe=auto: what it chose and why (config.yaml comments)
    warned: set[str] = field(default_factory=set)   # DINO's health warnings given in this run
    pretrained: dict | None = None        # pretrained_weights: the file's facts and what was taken from it

    def crops_on_device(self, batch: Batch, device: torch.device) -> list[torch.Tensor]:
        """The batch's crops on ``device``: made there from uint8 images (augment=gpu) or moved there."""
        if self.device_augment is not None:
            return self.device_augment(batch.images, batch.params, device)
        return [c.to(device, non_blocking=True) for c in batch.crops]

    def config_text(self) -> str:
        """config.yaml: the values the run uses, with recipe=auto's choices and reasons as comments."""
        text = self.cfg.to_yaml()
        if self.pretrained:
            p = self.pretrained
            text += (f"# pretrained_weights: {p['path']} (sha256 {p['sha256']}, format {p['format']}, "
                     f"{p['arch']})\n" + "".join(f"#   {note}\n" for note in p.get("loaded", [])))
        if self.recipe:
            text += "".join(f"# {line}\n" for line in self.recipe.splitlines())
        return text

    def init_center_from_teacher(self, crops: list[torch.Tensor], precision: str) -> None:
        """``center_init: teacher``: the centre starts at the teacher's mean output on these crops."""
        from ssl_xcit.engine.step import autocast_context
        with torch.no_grad(), autocast_context(crops[0].device, precision):
            self.loss.init_center(self.teacher(crops[:2]))

    # ---- the Trainable protocol
    def state_dict(self) -> dict[str, Any]:
        return {"student": self.student.state_dict(), "teacher": self.teacher.state_dict(),
                "optimizer": self.optimizer.state_dict(), "dino_loss": self.loss.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else {},
                "pretrained": self.pretrained}

    def check_fits(self, state: dict[str, Any], path: Path) -> None:
        """One line when the checkpoint's student/teacher do not fit this run's models (other arch, head)."""
        require_parts(state, path, ("student", "teacher", "optimizer", "dino_loss"), "DINO training")
        saved_arch = state.get("config", {}).get("model", {}).get("arch", "unknown")
        for part, model in (("student", self.student), ("teacher", self.teacher)):
            mismatch = state_dict_mismatch(state[part], model.state_dict())
            if mismatch is None:
                continue
            if saved_arch != self.cfg.model.arch:
                raise CheckpointError(f"{path} holds an arch={saved_arch} run, this run asks for "
                                      f"arch={self.cfg.model.arch}: resume with arch={saved_arch}, or use a new output_dir")
            raise CheckpointError(f"{path} does not fit this run's model ({part}: {mismatch}): resume "
                                  f"with the settings in {path.parent / 'config.yaml'}, or use a new output_dir")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.student.load_state_dict(state["student"])
        self.teacher.load_state_dict(state["teacher"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.loss.load_state_dict(state["dino_loss"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])

    def weights(self) -> list[torch.Tensor]:
        return [t for model in (self.student, self.teacher) for t in model.state_dict().values()
                if t.is_floating_point()]


def build_dino(cfg: DinoConfig, run: Run) -> Dino:
    """Data, models, loss, optimizer, scaler and schedules, in the order that fixes the RNG streams."""
    # ---- data: multi-crop views of unlabelled images; each sample seeded by its global position
    dataset = open_training_images(cfg)
    sampler = training_sampler(dataset, cfg.optim.batch_size_per_gpu, run.world_size, run.rank, cfg.run.seed)
    total_steps = configured_steps(cfg, sampler.steps_per_epoch)
    pretrained = run.pretrained_start(cfg.model.pretrained_weights, lambda: read_pretrained(
        cfg.model.pretrained_weights, cfg.model.pretrained_checkpoint_key))
    facts = pretrained.facts() if isinstance(pretrained, PretrainedFile) else pretrained
    recipe = apply_recipe(cfg, dataset, total_steps, facts)   # recipe=auto: values fit to these images and steps
    # augment=gpu: the loader decodes and draws each crop's parameters; the crops are made on the device
    device_augment = BatchedMultiCrop(multicrop_config(cfg)) if cfg.data.augment == "gpu" else None
    dataset.transform = device_augment.loader_transform if device_augment else DinoMultiCrop(multicrop_config(cfg))
    loader = training_loader(dataset, sampler, cfg.optim.batch_size_per_gpu, cfg.data.num_workers, run.device,
                             cfg.run.seed)
    # ---- models: student and teacher; synchronised BatchNorm and DDP when distributed
    student, teacher = build_models(cfg)
    loss = build_loss(cfg)
    if isinstance(pretrained, PretrainedFile):    # a new run from a file (a resume takes its own checkpoint)
        facts = {**facts, "loaded": load_into_dino(pretrained, student, teacher, loss)}
        if run.is_main:
            print(f"[ssl_xcit] pretrained_weights: {'; '.join(facts['loaded'])}", flush=True)
    seed_this_rank(cfg.run.seed, run.rank)   # from here per rank: stochastic depth masks differ across ranks
    student, teacher, student_ddp = place_models(student, teacher, cfg.run, run)
    return Dino(cfg=cfg, dataset=dataset, sampler=sampler, loader=loader, student=student, teacher=teacher,
                student_ddp=student_ddp, loss=loss.to(run.device), optimizer=build_optimizer(cfg, student),
                scaler=make_scaler(cfg.run.precision, run.device),
                schedules=build_schedules(cfg, sampler.steps_per_epoch, run.world_size),
                clip_groups=gradient_clip_groups(student), total_steps=total_steps,
                device_augment=device_augment, recipe=recipe, pretrained=facts)
