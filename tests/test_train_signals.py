"""launch/train.py outside SLURM: SIGTERM, SIGUSR2 and Ctrl-C stop at the next step boundary with a
saved checkpoint (exit status 128 + signal number); a second Ctrl-C quits at once; --help and config
errors answer before torch loads, every known error is one line with exit status 2."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from ssl_xcit import cli
from tests.train_helpers import tiny_overrides

REPO = Path(__file__).resolve().parents[1]


def _train_steps(out: Path) -> int:
    try:
        lines = (out / "log.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    return sum(1 for line in lines if line.endswith("}") and json.loads(line)["event"] == "train")


def _send_after_steps(out: Path, steps: int, sig: int, pid: int | None = None,
                      until: threading.Event | None = None) -> threading.Thread:
    """Send ``sig`` to ``pid`` (this process by default) once log.jsonl shows ``steps`` steps; with
    ``until``, again every 20 ms until it is set (signals sent close together may merge into one)."""
    def send() -> None:
        deadline = time.monotonic() + 120
        while _train_steps(out) < steps and time.monotonic() < deadline:
            time.sleep(0.02)
        os.kill(os.getpid() if pid is None else pid, sig)
        while until is not None and not until.wait(0.02) and time.monotonic() < deadline:
            os.kill(os.getpid() if pid is None else pid, sig)
    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    return thread


@contextlib.contextmanager
def _fallback_handlers():
    """Catch the test's signals if the code under test does not, so they never kill pytest."""
    unhandled: list[int] = []
    sigs = (signal.SIGTERM, signal.SIGUSR2, signal.SIGINT)
    previous = {s: signal.signal(s, lambda signum, frame: unhandled.append(signum)) for s in sigs}
    try:
        yield unhandled
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGUSR2])
def test_a_signal_stops_at_a_step_boundary_saves_and_the_run_resumes(cifar_small, tmp_path, capsys, sig):
    from ssl_xcit.commands.train import main
    out = tmp_path / "run"
    argv = tiny_overrides(cifar_small, out, epochs=1, warmup_epochs=0)    # 6 steps, no periodic save
    with _fallback_handlers() as unhandled:
        sender = _send_after_steps(out, 2, sig)
        code = main(argv)
        sender.join()
        assert signal.getsignal(sig) is not signal.SIG_DFL and not unhandled   # main restored our handler
    assert code == 128 + sig
    step = torch.load(out / "checkpoint.pth", weights_only=True)["global_step"]
    assert 2 <= step < 6
    err = capsys.readouterr().err
    assert f"stopped on {signal.Signals(sig).name}" in err and f"global step {step}" in err
    assert main(argv) == 0                                   # the same command continues ...
    events = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [e["global_step"] for e in events if e["event"] == "resume"] == [step]   # ... from there
    assert events[-1]["event"] == "finished" and events[-1]["global_step"] == 6


def test_a_second_ctrl_c_exits_at_once(cifar_small, tmp_path):
    from ssl_xcit.commands.train import main
    out = tmp_path / "run"
    done = threading.Event()
    with _fallback_handlers():      # (a SIGINT still on its way after main has returned lands here)
        sender = _send_after_steps(out, 1, signal.SIGINT, until=done)
        try:
            with pytest.raises(KeyboardInterrupt):
                main(tiny_overrides(cifar_small, out))
        finally:
            done.set()
            sender.join()
    events = [json.loads(line)["event"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert "stopped" not in events and "finished" not in events
    assert not (out / "checkpoint.pth").exists()


def test_sigterm_on_the_command_line_saves_and_exits_143(cifar_small, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "launch/train.py", *tiny_overrides(cifar_small, out)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        sender = _send_after_steps(out, 2, signal.SIGTERM, pid=proc.pid)
        stdout, stderr = proc.communicate(timeout=240)
        sender.join()
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    step = torch.load(out / "checkpoint.pth", weights_only=True)["global_step"]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("launch/train.py: stopped on SIGTERM") and f"global step {step}" in last
    assert "Traceback" not in stderr


RUNNER = """
import runpy, sys
sys.argv = ["launch/train.py"] + sys.argv[1:]
try:
    runpy.run_path("launch/train.py", run_name="__main__")
    code = 0
except SystemExit as e:
    code = e.code
print("TORCH_LOADED" if "torch" in sys.modules else "NO_TORCH")
sys.exit(code)
"""


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", RUNNER, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120)


def test_help_answers_before_torch_loads():
    proc = _run_cli("--help")
    assert proc.returncode == 0 and "key=value" in proc.stdout
    assert proc.stdout.strip().splitlines()[-1] == "NO_TORCH"


@pytest.mark.parametrize("args, words", [
    (["lrr=1e-3"], ["lrr", "lr"]),
    (["--config", "configs/does_not_exist.yaml"], ["does_not_exist.yaml"]),
    (["arch=xcit_bogus"], ["xcit_bogus"]),                 # checked against the zoo table, still no torch
])
def test_config_errors_are_one_line_before_torch_loads(args, words):
    proc = _run_cli(*args)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("launch/train.py: error: "), proc.stderr
    assert all(w in lines[0] for w in words)
    assert proc.stdout.strip().splitlines()[-1] == "NO_TORCH"


def test_a_missing_data_folder_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        cli.run("ssl_xcit.commands.train:main", tiny_overrides(tmp_path / "nothing_here", tmp_path / "run"),
                prog="launch/train.py")
    assert info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "nothing_here" in lines[0]


# ---- issue 26: a signal to the whole process group (GNU timeout, scancel, a closing terminal)

def _run_and_signal_the_group(argv: list[str], out: Path, sig: int, after_steps: int = 2,
                              timeout: float = 300) -> subprocess.CompletedProcess:
    """Start ``argv`` in a process group of its own, send ``sig`` to the whole group (the main
    process and its DataLoader workers at once) once log.jsonl shows ``after_steps`` steps."""
    proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while _train_steps(out) < after_steps and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        os.killpg(proc.pid, sig)
        stdout, stderr = proc.communicate(timeout=timeout)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    return subprocess.CompletedProcess(argv, proc.returncode, stdout, stderr)


GROUP_CASES = [(signal.SIGTERM, "cpu"), (signal.SIGHUP, "gpu")]
HEAVY_GROUP_CASES = [(s, a) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR2, signal.SIGHUP)
                     for a in ("cpu", "gpu") if (s, a) not in GROUP_CASES]


@pytest.mark.parametrize("sig, augment", GROUP_CASES + [pytest.param(*c, marks=pytest.mark.heavy)
                                                         for c in HEAVY_GROUP_CASES])
def test_a_signal_to_the_process_group_saves_releases_the_lock_and_resumes(cifar_small, tmp_path, sig, augment):
    out = tmp_path / "run"
    argv = [sys.executable, "launch/train.py",
            *tiny_overrides(cifar_small, out, num_workers=2, augment=augment, epochs=1, warmup_epochs=0)]
    proc = _run_and_signal_the_group(argv, out, sig)
    assert proc.returncode == 128 + sig, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "killed by signal" not in proc.stderr, proc.stderr[-3000:]
    step = torch.load(out / "checkpoint.pth", weights_only=True)["global_step"]
    assert 2 <= step < 6
    assert (out / "train.lock").read_text() == "", "the lock record must be cleared on the way out"
    again = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=300,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed from {out / 'checkpoint.pth'} at global step {step}" in again.stdout


@pytest.mark.heavy
def test_a_signal_to_the_process_group_of_a_submitted_local_job_saves(cifar_small, tmp_path):
    """``timeout 60 launch/submit.py --cluster local --wait ...``: SIGTERM reaches submit.py, the job
    and its workers; the job saves its step and ends unrequeued."""
    out = tmp_path / "run"
    argv = [sys.executable, "launch/submit.py", "--cluster", "local", "--wait",
            *tiny_overrides(cifar_small, out, num_workers=2, epochs=1, warmup_epochs=0)]
    _run_and_signal_the_group(argv, out, signal.SIGTERM)
    deadline = time.monotonic() + 120
    while not (out / "checkpoint.pth").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    while (out / "train.lock").read_text() and time.monotonic() < deadline:
        time.sleep(0.2)
    events = [json.loads(line)["event"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert "stopped" in events and "finished" not in events
    step = torch.load(out / "checkpoint.pth", weights_only=True)["global_step"]
    assert 2 <= step < 6
    logs = "".join(p.read_text() for p in (out / "slurm").glob("*_log.out"))
    assert "stopped on SIGTERM, not requeued" in logs, logs
