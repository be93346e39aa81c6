"""The collapse guard (issue 13) on real training runs: a run forced to collapse either way is told
so once -- one console line, one ``collapse_warning`` event -- with the kind, the values seen and the
knob to turn, also not again after a resume; a healthy run of the same recipe is told nothing.

Each run is the tiny recipe on real CIFAR-10 images, batch 8, global crops only, 20 steps (the
guard judges from step 20 on), a few seconds on one core. The forcings were chosen by measuring them
(ssl_xcit/train/health.py): a teacher temperature of 1 makes the teacher's output uniform; no
centring (center_momentum=0.9999) with teacher_temp=0.001 and a fast teacher (momentum 0.5) puts
the whole batch on one prototype within 10 steps (both also measured to step 60: they stay so). Each test first checks from the logged teacher
statistics that the run did (or did not) collapse, so the warning is judged against what happened.
"""
import json
import math

import pytest

from ssl_xcit.train.health import COLLAPSE_FIRST_STEP
from ssl_xcit.train.loop import train
from tests.train_helpers import tiny_config

CHEAP = dict(batch_size_per_gpu=8, max_images=400, epochs=1, warmup_epochs=0, local_crops_number=0,
             drop_path_rate=0.0, log_every_steps=5, max_steps=COLLAPSE_FIRST_STEP)
UNIFORM = dict(teacher_temp=1.0, warmup_teacher_temp=1.0)
ONE_PROTOTYPE = dict(center_momentum=0.9999, teacher_temp=0.001, warmup_teacher_temp=0.001, momentum_teacher=0.5)
WARNING = "[ssl_xcit] warning: run looks collapsed"


def _run(cifar_root, out, **overrides):
    """One training run; its train records from step 15 on, its collapse warnings (events), and the
    console lines that warn of collapse."""
    train(tiny_config(cifar_root, out, **{**CHEAP, **overrides}))
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    late = [r for r in records if r["event"] == "train" and r["global_step"] >= 15]
    return late, [r for r in records if r["event"] == "collapse_warning"]


def _console_warnings(capsys) -> list[str]:
    return [line for line in capsys.readouterr().out.splitlines() if line.startswith(WARNING)]


@pytest.mark.parametrize("forcing, kind, knobs", [
    (UNIFORM, "uniform teacher output", ["lower teacher_temp", "warmup_teacher_temp", "raise momentum_teacher"]),
    (ONE_PROTOTYPE, "one prototype dominates the teacher output",
     ["raise teacher_temp", "lower lr", "lower out_dim", "use_bn_in_head=true"]),
], ids=["uniform", "one_prototype"])
def test_a_collapsed_run_is_told_once_with_the_kind_and_the_knob(cifar_root, tmp_path, capsys, forcing, kind,
                                                                  knobs):
    out = tmp_path / "run"
    with pytest.warns(RuntimeWarning, match=kind):
        late, warned = _run(cifar_root, out, **forcing)
    ln_k = math.log(256)
    if forcing is UNIFORM:      # it did collapse: every image's teacher distribution is flat
        assert all(r["teacher_entropy"] > 0.99 * ln_k for r in late), [r["teacher_entropy"] for r in late]
    else:                       # ... the batch's mean teacher distribution sits on one prototype
        assert all(r["teacher_kl_uniform"] > 0.99 * ln_k for r in late), [r["teacher_kl_uniform"] for r in late]
    [line] = _console_warnings(capsys)
    assert line.startswith(f"{WARNING} at global step {COLLAPSE_FIRST_STEP}: {kind}: "), line
    assert "Likely cause: " in line and all(k in line for k in knobs), line
    assert f"teacher entropy {late[-1]['teacher_entropy']:.3f}" in line          # the values seen
    assert [(w["global_step"], w["kind"]) for w in warned] == [(COLLAPSE_FIRST_STEP, kind)]
    assert all(k in warned[0]["knob"] for k in knobs)

    # resumed for 10 more steps, still collapsed: not told again
    late, warned = _run(cifar_root, out, **forcing, max_steps=COLLAPSE_FIRST_STEP + 10)
    assert late[-1]["global_step"] == COLLAPSE_FIRST_STEP + 10
    assert late[-1]["teacher_entropy" if forcing is UNIFORM else "teacher_kl_uniform"] > 0.99 * ln_k
    assert len(warned) == 1 and _console_warnings(capsys) == []


def test_a_healthy_run_of_the_same_recipe_is_told_nothing(cifar_root, tmp_path, capsys):
    late, warned = _run(cifar_root, tmp_path / "run")
    ln_k = math.log(256)
    assert late[-1]["global_step"] == COLLAPSE_FIRST_STEP      # the guard had its look
    judged = late[-1]                          # far from both limits (0.97 and 0.8 ln K) where judged
    assert judged["teacher_entropy"] < 0.9 * ln_k and judged["teacher_kl_uniform"] < 0.3 * ln_k, judged
    assert warned == [] and _console_warnings(capsys) == []
