"""ssl_xcit.distributed.pick_device: the one device rule of training, evaluation and the quickstart."""
import pytest
import torch

from ssl_xcit.distributed import pick_device


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
