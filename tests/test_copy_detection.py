"""Copy detection: AP, ranks (ties against the query) and per-family scores by hand; every edit
family and level; a benchmark rebuilt from its seed is byte-identical and reused; the command end to
end on a tiny folder with the pixels baseline and a random backbone; bad input in one line."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image, ImageOps

from image_fixtures import ARCH, make_images
from ssl_xcit import cli
from ssl_xcit.commands import copy_detection as cd_cmd
from ssl_xcit.evaluate import copy_detection as cd
from ssl_xcit.evaluate.copy_edits import FAMILIES, LEVELS, EditError, apply_edit


def test_average_precision_by_hand():
    assert cd.average_precision([0], 1) == 1.0
    assert cd.average_precision([1], 1) == pytest.approx(0.25)          # (0/1 + 1/2) / 2
    assert cd.average_precision([0, 2], 2) == pytest.approx(0.5 + (1 / 2 + 2 / 3) / 4)
    assert cd.average_precision([3], 2) == pytest.approx((0 + 1 / 4) / 4)  # one of two positives found


def test_positive_ranks_count_ties_against_the_query():
    q = np.array([[1.0, 0.0]])
    db = np.array([[0.6, 0.8], [1.0, 0.0], [0.8, 0.6]])
    assert cd.positive_ranks(q, db, np.array([0])).tolist() == [2]
    assert cd.positive_ranks(q, db, np.array([1])).tolist() == [0]
    same = np.ones((3, 2)) / np.sqrt(2)
    assert cd.positive_ranks(q, same, np.array([0])).tolist() == [2]   # everything tied: last


def test_scores_per_family_by_hand():
    queries = [{"family": "a", "level": 1}, {"family": "a", "level": 2}, {"family": "b", "level": 1}]
    s = cd.copy_scores(np.array([0, 1, 3]), queries)
    assert s["by_family"]["a"] == {"mAP": pytest.approx(0.625), "recall@1": 0.5, "queries": 2}
    assert s["by_family"]["b"]["mAP"] == pytest.approx(0.125)
    assert s["all"]["mAP"] == pytest.approx((1 + 0.25 + 0.125) / 3) and s["all"]["recall@1"] == pytest.approx(1 / 3)
    assert s["by_level"]["a/2"]["mAP"] == pytest.approx(0.25)


def test_every_edit_family_and_level(tmp_path):
    im = Image.open(make_images(tmp_path, 1, size=(120, 80))[0]).convert("RGB")
    for family in FAMILIES:
        for level in LEVELS:
            a = apply_edit(im, family, level, np.random.default_rng(0))
            b = apply_edit(im, family, level, np.random.default_rng(0))
            assert a.mode == "RGB" and np.array_equal(np.asarray(a), np.asarray(b)), (family, level)
            assert not np.array_equal(np.asarray(a.resize(im.size)), np.asarray(im)), (family, level)
    assert np.array_equal(np.asarray(apply_edit(im, "flip", 1, np.random.default_rng(0))), np.asarray(ImageOps.mirror(im)))
    assert apply_edit(im, "rescale", 2, np.random.default_rng(0)).size == (30, 20)
    crop = apply_edit(im, "crop", 3, np.random.default_rng(0))
    assert crop.width * crop.height < 0.4 * im.width * im.height
    with pytest.raises(EditError):
        apply_edit(im, "sepia", 1, np.random.default_rng(0))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("cd")
    make_images(root / "orig", 10, seed=0, size=(64, 48))
    make_images(root / "dis", 12, seed=1, size=(64, 48))
    make_images(root / "white", 8, seed=2, size=(64, 48))
    return root


def test_benchmark_is_reproducible_and_reused(folders, tmp_path):
    a = cd.build_benchmark(folders / "orig", tmp_path / "a", 6, folders / "dis", 5, ["crop", "jpeg", "overlay"],
                           seed=3, progress=False)
    b = cd.build_benchmark(folders / "orig", tmp_path / "b", 6, folders / "dis", 5, ["crop", "jpeg", "overlay"],
                           seed=3, progress=False)
    assert a.originals == b.originals and a.distractors == b.distractors and len(a.queries) == 18
    for qa, qb in zip(a.queries, b.queries):
        assert open(qa["path"], "rb").read() == open(qb["path"], "rb").read()
    assert [q["level"] for q in a.queries[:6]] == [1, 2, 3, 2, 3, 1]           # LEVELS[(i + f) % 3]
    stamp = (tmp_path / "a" / cd.BENCH_FILE).stat().st_mtime_ns
    again = cd.build_benchmark(folders / "orig", tmp_path / "a", 6, folders / "dis", 5, ["crop", "jpeg", "overlay"],
                               seed=3, progress=False)
    assert (tmp_path / "a" / cd.BENCH_FILE).stat().st_mtime_ns == stamp and again.queries == a.queries
    other = cd.build_benchmark(folders / "orig", tmp_path / "c", 6, folders / "dis", 5, ["crop"], seed=4,
                               progress=False)
    assert other.originals != a.originals or other.queries[0]["path"] != a.queries[0]["path"]


def test_command_scores_pixels_and_a_backbone(folders, tmp_path, capsys):
    out = tmp_path / "run"
    rows = cd_cmd.main(["--data-path", str(folders / "orig"), "--originals", "6", "--distractors",
                        str(folders / "dis"), "--n-distractors", "6", "--whiten-data", str(folders / "white"),
                        "--checkpoint", "pixels", ARCH, "--imsize", "32", "--families", "jpeg", "flip", "crop",
                        "--out", str(out), "--num-workers", "0", "--no-progress"])
    assert [(r["model"], r["descriptor"], r["whitened"]) for r in rows] == [
        ("pixels", "pixels", False), ("pixels", "pixels", True), (ARCH, "cls", False), (ARCH, "cls", True),
        (ARCH, "cls_gem", False), (ARCH, "cls_gem", True)]
    assert rows[0]["database"] == 12 and rows[0]["by_family"]["jpeg"]["queries"] == 6
    assert rows[0]["by_family"]["jpeg"]["recall@1"] == 1.0          # JPEG copies keep their 8x8 colours
    assert rows[2]["dim"] == 128 and rows[4]["dim"] == 256           # nano: 128; + GeM: 256
    saved = json.loads((out / "results.json").read_text())
    assert len(saved["rows"]) == 6 and "| pixels | pixels | no |" in (out / "results.md").read_text()
    assert (out / "results.png").read_bytes()[:4] == b"\x89PNG"


def test_bad_input_is_one_line(folders, tmp_path, capsys):
    def one_line(argv):
        with pytest.raises(SystemExit) as exc:
            cli.run(cd_cmd.main, argv, prog="cd")
        err = capsys.readouterr().err.strip()
        assert exc.value.code == 2 and len(err.splitlines()) == 1
        return err
    base = ["--checkpoint", "pixels", "--out", str(tmp_path / "o"), "--no-progress"]
    assert "give a smaller --originals" in one_line(["--data-path", str(folders / "orig"), "--originals", "50", *base])
    assert "no such folder" in one_line(["--data-path", str(tmp_path / "nope"), *base])
    assert "--imsize must be >= 1" in one_line(["--data-path", str(folders / "orig"), "--imsize", "0", *base])
    assert not (tmp_path / "o" / cd.BENCH_FILE).exists()
