"""Near-duplicates: pairs against a float64 brute force (exact and calibrated cells), top pairs,
connected components and the keep rules by hand, the command on an export with a planted copy,
and bad input as one line with nothing written."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from image_fixtures import export_folder, make_images
from ssl_xcit import cli
from ssl_xcit.commands import find_duplicates as dup_cmd
from ssl_xcit.evaluate import duplicates as dup
from ssl_xcit.evaluate.descriptors import l2n


def _clustered(n: int, d: int, seed: int = 0, noise: float = 0.25) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(max(2, n // 30), d))
    return l2n(centres[rng.integers(0, len(centres), n)] + noise * rng.normal(size=(n, d)))


def _brute_pairs(x: np.ndarray, threshold: float) -> dict[tuple[int, int], float]:
    s = x.astype(np.float64) @ x.astype(np.float64).T
    i, j = np.nonzero(np.triu(s >= threshold, k=1))
    return {(a, b): s[a, b] for a, b in zip(i.tolist(), j.tolist())}


def test_components_by_hand():
    labels = dup.components(6, np.array([0, 1, 4]), np.array([1, 2, 5]))
    assert labels.tolist() == [0, 0, 0, 3, 4, 4]
    labels = dup.components(4, np.array([2, 0]), np.array([3, 3]))   # 0-3-2 joined through 3
    assert labels.tolist() == [0, 1, 0, 0]


def test_a_pair_exactly_at_the_threshold_counts():
    x = np.array([[1.0, 0.0], [0.5, np.sqrt(3) / 2], [-1.0, 0.0]], dtype=np.float32)  # cos(0, 1) = 0.5
    p = dup.range_pairs(x, 0.5, "flat")
    assert [(int(a), int(b)) for a, b in zip(p.i, p.j)] == [(0, 1)]
    assert len(dup.range_pairs(x, 0.51, "flat")) == 0


@pytest.mark.parametrize("kind,n", [("flat", 400), ("cells", 6000)])
def test_range_pairs_match_brute_force(kind, n):
    x = _clustered(n, 12, noise=0.12)
    want = _brute_pairs(x, 0.97)
    p = dup.range_pairs(x, 0.97, kind)
    got = {(int(a), int(b)): float(s) for a, b, s in zip(p.i, p.j, p.score)}
    assert len(want) > 50 and set(got) <= set(want)             # never a pair below the threshold
    assert len(set(got) & set(want)) / len(want) >= (1.0 if kind == "flat" else 0.99)
    assert all(abs(got[k] - want[k]) < 1e-4 for k in got)
    assert np.all(np.diff(p.score) <= 0) and np.all(p.i < p.j)   # highest first, each pair once


def test_a_threshold_that_finds_everything_is_refused(monkeypatch):
    monkeypatch.setattr(dup, "MAX_PAIRS", 10_000)  # raw hits: both directions and each row with itself
    x = _clustered(400, 12, noise=0.12)
    assert 1000 < len(dup.range_pairs(x, 0.99, "flat")) < 5000
    with pytest.raises(dup.DuplicatesError, match="higher threshold"):
        dup.range_pairs(x, -1.0, "flat")
    with pytest.raises(dup.DuplicatesError, match="higher threshold"):
        dup.range_pairs(x, -1.0, "cells")


def test_histogram_separates_copies_from_near_images():
    edges = dup.histogram_edges(0.0, bins=30)
    assert edges[0] == pytest.approx(0.0) and edges[-1] == 1.0 and np.all(np.diff(edges) > 0)
    x = _clustered(200, 16, noise=0.3)
    x[10] = x[3]                                                  # an exact copy
    x[11] = l2n(x[4:5] + 0.003 * np.random.default_rng(0).normal(size=(1, 16)))[0]  # 1 - cos ~ 1e-5
    h = dup.nn_histogram(x, bins=30)
    assert h["sample"] == 200 and sum(h["counts"]) == 200
    assert h["counts"][-1] >= 2                                   # 3 and 10: 1 - cos < 1e-5
    nn = np.asarray(h["nn_scores"])
    assert nn[3] == pytest.approx(1.0, abs=1e-6) and 0.9999 < nn[11] < 1.0 and np.median(nn) < 0.99


def test_top_pairs_are_the_most_similar_pairs():
    x = _clustered(300, 8, seed=3)
    s = x.astype(np.float64) @ x.astype(np.float64).T
    iu = np.triu_indices(300, 1)
    best = np.sort(s[iu])[::-1][:25]
    p = dup.top_pairs(x, 25, "flat")
    np.testing.assert_allclose(p.score, best, atol=1e-5)


def test_keep_rules(tmp_path):
    small, big = tmp_path / "small.png", tmp_path / "big.png"
    Image.new("RGB", (10, 10)).save(small)
    Image.new("RGB", (30, 20)).save(big)
    paths = [str(tmp_path / "a.png"), str(small), str(tmp_path / "c.png"), str(big)]
    groups = [{"rows": [1, 3]}]
    assert dup.choose_kept(groups, paths, "first") == [paths[0], str(small), paths[2]] and groups[0]["keep"] == str(small)
    assert dup.choose_kept(groups, paths, "largest") == [paths[0], paths[2], str(big)] and groups[0]["keep"] == str(big)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """12 images plus an exact copy of img004 and a re-encoded (JPEG) copy of img007."""
    root = tmp_path_factory.mktemp("dup")
    make_images(root / "imgs", 12)
    shutil.copy(root / "imgs" / "img004.png", root / "imgs" / "copy<4>.png")
    Image.open(root / "imgs" / "img007.png").save(root / "imgs" / "img007_q90.jpg", quality=90)
    export_folder(root / "imgs", root / "feats")
    return root


def test_command_groups_the_planted_copies_and_deletes_nothing(planted, capsys):
    out = planted / "out"
    before = sorted(p.name for p in (planted / "imgs").iterdir())
    res = dup_cmd.main(["--features", str(planted / "feats"), "--threshold", "0.99999", "--keep", "largest",
                        "--out", str(out), "--no-progress"])
    printed = capsys.readouterr().out
    assert "nearest-neighbour cosine" in printed and "a cleaned set keeps" in printed
    names = sorted(sorted(p.rsplit("/", 1)[-1] for p in g["paths"]) for g in res["groups"])
    assert ["copy<4>.png", "img004.png"] in names
    kept = (out / "keep.txt").read_text().splitlines()
    assert len(kept) == 14 - sum(len(g["paths"]) - 1 for g in res["groups"])
    assert sorted(p.name for p in (planted / "imgs").iterdir()) == before     # nothing deleted
    saved = json.loads((out / "duplicates.json").read_text())
    assert saved["n_groups"] == len(res["groups"]) and (out / "histogram.png").stat().st_size > 1000
    page = (out / "index.html").read_text()
    assert "copy&lt;4&gt;.png" in page and "copy<4>" not in page and "data:image/png;base64," in page
    assert (out / "duplicates.csv").read_text().startswith("group,score,path_a,path_b")


def _one_line(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        cli.run(dup_cmd.main, argv, prog="find_duplicates")
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    return err


def test_bad_input_is_one_line_and_writes_nothing(planted, tmp_path, capsys):
    out = tmp_path / "never"
    feats = ["--features", str(planted / "feats"), "--out", str(out), "--no-progress"]
    assert "[-1, 1]" in _one_line([*feats, "--threshold", "1.5"], capsys)
    assert "[-1, 1]" in _one_line([*feats, "--threshold", "nan"], capsys)
    assert "--top-pairs" in _one_line([*feats, "--top-pairs", "0"], capsys)
    assert "not allowed with" in _one_line([*feats, "--threshold", "0.9", "--top-pairs", "3"], capsys)
    assert "--patch-tokens" in _one_line([*feats, "--threshold", "0.9", "--descriptor", "cls_gem"], capsys)
    (tmp_path / "empty").mkdir()
    assert "not a feature export" in _one_line(["--features", str(tmp_path / "empty"), "--threshold", "0.9",
                                                "--out", str(out)], capsys)
    assert not out.exists()
    with pytest.raises(dup.DuplicatesError, match="threshold"):
        dup.find_duplicates(planted / "feats", threshold=-1.01)
