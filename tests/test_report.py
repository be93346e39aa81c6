"""The report page (ssl_xcit.evaluate.report, eval/report.py), checked in headless Chromium.

The run folder is written with the project's own writers (RunLogger for log.jsonl, the config's
to_yaml, checkpoints in the training format) so the page reads the same files a run leaves.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from ssl_xcit import cli
from ssl_xcit.evaluate.report import read_log, write_report, write_report_at_end_of_run
from ssl_xcit.evaluate.report_attention import find_checkpoints
from ssl_xcit.models import build_model
from ssl_xcit.train.config import DinoConfig
from ssl_xcit.engine.logger import RunLogger

ARCH = "xcit_nano_12_p8"


def _checkpoint(path: Path, step: int, seed: int) -> None:
    torch.manual_seed(seed)
    sd = {f"backbone.{k}": v for k, v in build_model(ARCH, num_classes=0).state_dict().items()}
    torch.save({"format": "ssl_xcit", "version": 1, "global_step": step, "epoch": step // 10,
                "config": {"model": {"arch": ARCH}}, "teacher": sd, "student": sd}, path)


def make_run(folder: Path, data_path: Path, checkpoints: bool = True) -> Path:
    """A finished 30-step run: config.yaml, log.jsonl (train, knn, resume, collapse warning), checkpoints."""
    folder.mkdir(parents=True, exist_ok=True)
    cfg = DinoConfig()
    cfg.model.arch, cfg.model.out_dim = ARCH, 64
    cfg.data.data_path, cfg.data.global_crops_size = str(data_path), 32
    cfg.run.output_dir = str(folder)
    (folder / "config.yaml").write_text(cfg.to_yaml())
    log = RunLogger(folder, tensorboard=False)
    log.event("start", images=200, world_size=1, steps_per_epoch=10, total_steps=30, arch=ARCH)
    log.scalars(0, {"top1": 20.0, "top5": 60.0, "seconds": 1.0}, 0, group="knn")
    for step in range(2, 31, 2):
        log.scalars(step, {"loss": 4.1 - step / 30, "lr": 1e-3 * (1 - step / 30), "weight_decay": 0.04 + step / 100,
                           "teacher_momentum": 0.99 + step / 3000, "teacher_temp": 0.04, "grad_norm": 1.0,
                           "teacher_entropy": 3.0 - step / 60, "teacher_kl_uniform": 1.0 + step / 60,
                           "images_per_s": 40.0 + step}, (step - 1) // 10)
        if step == 14:
            log.event("resume", checkpoint="checkpoint.pth", global_step=12, epoch=1, step=2)
        if step == 20:
            log.event("collapse_warning", global_step=20, kind="one prototype dominates the teacher output")
        if step % 10 == 0:
            log.scalars(step, {"top1": 20.0 + step / 2, "top5": 60.0, "seconds": 1.0}, step // 10 - 1, group="knn")
    log.event("finished", global_step=30, checkpoint=str(folder / "checkpoint.pth"))
    if checkpoints:
        _checkpoint(folder / "checkpoint0000.pth", 10, 1)
        _checkpoint(folder / "checkpoint0002.pth", 30, 2)
        shutil.copy(folder / "checkpoint0002.pth", folder / "checkpoint.pth")   # the same step: one row
    return folder


def _img_sources(page: str) -> list[str]:
    return re.findall(r'<img src="([^"]+)"', page)


@pytest.fixture(scope="module")
def finished_report(tmp_path_factory, cifar_small) -> Path:
    """index.html of :func:`make_run`'s run with 3 images per checkpoint (written once: ~10 s)."""
    run = make_run(tmp_path_factory.mktemp("report") / "run", cifar_small / "train")
    return write_report(run, n_images=3)


def test_report_shows_every_part_of_a_finished_run(finished_report):
    index, run = finished_report, finished_report.parent.parent
    assert index == run / "report" / "index.html"
    page = index.read_text()
    srcs = _img_sources(page)
    assert {"loss.png", "schedules.png", "teacher.png", "speed.png", "knn.png", "attention.png"} <= set(srcs)
    from PIL import Image
    for src in srcs:   # every picture the page names sits beside it and is a real image
        with Image.open(index.parent / src) as im:
            assert im.size[0] > 200 and im.size[1] > 150
    assert "finished at global step 30" in page
    assert "1 collapse warning(s), first at global step 20" in page
    assert "last: top-1 35.00% at global step 30" in page
    assert "xcit_nano_12_p8" in page and "global_crops_size: 32" in page     # the config
    # rows: the random start, step 10, step 30 (checkpoint.pth is the same step as checkpoint0002)
    assert "rows: step 0 (random init), step 10 (checkpoint0000), step 30 (checkpoint0002)" in page


def test_report_of_a_run_that_has_just_started(tmp_path, capsys):
    started = tmp_path / "started"
    started.mkdir()
    (started / "log.jsonl").write_text("")
    page = write_report(started).read_text()
    for note in ("no training records in log.jsonl yet", "no checkpoint saved yet", "no config.yaml",
                 "no progress logged yet", "no k-NN records"):
        assert note in page
    assert _img_sources(page) == []
    configured = tmp_path / "configured"
    configured.mkdir()
    (configured / "config.yaml").write_text("model:\n  arch: xcit_nano_12_p8\n")
    assert "no log.jsonl yet" in write_report(configured).read_text()
    # a line being written when the page is made is skipped and counted
    (started / "log.jsonl").write_text('{"event": "start", "time": 1.0}\n'
                                       '{"event": "train", "global_step": 2, "loss": 4.0}\n{"event": "tr')
    page = write_report(started).read_text()
    assert "1 unreadable line(s)" in page and "loss.png" in _img_sources(page)
    assert "running or interrupted (last logged global step 2)" in page


def test_a_folder_that_is_not_a_run_is_refused_in_one_line(tmp_path, capsys):
    """eval/report.py on a folder without config.yaml, log.jsonl or a checkpoint wrote report/index.html
    into it and said "report written"."""
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "holiday.jpg").write_bytes(b"x")
    with pytest.raises(SystemExit) as stop:
        cli.run("ssl_xcit.commands.report:main", [str(photos)], prog="report.py")
    captured = capsys.readouterr()
    assert stop.value.code == 2 and captured.err.count("\n") == 1, captured.err
    assert f"{photos} is not a training run's output_dir (no config.yaml, log.jsonl or checkpoint*.pth" in captured.err
    assert "report written" not in captured.out and sorted(p.name for p in photos.iterdir()) == ["holiday.jpg"]
    from ssl_xcit.evaluate.report import NotARunError
    with pytest.raises(NotARunError):
        write_report(photos, out_dir=tmp_path / "elsewhere")
    assert not (tmp_path / "elsewhere").exists()


def test_attention_images_from_an_archive_and_a_bad_checkpoint(tmp_path, cifar_small, monkeypatch):
    """The quickstart trains from a .tar.gz: the page takes its images from the unpacked archive;
    an unreadable checkpoint is named on the page instead of stopping it."""
    import tarfile
    monkeypatch.setenv("SSL_XCIT_HOME", str(tmp_path / "home"))   # the archive cache goes here
    archive = tmp_path / "mini.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for cls in ("cat", "dog"):
            for img in sorted((cifar_small / "train" / cls).iterdir())[:2]:
                tar.add(img.resolve(), arcname=f"mini/train/{cls}/{img.name}")
    run = make_run(tmp_path / "run", archive, checkpoints=False)
    _checkpoint(run / "checkpoint0000.pth", 10, 1)
    (run / "checkpoint.pth").write_bytes(b"not a checkpoint")
    page = write_report(run, n_images=2).read_text()
    assert "attention.png" in _img_sources(page)
    assert "rows: step 0 (random init), step 10 (checkpoint0000)" in page
    assert "unreadable checkpoint skipped: checkpoint.pth" in page


def test_unreadable_images_are_skipped_for_the_attention_maps(tmp_path, cifar_small, capsys):
    """Training skips an unreadable image; the page's fixed images did not, and the finished run's page
    was "not written" (and so was the page of the eval/report.py command it suggested)."""
    import warnings
    data = tmp_path / "data"
    data.mkdir()
    (data / "0000_broken.jpg").write_bytes(b"\xff\xd8 not a JPEG at all")      # picked: evenly spread, first
    for img in sorted((cifar_small / "train" / "cat").iterdir())[:2]:
        shutil.copy(img.resolve(), data / img.name)
    run = make_run(tmp_path / "run", data, checkpoints=False)
    _checkpoint(run / "checkpoint0000.pth", 10, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)    # "report page not written" would be an error here
        index = write_report_at_end_of_run(run)
    page = index.read_text()
    assert "attention.png" in _img_sources(page)
    assert f"1 unreadable image(s) skipped: {data / '0000_broken.jpg'}" in page
    good = next(p for p in sorted(data.iterdir()) if p.name != "0000_broken.jpg")
    out = cli.run("ssl_xcit.commands.report:main", [str(run), "--images", str(good), str(data / "0000_broken.jpg"),
                                                    "--out", str(tmp_path / "page")], prog="report.py")
    page = out.read_text()
    assert "attention.png" in _img_sources(page) and "1 unreadable image(s) skipped" in page
    assert "report written to" in capsys.readouterr().out


def test_end_of_run_report_never_raises(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "log.jsonl").write_text("")
    assert write_report_at_end_of_run(tmp_path / "run") == tmp_path / "run" / "report" / "index.html"
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("x")
    with pytest.warns(RuntimeWarning, match="report page not written .*python eval/report.py"):
        assert write_report_at_end_of_run(not_a_folder) is None


def test_read_log_and_checkpoint_order(tmp_path):
    (tmp_path / "log.jsonl").write_text('{"a": 1}\n[1, 2]\n\nnot json\n{"b": 2}\n')
    log = read_log(tmp_path / "log.jsonl")
    assert log.records == [{"a": 1}, {"b": 2}] and log.bad_lines == 2
    for name in ("checkpoint0010.pth", "checkpoint0002.pth", "checkpoint.pth", "checkpoint_old.pth"):
        (tmp_path / name).write_bytes(b"")
    assert [p.name for p in find_checkpoints(tmp_path)] == ["checkpoint0002.pth", "checkpoint0010.pth",
                                                             "checkpoint.pth"]
    for e in range(20):
        (tmp_path / f"checkpoint{e:04d}.pth").write_bytes(b"")
    picked = [p.name for p in find_checkpoints(tmp_path, limit=5)]
    assert len(picked) == 5 and picked[0] == "checkpoint0000.pth" and picked[-1] == "checkpoint.pth"


def test_report_command_line(tmp_path, capsys):
    pytest.importorskip("ssl_xcit.evaluate.report")
    from ssl_xcit.commands import report
    with pytest.raises(SystemExit) as stop:
        cli.run("ssl_xcit.commands.report:main", [str(tmp_path / "nowhere")], prog="report.py")
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nowhere" in err
    run = tmp_path / "r"
    run.mkdir()
    (run / "config.yaml").write_text("model:\n  arch: xcit_nano_12_p8\n")
    out = cli.run(report.main, [str(run), "--out", str(tmp_path / "page")], prog="report.py")
    assert out == tmp_path / "page" / "index.html" and out.is_file()


CHECK_SCRIPT = """<script>window.addEventListener('load', function () {
  var r = Array.prototype.map.call(document.images, function (i) { return i.naturalWidth; });
  document.body.setAttribute('data-img-widths', r.join(','));
});</script></body>"""


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.skipif(_chromium() is None, reason="headless Chromium not installed (Debian: apt-get install chromium)")
def test_report_page_renders_in_headless_chromium(tmp_path, finished_report):
    index = finished_report
    page = index.read_text()
    # a copy with a probe that records each image's decoded width once the page has loaded
    probe = index.with_name("probe.html")   # beside the page, so its relative image paths resolve
    probe.write_text(page.replace("</body>", CHECK_SCRIPT))
    shot = Path(os.environ.get("SSL_XCIT_REPORT_SHOT", tmp_path / "shot.png"))
    # one browser start: the DOM after the load event (with the probe's result) and a screenshot
    dom = subprocess.run([_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                          "--virtual-time-budget=5000", "--window-size=1200,1800", f"--screenshot={shot}",
                          "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=120)
    widths = re.search(r'data-img-widths="([^"]*)"', dom.stdout)
    assert widths, f"probe did not run; chromium stderr: {dom.stderr[-500:]}"
    loaded = [int(w) for w in widths.group(1).split(",")]
    assert len(loaded) == len(_img_sources(page)) == 6 and min(loaded) > 0, loaded
    from PIL import Image
    with Image.open(shot) as im:
        pixels = np.asarray(im.convert("RGB"))
    assert pixels.shape[:2] == (1800, 1200)
    plots = pixels[150:1500]   # below the title: the curve figures
    not_white = (plots < 235).any(axis=2).mean()
    colours = len(np.unique(plots.reshape(-1, 3), axis=0))
    blue = ((plots[..., 2] > 150) & (plots[..., 0] < 80)).sum()   # matplotlib's tab:blue curves
    # measured on a real run's page (2-core CPU, 2026-12-02): loaded 4.9% non-white, 768 colours,
    # 6044 blue pixels; the same page with every image missing: 4.7%, 335 colours, 0 blue (its text,
    # boxes and broken-image icons are black, grey and red), so blue pixels mean loaded plots
    assert not_white > 0.02 and colours > 500 and blue > 2000, (not_white, colours, blue)
