"""DINO on real CIFAR-10 images on the CPU: the engine learns (issue 3), and the README's quickstart
lifts k-NN clearly above the random backbone it started from (issue 4): the README command itself,
as written there, 400 steps (about 4 minutes on 2 cores), and, in the heavy set, the same at 600
steps. Without --data it finds its images itself (issue 13): the archive next to the repository,
else an earlier download, else a download through torchvision, else one line saying what to pass."""
import json
import math
import shlex
import tarfile
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

from ssl_xcit import cli
from ssl_xcit.commands import quickstart as qs
from ssl_xcit.cli import UsageError
from ssl_xcit.evaluate.inputs import EvalInputError
from ssl_xcit.commands.quickstart import DEFAULT_CONFIG, main as quickstart, parse_args, training_config
from ssl_xcit.train.config import load_config
from ssl_xcit.train.loop import train
from tests.conftest import make_subset

README = Path(__file__).resolve().parents[1] / "README.md"


def test_dino_loss_falls_on_real_images_without_collapse(cifar_root, tmp_path):
    """The quickstart recipe with its former multi-crop schedule (2 local crops, 2 epochs, last layer
    frozen in epoch 0), made cheaper (patch 16, batch 32, 80 steps, about a minute)."""
    out = tmp_path / "run"
    cfg = load_config(DEFAULT_CONFIG, [f"data_path={cifar_root / 'train'}", f"output_dir={out}",
                                       "arch=xcit_nano_12_p16", "batch_size_per_gpu=32", "max_images=2560",
                                       "local_crops_number=2", "epochs=2", "freeze_last_layer=1",
                                       "max_steps=80", "log_every_steps=1", "tensorboard=false",
                                       "num_workers=0", "report=false"])
    result = train(cfg)
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["event"] == "train"]
    assert result.global_step == 80 and steps[-1]["global_step"] == 80
    first, last = steps[0], steps[-10:]
    mean_last = sum(r["loss"] for r in last) / len(last)
    assert mean_last < first["loss"] - 0.1, (first["loss"], mean_last)
    ln_k = math.log(cfg.model.out_dim)
    assert all(r["teacher_entropy"] < 0.97 * ln_k for r in last), "teacher output is (near) uniform"
    assert all(r["teacher_kl_uniform"] < 0.9 * ln_k for r in last), "one prototype dominates"
    assert not [r for r in records if r["event"] == "collapse_warning"]


def test_overrides_may_follow_the_knn_k_list(cifar_small):
    args = parse_args(["--knn-k", "10", "20", "epochs=3", "--output", "o", "max_images=64",
                       "--data", str(cifar_small)])
    assert args.knn_k == [10, 20] and args.overrides == ["epochs=3", "max_images=64"] and args.output == "o"
    with pytest.raises(UsageError, match="invalid int value: 'ten'"):
        parse_args(["--knn-k", "ten"])


def test_the_knn_monitor_is_on_at_the_final_knn_resolution_and_can_be_changed(cifar_small, tmp_path):
    def config(*argv):
        return training_config(parse_args(["--data", str(cifar_small), *argv]), cifar_small, tmp_path).eval
    default = config()
    assert (default.eval_every_steps, default.eval_max_images, default.eval_data_path) == (50, 500, str(cifar_small))
    assert default.eval_crop_size == default.eval_resize == 32               # the quickstart's global crop
    assert config("global_crops_size=64").eval_resize == 64
    assert config("--monitor-every-steps", "20", "--monitor-images", "300").eval_every_steps == 20
    assert config("eval_max_images=100").eval_max_images == 100              # the user's keys win
    assert config("--monitor-every-steps", "0").eval_every_steps == 0
    with pytest.raises(EvalInputError, match="--monitor-images positive"):
        parse_args(["--data", str(cifar_small), "--monitor-images", "0"])


def readme_quickstart_argv() -> list[str]:
    """The arguments of the README's main command, as written in its Set-up section."""
    setup = README.read_text().split("\n## Set-up\n", 1)[1].split("\n## ", 1)[0]
    commands = [line for line in setup.splitlines() if line.startswith("python launch/quickstart.py")]
    assert len(commands) == 1, commands
    return shlex.split(commands[0], comments=True)[2:]


@pytest.fixture
def no_network(monkeypatch):
    """Every attempt to reach the network fails (and is counted): torchvision's download opens URLs
    with urllib.request.urlopen."""
    calls = []

    def refuse(request, *args, **kwargs):
        calls.append(getattr(request, "full_url", request))
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    return calls


@pytest.fixture
def downloaded(cifar_small, tmp_path) -> Path:
    """A --download-dir holding a complete earlier CIFAR-10 download (cifar_small's images)."""
    folder = tmp_path / "dl"
    make_subset(cifar_small, folder / "cifar10", 2, 1)
    (folder / "cifar10" / qs.DOWNLOAD_MARKER).write_text("{}")
    return folder


def test_the_readme_command_takes_the_archive_next_to_the_repository(monkeypatch, no_network, tmp_path):
    """The README's command names no --data: here ../shared/data/cifar10.tar.gz exists and is chosen."""
    assert "--data" not in readme_quickstart_argv()
    if not qs.DEFAULT_DATA.exists():
        pytest.skip(f"{qs.DEFAULT_DATA} not here")
    monkeypatch.chdir(tmp_path)
    args = parse_args(readme_quickstart_argv())
    assert (args.source, args.source_path) == ("archive", qs.DEFAULT_DATA)


def test_no_data_takes_the_archive_then_an_earlier_download_then_downloads(cifar_small, downloaded, tmp_path,
                                                                          monkeypatch, no_network):
    from ssl_xcit.data import sources
    assert qs.DOWNLOAD_MARKER == sources.MARKER
    archive = tmp_path / "cifar10.tar.gz"
    with tarfile.open(archive, "w:gz", dereference=True) as tar:   # make_subset links; the archive holds files
        tar.add(make_subset(cifar_small, tmp_path / "small", 1, 1), arcname="cifar10", recursive=True)
    monkeypatch.setenv("SSL_XCIT_HOME", str(tmp_path / "home"))      # where the archive is unpacked
    monkeypatch.setattr(qs, "DEFAULT_DATA", archive)
    argv = ["--download-dir", str(downloaded)]

    # 1. the archive exists: it is used (unpacked into the cache), even with a download at hand
    args = parse_args(argv)
    assert (args.source, args.source_path) == ("archive", archive)
    root = qs.data_root(args)
    assert root.is_relative_to(tmp_path / "home") and len(list((root / "train").glob("*/*"))) == 10
    # 2. no archive: the earlier download is used as it is
    archive.unlink()
    args = parse_args(argv)
    assert (args.source, args.source_path) == ("downloaded", downloaded / "cifar10")
    assert qs.data_root(args) == downloaded / "cifar10"
    # 3. --download skips the archive but still uses the earlier download
    assert parse_args([*argv, "--download"]).source == "downloaded"
    # 4. neither: a download (the only case that asks for the network)
    args = parse_args(["--download-dir", str(tmp_path / "empty")])
    assert (args.source, args.source_path) == ("download", tmp_path / "empty")
    assert no_network == []                     # choosing never touched the network


def test_a_failed_download_is_one_line_naming_data(tmp_path, monkeypatch, capsys, no_network):
    monkeypatch.setattr(qs, "DEFAULT_DATA", tmp_path / "absent.tar.gz")
    argv = ["--download-dir", str(tmp_path / "dl"), "--output", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as exit_info:
        cli.run(quickstart, argv, prog="launch/quickstart.py")
    assert exit_info.value.code == 2
    assert no_network, "the download was not attempted"
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("launch/quickstart.py: error: could not download CIFAR-10"), err
    assert "Temporary failure in name resolution" in err and "pass --data PATH" in err
    assert str(tmp_path / "absent.tar.gz") in err
    assert not (tmp_path / "out" / "train").exists()     # nothing trained


def test_the_download_shows_a_progress_bar_and_a_bad_file_is_one_line(tmp_path, monkeypatch, capsys):
    """torchvision's own download (its tqdm bar on stderr) is what runs; what it fetched here is not
    CIFAR-10 (wrong checksum), which ends as the same one-line error."""
    class Response:
        def __init__(self, url):
            self.url, self.length, self._left = url, 4096, [b"x" * 4096]

        def read(self, size=-1):
            return self._left.pop() if self._left else b""

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False
    monkeypatch.setattr(urllib.request, "urlopen", lambda request, *a, **k: Response(request.full_url))
    monkeypatch.setattr(qs, "DEFAULT_DATA", tmp_path / "absent.tar.gz")
    with pytest.raises(SystemExit, match="2"):
        cli.run(quickstart, ["--download-dir", str(tmp_path / "dl"), "--output", str(tmp_path / "out")],
                prog="launch/quickstart.py")
    err = capsys.readouterr().err
    assert "4.10k/4.10k" in err                                  # the byte counter of the progress bar
    last = err.strip().splitlines()[-1]
    assert last.startswith("launch/quickstart.py: error: could not download CIFAR-10") and "--data" in last


def test_data_never_downloads(cifar_small, tmp_path, monkeypatch, no_network, capsys):
    monkeypatch.setattr(qs, "DEFAULT_DATA", tmp_path / "absent.tar.gz")
    args = parse_args(["--data", str(cifar_small), "--download-dir", str(tmp_path / "dl")])
    assert (args.source, args.source_path) == ("data", cifar_small)
    assert qs.data_root(args) == cifar_small.resolve()
    for argv, message in ((["--data", str(tmp_path / "nowhere")], "not found"),
                          (["--data", str(cifar_small), "--download"], "give --data or --download, not both")):
        with pytest.raises(SystemExit, match="2"):
            cli.run(quickstart, [*argv, "--download-dir", str(tmp_path / "dl")], prog="launch/quickstart.py")
        assert message in capsys.readouterr().err
    assert no_network == [] and not (tmp_path / "dl").exists()


def test_a_read_only_output_is_one_line_before_any_training(cifar_small, tmp_path, monkeypatch, capsys):
    """--output on a read-only file system failed inside the training with a traceback; now one line
    naming the folder, before anything is trained (the recipe here would train for a second if it ran)."""
    from conftest import make_read_only
    read_only = tmp_path / "ro"
    read_only.mkdir()
    make_read_only(monkeypatch, read_only)
    argv = ["--data", str(cifar_small), "--output", str(read_only / "qs"), "--monitor-every-steps", "0",
            "--knn-train-images", "20", "--knn-val-images", "10", "--knn-k", "5", "max_images=16",
            "batch_size_per_gpu=8", "max_steps=1", "report=false", "tensorboard=false", "num_workers=0"]
    with pytest.raises(SystemExit) as stop:
        cli.run(quickstart, argv, prog="launch/quickstart.py")
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"launch/quickstart.py: error: cannot write in {read_only / 'qs'}: read-only file "
                          "system"), err
    assert list(read_only.iterdir()) == []


def test_the_output_says_how_many_images_were_used(cifar_small, tmp_path, capsys):
    """On a 200-image folder the first line said "12800 images" (the recipe's max_images) and the k-NN
    table "10000 train images as memory" (--knn-train-images): both now say what was used."""
    argv = ["--data", str(cifar_small), "--output", str(tmp_path / "qs"), "--monitor-every-steps", "0",
            "--knn-k", "5", "max_steps=2", "batch_size_per_gpu=8", "report=false", "tensorboard=false",
            "num_workers=0", "log_every_steps=1"]
    report = cli.run(quickstart, argv, prog="launch/quickstart.py")
    out = capsys.readouterr().out
    assert "(200 images, 1 epochs)" in out, out
    assert "200 train images as memory, 100 val images as queries" in out, out
    assert (report["knn_train_images"], report["knn_val_images"]) == (200, 100)
    saved = json.loads((tmp_path / "qs" / "quickstart.json").read_text())
    assert saved["knn_train_images"] == 200 and saved["steps"] == 2
    with pytest.raises(SystemExit):     # more neighbours than the folder's train images: before training
        cli.run(quickstart, [*argv[:-6], "--knn-k", "300", "--output", str(tmp_path / "qs2")], prog="qs")
    assert "--knn-k 300 exceeds the 200 train images" in capsys.readouterr().err
    assert not (tmp_path / "qs2").exists()


@pytest.fixture
def both_cores():
    """The quickstart is one process; let it use both cores of a CI machine (the suite default is 1)."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def _check_clear_gain(report: dict, out: Path, steps: int, min_gain: float, max_p: float) -> None:
    paired = report["paired"]["20"]
    trained, random_init = report["trained"]["20"]["top1"], report["random"]["20"]["top1"]
    assert report["steps"] == steps
    # "clearly above": a margin of points AND a paired exact test on the same 2,000 queries
    assert paired["gain"] >= min_gain, report
    assert paired["p_value"] < max_p, report
    assert paired["gain"] == pytest.approx(trained - random_init)
    assert paired["a_only"] - paired["b_only"] == round(paired["gain"] * 2000 / 100)
    saved = json.loads((out / "quickstart.json").read_text())
    assert saved["paired"]["20"] == paired and saved["trained"]["20"]["top1"] == trained


def _check_curve_and_page(report: dict, out: Path, steps: list[int]) -> None:
    """The k-NN monitor's curve (every 50 steps, 500 + 500 images) rises from the random start, is in
    quickstart.json and knn.png, and the run's report page was written at the end of training."""
    curve = report["knn_curve"]
    assert [r["global_step"] for r in curve] == steps, curve
    assert curve[-1]["top1"] > curve[0]["top1"], curve
    assert json.loads((out / "quickstart.json").read_text())["knn_curve"] == curve
    assert (out / "train" / "knn.png").stat().st_size > 0
    assert "knn.png" in (out / "train" / "report" / "index.html").read_text()


def test_quickstart_trained_teacher_clearly_beats_its_random_start(cifar_root, tmp_path, both_cores,
                                                                   monkeypatch, no_network):
    """The README command as written there (no --data: the archive next to the repository; 400
    steps of batch 32, 12,800 CIFAR-10 images), with the output in a temporary folder and no
    TensorBoard. The archive is the one conftest unpacked for cifar_root: the quickstart is pointed
    at that copy rather than unpacking the same 60,000 images again into ~/.cache.

    Measured on the 2-core machine (2026-12-02, idle), recipe=auto with KoLeo and a constant teacher
    momentum: 40.60 vs 29.10 (+11.50, McNemar p = 4e-21), 3.4 min training, 4.2 min in all. Before
    KoLeo (200 steps, where DINO alone stalled): 33.70 vs 29.10 (+4.60, p = 5e-5).
    Seeds 1 and 2 (the heavy test below) gained +8.60 and +8.55, so the bound leaves room for a
    machine whose floating point differs, while a run that stalls as before (+4.6) fails it.
    """
    out = tmp_path / "quickstart"
    monkeypatch.setattr(qs, "DEFAULT_DATA", cifar_root)
    report = quickstart([*readme_quickstart_argv(), "--output", str(out), "tensorboard=false"])
    assert report["data"] == str(cifar_root) and no_network == []
    _check_clear_gain(report, out, steps=400, min_gain=8.0, max_p=1e-6)
    _check_curve_and_page(report, out, steps=list(range(0, 401, 50)))


@pytest.mark.heavy
def test_quickstart_longer_run_clearly_beats_its_random_start(cifar_root, tmp_path, both_cores):
    """The README command with 600 steps (measured, seed 1 in bf16: 37.35 vs 30.70, +6.65; in fp32 not
    measured): more steps of this recipe keep k-NN clearly above the random start."""
    out = tmp_path / "quickstart"
    report = quickstart(["--data", str(cifar_root), "--output", str(out), "--knn-train-images", "10000",
                         "--knn-val-images", "2000", "--knn-k", "20", "max_images=19200", "tensorboard=false"])
    _check_clear_gain(report, out, steps=600, min_gain=5.0, max_p=1e-4)
    _check_curve_and_page(report, out, steps=list(range(0, 601, 50)))


@pytest.mark.heavy
@pytest.mark.parametrize("seed", [1, 2])
def test_quickstart_gains_on_other_seeds(cifar_root, tmp_path, both_cores, seed):
    """The README command on the two other seeds of benchmarks/small_data.py (seed 0 is the fast
    suite's run): each trained teacher clearly above its own random start. Measured 2026-12-02 on
    the 2-core CPU: seed 1 39.30 vs 30.70 (+8.60, p = 6e-12), seed 2 38.50 vs 29.95 (+8.55, p = 4e-12);
    the issue's +10 is not reached on these two seeds."""
    out = tmp_path / f"quickstart{seed}"
    report = quickstart(["--data", str(cifar_root), "--output", str(out), "--monitor-every-steps", "0",
                         f"seed={seed}", "tensorboard=false"])
    _check_clear_gain(report, out, steps=400, min_gain=7.0, max_p=1e-6)
