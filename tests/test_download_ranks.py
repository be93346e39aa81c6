"""pretrained=True, download=True under a process group: one download per node, no hang on failure.

The logic is tested in one process with a faked process group (fast set). The real 2-process gloo
runs are in the heavy set: on this 2-core machine under CPU load, torch 2.14's gloo sometimes
completed the collective on one rank while the other waited until its peer closed the connection
(seen with dist.barrier and with all_reduce, so not a bug of this code), which made them flaky."""
import json
import os
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

NAME = "xcit-nano-12-p16_3rdparty_in1k"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, port: int, folder: str, fail: bool) -> None:
    from ssl_xcit.models import factory
    os.environ.update(SSL_XCIT_HOME=folder, LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)

    def fake_download(url, dst, hash_prefix=None, progress=True):
        Path(folder, f"download_by_rank{rank}").write_text(url)
        if fail:
            raise ConnectionError("no network here")
        Path(dst).write_bytes(b"weights")

    torch.hub.download_url_to_file = fake_download
    try:
        outcome = {"path": str(factory.pretrained_file(NAME, download=True))}
    except Exception as err:  # noqa: BLE001 - the test inspects it
        outcome = {"error": type(err).__name__, "message": str(err)}
    Path(folder, f"outcome{rank}.json").write_text(json.dumps(outcome))
    # keep this process (and its gloo connections) alive until the other rank is done too: a rank
    # that exits at once can close the socket under the other's still-finishing barrier
    deadline = time.time() + 60
    while not all(Path(folder, f"outcome{r}.json").exists() for r in (0, 1)) and time.time() < deadline:
        time.sleep(0.05)
    dist.destroy_process_group()


def _run(tmp_path: Path, fail: bool) -> list[dict]:
    mp.spawn(_rank_main, args=(_free_port(), str(tmp_path), fail), nprocs=2)
    return [json.loads((tmp_path / f"outcome{r}.json").read_text()) for r in (0, 1)]


class FakeGroup:
    """Stands in for torch.distributed: an initialised group of 2 whose barrier is recorded."""

    def __init__(self):
        self.barriers = 0

    def is_available(self):
        return True

    def is_initialized(self):
        return True

    def get_world_size(self):
        return 2

    def barrier(self):
        self.barriers += 1


@pytest.mark.parametrize("local_rank", [0, 1])
@pytest.mark.parametrize("fail", [False, True])
def test_download_coordination_logic_with_a_faked_group(tmp_path, monkeypatch, local_rank, fail):
    from ssl_xcit.models import factory
    group, calls = FakeGroup(), []
    monkeypatch.setattr(dist, "is_available", group.is_available)
    monkeypatch.setattr(dist, "is_initialized", group.is_initialized)
    monkeypatch.setattr(dist, "get_world_size", group.get_world_size)
    monkeypatch.setattr(dist, "barrier", group.barrier)
    monkeypatch.setenv("SSL_XCIT_HOME", str(tmp_path))
    monkeypatch.setenv("LOCAL_RANK", str(local_rank))

    def fake_download(url, dst, hash_prefix=None, progress=True):
        calls.append(url)
        if fail:
            raise ConnectionError("no network here")
        Path(dst).write_bytes(b"weights")

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    if local_rank == 0 and not fail:
        assert factory.pretrained_file(NAME, download=True).read_bytes() == b"weights"
    elif local_rank == 0:
        with pytest.raises(ConnectionError, match="no network here"):
            factory.pretrained_file(NAME, download=True)
    else:   # rank 1 never downloads; rank 0's file is not there in this single-process test
        with pytest.raises(FileNotFoundError, match=f"local rank 0.*{NAME}"):
            factory.pretrained_file(NAME, download=True)
    assert len(calls) == (1 if local_rank == 0 else 0)
    assert group.barriers == 1            # every rank meets the others once, also when failing


@pytest.mark.heavy
def test_only_local_rank_0_downloads_and_every_rank_gets_the_file(tmp_path):
    outcomes = _run(tmp_path, fail=False)
    assert sorted(p.name for p in tmp_path.glob("download_by_rank*")) == ["download_by_rank0"]
    assert outcomes[0] == outcomes[1] and Path(outcomes[0]["path"]).read_bytes() == b"weights"


@pytest.mark.heavy
def test_a_failed_download_fails_every_rank_without_hanging(tmp_path):
    outcomes = _run(tmp_path, fail=True)
    assert outcomes[0] == {"error": "ConnectionError", "message": "no network here"}
    assert outcomes[1]["error"] == "FileNotFoundError"
    assert "local rank 0" in outcomes[1]["message"] and NAME in outcomes[1]["message"]
