"""DINO loss: cross-entropy between the centred, sharpened teacher and the student, plus the centre.

Layout: ``student_output`` holds all ``ncrops`` crops, ``teacher_output`` the ``n_global_crops``
(2) global crops, both crop-major (rows ``[i*B, (i+1)*B)`` are crop ``i``), as produced by
:class:`ssl_xcit.dino.multicrop.MultiCropForward`. The loss averages ``H(teacher_iq, student_v)``
over every pair with ``v != iq`` and over the batch.

The centre (an EMA of the teacher's mean output) is the other half of DINO's collapse
prevention; it is a persistent buffer, so save ``loss.state_dict()`` with the checkpoint for an
exact resume. Its update uses the global batch mean: with torch.distributed initialised the
per-rank SUM and row COUNT are all-reduced (one packed collective, started before the loss is
computed so it overlaps), which stays exact when ranks hold different numbers of rows.

Epochs are integers, as in DINO: the teacher temperature changes once per epoch.
Softmaxes run in float32 for half-precision inputs (bf16/fp16 under autocast); float64 stays float64.
"""
from __future__ import annotations

import math
import operator

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def _as_epoch(epoch: object) -> int:
    try:
        value = operator.index(epoch)  # type: ignore[arg-type]
    except TypeError as err:
        raise TypeError(f"epoch must be an integer (DINO schedules change per epoch), got {epoch!r}") from err
    if value < 0:
        raise ValueError(f"epoch must be >= 0, got {value}")
    return value


def teacher_temperature(epoch: int, warmup_teacher_temp: float, teacher_temp: float,
                        warmup_teacher_temp_epochs: int) -> float:
    """Teacher temperature at ``epoch``: linear from warm-up to final over the warm-up epochs.

    Same values as DINO's ``np.linspace(warmup, final, W)`` table: epoch 0 gives
    ``warmup_teacher_temp``, epoch ``W-1`` gives ``teacher_temp``, constant afterwards (also past
    the planned number of epochs, so an extended run keeps going).
    """
    epoch = _as_epoch(epoch)
    if warmup_teacher_temp_epochs < 0:
        raise ValueError(f"warmup_teacher_temp_epochs must be >= 0, got {warmup_teacher_temp_epochs}")
    if epoch >= warmup_teacher_temp_epochs:
        return float(teacher_temp)
    if warmup_teacher_temp_epochs == 1:
        return float(warmup_teacher_temp)
    frac = epoch / (warmup_teacher_temp_epochs - 1)
    return float(warmup_teacher_temp + (teacher_temp - warmup_teacher_temp) * frac)


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """float32 for half types; float32/float64 stay as they are (float64 keeps tests exact)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _stats_from_log_probs(log_probs: torch.Tensor) -> dict[str, torch.Tensor]:
    probs = log_probs.exp()
    entropy = -(probs * log_probs).sum(dim=-1).mean()
    mean_probs = probs.mean(dim=0)
    kl_uniform = torch.special.xlogy(mean_probs, mean_probs).sum() + math.log(log_probs.shape[-1])
    return {"teacher_entropy": entropy.detach(), "teacher_kl_uniform": kl_uniform.detach()}


@torch.no_grad()
def teacher_stats(teacher_output: torch.Tensor, center: torch.Tensor, temp: float) -> dict[str, torch.Tensor]:
    """Collapse diagnostics of the sharpened teacher ``softmax((t - center) / temp)`` (this rank only).

    ``teacher_entropy``: mean per-row entropy (-> 0 when every image picks one prototype, i.e.
    over-sharpening); ``teacher_kl_uniform``: KL(mean distribution || uniform) (-> 0 when the
    batch spreads evenly over the prototypes, -> log K when all rows pick the same one).
    Both are 0-d detached tensors (no host sync).
    """
    log_probs = F.log_softmax((_upcast(teacher_output) - center) / temp, dim=-1)
    return _stats_from_log_probs(log_probs)


class DINOLoss(nn.Module):
    """``forward(student_output, teacher_output, epoch) -> scalar loss``; updates ``center``."""

    center: torch.Tensor

    def __init__(self, out_dim: int, ncrops: int, warmup_teacher_temp: float = 0.04,
                 teacher_temp: float = 0.04, warmup_teacher_temp_epochs: int = 0,
                 nepochs: int = 100, student_temp: float = 0.1, center_momentum: float = 0.9,
                 n_global_crops: int = 2) -> None:
        super().__init__()
        if out_dim < 1:
            raise ValueError(f"DINOLoss: out_dim must be >= 1, got {out_dim}")
        if not 1 <= n_global_crops <= ncrops or ncrops < 2:
            raise ValueError(f"DINOLoss: need ncrops >= 2 and 1 <= n_global_crops <= ncrops, got "
                             f"ncrops={ncrops} n_global_crops={n_global_crops}")
        for name, value in (("warmup_teacher_temp", warmup_teacher_temp), ("teacher_temp", teacher_temp),
                            ("student_temp", student_temp)):
            if not value > 0:
                raise ValueError(f"DINOLoss: {name} must be > 0, got {value}")
        if not 0.0 <= center_momentum <= 1.0:
            raise ValueError(f"DINOLoss: center_momentum must be in [0, 1], got {center_momentum}")
        if not 0 <= warmup_teacher_temp_epochs <= nepochs:
            raise ValueError(f"DINOLoss: warmup_teacher_temp_epochs={warmup_teacher_temp_epochs} must be "
                             f"in [0, nepochs={nepochs}]")
        self.out_dim = out_dim
        self.ncrops = ncrops
        self.n_global_crops = n_global_crops
        self.warmup_teacher_temp = warmup_teacher_temp
        self.teacher_temp = teacher_temp
        self.warmup_teacher_temp_epochs = warmup_teacher_temp_epochs
        self.nepochs = nepochs
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.last_stats: dict[str, torch.Tensor | float] = {}

    def temperature(self, epoch: int) -> float:
        return teacher_temperature(epoch, self.warmup_teacher_temp, self.teacher_temp,
                                   self.warmup_teacher_temp_epochs)

    def _check_shapes(self, student_output: torch.Tensor, teacher_output: torch.Tensor) -> int:
        if student_output.ndim != 2 or teacher_output.ndim != 2:
            raise ValueError(f"DINOLoss: outputs must be 2-D (rows, out_dim); got student "
                             f"{tuple(student_output.shape)}, teacher {tuple(teacher_output.shape)}")
        if student_output.shape[1] != self.out_dim or teacher_output.shape[1] != self.out_dim:
            raise ValueError(f"DINOLoss: out_dim is {self.out_dim} but student has {student_output.shape[1]} "
                             f"and teacher {teacher_output.shape[1]} columns")
        rows = student_output.shape[0]
        if rows == 0 or rows % self.ncrops:
            raise ValueError(f"DINOLoss: student_output has {rows} rows, not a positive multiple of "
                             f"ncrops={self.ncrops}")
        batch = rows // self.ncrops
        if teacher_output.shape[0] != self.n_global_crops * batch:
            raise ValueError(f"DINOLoss: teacher_output has {teacher_output.shape[0]} rows; expected "
                             f"n_global_crops*B = {self.n_global_crops}*{batch}")
        return batch

    def forward(self, student_output: torch.Tensor, teacher_output: torch.Tensor, epoch: int,
                update_center: bool = True) -> torch.Tensor:
        batch = self._check_shapes(student_output, teacher_output)
        temp = self.temperature(epoch)
        pending = self._start_center_reduction(teacher_output) if update_center else None

        t_log_probs = F.log_softmax((_upcast(teacher_output.detach()) - self.center) / temp, dim=-1)
        teacher = t_log_probs.exp().view(self.n_global_crops, batch, self.out_dim)
        student = F.log_softmax(_upcast(student_output) / self.student_temp, dim=-1)
        student = student.view(self.ncrops, batch, self.out_dim)
        student_sum = student.sum(dim=0)
        # sum over v != iq of <q_iq, log p_v> = <q_iq, sum_v log p_v - log p_iq>
        total = student.new_zeros(())
        for iq in range(self.n_global_crops):
            total = total - (teacher[iq] * (student_sum - student[iq])).sum()
        n_pairs = self.n_global_crops * (self.ncrops - 1)
        loss = total / (n_pairs * batch)

        self.last_stats = {**_stats_from_log_probs(t_log_probs.detach()), "teacher_temp": temp}
        if pending is not None:
            self._finish_center_update(*pending)
        return loss

    def _start_center_reduction(self, teacher_output: torch.Tensor):
        t = teacher_output.detach().to(self.center.dtype)
        count = torch.full((1,), float(t.shape[0]), dtype=t.dtype, device=t.device)
        packed = torch.cat([t.sum(dim=0), count])
        work = None
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            work = dist.all_reduce(packed, op=dist.ReduceOp.SUM, async_op=True)
        return packed, work

    @torch.no_grad()
    def _finish_center_update(self, packed: torch.Tensor, work) -> None:
        if work is not None:
            work.wait()
        batch_center = (packed[:-1] / packed[-1]).unsqueeze(0)
        self.center.mul_(self.center_momentum).add_(batch_center, alpha=1.0 - self.center_momentum)

    @torch.no_grad()
    def init_center(self, teacher_output: torch.Tensor) -> None:
        """Set the centre to the teacher's mean output over this batch (all ranks), instead of DINO's
        zero: a pretrained teacher's outputs are far from zero-mean, and a zero centre would let the
        first hundreds of steps sharpen the same few prototypes for every image."""
        packed, work = self._start_center_reduction(teacher_output)
        if work is not None:
            work.wait()
        self.center.copy_((packed[:-1] / packed[-1]).unsqueeze(0))

    @torch.no_grad()
    def update_center(self, teacher_output: torch.Tensor) -> None:
        """EMA of the (all-ranks) teacher batch mean; ``forward`` already calls this."""
        if teacher_output.ndim != 2 or teacher_output.shape[1] != self.out_dim:
            raise ValueError(f"update_center: teacher_output must be (rows, {self.out_dim}), got "
                             f"{tuple(teacher_output.shape)}")
        self._finish_center_update(*self._start_center_reduction(teacher_output))
