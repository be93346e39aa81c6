"""DINO's health checks, apart from the loop that calls them: a diverging loss, a collapsed teacher
(images that do not load: :mod:`ssl_xcit.engine.unreadable`). Each reads numbers the loop already has and warns (once, where
the caller says so) or builds the message of the error the loop raises; none changes the training.
"""
from __future__ import annotations

import json
import math
import warnings
from typing import TYPE_CHECKING

from ssl_xcit.engine.logger import RunLogger

if TYPE_CHECKING:
    from ssl_xcit.train.config import DinoConfig

# a loss above this many times ln(out_dim) is divergence, not learning (healthy: near or below 1x)
DIVERGED_LOSS_FACTOR = 3.0
# collapse (warn_if_collapsed), from the teacher's output at log steps, in units of ln K (K = out_dim).
# Measured on CIFAR-10 (2-core CPU, 2026-12-02), from step 20 on: healthy runs stay far from both
# limits -- the quickstart recipe (200 steps) at most entropy 0.89 and KL 0.02, the tests' tiny recipe
# (batch 8 and 16, no BatchNorm in the head) 0.82 and 0.08 -- while collapsed ones are past them at
# or soon after step 20: the quickstart without BatchNorm in the head (uniform) entropy 0.98 at step
# 20, 0.996 at 50; teacher_temp=1 (uniform) 0.999 from step 1; lr=0.5 in the tiny recipe (uniform)
# 0.97 at step 29, or at batch 8 KL 0.82 at step 24 before it turns uniform; no centring
# (center_momentum=0.9999) with teacher_temp=0.001 (one prototype) KL 1.00 from step 10, with
# teacher_temp=0.01 KL 0.80-0.85 from step 34 (the batch's 32 crops on about 3 of 256 prototypes).
COLLAPSE_FIRST_STEP = 20           # judged from this step on (a fresh teacher moves fast at first)
UNIFORM_ENTROPY_FRACTION = 0.97    # mean per-image teacher entropy >= this x ln K: uniform
ONE_PROTOTYPE_KL_FRACTION = 0.8    # KL(batch-mean teacher || uniform) >= this x ln K: one prototype
# images per rank below which that KL is not judged: a healthy, sharp teacher puts B images' 2B crops
# on about B prototypes, KL = ln K - ln B, for B = 4 and K = 256 already 0.75 ln K
ONE_PROTOTYPE_MIN_BATCH = 8


def warn_if_collapsed(values: dict, cfg: DinoConfig, step: int, logger: RunLogger, is_main: bool) -> bool:
    """Say once, early and clearly, that DINO has collapsed, which way, why, and what to change.

    DINO collapses two ways, both visible in the teacher's sharpened, centred output long before
    k-NN shows them (DINO paper, Fig. 7):

    - **uniform**: every image gets (nearly) the same flat distribution, so the teacher teaches
      nothing; its mean per-image entropy H reaches ln K (K = ``out_dim``). Judged by
      ``H >= UNIFORM_ENTROPY_FRACTION * ln K``.
    - **one prototype**: the whole batch lands on the same prototype(s); the KL of the batch-mean
      distribution from uniform reaches ln K. Judged by ``KL >= ONE_PROTOTYPE_KL_FRACTION * ln K``,
      i.e. the batch effectively uses at most ``K ** (1 - fraction)`` prototypes. Only with at least
      ``ONE_PROTOTYPE_MIN_BATCH`` images per rank: the crops of a few images use that few prototypes
      in a healthy run too.

    The loss alone does not tell: a healthy small run sits near ln K (the quickstart: 0.98 ln K).
    Checked at log steps from ``COLLAPSE_FIRST_STEP`` on (the first steps move a fresh teacher
    fast). Returns True when the caller need not check again: it warned now (console line, RuntimeWarning,
    ``collapse_warning`` event), or this run's log.jsonl already holds one (a resumed run is not told twice).
    """
    if not is_main or step < COLLAPSE_FIRST_STEP:
        return False
    out_dim = cfg.model.out_dim
    ln_k = math.log(out_dim)
    entropy, kl = values["teacher_entropy"], values["teacher_kl_uniform"]
    uniform = entropy >= UNIFORM_ENTROPY_FRACTION * ln_k
    one_prototype = (kl >= ONE_PROTOTYPE_KL_FRACTION * ln_k
                     and cfg.optim.batch_size_per_gpu >= ONE_PROTOTYPE_MIN_BATCH)
    if not (uniform or one_prototype):
        return False
    if _logged_before(logger, "collapse_warning"):
        return True
    d, seen = cfg.dino, (f"teacher entropy {entropy:.3f} ({entropy / ln_k:.0%} of ln(out_dim) {ln_k:.3f}), "
                         f"KL to uniform {kl:.3f}, loss {values['loss']:.3f}")
    if uniform:
        kind = "uniform teacher output"
        what = "the teacher gives every image a near-uniform distribution, so it teaches nothing"
        temp_now = values.get("teacher_temp", d.teacher_temp)
        temp = f"teacher_temp={d.teacher_temp:g}" + (f", now {temp_now:g}" if temp_now != d.teacher_temp else "")
        cause = (f"the teacher temperature is too high ({temp}), the centre outweighs the sharpening (the "
                 "features of a fresh backbone too alike), or the teacher follows the student too fast "
                 f"(momentum_teacher={d.momentum_teacher:g})")
        knob = ("lower teacher_temp (DINO: 0.04) or warm it up (warmup_teacher_temp=0.04, "
                "warmup_teacher_temp_epochs), raise momentum_teacher (towards 0.996-0.9995), and on small data "
                f"set use_bn_in_head=true (now {str(cfg.model.use_bn_in_head).lower()})")
    else:
        kind = "one prototype dominates the teacher output"
        what = (f"the whole batch falls on about {math.exp(ln_k - kl):.1f} of the {out_dim} prototypes")
        cause = (f"too low a teacher temperature (teacher_temp={d.teacher_temp:g}) or too weak a centre "
                 f"(center_momentum={d.center_momentum:g}), too large an lr (lr={cfg.optim.lr:g}), or out_dim "
                 f"too large for a small data set (out_dim={out_dim})")
        knob = ("raise teacher_temp a little (e.g. to 0.05-0.07), lower lr, lower out_dim, and on small data "
                f"set use_bn_in_head=true (now {str(cfg.model.use_bn_in_head).lower()})")
    msg = (f"run looks collapsed at global step {step}: {kind}: {what} ({seen}). Likely cause: {cause}. "
           f"Knob to turn: {knob}; then start again in a new output_dir (training goes on unchanged)")
    warnings.warn(msg, RuntimeWarning, stacklevel=2)
    print(f"[ssl_xcit] warning: {msg}", flush=True)
    logger.event("collapse_warning", global_step=step, kind=kind, teacher_entropy=entropy,
                 teacher_kl_uniform=kl, loss=values["loss"], ln_out_dim=ln_k, cause=cause, knob=knob)
    return True


def _logged_before(logger: RunLogger, event: str) -> bool:
    """Whether this run's log.jsonl (of an earlier start of the same run) holds ``event``."""
    if not logger.enabled or not logger.path.is_file():
        return False
    marker = f'"{event}"'
    with open(logger.path) as f:
        for line in f:
            if marker in line:
                try:
                    if json.loads(line).get("event") == event:
                        return True
                except (ValueError, AttributeError):   # a torn last line of a killed run
                    continue
    return False


def warn_if_diverging(values: dict, out_dim: int, step: int, logger: RunLogger, is_main: bool,
                      lr: float) -> bool:
    """DINO's loss is a cross-entropy over ``out_dim`` prototypes: it starts near ln(out_dim) and a
    healthy run stays near or below it. Far above it, the student's logits are blowing up: the run
    diverges (usually too high a learning rate). True when it warned (the caller warns once)."""
    ln_k = math.log(out_dim)
    if not is_main or values["loss"] <= DIVERGED_LOSS_FACTOR * ln_k:
        return False
    msg = (f"run is diverging at global step {step}: loss {values['loss']:.2e} is "
           f"{values['loss'] / ln_k:.0f}x ln(out_dim) {ln_k:.2f} (a healthy DINO loss stays near or below it). "
           f"Likely cause: the learning rate is too high for this batch (lr={lr:g} per 256 images): "
           "lower lr, raise warmup_epochs, or set clip_grad (DINO: 3.0)")
    warnings.warn(msg, RuntimeWarning, stacklevel=2)
    print(f"[ssl_xcit] warning: {msg}", flush=True)
    logger.event("divergence_warning", global_step=step, loss=values["loss"], ln_out_dim=ln_k)
    return True
