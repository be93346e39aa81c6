"""ssl_xcit.distributed.pick_device: the one device rule of training, evaluation and the quickstart."""
import pytest
import torch

from ssl_xcit import cli
from ssl_xcit.distributed import DeviceError, init_distributed, pick_device
from ssl_xcit.errors import UserError
from tests.train_helpers import tiny_overrides


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture
def two_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)


def test_without_gpu_auto_and_cpu_give_cpu(no_gpu):
    assert pick_device("auto") == torch.device("cpu") and pick_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("name", ["cuda", "cuda:0"])
def test_cuda_without_gpu_is_an_error_not_a_cpu_run(no_gpu, name):
    with pytest.raises(RuntimeError, match=f"device {name} was asked for but torch sees no CUDA GPU"):
        pick_device(name)


@pytest.mark.parametrize("name", ["gpu", "cuda:x", "", "CPU"])
def test_unknown_names_are_refused(name):
    with pytest.raises(ValueError, match="device must be auto, cpu, cuda or cuda:N"):
        pick_device(name)


def test_with_gpus_auto_follows_local_rank_or_current_device(two_gpus):
    assert pick_device("auto") == torch.device("cuda", 1)            # the current device
    assert pick_device("cuda", local_rank=2) == torch.device("cuda", 0)   # local rank modulo GPUs per node
    assert pick_device("cuda:1") == torch.device("cuda", 1)
    assert pick_device("cpu", local_rank=1) == torch.device("cpu")


def test_cuda_index_beyond_the_gpus_is_refused(two_gpus):
    with pytest.raises(DeviceError, match=r"device cuda:7 was asked for but torch sees 2 GPU\(s\) \(cuda:0 to cuda:1\)"):
        pick_device("cuda:7")


@pytest.mark.parametrize("call, builtin", [
    (lambda: pick_device("gpu"), ValueError),
    (lambda: pick_device("cuda"), RuntimeError),
    (lambda: init_distributed("cpu"), RuntimeError),        # WORLD_SIZE=2 without MASTER_ADDR / MASTER_PORT
])
def test_device_mistakes_are_user_errors_and_keep_their_builtin(no_gpu, monkeypatch, call, builtin):
    """A UserError (one line on a command line, exit 2), still caught as the builtin it was before."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(builtin) as info:
        call()
    assert isinstance(info.value, UserError)


def test_train_with_device_cuda_on_a_cpu_machine_is_one_line(no_gpu, cifar_small, tmp_path, capsys):
    """``launch/train.py ... device=cuda`` without a GPU: one line, exit status 2, nothing written."""
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as info:
        cli.run("ssl_xcit.commands.train:main", tiny_overrides(cifar_small, out, device="cuda"), prog="launch/train.py")
    assert info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == ["launch/train.py: error: device cuda was asked for but torch sees no CUDA GPU; use cpu or auto"]
    assert not out.exists()
