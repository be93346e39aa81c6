"""The run machinery every training loop here shares, apart from what the loop trains: DINO
pretraining (:mod:`ssl_xcit.train.loop`) and supervised fine-tuning (:mod:`ssl_xcit.finetune.loop`)
each hold a :class:`Run` and call it at the same places DINO's ``train_one_epoch`` does its
bookkeeping, so both loops read as their algorithm and neither carries the other's concerns.

What a :class:`Run` owns:

* **the output folder**: one run at a time (rank 0 holds ``train.lock``,
  :mod:`ssl_xcit.engine.lock`), ``config.yaml``, ``log.jsonl`` and TensorBoard
  (:class:`~ssl_xcit.engine.logger.RunLogger`). A start that fails before its logs open leaves the
  folder as it found it: a folder it created is removed again.
* **the position**: global step, steps per epoch, the epoch's batches from a
  :class:`~ssl_xcit.data.sampler.ResumableDistributedSampler` (exact resume mid-epoch, also on
  another number of processes), batches whose images all failed to load skipped on every rank.
* **the guards**: a non-finite loss is caught before ``backward`` on every rank (no update applied);
  a stop request (SIGTERM, SLURM's warning) is agreed by all ranks and saved at the step boundary;
  weights that are not finite are never saved, and once a run diverges (its loss far above normal,
  or its weights grown :data:`WEIGHT_GROWTH_LIMIT` times since the last checkpoint) the last
  checkpoint saved before is kept, not overwritten, so the command the error gives resumes from
  healthy weights.
* **checkpoints**: written atomically by rank 0 with every rank's RNG state, read back through
  :func:`~ssl_xcit.engine.checkpoint.load_checkpoint`; what is trained is a :class:`Trainable`, which
  gives its own part of the file and checks that a file fits before anything is loaded.
"""
from __future__ import annotations

import math
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

import torch

from ssl_xcit import distributed as dist_utils
from ssl_xcit.data.folders import Batch
from ssl_xcit.errors import UserError
from ssl_xcit.evaluate.report import write_report_at_end_of_run
from ssl_xcit.engine.checkpoint import (CHECKPOINT_NAME, CheckpointError, capture_rng_state, load_checkpoint,
                                       restore_rng_state, save_checkpoint)
from ssl_xcit.engine.unreadable import unreadable_message, warn_if_mostly_unreadable
from ssl_xcit.engine.lock import LOCK_NAME, OutputDirLock
from ssl_xcit.engine.logger import RunLogger


class NonFiniteLossError(UserError, RuntimeError):
    """The loss or the weights became NaN or infinite: no update applied, nothing saved; the
    message says what checkpoint.pth holds."""


class DataSetError(UserError, ValueError):
    """The images cannot be trained on: none given, too few for a batch, none readable."""


# a run whose batches are all unreadable this many steps in a row stops (rather than at epoch end)
MAX_EMPTY_STEPS_IN_A_ROW = 20
# weights whose RMS grew more than this many times since the last checkpoint (or the start) have
# exploded: no healthy run grows its weights 100x. Measured (2-core AMD EPYC, 2026-12-05): the
# quickstart's student + teacher end at 0.93x their start's RMS after 400 steps; lr=1e8 without
# clipping (tests' tiny recipe) grows them 3.96e6x in one step, while that step's loss is still finite.
WEIGHT_GROWTH_LIMIT = 100.0


@dataclass
class TrainResult:
    status: str                 # "finished" or "stopped" (a stop request, e.g. SLURM preemption)
    epoch: int                  # epoch the run was in when it returned
    global_step: int            # optimizer steps done in total
    checkpoint: Path | None     # the checkpoint written last
    last_loss: float = float("nan")


class Trainable(Protocol):
    """What a loop trains, as the run machinery sees it."""

    def state_dict(self) -> dict[str, Any]:
        """The loop's own part of checkpoint.pth (models, optimizer, loss state, ...)."""

    def check_fits(self, state: dict[str, Any], path: Path) -> None:
        """Raise :class:`CheckpointError` naming ``path`` when ``state`` cannot be loaded (another
        model, another kind of run); called before anything is loaded."""

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def weights(self) -> list[torch.Tensor]:
        """The floating-point tensors that must be finite (and not exploded) to be saved."""


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


class Run(dist_utils.OnRank):
    """One training run's folder, position, guards and checkpoints (see the module docstring).

    Built by :meth:`open` (which locks the folder), given its data and what it trains by
    :meth:`attach`, then driven by the loop: :meth:`resume`, :meth:`open_logs`, per epoch
    :meth:`epoch_batches`, per step :meth:`check_loss`, :meth:`step_done`, :meth:`log_due` /
    :meth:`log_scalars` and :meth:`after_step`, :meth:`end_epoch`, and :meth:`finish`.
    """

    def __init__(self, cfg: Any, rank: int, world_size: int, device: torch.device) -> None:
        self.cfg = cfg                   # the loop's config: .run (RunConfig), .to_dict(), .to_yaml()
        self.rank, self.world_size, self.device = rank, world_size, device
        self.output_dir = Path(cfg.run.output_dir)
        self.ckpt_path = self.output_dir / CHECKPOINT_NAME
        self.kind = ""                   # "dino", "finetune": recorded in checkpoints, checked on resume
        self.global_step = 0
        self.steps_per_epoch = 1
        self.total_steps = 0
        self.saved_step: int | None = None    # the global step checkpoint.pth holds (None: there is none)
        self.last_loss = float("nan")
        self.last_ckpt: Path | None = None
        self.logger: RunLogger | None = None
        self.counters = _Counters()
        self.dataset: Any = None
        self.sampler: Any = None
        self.trainable: Trainable | None = None
        self._checkpoint_extras: Callable[[], dict[str, Any]] | None = None   # more of the loop's state (budget)
        self.diverged: str | None = None      # why the run counts as diverging (checkpoints then kept)
        self._weights_rms: float | None = None
        self._progress: Any = None
        self._saved: dict | None = None

    @property
    def epoch(self) -> int:
        return self.global_step // self.steps_per_epoch

    # ------------------------------------------------------------------ the folder
    @classmethod
    @contextmanager
    def open(cls, cfg: Any, kind: str) -> Iterator["Run"]:
        """Seed, pick the device, lock ``output_dir`` (rank 0; all ranks agree on a refusal); on the
        way out close the logs and release the lock. A start that fails before :meth:`open_logs`
        removes the folder again when this start created it (a failed first start left it holding
        only ``train.lock``)."""
        rank, world_size = dist_utils.get_rank(), dist_utils.get_world_size()
        device = dist_utils.pick_device(cfg.run.device)
        if cfg.run.deterministic:
            torch.use_deterministic_algorithms(True)
        seed_everything(cfg.run.seed)   # the same initial weights on every rank
        run = cls(cfg, rank, world_size, device)
        run.kind = kind
        created = not run.output_dir.exists()
        _make_folder(run.output_dir)
        lock = run._lock()
        try:
            yield run
        except BaseException:
            if run.logger is None and created and run.is_main:
                _remove_new_folder(run.output_dir)
            raise
        finally:
            if run.logger is not None:
                run.logger.close()
            if lock is not None:
                lock.release()

    def _lock(self) -> OutputDirLock | None:
        """Rank 0 takes the folder's lock (the other ranks are the same run); all ranks agree on refusal."""
        lock, refusal = None, None
        if self.is_main:
            try:
                lock = OutputDirLock(self.output_dir).acquire()
            except UserError as err:   # raised after the other ranks know, so none waits
                refusal = err
            except OSError as err:
                refusal = UserError(f"cannot write to output_dir {self.output_dir}: {err.strerror}")
        (refused,) = dist_utils.any_rank_flags(refusal is not None, device=self.device)
        if refusal is not None:
            raise refusal
        if refused:
            raise UserError(f"rank 0 could not lock {self.output_dir}: another training uses it (rank 0 says who)")
        self._lock_taken_over = lock.took_over if lock is not None else None
        return lock

    def attach(self, trainable: Trainable, dataset: Any, sampler: Any, total_steps: int) -> None:
        """What the run trains and on what: the position's epochs are the sampler's."""
        self.trainable, self.dataset, self.sampler = trainable, dataset, sampler
        self.steps_per_epoch, self.total_steps = sampler.steps_per_epoch, total_steps

    def wire_checkpoint_extras(self, provider: Callable[[], dict[str, Any]]) -> None:
        """More of the loop's state in every checkpoint (DINO's time budget), given once: the budget is
        made from the attached run, so it cannot be passed to the run's constructor."""
        if self._checkpoint_extras is not None:
            raise RuntimeError("the checkpoint extras of this run are wired already")
        self._checkpoint_extras = provider

    def scalars(self, step: int, values: dict[str, float], epoch: int, group: str = "train") -> None:
        """One progress record into the run's logs once they are open (nothing before): the k-NN monitor
        is built before the logs open (a bad eval_data_path must stop the start first) and is given the
        run as its logger."""
        if self.logger is not None:
            self.logger.scalars(step, values, epoch, group=group)

    def open_logs(self, config_text: str, resumed: dict | None, choices: str | None = None,
                  **start_fields: Any) -> None:
        """config.yaml, log.jsonl and TensorBoard, written only now that the run is accepted."""
        self.logger = logger = RunLogger(self.output_dir, enabled=self.is_main, tensorboard=self.cfg.run.tensorboard)
        self.counters.t_last = time.perf_counter()
        if not self.is_main:
            return
        self.write_config(config_text)
        if choices and resumed is None:
            print(f"[ssl_xcit] {choices}", flush=True)
            logger.event("recipe_auto", choices=choices)
        old = self._lock_taken_over
        if old is not None:
            print(f"[ssl_xcit] took over the lock of a training that is gone ({old.describe()})", flush=True)
            logger.event("lock_taken_over", host=old.host, pid=old.pid, since=old.since)
        if resumed is None:
            logger.event("start", images=len(self.dataset), world_size=self.world_size,
                         steps_per_epoch=self.steps_per_epoch, total_steps=self.total_steps, **start_fields)
            return
        print(f"[ssl_xcit] resumed from {resumed['checkpoint']} at global step {resumed['global_step']} "
              f"(epoch {resumed['epoch']}, step {resumed['step']} of {self.steps_per_epoch})", flush=True)
        if resumed["converted_from_steps_per_epoch"] is not None:
            print(f"[ssl_xcit] the checkpoint had {resumed['converted_from_steps_per_epoch']} steps per epoch: "
                  "same images of the epoch done, position converted (lr schedule scaled to the new global batch)",
                  flush=True)
        logger.event("resume", **resumed)

    def write_config(self, text: str) -> None:
        if self.is_main:
            (self.output_dir / "config.yaml").write_text(text)

    # ------------------------------------------------------------------ resume
    def saved_state(self) -> dict | None:
        """checkpoint.pth of the folder, read once (``None`` when there is none): builders read what
        the run recorded (e.g. where its weights came from) before :meth:`resume` loads it."""
        if self._saved is None and self.ckpt_path.exists():
            self._saved = load_checkpoint(self.ckpt_path, map_location="cpu")
        return self._saved

    def pretrained_start(self, path: str, read: Callable[[], Any]) -> Any:
        """The file a new run starts from (``read()``: read now), or, when the run resumes, the
        facts its checkpoint recorded about it (so the run is the same without reading the file again)."""
        if not path:
            return None
        saved = self.saved_state()
        if saved is None:
            return read()
        if self.is_main:
            print(f"[ssl_xcit] {self.ckpt_path} exists: resuming it; pretrained_weights={path} is not used again",
                  flush=True)
        return saved.get("pretrained")

    def resume(self) -> tuple[dict | None, dict | None]:
        """Load checkpoint.pth if there is one: everything that shapes the next step comes back.

        Every check comes before any state changes and before anything is written, so a refused
        resume leaves the folder as it was. Returns (what to log about it, the loaded state), both
        ``None`` on a fresh start.
        """
        state = self.saved_state()
        self._saved = None   # loaded below: not held twice
        if state is None:
            self._weights_rms = _rms(self.trainable.weights())
            return None, None
        saved_kind = state.get("kind", "dino")
        if saved_kind != self.kind:
            raise CheckpointError(f"{self.ckpt_path} is a checkpoint of a {_KINDS.get(saved_kind, saved_kind)} run, "
                                  f"this is {_KINDS.get(self.kind, self.kind)}: use a new output_dir")
        self.trainable.check_fits(state, self.ckpt_path)
        converted_from = self._position_from(state)
        self.trainable.load_state_dict(state)
        self.global_step = self.saved_step = int(state["global_step"])
        if converted_from is not None:
            self.global_step = self.sampler.epoch * self.steps_per_epoch + self.sampler.start_step
        rng = state["rng"]
        restore_rng_state(rng[min(self.rank, len(rng) - 1)] if isinstance(rng, list) else rng)
        self._weights_rms = _rms(self.trainable.weights())
        epoch, step_in_epoch = divmod(self.global_step, self.steps_per_epoch)
        info = {"checkpoint": str(self.ckpt_path), "global_step": self.global_step, "epoch": epoch,
                "step": step_in_epoch, "converted_from_steps_per_epoch": converted_from}
        return info, state

    def _position_from(self, state: dict) -> int | None:
        """The data position of a checkpoint written with another number of steps per epoch (another
        global batch, e.g. a requeued job on fewer nodes): the same place of the same epoch's data
        order when the images already seen fill whole new batches. Returns the saved steps per epoch
        when converted, ``None`` when they are the same."""
        spe = self.steps_per_epoch
        saved_steps = state.get("steps_per_epoch", spe)
        if saved_steps == spe:
            return None
        where = (f"{self.ckpt_path} was written with {saved_steps} steps per epoch, this run has {spe} "
                 f"({len(self.dataset)} images, global batch {self.sampler.batch_size_per_rank * self.world_size})")
        if "sampler" not in state:
            raise CheckpointError(f"{where}: resume with the same images, batch_size_per_gpu and number "
                                  "of processes, or use a new output_dir")
        try:
            self.sampler.load_state_dict(state["sampler"], strict=True)
        except (KeyError, ValueError) as err:
            raise CheckpointError(f"{where}, and the position cannot be carried over: {err}. Resume "
                                  "with the old batch size or from an epoch-end checkpoint, or use a "
                                  "new output_dir") from None
        return saved_steps

    # ------------------------------------------------------------------ steps
    def epoch_batches(self, loader: Any, epochs: int) -> Iterator[Batch]:
        """The batches of the epoch the run is in, from its position to the epoch's end (or the
        run's), with a progress bar on rank 0. A batch in which some rank has no readable image is
        skipped on every rank (it counts as a step)."""
        spe = self.steps_per_epoch
        epoch, start_step = divmod(self.global_step, spe)
        self.sampler.set_epoch(epoch)
        self.sampler.set_start_step(start_step)
        steps_this_epoch = min(spe, self.total_steps - epoch * spe)
        self._progress = _progress(self.is_main, start_step, steps_this_epoch, epoch, epochs)
        try:
            for batch in loader:
                if self.global_step >= self.total_steps or self.global_step - epoch * spe >= steps_this_epoch:
                    break
                if self._count_and_skip_empty(batch):
                    continue
                yield batch
        finally:
            if self._progress is not None:
                self._progress.close()
                self._progress = None

    def check_loss(self, loss_value: float, stop_requested: Callable[[], bool] | None) -> bool:
        """Between forward and backward, as DINO: all ranks agree whether any rank's loss is not
        finite (then every rank stops, no update applied) and whether a stop was requested (then
        the run stops after this step). Returns the latter."""
        stop_here = stop_requested() if stop_requested is not None else False
        bad_loss, stop_here = dist_utils.any_rank_flags(not math.isfinite(loss_value), stop_here,
                                                        device=self.device)
        if bad_loss:
            where = (f"({loss_value})" if not math.isfinite(loss_value)
                     else f"on another rank (here {loss_value:.4g})")
            raise NonFiniteLossError(f"non-finite loss {where} at global step {self.global_step} "
                                     f"(epoch {self.epoch}): stopped, no update applied; {self.checkpoint_holds()}. "
                                     f"{self._advice()}")
        return stop_here

    def _advice(self) -> str:
        fp32 = "" if self.cfg.run.precision == "fp32" else ", or use precision=fp32"
        return f"Lower lr, raise warmup_epochs, or set clip_grad{fp32}"

    def step_done(self, loss_value: float, images: int, **postfix: float) -> None:
        """One optimizer step is done: count it and its images, move the progress bar."""
        self.global_step += 1
        self.last_loss = loss_value
        self.counters.images_seen += images * self.world_size
        if self._progress is not None:
            self._progress.update(1)
            self._progress.set_postfix(loss=f"{loss_value:.4f}", **{k: f"{v:.2e}" for k, v in postfix.items()})

    @contextmanager
    def untimed(self) -> Iterator[None]:
        """Work inside (an evaluation) is left out of the logged images/s."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.counters.t_last += time.perf_counter() - start

    def log_due(self) -> bool:
        return self.global_step % self.cfg.run.log_every_steps == 0 or self.global_step == self.total_steps

    def log_scalars(self, values: dict[str, float], epoch: int) -> dict[str, float]:
        """One log record (log.jsonl, TensorBoard) with images/s added; warns once when most images
        did not load. Returns the values logged."""
        c = self.counters
        now = time.perf_counter()
        values = {**values, "images_per_s": c.images_seen / max(now - c.t_last, 1e-9)}
        self.logger.scalars(self.global_step, values, epoch)
        self._warn_once_if_mostly_unreadable(c.run_loaded, c.run_skipped, min_tried=16)
        c.images_seen, c.t_last = 0, now
        return values

    def mark_diverging(self, why: str) -> None:
        """From now on checkpoint.pth is kept as it is (see :meth:`save`)."""
        if self.diverged is None:
            self.diverged = why

    def after_step(self, stop_here: bool) -> bool:
        """Save on a stop request (then True: the loop returns) or every ``save_every_steps``."""
        if stop_here:
            self.save()
            if self.is_main:
                print(f"[ssl_xcit] stop requested: {self._saved_or_kept()}", flush=True)
                self.logger.event("stopped", global_step=self.global_step, checkpoint=str(self.ckpt_path),
                                  checkpoint_step=self.saved_step)
            return True
        every = self.cfg.run.save_every_steps
        if every and self.global_step % every == 0:
            self.save()
        return False

    def _saved_or_kept(self) -> str:
        if self.saved_step == self.global_step:
            return f"saved {self.ckpt_path} at global step {self.global_step}"
        return self.checkpoint_holds()

    def _count_and_skip_empty(self, batch: Batch) -> bool:
        """Count loaded and unreadable images. When some rank's batch has none that loaded, every rank
        skips the step (it counts as done) and True is returned; many such steps in a row are an error."""
        c = self.counters
        c.epoch_loaded += len(batch)
        c.epoch_skipped += batch.n_skipped
        c.run_loaded += len(batch)
        c.run_skipped += batch.n_skipped
        if not dist_utils.any_rank(batch.is_empty, self.device):
            c.empty_steps_in_a_row = 0
            return False
        self.global_step += 1
        c.empty_steps_in_a_row += 1
        if c.empty_steps_in_a_row >= MAX_EMPTY_STEPS_IN_A_ROW:
            loaded, skipped = self.all_ranks_sum(c.run_loaded, c.run_skipped)
            raise DataSetError(unreadable_message(self.dataset, loaded, skipped, extra=f"{c.empty_steps_in_a_row} "
                                                  "steps in a row had a batch without one readable image"))
        return True

    def end_epoch(self) -> None:
        """At an epoch's end (or the run's): check that images loaded, save, log the epoch."""
        spe, c = self.steps_per_epoch, self.counters
        end_of_epoch = self.global_step % spe == 0
        if not (end_of_epoch or self.global_step >= self.total_steps):
            return
        done_epoch = (self.global_step - 1) // spe
        loaded, skipped = self.all_ranks_sum(c.epoch_loaded, c.epoch_skipped)
        if loaded == 0:
            raise DataSetError(unreadable_message(self.dataset, loaded, skipped))
        self._warn_once_if_mostly_unreadable(loaded, skipped, min_tried=1)
        freq = self.cfg.run.saveckp_freq
        keep = (f"checkpoint{done_epoch:04d}.pth" if end_of_epoch and freq and (done_epoch + 1) % freq == 0
                else None)
        self.save(keep)
        if skipped and self.is_main:
            print(f"[ssl_xcit] epoch {done_epoch}: skipped {skipped} unreadable images "
                  "(warnings above name them)", flush=True)
        self.logger.event("epoch_end", epoch=done_epoch, global_step=self.global_step, loss=self.last_loss,
                          skipped_images=skipped)
        c.epoch_loaded = c.epoch_skipped = 0
        self.logger.flush()

    def finish(self) -> TrainResult:
        """The run is done: its last event, then (unless ``report=false``) its report page."""
        if self.is_main:
            self.logger.event("finished", global_step=self.global_step, checkpoint=str(self.ckpt_path))
            if self.cfg.run.report:
                write_report_at_end_of_run(self.output_dir)    # never raises: a warning names the retry command
        return TrainResult("finished", self.epoch, self.global_step, self.last_ckpt or self.ckpt_path,
                           self.last_loss)

    def stopped(self) -> TrainResult:
        return TrainResult("stopped", self.epoch, self.global_step, self.last_ckpt, self.last_loss)

    def _warn_once_if_mostly_unreadable(self, loaded: int, skipped: int, min_tried: int) -> None:
        c = self.counters
        if not c.warned_unreadable:
            c.warned_unreadable = warn_if_mostly_unreadable(self.dataset, loaded, skipped, min_tried, self.logger,
                                                            self.is_main, self.global_step)

    def all_ranks_sum(self, *counts: int) -> tuple[int, ...]:
        total = dist_utils.all_reduce_sum(torch.tensor(counts, dtype=torch.float64, device=self.device))
        return tuple(int(v) for v in total.tolist())

    # ------------------------------------------------------------------ checkpoints
    def save(self, extra_name: str | None = None) -> Path | None:
        """Write checkpoint.pth (and ``extra_name``) atomically, on every rank's agreement: never
        weights that are not finite (an error), nor over the last healthy checkpoint once the run
        diverges (kept, said once)."""
        weights = self.trainable.weights()
        rms = _rms(weights)
        grew = self._weights_rms is not None and rms > WEIGHT_GROWTH_LIMIT * self._weights_rms
        bad, grew, diverged = dist_utils.any_rank_flags(not math.isfinite(rms), grew, self.diverged is not None,
                                                        device=self.device)
        if bad:
            raise NonFiniteLossError(f"weights are not finite after global step {self.global_step} "
                                     f"(last loss {self.last_loss:.4g}): stopped without saving them; "
                                     f"{self.checkpoint_holds()}. {self._advice()}")
        if grew:
            self.mark_diverging(f"its weights grew {rms / self._weights_rms:.3g}x (RMS {rms:.3g}) since "
                                f"{'global step ' + str(self.saved_step) if self.saved_step is not None else 'the start'}")
        if grew or diverged:
            self.mark_diverging("another rank saw the loss diverge")
            self._keep_healthy_checkpoint()
            return None
        state = self._checkpoint_state()   # collective under DDP: every rank takes part
        if self.is_main:
            save_checkpoint(state, self.ckpt_path)
            if extra_name:
                save_checkpoint(state, self.output_dir / extra_name)
        dist_utils.barrier()
        self.saved_step, self.last_ckpt, self._weights_rms = self.global_step, self.ckpt_path, rms
        return self.ckpt_path

    def _keep_healthy_checkpoint(self) -> None:
        if self.is_main and not getattr(self, "_told_kept", False):
            self._told_kept = True
            print(f"[ssl_xcit] warning: the run is diverging: {self.ckpt_path.name} is not overwritten from "
                  f"now on; {self.checkpoint_holds()}", flush=True)
            self.logger.event("checkpoint_kept", global_step=self.global_step, checkpoint_step=self.saved_step,
                              reason=self.diverged)

    def _checkpoint_state(self) -> dict:
        rng_states = [capture_rng_state()]
        if self.world_size > 1:   # every rank's RNG, so drop-path masks continue exactly on each rank
            gathered: list = [None] * self.world_size
            torch.distributed.all_gather_object(gathered, rng_states[0])
            rng_states = gathered
        gs, spe = self.global_step, self.steps_per_epoch
        return {"kind": self.kind, **self.trainable.state_dict(), **(self._checkpoint_extras or dict)(),
                "epoch": gs // spe, "global_step": gs, "steps_per_epoch": spe, "rng": rng_states,
                "config": self.cfg.to_dict(),
                # the data position in sampler terms, so a run with another global batch can resume
                "sampler": {**self.sampler.state_dict(), "epoch": gs // spe, "start_step": gs % spe}}

    def checkpoint_holds(self) -> str:
        """What checkpoint.pth holds now, for messages that stop the run (they must be true)."""
        if self.saved_step is None:
            return f"no checkpoint was written ({self.ckpt_path} does not exist)"
        if self.diverged is not None:
            return (f"{self.ckpt_path} holds global step {self.saved_step}, kept from before the run began to "
                    f"diverge ({self.diverged}): the same command resumes from there; lower lr first")
        return (f"{self.ckpt_path} holds global step {self.saved_step}, not overwritten (if the loss was already "
                "climbing, resume from an earlier checkpoint or start again with another lr)")


_KINDS = {"dino": "DINO pretraining", "finetune": "fine-tuning"}


# what a terminal, `timeout`, `scancel` or a closing session send to the whole process group
STOP_SIGNALS = ("SIGINT", "SIGTERM", "SIGHUP", "SIGUSR1", "SIGUSR2")


def worker_ignores_stop_signals(worker_id: int) -> None:
    """``worker_init_fn`` of the training loaders: a data-loading worker ignores the stop signals.

    Why: ``kill -TERM -- -PGID`` (GNU ``timeout``, ``scancel``; SIGHUP from a closing terminal,
    SIGINT from Ctrl-C) reaches the main process *and* its DataLoader workers at once. A worker
    that dies of it makes the main process raise "DataLoader worker (pid N) is killed by signal"
    before it can save, and the run is lost. Ignored here, the signal is the main process's alone:
    it finishes its step, saves and exits, and the loader then shuts its workers down (a worker
    also exits by itself when the main process is gone: PyTorch's worker watchdog).
    """
    import signal
    for name in STOP_SIGNALS:
        sig = getattr(signal, name, None)
        if sig is not None:
            signal.signal(sig, signal.SIG_IGN)


def seed_everything(seed: int) -> None:
    import numpy as np
    torch.manual_seed(seed)
    np.random.seed(seed)


def _rms(tensors: list[torch.Tensor]) -> float:
    """Root mean square over all the tensors' elements, in float64 (inf/nan when any is)."""
    total = sum(float(t.detach().double().pow(2).sum()) for t in tensors)
    count = sum(t.numel() for t in tensors)
    return math.sqrt(total / max(count, 1))


def _make_folder(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create output_dir {folder}: {err.strerror}") from None


def _remove_new_folder(folder: Path) -> None:
    """Undo a failed first start: the folder held nothing but the lock this start created."""
    leftovers = [p for p in folder.iterdir() if p.name != LOCK_NAME] if folder.is_dir() else []
    if not leftovers:
        shutil.rmtree(folder, ignore_errors=True)


def _progress(is_main: bool, start: int, total: int, epoch: int, epochs: int):
    if not is_main:
        return None
    from tqdm.auto import tqdm
    # redraw at most every 30 s into a log file (SLURM, CI), so logs stay readable
    interval = 0.1 if sys.stderr.isatty() else 30.0
    return tqdm(total=total, initial=start, desc=f"epoch {epoch + 1}/{epochs}", dynamic_ncols=True,
                leave=False, mininterval=interval)
