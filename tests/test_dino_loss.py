"""DINOLoss vs explicit float64 numpy loops; centre EMA vs the formula, incl. 2-process gloo."""
from __future__ import annotations

import math
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ssl_xcit.dino.loss import DINOLoss, teacher_stats, teacher_temperature


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def _log_softmax(x: np.ndarray) -> np.ndarray:
    z = x - x.max()
    return z - math.log(np.exp(z).sum())


def reference_loss(student, teacher, center, ncrops, n_global, t_temp, s_temp) -> float:
    """DINO's definition written out: loops over (teacher crop, student crop, sample)."""
    batch = student.shape[0] // ncrops
    total, pairs = 0.0, 0
    for iq in range(n_global):
        for v in range(ncrops):
            if v == iq:
                continue
            pairs += 1
            for b in range(batch):
                q = _softmax((teacher[iq * batch + b] - center[0]) / t_temp)
                logp = _log_softmax(student[v * batch + b] / s_temp)
                total += -sum(q[k] * logp[k] for k in range(len(q)))
    return total / (pairs * batch)


@pytest.mark.parametrize("ncrops,n_global,batch,dim", [(6, 2, 3, 11), (2, 2, 4, 5), (4, 1, 2, 7)])
def test_loss_matches_explicit_loops(ncrops, n_global, batch, dim):
    g = torch.Generator().manual_seed(ncrops * 100 + dim)
    student = torch.randn(ncrops * batch, dim, generator=g, dtype=torch.float64) * 3
    teacher = torch.randn(n_global * batch, dim, generator=g, dtype=torch.float64) * 3
    loss_fn = DINOLoss(dim, ncrops, warmup_teacher_temp=0.04, teacher_temp=0.07,
                       warmup_teacher_temp_epochs=5, nepochs=10, n_global_crops=n_global).double()
    center = torch.randn(1, dim, generator=g, dtype=torch.float64)
    loss_fn.center.copy_(center)
    epoch = 2
    t_temp = 0.04 + (0.07 - 0.04) * 2 / 4
    got = loss_fn(student, teacher, epoch).item()
    want = reference_loss(student.numpy(), teacher.numpy(), center.numpy(), ncrops, n_global, t_temp, 0.1)
    assert got == pytest.approx(want, rel=1e-12, abs=1e-12)


def test_loss_float32_close_to_float64_reference():
    g = torch.Generator().manual_seed(3)
    ncrops, batch, dim = 5, 4, 64
    student = torch.randn(ncrops * batch, dim, generator=g)
    teacher = torch.randn(2 * batch, dim, generator=g)
    loss = DINOLoss(dim, ncrops)(student, teacher, 0).item()
    want = reference_loss(student.double().numpy(), teacher.double().numpy(), np.zeros((1, dim)),
                          ncrops, 2, 0.04, 0.1)
    assert loss == pytest.approx(want, rel=1e-5)


def test_student_gradient_matches_closed_form():
    """d loss / d s_(v,b) = sum_{iq != v} (softmax(s/Ts) - q_iq) / (Ts * pairs * B)."""
    g = torch.Generator().manual_seed(4)
    ncrops, batch, dim, s_temp = 4, 3, 6, 0.1
    student = torch.randn(ncrops * batch, dim, generator=g, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(2 * batch, dim, generator=g, dtype=torch.float64, requires_grad=True)
    loss_fn = DINOLoss(dim, ncrops, student_temp=s_temp).double()
    loss_fn(student, teacher, 0).backward()
    assert teacher.grad is None  # the teacher is a target, never trained through the loss
    s = student.detach().numpy()
    t = teacher.detach().numpy()
    pairs = 2 * (ncrops - 1)
    want = np.zeros_like(s)
    for v in range(ncrops):
        for b in range(batch):
            p = _softmax(s[v * batch + b] / s_temp)
            for iq in range(2):
                if iq != v:
                    q = _softmax(t[iq * batch + b] / 0.04)
                    want[v * batch + b] += (p - q) / (s_temp * pairs * batch)
    np.testing.assert_allclose(student.grad.numpy(), want, rtol=1e-10, atol=1e-14)


def test_center_update_formula_two_steps():
    g = torch.Generator().manual_seed(5)
    dim, m = 8, 0.9
    loss_fn = DINOLoss(dim, 4, center_momentum=m).double()
    c = np.zeros((1, dim))
    for _ in range(2):
        teacher = torch.randn(6, dim, generator=g, dtype=torch.float64)
        old_center = loss_fn.center.clone()
        loss = loss_fn(torch.randn(12, dim, generator=g, dtype=torch.float64), teacher, 0)
        c = m * c + (1 - m) * teacher.numpy().mean(axis=0, keepdims=True)
        np.testing.assert_allclose(loss_fn.center.numpy(), c, rtol=1e-12)
        assert not torch.equal(old_center, loss_fn.center)
    assert "center" in loss_fn.state_dict()


def test_loss_uses_center_from_before_its_update():
    g = torch.Generator().manual_seed(8)
    dim = 5
    loss_fn = DINOLoss(dim, 3).double()
    c0 = torch.randn(1, dim, generator=g, dtype=torch.float64)
    loss_fn.center.copy_(c0)
    s = torch.randn(6, dim, generator=g, dtype=torch.float64)
    t = torch.randn(4, dim, generator=g, dtype=torch.float64) + 2.0
    got = loss_fn(s, t, 0).item()
    assert got == pytest.approx(reference_loss(s.numpy(), t.numpy(), c0.numpy(), 3, 2, 0.04, 0.1), rel=1e-12)
    new_c = loss_fn.center.numpy()
    assert got != pytest.approx(reference_loss(s.numpy(), t.numpy(), new_c, 3, 2, 0.04, 0.1), rel=1e-6)


def test_update_center_false_leaves_center():
    loss_fn = DINOLoss(4, 2)
    loss_fn(torch.randn(4, 4), torch.randn(4, 4), 0, update_center=False)
    assert torch.count_nonzero(loss_fn.center) == 0


def test_teacher_temperature_matches_dino_table():
    warm, final, w, n = 0.04, 0.07, 30, 100
    table = np.concatenate([np.linspace(warm, final, w), np.ones(n - w) * final])
    for epoch in range(n):
        assert teacher_temperature(epoch, warm, final, w) == pytest.approx(table[epoch], abs=1e-15)
    assert teacher_temperature(150, warm, final, w) == final  # extended run: constant
    assert teacher_temperature(0, warm, final, 1) == warm
    assert teacher_temperature(0, warm, final, 0) == final
    with pytest.raises(TypeError, match="integer"):
        teacher_temperature(1.5, warm, final, w)
    with pytest.raises(ValueError, match=">= 0"):
        teacher_temperature(-1, warm, final, w)


def test_teacher_stats_vs_numpy_and_extremes():
    g = torch.Generator().manual_seed(6)
    t = torch.randn(10, 7, generator=g, dtype=torch.float64)
    c = torch.randn(1, 7, generator=g, dtype=torch.float64)
    stats = teacher_stats(t, c, 0.5)
    probs = np.stack([_softmax(row) for row in (t.numpy() - c.numpy()) / 0.5])
    entropy = np.mean([-(p * np.log(p)).sum() for p in probs])
    mean = probs.mean(axis=0)
    kl = (mean * np.log(mean * 7)).sum()
    assert stats["teacher_entropy"].item() == pytest.approx(entropy, rel=1e-12)
    assert stats["teacher_kl_uniform"].item() == pytest.approx(kl, rel=1e-10)
    # uniform teacher: entropy log K, KL 0; collapsed teacher (one prototype): entropy 0, KL log K
    uni = teacher_stats(torch.zeros(4, 7), torch.zeros(1, 7), 0.04)
    assert uni["teacher_entropy"].item() == pytest.approx(math.log(7), rel=1e-6)
    assert uni["teacher_kl_uniform"].item() == pytest.approx(0.0, abs=1e-6)
    peaked = torch.zeros(4, 7)
    peaked[:, 2] = 100.0
    col = teacher_stats(peaked, torch.zeros(1, 7), 0.04)
    assert col["teacher_entropy"].item() == pytest.approx(0.0, abs=1e-6)
    assert col["teacher_kl_uniform"].item() == pytest.approx(math.log(7), rel=1e-6)


def test_last_stats_recorded_from_forward():
    loss_fn = DINOLoss(5, 3, warmup_teacher_temp=0.03, teacher_temp=0.06, warmup_teacher_temp_epochs=3,
                       nepochs=10)
    t = torch.randn(4, 5)
    loss_fn(torch.randn(6, 5, requires_grad=True), t, 1)
    want = teacher_stats(t, torch.zeros(1, 5), 0.045)
    assert loss_fn.last_stats["teacher_temp"] == pytest.approx(0.045)
    for k in want:
        assert not loss_fn.last_stats[k].requires_grad
        assert loss_fn.last_stats[k].item() == pytest.approx(want[k].item(), rel=1e-5)


def test_bfloat16_inputs_computed_in_float32():
    g = torch.Generator().manual_seed(7)
    s, t = torch.randn(8, 16, generator=g), torch.randn(4, 16, generator=g)
    loss_bf = DINOLoss(16, 4)(s.bfloat16(), t.bfloat16(), 0)
    assert loss_bf.dtype == torch.float32
    ref = reference_loss(s.bfloat16().double().numpy(), t.bfloat16().double().numpy(), np.zeros((1, 16)),
                         4, 2, 0.04, 0.1)
    assert loss_bf.item() == pytest.approx(ref, rel=1e-5)


@pytest.mark.parametrize("kwargs,match", [
    (dict(out_dim=4, ncrops=1), "ncrops >= 2"),
    (dict(out_dim=4, ncrops=4, n_global_crops=5), "n_global_crops"),
    (dict(out_dim=0, ncrops=4), "out_dim"),
    (dict(out_dim=4, ncrops=4, teacher_temp=0.0), "teacher_temp"),
    (dict(out_dim=4, ncrops=4, center_momentum=1.5), "center_momentum"),
    (dict(out_dim=4, ncrops=4, warmup_teacher_temp_epochs=200, nepochs=100), "warmup_teacher_temp_epochs"),
])
def test_bad_constructor_args(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DINOLoss(**kwargs)


def test_bad_shapes():
    loss_fn = DINOLoss(4, 3)
    with pytest.raises(ValueError, match="multiple of ncrops"):
        loss_fn(torch.randn(7, 4), torch.randn(4, 4), 0)
    with pytest.raises(ValueError, match="n_global_crops"):
        loss_fn(torch.randn(6, 4), torch.randn(6, 4), 0)
    with pytest.raises(ValueError, match="out_dim"):
        loss_fn(torch.randn(6, 5), torch.randn(4, 5), 0)
    with pytest.raises(TypeError, match="integer"):
        loss_fn(torch.randn(6, 4), torch.randn(4, 4), 0.5)


# ---------------------------------------------------------------- distributed centre (gloo, 2 ranks)

DIM, NCROPS, MOMENTUM = 6, 3, 0.8
ROWS = {0: 2, 1: 5}  # uneven per-rank batch sizes


def _rank_data(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(10 + rank)
    b = ROWS[rank]
    # offset per rank so that a mean of per-rank means differs from the true global mean
    return (torch.randn(NCROPS * b, DIM, generator=g, dtype=torch.float64),
            torch.randn(2 * b, DIM, generator=g, dtype=torch.float64) + 3.0 * rank)


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        loss_fn = DINOLoss(DIM, NCROPS, center_momentum=MOMENTUM).double()
        loss_fn.center.fill_(0.5)
        student, teacher = _rank_data(rank)
        loss = loss_fn(student, teacher, 0)
        torch.save({"center": loss_fn.center.clone(), "loss": loss.detach()}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_center_allreduce_uneven_batches_matches_single_process(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]

    teachers = [_rank_data(r)[1] for r in range(2)]
    single = DINOLoss(DIM, NCROPS, center_momentum=MOMENTUM).double()
    single.center.fill_(0.5)
    single.update_center(torch.cat(teachers))
    manual = 0.5 * MOMENTUM + (1 - MOMENTUM) * torch.cat(teachers).mean(0, keepdim=True)
    torch.testing.assert_close(single.center, manual, rtol=1e-12, atol=1e-12)
    for r in range(2):
        torch.testing.assert_close(results[r]["center"], manual, rtol=1e-12, atol=1e-12)
    # the test can tell the right answer from averaging per-rank means
    naive = 0.5 * MOMENTUM + (1 - MOMENTUM) * torch.stack([t.mean(0) for t in teachers]).mean(0, keepdim=True)
    assert (naive - manual).abs().max() > 0.1
    # the loss itself stays local to each rank
    for r in range(2):
        s, t = _rank_data(r)
        local = DINOLoss(DIM, NCROPS).double()
        local.center.fill_(0.5)
        assert results[r]["loss"].item() == pytest.approx(local(s, t, 0).item(), rel=1e-12)
