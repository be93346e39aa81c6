"""k-NN evaluation: faiss search + weighted votes against an independent float64 NumPy computation,
and the command line end to end (one process and two gloo processes) on a tiny real image folder."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ssl_xcit.commands import knn as knn_command
from ssl_xcit.evaluate import knn

REPO = Path(__file__).resolve().parents[1]
ARCH = "xcit_nano_12_p16"



def reference_knn(train, train_labels, val, val_labels, k, temperature, num_classes):
    """DINO's weighted vote, written from the paper's description in float64 NumPy."""
    tr = np.asarray(train, np.float64)
    va = np.asarray(val, np.float64)
    tr = tr / np.linalg.norm(tr, axis=1, keepdims=True)
    va = va / np.linalg.norm(va, axis=1, keepdims=True)
    sim = va @ tr.T
    nearest = np.argsort(-sim, axis=1, kind="stable")[:, :k]
    weights = np.exp(np.take_along_axis(sim, nearest, axis=1) / temperature)
    neighbour_classes = np.asarray(train_labels)[nearest]
    scores = np.zeros((len(va), num_classes))
    for c in range(num_classes):
        scores[:, c] = (weights * (neighbour_classes == c)).sum(axis=1)
    ranked = np.argsort(-scores, axis=1, kind="stable")[:, :min(5, k)]
    hits = ranked == np.asarray(val_labels)[:, None]
    return ranked, 100.0 * hits[:, 0].mean(), 100.0 * hits.any(axis=1).mean()


def random_problem(seed=0, n_train=600, n_val=150, dim=24, classes=7):
    """Clustered but overlapping classes: continuous data (no exact ties), accuracy far from 0 and 100."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim))
    tl = rng.integers(0, classes, n_train)
    vl = rng.integers(0, classes, n_val)
    train = centres[tl] + 1.5 * rng.normal(size=(n_train, dim))
    val = centres[vl] + 1.5 * rng.normal(size=(n_val, dim))
    return train.astype(np.float32), tl, val.astype(np.float32), vl


def _predict(train, tl, val, vl, ks, cfg=knn.IndexConfig(), temperature=0.07, classes=7):
    tr = knn.l2_normalize(torch.from_numpy(train))
    va = knn.l2_normalize(torch.from_numpy(val))
    if cfg.fp16:
        tr, va = tr.half(), va.half()
    index = knn.build_index(tr, cfg)
    return knn.knn_predict(index, torch.from_numpy(tl), va, torch.from_numpy(vl), ks, temperature, classes,
                           query_batch=64)


@pytest.mark.parametrize("temperature", [0.07, 0.5])
def test_flat_faiss_matches_float64_bruteforce(temperature):
    train, tl, val, vl = random_problem()
    ks = [1, 3, 10, 20, 100, 200]
    preds = _predict(train, tl, val, vl, ks, temperature=temperature)
    for k in ks:
        ranked, top1, top5 = reference_knn(train, tl, val, vl, k, temperature, 7)
        np.testing.assert_array_equal(preds[k].top5.numpy(), ranked, err_msg=f"k={k}")
        assert preds[k].top1_acc == pytest.approx(top1, abs=1e-9)
        assert preds[k].top5_acc == pytest.approx(top5, abs=1e-9)
    # the problem is neither trivial nor hopeless, so the comparison means something
    assert 20 < preds[20].top1_acc < 95


def test_knn_classifier_normalises_and_reports_percent():
    train, tl, val, vl = random_problem(seed=3)
    scaled = train * np.random.default_rng(1).uniform(0.1, 10, size=(len(train), 1)).astype(np.float32)
    res = knn.knn_classifier(torch.from_numpy(scaled), torch.from_numpy(tl), torch.from_numpy(val),
                             torch.from_numpy(vl), ks=[10, 20], num_classes=7)
    for k in (10, 20):
        _, top1, top5 = reference_knn(train, tl, val, vl, k, 0.07, 7)
        assert res[k]["top1"] == pytest.approx(top1) and res[k]["top5"] == pytest.approx(top5)


def test_ivf_with_all_cells_probed_is_exact_and_fp16_is_close():
    train, tl, val, vl = random_problem(seed=5)
    ks = [10, 50]
    flat = _predict(train, tl, val, vl, ks)
    ivf = _predict(train, tl, val, vl, ks, knn.IndexConfig(kind="ivf", nlist=8, nprobe=8))
    half = _predict(train, tl, val, vl, ks, knn.IndexConfig(fp16=True))
    hnsw = _predict(train, tl, val, vl, ks, knn.IndexConfig(kind="hnsw", ef_search=600))
    for k in ks:
        assert torch.equal(ivf[k].top5, flat[k].top5)
        # float16 features move similarities by ~1e-3: nearly every prediction is unchanged
        assert (half[k].top5[:, 0] == flat[k].top5[:, 0]).float().mean() > 0.95
        assert (hnsw[k].top5[:, 0] == flat[k].top5[:, 0]).float().mean() > 0.95


def test_cells_index_with_every_cell_probed_matches_float64_reference():
    """knn_index's cell-by-cell search, all cells probed, gives the float64 vote's exact rankings;
    probing fewer cells (calibrated) keeps nearly every prediction."""
    train, tl, val, vl = random_problem(seed=7)
    ks = [1, 10, 20]
    every = _predict(train, tl, val, vl, ks, knn.IndexConfig(kind="cells", nlist=6, nprobe=6))
    calibrated = _predict(train, tl, val, vl, ks, knn.IndexConfig(kind="cells", nlist=6))
    for k in ks:
        ranked, top1, _ = reference_knn(train, tl, val, vl, k, 0.07, 7)
        np.testing.assert_array_equal(every[k].top5.numpy(), ranked, err_msg=f"k={k}")
        assert (calibrated[k].top5[:, 0].numpy() == ranked[:, 0]).mean() > 0.97


def test_index_defaults_to_auto_which_is_exact_on_small_sets():
    from ssl_xcit.commands import options
    assert options.knn_parser().parse_args([]).index == "auto"
    assert knn.IndexConfig(kind="auto").resolved(knn.AUTO_MIN_TRAIN - 1).kind == "flat"


def test_ties_break_towards_lower_class_index():
    scores = torch.tensor([[0.0, 2.0, 2.0, 1.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    assert knn.ranked_classes(scores, 5).tolist() == [[1, 2, 3, 0, 4]]


def test_weighted_votes_against_hand_computation():
    sims = np.array([[0.9, 0.5, 0.1]])
    labels = np.array([[2, 0, 2]])
    scores = knn.weighted_votes(sims, labels, 3, 0.1)
    expected = [np.exp(5.0), 0.0, np.exp(9.0) + np.exp(1.0)]
    np.testing.assert_allclose(scores.numpy()[0], expected, rtol=1e-12)


def test_bad_inputs_raise_clear_errors():
    train, tl, val, vl = random_problem(n_train=50, n_val=10)
    index = knn.build_index(torch.from_numpy(train))
    with pytest.raises(ValueError, match="exceeds the 50 train features"):
        knn.knn_predict(index, torch.from_numpy(tl), torch.from_numpy(val), torch.from_numpy(vl), [200])
    with pytest.raises(ValueError, match="k-NN needs class labels"):
        knn.knn_predict(index, torch.from_numpy(tl), torch.from_numpy(val), -torch.ones(10, dtype=torch.long), [5])
    with pytest.raises(ValueError, match="kind must be one of"):   # the library names its parameter
        knn.IndexConfig(kind="lsh")
    with pytest.raises(ValueError, match="temperature"):
        knn.weighted_votes(np.zeros((1, 1)), np.zeros((1, 1), dtype=int), 2, 0.0)
    with pytest.raises(FileNotFoundError, match="lacks"):
        knn.load_dumped(REPO / "tests")


# ------------------------------------------------------------------------------------------- CLI
def _cli_args(data, out, extra=()):
    return ["--checkpoint", ARCH, "--data-path", str(data), "--crop-size", "32", "--batch-size", "50",
            "--num-workers", "0", "--device", "cpu", "--output-dir", str(out), "--nb-knn", "5", "20", "200",
            "--no-progress", *extra]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def one_process_run(cifar_small, tmp_path_factory):
    out = tmp_path_factory.mktemp("knn1")
    report = knn_command.main(_cli_args(cifar_small, out, ["--dump-features", str(out / "feats")]))
    return out, report


def test_script_runs_from_outside_the_repo_without_install(tmp_path):
    env = {**os.environ, "PYTHONPATH": "", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(REPO / "eval" / "eval_knn.py"), "--help"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "--nb-knn" in proc.stdout and "--load-features" in proc.stdout


def test_cli_script_writes_knn_json_consistent_with_its_dumped_features(one_process_run):
    # A random-init backbone gives nearly collinear features (cosines within ~1e-3 of each other),
    # so a float64 recomputation would differ on float32 near-ties; the float64 check is above.
    out, returned = one_process_run
    report = json.loads((out / "knn.json").read_text())
    assert returned["results"] == report["results"]
    assert set(report["results"]) == {"5", "20", "200"}
    assert report["num_train"] == 200 and report["num_val"] == 100 and report["num_classes"] == 10
    assert report["checkpoint"] == ARCH and report["index"] == "flat" and report["arch"] == ARCH
    assert Path(report["data_path"]).is_dir()    # which images the figure is of (the model card says it)
    feats, meta = knn.load_dumped(out / "feats")
    assert meta["classes"][:2] == ["airplane", "automobile"] or len(meta["classes"]) == 10
    assert feats["train_features"].shape == (200, 128) and feats["val_features"].shape == (100, 128)
    np.testing.assert_allclose(feats["train_features"].norm(dim=1).numpy(), 1.0, atol=1e-5)
    assert torch.equal(feats["train_labels"], torch.arange(10).repeat_interleave(20))
    again = knn.knn_classifier(feats["train_features"], feats["train_labels"], feats["val_features"],
                               feats["val_labels"], [5, 20, 200], num_classes=10,
                               normalize=False)
    for k in (5, 20, 200):
        assert report["results"][str(k)] == again[k]
        assert 0 <= again[k]["top1"] <= again[k]["top5"] <= 100
    assert report["results"]["200"]["top5"] >= report["results"]["200"]["top1"]


def test_load_features_skips_extraction_and_gives_same_numbers(one_process_run, tmp_path):
    out, _ = one_process_run
    report = knn_command.main(["--load-features", str(out / "feats"), "--output-dir",
                       str(tmp_path), "--nb-knn", "5", "20", "200", "--device", "cpu"])
    assert report["results"] == json.loads((out / "knn.json").read_text())["results"]
    again = json.loads((tmp_path / "knn.json").read_text())
    assert again["results"] == report["results"]
    assert again["data_path"] == json.loads((out / "knn.json").read_text())["data_path"]   # carried by the dump


def test_two_process_extraction_equals_one_process(one_process_run, cifar_small, tmp_path):
    out1, _ = one_process_run
    out2 = tmp_path / "knn2"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
           str(_free_port()), str(REPO / "eval" / "eval_knn.py"),
           *_cli_args(cifar_small, out2, ["--dump-features", str(out2 / "feats")])]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, _ = knn.load_dumped(out1 / "feats")
    two, _ = knn.load_dumped(out2 / "feats")
    for key in ("train_labels", "val_labels"):
        assert torch.equal(one[key], two[key])
    for key in ("train_features", "val_features"):
        # batches of 50 line up with the 2 shards (100 + 50 images): same batches, same numbers
        assert torch.equal(one[key], two[key]), key
    r1 = json.loads((out1 / "knn.json").read_text())["results"]
    r2 = json.loads((out2 / "knn.json").read_text())["results"]
    assert r1 == r2


def test_training_checkpoint_teacher_or_student_and_default_output_dir(cifar_root, tmp_path):
    from conftest import make_subset
    from ssl_xcit.evaluate import backbone, datasets
    from ssl_xcit.evaluate.features import extract_features
    data = make_subset(cifar_root, tmp_path / "data", 3, 1)
    nets = {key: backbone.load_frozen_backbone(ARCH, seed=seed) for key, seed in (("teacher", 1), ("student", 2))}
    run = tmp_path / "run"
    run.mkdir()
    ckpt = run / "checkpoint.pth"
    torch.save({"format": "ssl_xcit", "config": {"model": {"arch": ARCH}},
                **{key: {f"backbone.{k}": v for k, v in m.state_dict().items()} for key, m in nets.items()}}, ckpt)
    val = datasets.open_images(data / "val", datasets.eval_transform(32))
    for key, net in nets.items():
        dump = tmp_path / f"dump_{key}"
        knn_command.main(["--checkpoint", str(ckpt), "--checkpoint-key", key, "--data-path", str(data),
                  "--crop-size", "32",
                  "--nb-knn", "3", "--num-workers", "0", "--device", "cpu", "--dump-features", str(dump),
                  "--no-progress"])
        assert (run / "knn.json").is_file()  # default output folder: the checkpoint's
        assert json.loads((run / "knn.json").read_text())["arch"] == ARCH   # from the checkpoint, not --arch
        expected, labels = extract_features(net, val, 8, "cpu", 0, progress=False)
        got, _ = knn.load_dumped(dump)
        torch.testing.assert_close(got["val_features"], knn.l2_normalize(expected))
        assert torch.equal(got["val_labels"], labels)
