"""One command, one run: ``launch/train.py``, ``torchrun launch/train.py``, ``launch/submit.py
--cluster local`` and ``--cluster slurm`` resolve the same config, ``recipe: auto``'s choices included, and write the same
``config.yaml`` (a job used to rebuild its config from every resolved value, marking each as the
user's, so ``recipe: auto`` chose nothing there and the job trained DINO's ImageNet values)."""
from __future__ import annotations

import contextlib
import io
import os
import re
from pathlib import Path

import pytest

from ssl_xcit.commands.submit import main as submit_main, prepare, submit
from ssl_xcit.train.config import config_from_dict, load_config, user_set_keys, user_values
from ssl_xcit.train.loop import resolved_config
from tests.conftest import make_subset
from tests.slurm_cluster import local_slurm, wait_job_end, wait_until  # noqa: F401  (fixture)

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "configs" / "quickstart.yaml"


@pytest.fixture(scope="module")
def ninety(cifar_root, tmp_path_factory) -> Path:
    """90 real CIFAR-10 training images (9 per class): a data set recipe=auto fits."""
    return make_subset(cifar_root, tmp_path_factory.mktemp("ninety"), 9, 1)


def command(data: Path, out: Path, epochs: int) -> list[str]:
    return ["--config", str(QUICKSTART), f"data_path={data}", f"output_dir={out}", f"epochs={epochs}",
            "max_steps=2", "num_workers=0", "device=cpu", "report=false", "tensorboard=false"]


def config_yaml(out: Path) -> str:
    """The run's config.yaml with its own output folder blanked (the one word the commands differ in)."""
    return (out / "config.yaml").read_text().replace(str(out), "OUT")


@pytest.mark.parametrize("epochs", [1, 20])
def test_a_job_rebuilds_the_config_the_command_resolves_here(ninety, tmp_path, epochs):
    argv = command(ninety, tmp_path / "run", epochs)
    local = load_config(argv[1], argv[2:])
    _, prepared = prepare(["--cluster", "local", *argv])
    job = prepared.task.job_config()
    assert user_set_keys(job) == user_set_keys(local)
    mine, theirs = resolved_config(local), resolved_config(job)
    assert theirs.to_dict() == mine.to_dict()
    # recipe=auto chose for these 90 images (DINO's ImageNet head has 65,536 prototypes, no KoLeo)
    assert theirs.model.out_dim < 65536 and theirs.dino.koleo_loss_weight > 0


def test_user_values_round_trip_keeps_values_and_user_set_keys(tmp_path):
    cfg = load_config(QUICKSTART, ["lr=1e-3", "global_crops_scale=[0.3,1]", "fused=null", "seed=4",
                                   f"data_path={tmp_path}"])
    again = config_from_dict(user_values(cfg))
    assert again.to_dict() == cfg.to_dict()
    assert user_set_keys(again) == user_set_keys(cfg)
    assert "optim.warmup_epochs" not in user_set_keys(again)   # a default stays a default


def test_paths_are_absolute_whatever_the_launcher(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.tar").touch()
    cfg = load_config(None, ["data_path=images", "output_dir=~/runs/x", "eval_data_path=val"])
    assert cfg.data.data_path == str(tmp_path / "images")
    assert cfg.run.output_dir == os.path.expanduser("~/runs/x")
    assert cfg.eval.eval_data_path == str(tmp_path / "val")
    shards = load_config(None, ["data_path=a.tar,b.tar", "output_dir=o"]).data.data_path
    assert shards == f"{tmp_path / 'a.tar'},{tmp_path / 'b.tar'}"
    pattern = load_config(None, ["data_path=s/train-{000..009}.tar"]).data.data_path
    assert pattern == str(tmp_path / "s" / "train-{000..009}.tar")


@pytest.fixture(scope="module")
def train_py_yaml(ninety, tmp_path_factory) -> str:
    """config.yaml of ``launch/train.py``'s main with the command (epochs=1: DINO's 10 warm-up epochs
    do not fit), run in this process."""
    from ssl_xcit.commands.train import main
    out = tmp_path_factory.mktemp("train_py") / "run"
    assert main(command(ninety, out, 1)) == 0
    text = config_yaml(out)
    assert "# recipe: auto chose these for 90 images" in text
    return text


def test_submit_local_writes_the_config_yaml_of_train_py(ninety, tmp_path, train_py_yaml):
    out = tmp_path / "run"
    with contextlib.redirect_stdout(io.StringIO()):
        sub = submit(["--cluster", "local", *command(ninety, out, 1)])
    wait_until(sub.job.done, 600, f"local job {sub.job.job_id}")
    assert sub.job.exception() is None, sub.job.paths.stderr.read_text()
    assert config_yaml(out) == train_py_yaml


def test_torchrun_writes_the_config_yaml_of_train_py(ninety, tmp_path, train_py_yaml):
    """The same words under torchrun (its environment: RANK, WORLD_SIZE, a rendezvous; one process,
    as the command above) resolve the same config."""
    import subprocess
    import sys
    from tests.test_train_ddp import _free_port
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1",
                           "--master_port", str(_free_port()), str(REPO / "launch" / "train.py"),
                           *command(ninety, out, 1)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert config_yaml(out) == train_py_yaml


@pytest.mark.slurm
def test_slurm_job_writes_the_config_yaml_of_train_py(local_slurm, ninety, tmp_path, train_py_yaml,  # noqa: F811
                                                       monkeypatch):
    out = tmp_path / "run"
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert submit_main(["--cluster", "slurm", "--cpus-per-task", "1", *command(ninety, out, 1)]) == 0
    job_id = re.search(r"submitted job (\d+) \(slurm\)", stdout.getvalue()).group(1)
    state = wait_job_end(job_id, 900, out / "slurm" / f"{job_id}_0_log.err")
    assert state == "COMPLETED", (out / "slurm" / f"{job_id}_0_log.err").read_text()
    assert config_yaml(out) == train_py_yaml
