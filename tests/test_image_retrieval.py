"""DINO's retrieval protocol: revisitop's compute_map by hand (junk removed from the ranking, a query
without positives left out, precision@k with revisitop's cut), Medium / Hard from easy / hard / junk,
the command end to end on a synthetic data set written in revisitop's exact layout, and a folder
without gnd_*.pkl in one line."""
from __future__ import annotations

import pickle

import numpy as np
import pytest
from PIL import Image

from image_fixtures import ARCH, make_images
from ssl_xcit import cli
from ssl_xcit.commands import image_retrieval as ir_cmd
from ssl_xcit.evaluate import retrieval


def test_compute_map_with_junk_by_hand():
    ranks = np.array([[3, 0, 5, 1, 2, 4]]).T                 # one query; database ids best first
    # positives 0 (position 1) and 1 (position 3); junk 5 (position 2) is taken out: 1 moves to 2
    m, aps, pr, prs = retrieval.compute_map(ranks, [{"ok": np.array([0, 1]), "junk": np.array([5])}], [1, 2, 5])
    ap = ((0 / 1 + 1 / 2) / 2 + (1 / 2 + 2 / 3) / 2) / 2
    assert m == pytest.approx(ap) and aps[0] == pytest.approx(ap)
    # revisitop's precision@k: k cut to the last positive's position (here 3, 1-based)
    np.testing.assert_allclose(prs[0], [0 / 1, 1 / 2, 2 / 3])
    m_nojunk, *_ = retrieval.compute_map(ranks, [{"ok": np.array([0, 1])}])
    assert m_nojunk == pytest.approx(((0 + 1 / 2) / 2 + (1 / 3 + 2 / 4) / 2) / 2)


def test_a_query_without_positives_is_left_out():
    ranks = np.array([[0, 1, 2], [2, 1, 0]]).T
    m, aps, _, _ = retrieval.compute_map(ranks, [{"ok": np.array([0])}, {"ok": np.array([], dtype=int)}])
    assert m == 1.0 and np.isnan(aps[1])
    with pytest.raises(retrieval.RetrievalError):
        retrieval.compute_map(ranks, [{"ok": []}, {"ok": []}])


def test_medium_and_hard_protocols():
    gnd = [{"easy": [1], "hard": [2], "junk": [3]}]
    medium, hard = retrieval.medium_hard(gnd)
    assert medium[0]["ok"].tolist() == [1, 2] and medium[0]["junk"].tolist() == [3]
    assert hard[0]["ok"].tolist() == [2] and sorted(hard[0]["junk"].tolist()) == [1, 3]
    ranks = np.array([[1, 3, 2, 0]]).T                       # easy first, junk, then hard
    s = retrieval.score_rankings(ranks, gnd)
    assert s["mAP_M"] == pytest.approx(100.0)                # junk 3 removed: 1 and 2 at positions 0, 1
    assert s["mAP_H"] == pytest.approx(100.0)                # easy 1 and junk 3 removed: 2 first


def write_revisitop(root, dataset: str = "roxford5k"):
    """A tiny data set in revisitop's layout: 8 database images, 2 queries that are copies of
    database images 2 and 5 (query 0: easy [2], junk [3]; query 1: hard [5], easy [6])."""
    folder = root / dataset
    paths = make_images(folder / "jpg", 8, size=(72, 56))
    imlist = []
    for p in paths:                                           # revisitop: .jpg files, names without it
        Image.open(p).convert("RGB").save(p.with_suffix(".jpg"), quality=95)
        p.unlink()
        imlist.append(p.stem)
    for q, src in (("query0", 2), ("query1", 5)):
        (folder / "jpg" / f"{q}.jpg").write_bytes((folder / "jpg" / f"{imlist[src]}.jpg").read_bytes())
    gnd = [{"bbx": [0, 0, 10, 10], "easy": np.array([2]), "hard": np.array([], dtype=np.int64), "junk": np.array([3])},
           {"bbx": [0, 0, 10, 10], "easy": np.array([6]), "hard": np.array([5]), "junk": np.array([], dtype=np.int64)}]
    with open(folder / f"gnd_{dataset}.pkl", "wb") as f:
        pickle.dump({"imlist": imlist, "qimlist": ["query0", "query1"], "gnd": gnd}, f)
    return root


def test_command_on_a_revisitop_fixture(tmp_path, capsys):
    root = write_revisitop(tmp_path)
    res = ir_cmd.main(["--data_path", str(root), "--dataset", "roxford5k", "--imsize", "64",
                       "--pretrained_weights", ARCH, "--no-progress", "--out", str(tmp_path / "r.json")])
    assert res["database"] == 8 and res["queries"] == 2
    # each query is an exact copy of a positive, so that positive ranks first
    assert res["mAP_H"] == pytest.approx(100.0)              # query 0 has no hard positive: left out
    assert 50.0 < res["mAP_M"] <= 100.0 and res["mP@1_M"] == pytest.approx(100.0)
    assert ">> roxford5k: mAP M:" in capsys.readouterr().out and (tmp_path / "r.json").is_file()
    multi = ir_cmd.main(["--data_path", str(root), "--dataset", "roxford5k", "--imsize", "64", "--multiscale",
                         "true", "--pretrained_weights", ARCH, "--no-progress"])
    assert multi["multiscale"] is True and multi["mP@1_M"] == pytest.approx(100.0)


def test_missing_ground_truth_is_one_line(tmp_path, capsys):
    root = write_revisitop(tmp_path)
    (root / "roxford5k" / "gnd_roxford5k.pkl").unlink()
    with pytest.raises(SystemExit) as exc:
        cli.run(ir_cmd.main, ["--data_path", str(root), "--dataset", "roxford5k", "--pretrained_weights", ARCH],
                prog="retrieval")
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and len(err.splitlines()) == 1
    assert "gnd_roxford5k.pkl not found" in err and "--data_path" in err


def test_a_pickle_that_names_code_is_refused(tmp_path):
    root = write_revisitop(tmp_path, "rparis6k")
    with open(root / "rparis6k" / "gnd_rparis6k.pkl", "wb") as f:
        pickle.dump({"imlist": [], "qimlist": [], "gnd": [], "x": print}, f)
    with pytest.raises(retrieval.RetrievalError, match="builtins.print"):
        retrieval.load_revisitop(root, "rparis6k")
