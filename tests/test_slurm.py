"""The SLURM launcher: argument checks and sbatch rendering (fast), stop-and-requeue through
submitit's local executor (fast), and real jobs on a local SLURM (``-m slurm``, a few minutes)."""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import cloudpickle
import pytest
import torch
from submitit.core.utils import DelayedSubmission

from tests import slurm_cluster
from tests.slurm_cluster import (FakeTraining, PacedTraining, events, fake_events, job_info, last_step,
                           local_slurm, wait_job_end, wait_until)
from ssl_xcit.cluster import environment, stopping
from ssl_xcit.cluster.stopping import REQUEUE, TERMINATE, StopRendezvous, StopSignals, decide
from ssl_xcit.commands.submit import main, prepare, split_tool, submit
from ssl_xcit.cluster.tasks import EvalTask
from tests.train_helpers import assert_same_weights, load_weights

cloudpickle.register_pickle_by_value(slurm_cluster)   # jobs cannot import tests/ by name

TINY = """\
model: {arch: xcit_nano_12_p16, out_dim: 256, head_hidden_dim: 64, head_bottleneck_dim: 32}
data: {global_crops_size: 32, local_crops_size: 16, local_crops_number: 2, num_workers: 0}
optim: {batch_size_per_gpu: 8, epochs: 1, warmup_epochs: 0}
run: {precision: fp32, device: cpu, tensorboard: false, log_every_steps: 1, seed: 3}
"""


@pytest.fixture
def tiny_yaml(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY)
    return path


@pytest.fixture
def no_slurm_path(tmp_path: Path, monkeypatch) -> Path:
    """A PATH with no SLURM client on it (the python interpreter is called by absolute path)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", str(bin_dir))
    return bin_dir


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    assert err.startswith("launch/submit.py: error: "), err
    return err


# --------------------------------------------------------------------------- command line (fast)
@pytest.mark.parametrize("extra, expected, absent", [
    (["--nodes", "2", "--gpus-per-node", "4"],
     ["--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4"], []),
    (["--tasks-per-node", "3"], ["--nodes=1", "--ntasks-per-node=3"], ["--gpus-per-node"]),
])
def test_dry_run_renders_the_sbatch_script_without_slurm(no_slurm_path, tiny_yaml, tmp_path, capsys,
                                                         extra, expected, absent):
    out_dir = tmp_path / "run"
    argv = ["--dry-run", "--config", str(tiny_yaml), f"data_path={tmp_path}", f"output_dir={out_dir}",
            "--partition", "gpu", "--account", "acc", "--qos", "high", "--constraint", "volta32gb",
            "--comment", "dino", "--mem-per-gpu", "40G", "--cpus-per-task", "10", "--timeout", "600",
            "--slurm", "mail-type=END", "--slurm", "exclusive", *extra]
    assert main(argv) == 0
    script = capsys.readouterr().out
    for flag in [*expected, "--partition=gpu", "--account=acc", "--qos=high", "--constraint=volta32gb",
                 "--comment=dino", "--mem-per-gpu=40G", "--cpus-per-task=10", "--time=600",
                 "--mail-type=END", "--exclusive", "--requeue", "--signal=USR2@90"]:
        assert f"#SBATCH {flag}\n" in script, f"{flag} missing from:\n{script}"
    for flag in absent:
        assert f"#SBATCH {flag}" not in script
    assert f"--output {out_dir / 'slurm'}/%j_%t_log.out" in script   # default job dir: <output_dir>/slurm
    assert "-m submitit.core._submit" in script
    assert not out_dir.exists(), "a dry run must not create anything"


def test_resource_errors_name_the_launchers_own_flags(capsys, tiny_yaml, tmp_path):
    base = ["--dry-run", "--config", str(tiny_yaml), f"data_path={tmp_path}"]
    assert main([*base, "--timeout", "0"]) == 2
    assert "--timeout must be at least 1" in one_line_error(capsys)
    assert main([*base, "--signal-delay", "-5"]) == 2
    assert "--signal-delay must be >= 0" in one_line_error(capsys)


def test_one_task_per_gpu_is_enforced(capsys, tiny_yaml, tmp_path):
    argv = ["--dry-run", "--config", str(tiny_yaml), f"data_path={tmp_path}", "--gpus-per-node", "8",
            "--tasks-per-node", "2"]
    assert main(argv) == 2
    assert "--tasks-per-node (2) must equal --gpus-per-node (8)" in one_line_error(capsys)


@pytest.mark.parametrize("fake_srun", [False, True])
def test_no_sbatch_on_the_path_is_one_clear_line(no_slurm_path, tiny_yaml, tmp_path, capsys, fake_srun):
    if fake_srun:   # srun alone makes "auto" pick SLURM, which then lacks sbatch
        (no_slurm_path / "srun").write_text("#!/bin/sh\nexit 1\n")
        (no_slurm_path / "srun").chmod(0o755)
    cluster = "auto" if fake_srun else "slurm"
    out_dir = tmp_path / "run"
    argv = ["--cluster", cluster, "--config", str(tiny_yaml), f"data_path={tmp_path}", f"output_dir={out_dir}"]
    assert main(argv) == 2
    assert "'sbatch' is not on the PATH" in one_line_error(capsys)
    assert not out_dir.exists()


@pytest.mark.parametrize("overrides, message", [
    (["lr=fast"], "lr must be a number"),
    (["learning_rate=1e-3"], "unknown config key 'learning_rate'"),
    (["data_path="], "data_path is not set"),
    (["data_path=/no/such/images"], "data_path /no/such/images does not exist"),
])
def test_config_errors_are_caught_before_submitting(tiny_yaml, tmp_path, capsys, overrides, message):
    out_dir = tmp_path / "run"
    argv = ["--cluster", "local", "--config", str(tiny_yaml), f"data_path={tmp_path}",
            f"output_dir={out_dir}", *overrides]
    assert main(argv) == 2
    err = one_line_error(capsys)
    assert "config error" in err and message in err, err
    assert not out_dir.exists(), "nothing may be created before the config is known to be good"


def test_missing_config_file_and_bad_usage_are_one_line(capsys, tmp_path):
    assert main(["--config", str(tmp_path / "nope.yaml")]) == 2
    assert "config file not found" in one_line_error(capsys)
    assert main(["--nodes", "two", "--config", "x.yaml"]) == 2
    assert "invalid int value: 'two'" in one_line_error(capsys)
    assert main([]) == 2
    assert "nothing to run" in one_line_error(capsys)


def test_evaluation_tools_get_the_words_after_their_name(tmp_path, no_slurm_path, capsys):
    tool_words = ["--checkpoint", "ckpt.pth", "--data-path", "data", "--nb-knn", "3"]
    argv = ["--gpus-per-node", "2", "--job-name", "eval_knn", "--job-dir", str(tmp_path / "jobs"),
            "eval_knn", *tool_words]
    assert split_tool(argv) == (argv[:6], "eval_knn", tool_words)   # --job-name's value is not the tool
    args, prep = prepare(argv)
    assert isinstance(prep.task, EvalTask) and prep.task.tool == "eval_knn"
    assert prep.task.argv == tool_words
    assert prep.spec.job_name == "eval_knn" and prep.spec.tasks_per_node == 2
    assert prep.job_dir == tmp_path / "jobs"
    _, prep = prepare(["export_features", "--out", str(tmp_path / "feats"), "--checkpoint", "c.pth",
                       "--data-path", "data"])
    assert prep.job_dir == tmp_path / "feats" / "slurm"   # default: beside the tool's own output
    # the tool's own parser runs before submitting: a typo is one line, not a failed job
    assert main(["--cluster", "slurm", "eval_knn", "--checkpoint", "c.pth", "--nb-knm", "5"]) == 2
    assert "eval_knn: " in (err := one_line_error(capsys)) and "--nb-knm" in err
    assert main(["--config", "x.yaml", "eval_linear", "--epochs", "1"]) == 2
    assert "--config and key=value overrides are for training" in one_line_error(capsys)


@pytest.mark.parametrize("argv, message", [
    (["--dry-run", "eval_knnn", "--checkpoint", "c.pth", "--data-path", "d"],
     "unknown tool 'eval_knnn'; did you mean 'eval_knn'?"),
    (["--dry-run", "--nodes", "2", "evl_linear", "--epochs", "1"], "unknown tool 'evl_linear'; did you mean 'eval_linear'?"),
    (["--dry-run", "configs/x.yaml"], "unknown tool 'configs/x.yaml'; known tools: finetune, eval_knn"),
])
def test_misspelt_tool_name_is_named_with_the_closest_tool(no_slurm_path, capsys, argv, message):
    assert main(argv) == 2
    assert message in one_line_error(capsys)


def test_tool_words_are_checked_without_importing_torch(tmp_path):
    """The submitting node parses a tool's words with the torch-free parser (fast, no GPU stack)."""
    code = ("import sys\n"
            "from ssl_xcit.commands.submit import main\n"
            "status = main(['--dry-run', '--job-dir', sys.argv[1], 'eval_knn', '--nb-knn', 'x'])\n"
            "assert status == 2, status\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "jobs")], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "invalid int value: 'x'" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


# --------------------------------------------------------------------------- inside a task (fast)
def test_torchrun_variables_come_from_the_slurm_job(monkeypatch):
    slurm = {"SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": "4242", "SLURM_NTASKS": "16",
             "SLURM_JOB_NUM_NODES": "2", "SLURM_NODEID": "1", "SLURM_PROCID": "9", "SLURM_LOCALID": "1",
             "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_RESTART_COUNT": "2",
             "RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "stale", "MASTER_PORT": "1"}  # inherited junk
    for key, value in slurm.items():
        monkeypatch.setenv(key, value)
    for key in ("SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    task = environment.export_torch_env()
    assert (task.job_id, task.restart, task.run_id) == ("4242", 2, "4242.2")
    got = {k: os.environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR")}
    assert got == {"RANK": "9", "WORLD_SIZE": "16", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "8",
                   "MASTER_ADDR": "gpu07"}
    port = int(os.environ["MASTER_PORT"])
    assert 20000 <= port < 60000 and port == environment.master_port("4242", 2)
    # a requeued run (restart 3) of the same job must not reuse the port
    assert environment.master_port("4242", 3) != port


def test_signals_only_set_a_flag():
    saved = {s: signal.getsignal(s) for s in (signal.SIGUSR2, signal.SIGTERM)}
    lines: list[str] = []
    try:
        flags = StopSignals(log=lines.append).install()
        assert not flags.stop_requested() and not lines
        os.kill(os.getpid(), signal.SIGUSR2)
        assert flags.stop_requested() and flags.reasons == [REQUEUE]
        os.kill(os.getpid(), signal.SIGTERM)   # the process survives: it only records
        assert flags.reasons == [REQUEUE, TERMINATE]
        assert flags.stop_requested() and len(lines) == 1 and "SIGUSR2" in lines[0]
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


@pytest.mark.parametrize("reasons, done, max_requeues, with_ckpt, requeue, words", [
    ({REQUEUE}, 0, 2, True, True, "requeue 1 of at most 2"),
    ({REQUEUE, TERMINATE}, 1, 2, True, True, "requeue 2 of at most 2"),
    ({REQUEUE}, 2, 2, True, False, "max_requeues=2 reached"),   # the job says the launcher's flag (below)
    ({TERMINATE}, 0, 2, True, False, "stopped on SIGTERM, not requeued"),
    ({REQUEUE}, 0, 2, False, False, "no checkpoint was written"),
])
def test_requeue_decision(tmp_path, reasons, done, max_requeues, with_ckpt, requeue, words):
    ckpt = tmp_path / "checkpoint.pth"
    if with_ckpt:
        ckpt.write_bytes(b"x")
    decision = decide(reasons, done, max_requeues, ckpt if with_ckpt else None)
    assert decision.requeue is requeue and words in decision.message


def test_rendezvous_collects_every_rank_and_names_the_missing(tmp_path):
    folder = stopping.rendezvous_folder(tmp_path, "77.0", 1)
    ranks = [StopRendezvous(folder, r, 3, poll_s=0.01) for r in range(3)]
    ranks[1].report([TERMINATE])
    ranks[2].report([REQUEUE])
    reasons, missing = ranks[0].gather(timeout_s=0.05)
    assert reasons == {TERMINATE, REQUEUE} and missing == [0]
    assert ranks[1].wait_decision(timeout_s=0.05) is None
    waiter = threading.Thread(target=lambda: ranks[0].publish(decide({REQUEUE}, 0, 1, None)))
    waiter.start()
    got = ranks[1].wait_decision(timeout_s=10)
    waiter.join()
    assert got is not None and got.requeue is False


# --------------------------------------------------------------------------- local executor jobs
def _wait_local(job, timeout_s: float = 120):
    wait_until(job.done, timeout_s, f"local job {job.job_id}")
    return job.results()


def test_local_job_stops_on_the_signal_requeues_once_and_resumes(tmp_path, tiny_yaml):
    """A 2-task job through submitit's local executor: rank 1 alone gets USR2 after step 3; both
    ranks stop there, rank 0 checkpoints and requeues once, the next run resumes at step 3."""
    out_dir = tmp_path / "run"
    fake = FakeTraining(steps=8, step_s=0.05, signal_at_step=3, signal_rank=1)
    sub = submit(["--cluster", "local", "--tasks-per-node", "2", "--max-requeues", "2", "--config",
                  str(tiny_yaml), f"data_path={tmp_path}", f"output_dir={out_dir}"], train_fn=fake)
    results = _wait_local(sub.job)
    assert [r.status for r in results] == ["finished", "finished"]
    assert results[0].total == sum(3.0 * s for s in range(1, 9))   # as if never interrupted
    assert [(e["event"], e["step"]) for e in fake_events(out_dir)] == [
        ("start", 0), ("stopped", 3), ("resume", 3), ("finished", 8)]
    log = sub.job.paths.stdout.read_text()
    assert log.count("[cluster] requeueing (requeue 1 of at most 2)") == 1, log
    assert DelayedSubmission.load(sub.job.paths.submitted_pickle).function.requeues_done == 1


def test_local_job_past_max_requeues_ends_stopped_with_its_checkpoint(tmp_path, tiny_yaml):
    out_dir = tmp_path / "run"
    fake = FakeTraining(steps=6, step_s=0.05, signal_at_step=2, signal_rank=0)
    sub = submit(["--cluster", "local", "--max-requeues", "0", "--config", str(tiny_yaml),
                  f"data_path={tmp_path}", f"output_dir={out_dir}"], train_fn=fake)
    (result,) = _wait_local(sub.job)
    assert result.status == "stopped" and result.global_step == 2
    assert (out_dir / "fake_checkpoint.pt").exists()
    assert "NOT requeued: --max-requeues=0 reached" in sub.job.paths.stdout.read_text()


# --------------------------------------------------------------------------- a real SLURM
JOB_TIMEOUT_S = 900


def _main_job_id(argv: list[str]) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(argv) == 0, out.getvalue()
    match = re.search(r"submitted job (\d+) \(slurm\)", out.getvalue())
    assert match, out.getvalue()
    return match.group(1)


@pytest.fixture(scope="module")
def slurm_runs(local_slurm, cifar_small, tmp_path_factory):
    """Three 2-task jobs submitted together so they overlap (the test cluster oversubscribes its CPUs):

    - straight: 8 training steps, uninterrupted;
    - preempted: the same run; USR2 is sent (``scancel --signal=USR2``) once it logged step 2;
    - time_limit: 12 steps, 1 minute limit, warning 15 s before; the first run is paced so it is
      still running at the warning. Once it has requeued itself, its limit is raised to 10 minutes
      so that the resumed run's finish does not race the next warning on a slow machine.
    """
    root = tmp_path_factory.mktemp("slurm_runs")
    yaml_path = root / "tiny.yaml"
    yaml_path.write_text(TINY)
    common = ["--cluster", "slurm", "--tasks-per-node", "2", "--cpus-per-task", "1", "--config",
              str(yaml_path), f"data_path={cifar_small}"]
    dirs = {name: root / name for name in ("straight", "preempted", "time_limit")}
    ids: dict[str, str] = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")   # sbatch exports it: 6 tasks share 2 cores
        ids["straight"] = _main_job_id(common + [f"output_dir={dirs['straight']}", "max_steps=8"])
        ids["preempted"] = _main_job_id(common + [f"output_dir={dirs['preempted']}", "max_steps=8",
                                                  "--max-requeues", "2"])
        sub = submit(common + [f"output_dir={dirs['time_limit']}", "max_steps=12", "--timeout", "1",
                               "--signal-delay", "15", "--max-requeues", "3"],
                     train_fn=PacedTraining(step_s=5.0))
        ids["time_limit"] = sub.job.job_id
    actions: dict[str, object] = {}
    stop = threading.Event()

    def drive() -> None:
        while not stop.is_set() and len(actions) < 2:
            if "preempt" not in actions and last_step(dirs["preempted"]) >= 2:
                subprocess.run(["scancel", "--signal=USR2", ids["preempted"]], check=True, timeout=30)
                actions["preempt"] = last_step(dirs["preempted"])
            if "raise_limit" not in actions and int(job_info(ids["time_limit"]).get("Restarts", 0) or 0) >= 1:
                subprocess.run(["scontrol", "update", f"JobId={ids['time_limit']}", "TimeLimit=10"],
                               check=True, timeout=30)
                actions["raise_limit"] = True
            time.sleep(0.3)

    driver = threading.Thread(target=drive, daemon=True)
    driver.start()
    yield {"ids": ids, "dirs": dirs, "actions": actions, "root": root, "common": common}
    stop.set()
    driver.join(timeout=10)
    for job_id in ids.values():   # only our own jobs, and only if still there
        subprocess.run(["scancel", job_id], capture_output=True, timeout=30)


def _stdout(job_dir: Path, job_id: str) -> str:
    path = job_dir / f"{job_id}_0_log.out"
    return path.read_text() if path.exists() else ""


@pytest.mark.slurm
def test_two_task_slurm_job_trains_on_real_images(slurm_runs, capsys):
    ids, out_dir = slurm_runs["ids"], slurm_runs["dirs"]["straight"]
    job_dir = out_dir / "slurm"
    assert wait_job_end(ids["straight"], JOB_TIMEOUT_S, job_dir / f"{ids['straight']}_0_log.err") == "COMPLETED"
    (start,) = events(out_dir, "start")
    assert start["world_size"] == 2 and start["images"] == 200
    assert events(out_dir, "finished")[-1]["global_step"] == 8
    assert (out_dir / "checkpoint.pth").is_file()
    result = torch.load(out_dir / "checkpoint.pth", weights_only=True)
    assert result["global_step"] == 8
    assert "rank 0 at localhost:" in _stdout(job_dir, ids["straight"])
    # --dry-run shows exactly the script that was submitted
    argv = slurm_runs["common"] + [f"output_dir={out_dir}", "max_steps=8", "--dry-run"]
    capsys.readouterr()
    assert main(argv) == 0
    rendered = capsys.readouterr().out.split("\n", 1)[1]
    assert rendered.strip() == (job_dir / f"{ids['straight']}_submission.sh").read_text().strip()


@pytest.mark.slurm
def test_preempted_slurm_job_resumes_and_matches_the_uninterrupted_run(slurm_runs):
    ids, dirs = slurm_runs["ids"], slurm_runs["dirs"]
    out_dir, job_dir = dirs["preempted"], dirs["preempted"] / "slurm"
    state = wait_job_end(ids["preempted"], JOB_TIMEOUT_S, job_dir / f"{ids['preempted']}_0_log.err")
    assert state == "COMPLETED", _stdout(job_dir, ids["preempted"])
    assert "preempt" in slurm_runs["actions"], "the job ended before it could be signalled"
    (stopped,) = events(out_dir, "stopped")
    (resumed,) = events(out_dir, "resume")
    assert 0 < stopped["global_step"] < 8, "stopped mid-epoch (1 epoch of 12 steps, 8 run)"
    assert resumed["global_step"] == stopped["global_step"], "resumed from the saved step, not step 0"
    assert events(out_dir, "finished")[-1]["global_step"] == 8
    assert int(job_info(ids["preempted"]).get("Restarts", -1)) == 1, "exactly one requeue"
    log = _stdout(job_dir, ids["preempted"])
    assert log.count("[cluster] requeueing (requeue 1 of at most 2)") == 1, log
    assert f"resumed from {out_dir / 'checkpoint.pth'} at global step {stopped['global_step']}" in log
    wait_job_end(ids["straight"], JOB_TIMEOUT_S)
    assert_same_weights(load_weights(dirs["straight"]), load_weights(out_dir), exact=True)


@pytest.mark.slurm
def test_slurm_job_at_its_time_limit_requeues_itself_and_finishes(slurm_runs):
    ids, out_dir = slurm_runs["ids"], slurm_runs["dirs"]["time_limit"]
    job_dir = out_dir / "slurm"
    state = wait_job_end(ids["time_limit"], JOB_TIMEOUT_S, job_dir / f"{ids['time_limit']}_0_log.err")
    log = _stdout(job_dir, ids["time_limit"])
    assert state == "COMPLETED", log
    assert "caught SIGUSR2 (time limit or preemption)" in log   # sent by SLURM: the test sends none
    assert int(job_info(ids["time_limit"]).get("Restarts", 0)) >= 1
    resumes = events(out_dir, "resume")
    assert resumes and resumes[0]["global_step"] > 0
    assert events(out_dir, "finished")[-1]["global_step"] == 12


@pytest.mark.slurm
def test_unknown_partition_is_refused_before_submitting(local_slurm, tiny_yaml, tmp_path, capsys):
    out_dir = tmp_path / "run"
    argv = ["--cluster", "slurm", "--partition", "no_such_partition", "--config", str(tiny_yaml),
            f"data_path={tmp_path}", f"output_dir={out_dir}"]
    assert main(argv) == 2
    err = one_line_error(capsys)
    assert "unknown SLURM partition 'no_such_partition'" in err and "debug" in err
    assert not out_dir.exists()


@pytest.mark.slurm
def test_sbatch_refusal_is_reworded_when_sinfo_is_missing(local_slurm, tiny_yaml, tmp_path, capsys,
                                                          monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("sbatch", "srun"):   # the real clients, but no sinfo: sbatch itself must refuse
        (bin_dir / tool).symlink_to(subprocess.check_output(["which", tool], text=True).strip())
    monkeypatch.setenv("PATH", str(bin_dir))
    argv = ["--cluster", "slurm", "--partition", "no_such_partition", "--config", str(tiny_yaml),
            f"data_path={tmp_path}", f"output_dir={tmp_path / 'run'}"]
    assert main(argv) == 2
    err = one_line_error(capsys)
    assert "sbatch rejected the partition" in err and "invalid partition" in err.lower(), err


@pytest.mark.slurm
def test_evaluation_tool_runs_as_a_two_task_slurm_job(slurm_runs, cifar_small):
    """eval_knn on the checkpoint of the straight run: the words after the tool name reach its main()."""
    ids, ckpt_dir = slurm_runs["ids"], slurm_runs["dirs"]["straight"]
    assert wait_job_end(ids["straight"], JOB_TIMEOUT_S) == "COMPLETED"
    out_dir = slurm_runs["root"] / "knn"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        job_id = _main_job_id(["--cluster", "slurm", "--tasks-per-node", "2", "--cpus-per-task", "1",
                               "eval_knn", "--checkpoint", str(ckpt_dir / "checkpoint.pth"),
                               "--data-path", str(cifar_small), "--crop-size", "32", "--batch-size", "50",
                               "--num-workers", "0", "--nb-knn", "5", "--device", "cpu", "--no-progress",
                               "--output-dir", str(out_dir)])
    job_dir = out_dir / "slurm"
    state = wait_job_end(job_id, JOB_TIMEOUT_S, job_dir / f"{job_id}_0_log.err")
    assert state == "COMPLETED", _stdout(job_dir, job_id)
    report = json.loads((out_dir / "knn.json").read_text())
    assert report["num_train"] == 200 and report["num_val"] == 100   # all images, split over 2 tasks
    assert 0.0 <= report["results"]["5"]["top1"] <= 100.0
