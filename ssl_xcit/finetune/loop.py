"""The fine-tuning loop, readable top to bottom as DeiT's ``train_one_epoch`` and ``evaluate``: open
the run (:class:`~ssl_xcit.engine.run.Run`: the folder, its lock, logs, checkpoints, the NaN guard and
stop requests, shared with pretraining), build the pieces (:func:`~ssl_xcit.finetune.build.build_finetune`),
resume if the folder holds a checkpoint, then the epochs: each step is mixup, forward and loss, a
look at the loss on every rank before ``backward``, the update and the EMA; validation every
``eval_every_epochs`` (and ``eval_every_steps``) and at the end, with the best checkpoint kept as
``checkpoint_best.pth`` beside the last.

Each validation is a ``{"event": "val", "global_step", "top1", "top5"}`` record in ``log.jsonl``
(``val/top1`` in TensorBoard; with ``model_ema`` also ``ema_top1``/``ema_top5``), scored exactly as
``eval/eval_classification.py --model ARCH --checkpoint OUT/checkpoint.pth`` scores the saved model.
"""
from __future__ import annotations

import copy
import shutil
from typing import Callable

import torch

from ssl_xcit import distributed as dist_utils
from ssl_xcit.atomic import atomic_write
from ssl_xcit.evaluate.classification import topk_correct
from ssl_xcit.finetune.build import Finetune, build_finetune, val_loader
from ssl_xcit.finetune.config import FinetuneConfig
from ssl_xcit.finetune.probe_head import fit_probe_head
from ssl_xcit.finetune.step import apply_update, forward_loss, hold_backbone_norm_stats
from ssl_xcit.engine.run import Run, TrainResult

BEST_NAME = "checkpoint_best.pth"


def train(cfg: FinetuneConfig, stop_requested: Callable[[], bool] | None = None) -> TrainResult:
    """Run (or resume) fine-tuning as configured. Distributed when a process group is up;
    ``stop_requested`` as in pretraining (saved at the step boundary, status ``"stopped"``)."""
    cfg = copy.deepcopy(cfg)
    with Run.open(cfg, kind="finetune") as run:
        ft = build_finetune(cfg, run)
        run.attach(ft, ft.train_set, ft.sampler, ft.total_steps)
        resumed, _ = run.resume()
        run.open_logs(ft.config_text(), resumed, ft.recipe, arch=cfg.model.arch, classes=len(ft.classes),
                      val_images=len(ft.val_set))
        val = val_loader(ft, run)
        if ft.budget is not None:
            ft.budget.clock.start()     # fitting the head counts against the budget too
        if resumed is None and cfg.optim.head_init == "probe":
            fit_head_first(run, ft, val)
        while run.global_step < run.total_steps:
            if train_one_epoch(run, ft, val, stop_requested):
                return run.stopped()
            improved = validate(run, ft, val) if _epoch_val_due(run, cfg) else False
            run.end_epoch()    # saves checkpoint.pth, the best validation so far in it
            if improved:
                keep_best(run)
        say_if_not_paid(run, ft)
        return run.finish()


def _epoch_val_due(run: Run, cfg: FinetuneConfig) -> bool:
    """Every ``eval_every_epochs`` epochs, and always at the run's end (its last val event)."""
    every = cfg.eval.eval_every_epochs
    return run.global_step >= run.total_steps or bool(every) and (run.global_step // run.steps_per_epoch) % every == 0


def train_one_epoch(run: Run, ft: Finetune, val, stop_requested: Callable[[], bool] | None) -> bool:
    """The steps of one epoch from the run's position. True when a stop was requested (and saved)."""
    cfg = ft.cfg
    for batch in run.epoch_batches(ft.loader, cfg.optim.epochs):
        epoch, lr = run.epoch, float(ft.lr[run.global_step])
        images = batch.images.to(run.device, non_blocking=True)
        labels = batch.labels.to(run.device, non_blocking=True)
        head_only = run.global_step < cfg.optim.freeze_backbone_steps
        hold_backbone_norm_stats(ft.model_ddp, frozen=head_only or cfg.optim.freeze_norm_stats)
        loss = forward_loss(images, labels, ft.model_ddp, ft.criterion, ft.mixup, cfg.run.precision)
        loss_value = loss.item()
        stop_here = run.check_loss(loss_value, stop_requested)   # before backward: no update from a bad loss
        out = apply_update(loss, ft.model_ddp, ft.optimizer, ft.scaler, lr, cfg.optim.clip_grad, ft.ema,
                           run.global_step, head_only=head_only)
        run.step_done(loss_value, len(batch), lr=lr)
        if ft.budget is not None:
            ft.budget.after_step(run, ft)   # plans the run's length from its pace; stops it at the budget
        if run.log_due():
            values = {"loss": loss_value, "lr": lr}
            if out.grad_norm is not None:
                values["grad_norm"] = out.grad_norm.item()
            run.log_scalars(values, epoch)
        at_end = run.global_step % run.steps_per_epoch == 0 or run.global_step >= run.total_steps
        if cfg.eval.eval_every_steps and run.global_step % cfg.eval.eval_every_steps == 0 and not at_end:
            if validate(run, ft, val):    # (an epoch's end validates in train())
                run.save()
                keep_best(run)
        if run.after_step(stop_here):
            return True
    return False


@torch.no_grad()
def accuracy(model: torch.nn.Module, loader, device: torch.device) -> dict[str, float]:
    """Top-1 / top-5 (percent) over every rank's shard of the val images (counts summed over ranks)."""
    was_training = model.training
    model.eval()
    counts = torch.zeros(3, dtype=torch.float64, device=device)   # images, top-1 hits, top-5 hits
    for batch in loader:
        if batch.is_empty:
            continue
        hits = topk_correct(model(batch.images.to(device)), batch.labels.to(device))
        counts += torch.tensor([len(batch), hits[1], hits[5]], dtype=torch.float64, device=device)
    model.train(was_training)
    n, top1, top5 = dist_utils.all_reduce_sum(counts).tolist()
    return {"top1": 100.0 * top1 / max(n, 1), "top5": 100.0 * top5 / max(n, 1), "images": int(n)}


def validate(run: Run, ft: Finetune, val) -> bool:
    """Score the model (and its EMA) on the val images and log it; True when it is the best so far
    (``ft.best`` updated: the next checkpoint records it)."""
    with run.untimed():
        scores = accuracy(ft.model, val, run.device)
        if ft.ema is not None:
            ema = accuracy(ft.ema.module, val, run.device)
            scores.update(ema_top1=ema["top1"], ema_top5=ema["top5"])
    probe = (ft.pretrained or {}).get("probe")
    if probe:   # the start's own linear probe beside every result: did fine-tuning pay?
        scores["start_probe_top1"] = probe["top1"]
    run.logger.scalars(run.global_step, scores, (run.global_step - 1) // run.steps_per_epoch, group="val")
    if run.is_main:
        ema_text = f"; EMA {scores['ema_top1']:.2f}%" if ft.ema is not None else ""
        if probe:
            ema_text += f"; the start's linear probe {probe['top1']:.2f}% ({scores['top1'] - probe['top1']:+.2f})"
        print(f"[ssl_xcit] val at step {run.global_step}: top-1 {scores['top1']:.2f}%, top-5 {scores['top5']:.2f}% "
              f"({scores['images']} images){ema_text}", flush=True)
    if scores["top1"] <= ft.best.get("top1", -1.0):
        return False
    ft.best = {"top1": scores["top1"], "top5": scores["top5"], "global_step": run.global_step}
    return True


def fit_head_first(run: Run, ft: Finetune, val) -> None:
    """LP-FT's first half (:mod:`ssl_xcit.finetune.probe_head`): the head fitted on the frozen
    start's features, then scored on the val images exactly as every later validation is: that
    score is the start's linear probe measured the same way, shown beside each result after it."""
    with run.untimed():
        fitted = fit_probe_head(ft.model, ft.train_set, ft.val_set.transform, len(ft.classes), run.device,
                                seed=ft.cfg.run.seed, num_workers=min(ft.cfg.data.num_workers, 2))
        if ft.ema is not None:
            ft.ema.set(ft.model)   # the EMA starts from the fitted head too
        scores = accuracy(ft.model, val, run.device)
    probe = {"top1": scores["top1"], "on": f"the fitted head at step 0, the same {scores['images']} val images"}
    ft.pretrained = {**(ft.pretrained or {}), "probe": probe, "head_fit": fitted.selected}
    run.logger.event("head_fitted", images=fitted.images, top1=scores["top1"], top5=scores["top5"], **fitted.selected)
    if run.is_main:
        print(f"[ssl_xcit] {fitted.describe()}; its val top-1 {scores['top1']:.2f}% ({scores['images']} images)",
              flush=True)
    ft.best = {"top1": scores["top1"], "top5": scores["top5"], "global_step": 0}
    run.save()        # the probe is the first candidate for checkpoint_best.pth: a run that does not pass it
    keep_best(run)    # leaves the user the probe, said at the end (say_if_not_paid)


def say_if_not_paid(run: Run, ft: Finetune) -> None:
    """At the end of an LP-FT run that never passed its start's probe: say so, and which file holds it."""
    if run.is_main and ft.best.get("global_step") == 0 and (ft.pretrained or {}).get("head_fit"):
        print(f"[ssl_xcit] fine-tuning did not pass the start's linear probe ({ft.best['top1']:.2f}%): "
              f"{run.output_dir / BEST_NAME} holds the probe (step 0), checkpoint.pth the fine-tuned model",
              flush=True)
        run.logger.event("finetuning_not_paid", probe_top1=ft.best["top1"])


def keep_best(run: Run) -> None:
    """checkpoint.pth was just saved at the best validation: copy it as checkpoint_best.pth (atomic)."""
    if run.is_main and run.saved_step == run.global_step:
        atomic_write(run.output_dir / BEST_NAME, lambda tmp: shutil.copyfile(run.ckpt_path, tmp))
    dist_utils.barrier()
