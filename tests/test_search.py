"""Search over a feature export: the ranking against a float64 brute-force search, queries embedded
by the export's own model and settings, the saved index reused and rebuilt when the export changes,
the result files and page, and every bad input as one line with nothing written."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from image_fixtures import ARCH, export_folder, make_images
from ssl_xcit import cli
from ssl_xcit.commands import search as search_cmd
from ssl_xcit.evaluate import search
from ssl_xcit.evaluate.descriptors import Whitening, gem, l2n
from ssl_xcit.evaluate.export import load_exported
from ssl_xcit.evaluate.exported import fingerprint, open_export, read_descriptors


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("search")
    make_images(root / "imgs", 20)
    export_folder(root / "imgs", root / "feats", patch=True, shard_size=8)  # 3 shards
    return root


def _brute(db: np.ndarray, q: np.ndarray, k: int):
    sims = q.astype(np.float64) @ db.astype(np.float64).T
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, order, 1), order


def test_descriptors_against_hand_computation():
    patch = torch.tensor([[[1.0, -2.0], [3.0, 0.5]]])        # B=1, P=2, D=2
    want = np.array([((1 + 3 ** 4) / 2) ** 0.25, ((1e-6 ** 4 + 0.5 ** 4) / 2) ** 0.25])
    np.testing.assert_allclose(gem(patch).numpy()[0], want, rtol=1e-5)
    x = np.array([[3.0, 4.0], [0.0, 2.0]])
    np.testing.assert_allclose(l2n(x), [[0.6, 0.8], [0.0, 1.0]])
    rng = np.random.default_rng(0)
    data = rng.normal(size=(500, 4)) @ np.diag([5.0, 2.0, 1.0, 0.1]) + 3.0
    w = Whitening.fit(data)
    z = (data - w.mean) @ w.projection                        # before the final L2 norm
    np.testing.assert_allclose(np.cov(z.T, bias=True), np.eye(4), atol=1e-4)


def test_read_descriptors_match_the_export(exported):
    view = open_export(exported / "feats")
    arrays = load_exported(exported / "feats")
    np.testing.assert_allclose(read_descriptors(view, "cls"), l2n(arrays["cls"]), atol=1e-6)
    cls_gem = np.concatenate([arrays["cls"], gem(torch.from_numpy(arrays["patch"])).numpy()], 1)
    np.testing.assert_allclose(read_descriptors(view, "cls_gem", chunk=3), l2n(cls_gem), atol=1e-6)
    assert view.paths()[0].endswith("img000.png") and len(view.paths()) == 20


def test_a_safetensors_export_reads_the_same(exported, tmp_path):
    export_folder(exported / "imgs", tmp_path / "st", patch=True, shard_size=8, formats=("safetensors",))
    for descriptor in ("cls", "cls_gem"):
        np.testing.assert_array_equal(read_descriptors(open_export(tmp_path / "st"), descriptor),
                                      read_descriptors(open_export(exported / "feats"), descriptor))


@pytest.mark.parametrize("kind", ["flat", "cells"])
def test_index_ranks_as_brute_force(kind):
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(20, 16))
    db = l2n(centres[rng.integers(0, 20, 4000)] + 0.3 * rng.normal(size=(4000, 16)))
    q = l2n(db[:50] + 0.05 * rng.normal(size=(50, 16)))
    index, resolved = search.build_search_index(db, kind)
    assert resolved == kind
    scores, rows = search.search_features(index, q, 5)
    want_s, want_r = _brute(db, q, 5)
    np.testing.assert_allclose(scores, want_s, atol=1e-4)
    assert (rows == want_r).mean() >= 0.99


def test_search_embeds_queries_like_the_export_and_reuses_its_index(exported, tmp_path):
    feats = exported / "feats"
    res = search.search_images(feats, exported / "imgs" / "img005.png", k=4, progress=False)
    db = read_descriptors(open_export(feats), "cls")
    hit = res["queries"][0]["results"]
    assert hit[0]["path"].endswith("img005.png") and hit[0]["row"] == 5 and hit[0]["score"] > 1 - 1e-5
    want_s, _ = _brute(db, db[5:6], 4)
    np.testing.assert_allclose([h["score"] for h in hit], want_s[0], atol=1e-5)
    assert res["index_built"] is True
    again = search.search_images(feats, exported / "imgs", k=3, progress=False)  # a folder: 20 queries
    assert again["index_built"] is False and len(again["queries"]) == 20
    meta = json.loads((feats / search.INDEX_DIR / "cls.json").read_text())
    assert meta["fingerprint"] == fingerprint(open_export(feats).manifest)


def test_a_redone_export_gets_a_new_index(exported, tmp_path):
    shutil.copytree(exported / "imgs", tmp_path / "imgs")
    export_folder(tmp_path / "imgs", tmp_path / "feats")
    first = search.search_images(tmp_path / "feats", tmp_path / "imgs" / "img001.png", k=2, progress=False)
    export_folder(tmp_path / "imgs", tmp_path / "feats", seed=1, overwrite=True)  # other weights, same folder
    second = search.search_images(tmp_path / "feats", tmp_path / "imgs" / "img001.png", k=2, progress=False)
    assert first["fingerprint"] != second["fingerprint"] and second["index_built"] is True
    assert second["queries"][0]["results"][0]["row"] == 1


def test_command_writes_json_csv_and_an_escaped_page(exported, tmp_path):
    odd = tmp_path / "q<b>&.png"
    shutil.copy(exported / "imgs" / "img002.png", odd)
    out = tmp_path / "out"
    res = search_cmd.main(["--features", str(exported / "feats"), "--query", str(odd), "--k", "3",
                           "--descriptor", "cls_gem", "--out", str(out), "--no-progress"])
    saved = json.loads((out / "results.json").read_text())
    assert saved["queries"][0]["results"][0]["row"] == 2 == res["queries"][0]["results"][0]["row"]
    lines = (out / "results.csv").read_text().splitlines()
    assert lines[0] == "query,rank,score,path,row" and len(lines) == 4 and lines[1].endswith(",2")
    page = (out / "index.html").read_text()
    assert "q&lt;b&gt;&amp;.png" in page and "<b>" not in page and page.count("data:image/jpeg;base64,") == 4


def _one_line(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        cli.run(search_cmd.main, argv, prog="search")
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    return err


def test_bad_inputs_are_one_line_and_write_nothing(exported, tmp_path, capsys):
    out = tmp_path / "never"
    q = str(exported / "imgs" / "img000.png")
    base = ["--out", str(out), "--no-progress"]
    (tmp_path / "plain").mkdir()
    assert "not a feature export" in _one_line(["--features", str(tmp_path / "plain"), "--query", q, *base], capsys)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image at all")
    assert "cannot read the query image" in _one_line(["--features", str(exported / "feats"), "--query",
                                                        str(bad), *base], capsys)
    assert "give a smaller --k" in _one_line(["--features", str(exported / "feats"), "--query", q, "--k", "21",
                                              *base], capsys)
    make_images(tmp_path / "few", 3)
    export_folder(tmp_path / "few", tmp_path / "cls_only")
    msg = _one_line(["--features", str(tmp_path / "cls_only"), "--query", q, "--descriptor", "cls_gem", *base], capsys)
    assert "--patch-tokens" in msg and "patch tokens" in msg
    manifest = json.loads((tmp_path / "cls_only" / "manifest.json").read_text())
    manifest["model"]["weights_sha256"] = "0" * 64                      # made by other weights
    (tmp_path / "cls_only" / "manifest.json").write_text(json.dumps(manifest))
    assert "--checkpoint" in _one_line(["--features", str(tmp_path / "cls_only"), "--query", q, "--k", "2", *base],
                                       capsys)
    assert not out.exists() and not (tmp_path / "cls_only" / search.INDEX_DIR).exists()
    export_folder(tmp_path / "few", tmp_path / "patch_only", outputs=("patch",))
    msg = _one_line(["--features", str(tmp_path / "patch_only"), "--query", q, "--k", "2", *base], capsys)
    assert "needs the CLS features" in msg and "holds only patch" in msg and not out.exists()


def test_an_interrupted_export_is_refused(tmp_path, capsys):
    make_images(tmp_path / "imgs", 6)

    class Stop(Exception):
        pass

    def stop(i):
        raise Stop

    with pytest.raises(Stop):
        export_folder(tmp_path / "imgs", tmp_path / "feats", shard_size=3, on_shard_done=stop)
    msg = _one_line(["--features", str(tmp_path / "feats"), "--query", str(tmp_path / "imgs"), "--no-progress",
                     "--out", str(tmp_path / "o")], capsys)
    assert "incomplete (1 of 2 shards" in msg and "eval/export_features.py" in msg
    assert ARCH and not (tmp_path / "o").exists()


@pytest.mark.parametrize("script", ["search", "find_duplicates", "eval_copy_detection", "eval_image_retrieval"])
def test_scripts_answer_help_and_bad_flags_without_torch(script):
    import subprocess
    import sys
    from pathlib import Path
    repo = Path(__file__).resolve().parents[1]
    probe = ("import runpy, sys; sys.argv = [{p!r}, *{a!r}]\n"
             "try:\n    runpy.run_path({p!r}, run_name='__main__')\n"
             "except SystemExit as e:\n    print('exit', e.code, 'torch' in sys.modules)\n")
    path = str(repo / "eval" / f"{script}.py")
    ok = subprocess.run([sys.executable, "-c", probe.format(p=path, a=["--help"])], capture_output=True, text=True)
    assert "usage:" in ok.stdout and ok.stdout.strip().endswith("exit 0 False")
    bad = subprocess.run([sys.executable, "-c", probe.format(p=path, a=["--no-such-flag"])], capture_output=True,
                         text=True)
    assert bad.stdout.strip() == "exit 2 False" and len(bad.stderr.strip().splitlines()) == 1


def test_a_saved_cells_index_is_loaded_and_answers_like_flat(exported, tmp_path):
    shutil.copytree(exported / "feats", tmp_path / "feats", ignore=shutil.ignore_patterns("search*"))
    q = exported / "imgs" / "img009.png"
    first = search.search_images(tmp_path / "feats", q, k=5, kind="cells", progress=False)
    again = search.search_images(tmp_path / "feats", q, k=5, kind="cells", progress=False)
    flat = search.search_images(tmp_path / "feats", q, k=5, kind="flat", progress=False)
    assert first["index"] == again["index"] == "cells" and first["index_built"] and not again["index_built"]
    assert flat["index_built"]                                    # another kind asked: rebuilt
    rows = [[h["row"] for h in r["queries"][0]["results"]] for r in (first, again, flat)]
    scores = [[h["score"] for h in r["queries"][0]["results"]] for r in (first, again, flat)]
    assert rows[0] == rows[1] and rows[0][0] == 9 == rows[2][0]
    np.testing.assert_allclose(scores[0], scores[2], atol=1e-5)
