"""update_teacher vs a per-parameter Python loop; wrappers, name checks, buffers."""
from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
from torch import nn

from ssl_xcit.dino.ema import copy_student_to_teacher, unwrap, update_teacher


def _net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.GELU(), nn.Linear(6, 3)).double()


def _python_ema(student: nn.Module, teacher: nn.Module, m: float) -> dict[str, torch.Tensor]:
    s = dict(student.named_parameters())
    out = {}
    for name, t in teacher.named_parameters():
        out[name] = torch.tensor([m * a + (1 - m) * b for a, b in zip(t.detach().flatten().tolist(),
                                                                       s[name].detach().flatten().tolist())],
                                 dtype=torch.float64).view_as(t)
    return out


@pytest.mark.parametrize("m", [0.996, 0.5, 1.0, 0.0])
def test_matches_python_loop(m):
    student, teacher = _net(0), _net(1)
    want = _python_ema(student, teacher, m)
    update_teacher(student, teacher, m)
    for name, t in teacher.named_parameters():
        torch.testing.assert_close(t.detach(), want[name], rtol=1e-15, atol=1e-15)
    if m == 0.0:
        for (_, a), (_, b) in zip(student.named_parameters(), teacher.named_parameters()):
            assert torch.equal(a, b)


def test_two_steps_and_student_untouched():
    student, teacher = _net(0), _net(1)
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    want = _python_ema(student, teacher, 0.9)
    update_teacher(student, teacher, 0.9)
    for n, p in teacher.named_parameters():
        p.data.copy_(want[n])  # same values; keep going from the reference
    want = _python_ema(student, teacher, 0.7)
    update_teacher(student, teacher, 0.7)
    for n, p in teacher.named_parameters():
        torch.testing.assert_close(p.detach(), want[n], rtol=1e-15, atol=1e-15)
    for n, p in student.named_parameters():
        assert torch.equal(p, before[n])


def test_buffers_are_not_touched():
    student, teacher = _net(0), _net(1)
    student.train()(torch.randn(8, 4, dtype=torch.float64))  # moves the student's BN running stats
    t_buffers = {n: b.clone() for n, b in teacher.named_buffers()}
    update_teacher(student, teacher, 0.9)
    for n, b in teacher.named_buffers():
        assert torch.equal(b, t_buffers[n]), n


def test_compiled_wrapper_is_unwrapped():
    student, teacher = _net(0), _net(1)
    want = _python_ema(student, teacher, 0.8)
    update_teacher(torch.compile(student), teacher, 0.8)  # names carry an _orig_mod. prefix
    for name, t in teacher.named_parameters():
        torch.testing.assert_close(t.detach(), want[name])
    assert unwrap(torch.compile(student)) is student


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_wrapped_student():
    if dist.is_initialized():
        pytest.skip("another test left a process group open in this process")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        student, teacher = _net(0), _net(1)
        ddp = nn.parallel.DistributedDataParallel(student)
        assert next(iter(dict(ddp.named_parameters()))).startswith("module.")
        want = _python_ema(student, teacher, 0.9)
        update_teacher(ddp, teacher, 0.9)
        for name, t in teacher.named_parameters():
            torch.testing.assert_close(t.detach(), want[name])
        assert unwrap(ddp) is student
    finally:
        dist.destroy_process_group()


def test_name_and_shape_mismatch_errors():
    with pytest.raises(ValueError, match="names differ.*only in student.*only in teacher"):
        update_teacher(nn.Sequential(nn.Linear(2, 2)), nn.Sequential(nn.Identity(), nn.Linear(2, 2)), 0.9)
    with pytest.raises(ValueError, match="'0.weight'.*student shape"):
        update_teacher(nn.Sequential(nn.Linear(2, 3)), nn.Sequential(nn.Linear(3, 3)), 0.9)
    with pytest.raises(ValueError, match="momentum"):
        update_teacher(_net(0), _net(1), 1.5)


def test_copy_student_to_teacher():
    student, teacher = _net(0), _net(1)
    student.train()(torch.randn(8, 4, dtype=torch.float64))
    copy_student_to_teacher(student, teacher)
    for (n, a), b in zip(student.state_dict().items(), teacher.state_dict().values()):
        assert torch.equal(a, b), n
    assert not any(p.requires_grad for p in teacher.parameters())
    assert all(p.requires_grad for p in student.parameters())
