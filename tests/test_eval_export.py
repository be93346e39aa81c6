"""Feature export: an interrupted export resumes to the same bytes, damaged shards are redone,
load_exported returns what extraction gives, and the command line on a tiny real image folder."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import make_subset
from killed_writer import start_blocked_writer
from ssl_xcit.commands import export as export_command
from ssl_xcit.evaluate import backbone, datasets, export
from ssl_xcit.evaluate.features import extract_outputs

REPO = Path(__file__).resolve().parents[1]
ARCH = "xcit_nano_12_p16"



@pytest.fixture(scope="module")
def images(cifar_root, tmp_path_factory):
    """30 real images in 10 classes (ImageFolder layout)."""
    root = make_subset(cifar_root, tmp_path_factory.mktemp("exp"), 3, 1)
    return datasets.open_images(root / "train", datasets.eval_transform(32))


@pytest.fixture(scope="module")
def model():
    return backbone.load_frozen_backbone(ARCH)


KW = dict(outputs=("cls", "patch"), n_last_blocks=2, shard_size=7, formats=("npy", "safetensors"),
          batch_size=4, num_workers=0, progress=False)


@pytest.fixture(scope="module")
def straight(model, images, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    manifest = export.export_features(model, images, out, **KW)
    return out, manifest


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


class Stop(Exception):
    pass


def test_interrupted_export_resumes_to_identical_files(model, images, straight, tmp_path):
    ref_dir, manifest = straight
    assert manifest["complete"] and manifest["num_shards"] == 5 and manifest["rows"] == 30
    done: list[int] = []

    def stop_after_two(i):
        done.append(i)
        if len(done) == 2:
            raise Stop

    with pytest.raises(Stop):
        export.export_features(model, images, tmp_path, on_shard_done=stop_after_two, **KW)
    assert not json.loads((tmp_path / "manifest.json").read_text())["complete"]
    with pytest.raises(RuntimeError, match="incomplete .2 of 5 shards"):
        export.load_exported(tmp_path)
    redone: list[int] = []
    export.export_features(model, images, tmp_path, on_shard_done=redone.append, **KW)
    assert redone == [2, 3, 4]  # the two finished shards were kept, not recomputed
    assert _files(tmp_path) == _files(ref_dir)


def test_damaged_and_partial_shards_are_redone(model, images, straight, tmp_path):
    ref_dir, _ = straight
    work = tmp_path / "work"
    shutil.copytree(ref_dir, work)
    # shard 1: same size, one flipped byte (only the checksum notices)
    victim = work / "shard-00001.cls.npy"
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF
    victim.write_bytes(bytes(data))
    # shard 3: interrupted before its record was written
    (work / "shard-00003.done.json").unlink()
    # and a temp file a killed process left behind (kill -9 during its write)
    writer = start_blocked_writer(work / "shard-00004.cls.npy")
    writer.kill()
    writer.wait(timeout=30)
    assert [p.name for p in work.glob(".shard-00004.cls.npy.*.tmp")]
    redone: list[int] = []
    export.export_features(model, images, work, on_shard_done=redone.append, **KW)
    assert redone == [1, 3]
    assert _files(work) == _files(ref_dir)


def test_load_exported_matches_direct_extraction(model, images, straight):
    ref_dir, manifest = straight
    loaded = export.load_exported(ref_dir, verify=True)
    direct = extract_outputs(model, images, ["cls", "patch", "last_blocks"], batch_size=4, num_workers=0,
                             n_last_blocks=2, progress=False)
    for name in ("cls", "patch", "last_blocks"):
        assert loaded[name].dtype == np.float32
        np.testing.assert_allclose(loaded[name], direct.outputs[name].numpy(), rtol=1e-5, atol=1e-5)
    assert loaded["cls"].shape == (30, 128) and loaded["patch"].shape == (30, 4, 128)
    assert loaded["last_blocks"].shape == (30, 256)
    np.testing.assert_array_equal(loaded["index"], np.arange(30))
    np.testing.assert_array_equal(loaded["label"], direct.labels.numpy())
    assert list(loaded["path"]) == images.files
    # the safetensors copy holds the same arrays as the .npy files
    from safetensors.numpy import load_file
    st = load_file(ref_dir / "shard-00002.safetensors")
    np.testing.assert_array_equal(st["cls"], np.load(ref_dir / "shard-00002.cls.npy"))
    assert manifest["arrays"]["patch"]["row_shape"] == [4, 128]


def test_other_settings_in_the_same_folder_are_refused(model, images, straight):
    ref_dir, _ = straight
    with pytest.raises(ValueError, match="other settings"):
        export.export_features(model, images, ref_dir, **{**KW, "shard_size": 8})


def test_corrupt_images_are_skipped_in_a_flat_folder(model, images, tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    for i, f in enumerate(images.files[:5]):
        os.symlink(images.root / f, flat / f"img{i}.jpg")
    (flat / "img2.jpg").unlink()
    (flat / "img2.jpg").write_bytes(b"not a jpeg")
    ds = datasets.open_images(flat, datasets.eval_transform(32))
    out = tmp_path / "out"
    manifest = export.export_features(model, ds, out, shard_size=3, num_workers=0, progress=False)
    loaded = export.load_exported(out)
    assert manifest["rows"] == 4 and manifest["skipped"] == 1 and not manifest["has_labels"]
    assert "label" not in loaded
    np.testing.assert_array_equal(loaded["index"], [0, 1, 3, 4])
    assert list(loaded["path"]) == ["img0.jpg", "img1.jpg", "img3.jpg", "img4.jpg"]


def test_bad_settings_raise():
    with pytest.raises(ValueError, match="formats must be npy"):   # the library names its parameters
        export.ExportConfig(formats=("hdf5",))
    with pytest.raises(ValueError, match="dtype must be one of"):
        export.ExportConfig(dtype="bfloat16")
    with pytest.raises(ValueError, match="n_last_blocks > 0"):
        export.ExportConfig(outputs=("cls", "last_blocks"))


# ------------------------------------------------------------------------------------------- CLI
def test_cli_exports_a_split(cifar_small, tmp_path):
    manifest = export_command.main(["--checkpoint", ARCH, "--data-path", str(cifar_small), "--split", "val", "--out",
                            str(tmp_path / "val"), "--crop-size", "32", "--format", "both", "--shard-size", "40",
                            "--dtype", "float16", "--num-workers", "0", "--device", "cpu", "--no-progress"])
    assert manifest["complete"] and manifest["num_shards"] == 3 and manifest["rows"] == 100
    assert manifest["config"]["source"]["checkpoint"] == ARCH
    loaded = export.load_exported(tmp_path / "val")
    assert loaded["cls"].dtype == np.float16 and loaded["cls"].shape == (100, 128)
    np.testing.assert_array_equal(loaded["label"], np.repeat(np.arange(10), 10))
    with pytest.raises(ValueError, match="--split train or --split val"):
        export_command.main(["--checkpoint", ARCH, "--data-path", str(cifar_small), "--out", str(tmp_path / "x")])


def _tiny_checkpoint(path: Path, seed: int) -> str:
    """A real timm-format checkpoint of the test arch with weights drawn from ``seed``; its sha256."""
    import hashlib

    from ssl_xcit import get_model
    torch.manual_seed(seed)
    torch.save(get_model(ARCH, num_classes=0).state_dict(), path)
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("exists", [True, False])
def test_a_read_only_out_folder_is_one_line_naming_it(cifar_small, tmp_path, monkeypatch, capsys, exists):
    """--out on a read-only file system was OSError(EROFS)'s traceback, after the model and the images
    were read; now one line naming the folder, before."""
    from conftest import make_read_only
    from eval import export_features
    from ssl_xcit import cli
    read_only = tmp_path / "ro"
    read_only.mkdir()
    out = read_only / "features" if not exists else read_only
    make_read_only(monkeypatch, read_only)
    argv = ["--checkpoint", ARCH, "--data-path", str(cifar_small), "--split", "val", "--out", str(out),
            "--crop-size", "32", "--num-workers", "0", "--device", "cpu", "--no-progress"]
    with pytest.raises(SystemExit) as stop:
        cli.run(export_features.main, argv, prog="export_features.py")
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1, err
    assert err == f"export_features.py: error: cannot write in {out}: read-only file system; give another " \
                  "folder or make this one writable\n", err


def test_resume_with_another_checkpoint_is_refused(cifar_small, tmp_path, monkeypatch):
    """Interrupted after one of three shards, the checkpoint file replaced by another: the rerun must not
    mix two models' features; the original file resumes; --overwrite starts over."""
    ckpt, out = tmp_path / "checkpoint.pth", tmp_path / "feats"
    sha_a = _tiny_checkpoint(ckpt, seed=1)
    argv = ["--checkpoint", str(ckpt), "--data-path", str(cifar_small), "--split", "val", "--out", str(out),
            "--crop-size", "32", "--shard-size", "40", "--num-workers", "0", "--device", "cpu", "--no-progress"]
    real_export, done = export.export_features, []

    def export_recording(*args, stop_after=None, **kwargs):
        def on_shard_done(i):
            done.append(i)
            if stop_after is not None and len(done) == stop_after:
                raise Stop
        return real_export(*args, on_shard_done=on_shard_done, **kwargs)

    monkeypatch.setattr(export, "export_features", lambda *a, **k: export_recording(*a, stop_after=1, **k))
    with pytest.raises(Stop):
        export_command.main(argv)
    assert json.loads((out / "manifest.json").read_text())["config"]["source"]["checkpoint_sha256"] == sha_a
    monkeypatch.setattr(export, "export_features", export_recording)
    before = _files(out)

    sha_b = _tiny_checkpoint(ckpt, seed=2)  # same path, other weights
    assert sha_b != sha_a
    with pytest.raises(export.ExportError) as info:
        export_command.main(argv)
    msg = str(info.value)
    assert sha_a[:16] in msg and sha_b[:16] in msg and str(ckpt) in msg, msg
    assert "--overwrite" in msg and "--out" in msg and "\n" not in msg
    assert _files(out) == before and done == [0]  # nothing written, nothing mixed
    manifest_file = out / "manifest.json"
    older = json.loads(manifest_file.read_text())  # as an export by an ssl_xcit without hashes
    older["config"]["source"].pop("checkpoint_sha256")
    manifest_file.write_text(json.dumps(older))
    with pytest.raises(export.ExportError, match="no file hash recorded.*mix two models"):
        export_command.main(argv)
    manifest_file.write_bytes(before["manifest.json"])

    assert _tiny_checkpoint(ckpt, seed=1) == sha_a  # the original file again: resumes
    manifest = export_command.main(argv)
    assert manifest["complete"] and done == [0, 1, 2]

    sha_b = _tiny_checkpoint(ckpt, seed=2)
    done.clear()
    (out / "notes.txt").write_text("mine")
    manifest = export_command.main([*argv, "--overwrite"])
    assert manifest["complete"] and done == [0, 1, 2]  # every shard redone with the new weights
    assert (out / "notes.txt").read_text() == "mine"  # --overwrite removes the export's files only
    moved = tmp_path / "moved.pth"
    ckpt.rename(moved)  # the same file elsewhere: its identity is its contents, the export is complete
    done.clear()
    argv[argv.index(str(ckpt))] = str(moved)
    assert export_command.main(argv)["complete"] and done == []
    assert manifest["config"]["source"]["checkpoint_sha256"] == sha_b
    torch.manual_seed(2)
    from ssl_xcit import get_model
    model_b = get_model(ARCH, num_classes=0).eval()
    loaded = export.load_exported(out, verify=True)
    ds = datasets.open_images(cifar_small / "val", datasets.eval_transform(32))
    with torch.no_grad():
        first = torch.stack([ds[i][0] for i in range(4)])
        np.testing.assert_allclose(loaded["cls"][:4], model_b(first).numpy(), rtol=1e-5, atol=1e-6)


def test_api_resume_with_other_weights_is_refused(model, images, tmp_path):
    """export_features records a fingerprint of the weights themselves, so a library caller that
    resumes with another model (no checkpoint file involved) is refused too."""
    done = []

    def stop(i):
        done.append(i)
        raise Stop

    with pytest.raises(Stop):
        export.export_features(model, images, tmp_path, on_shard_done=stop, **KW)
    other = backbone.load_frozen_backbone(ARCH, seed=5)
    with pytest.raises(export.ExportError, match="other weights"):
        export.export_features(other, images, tmp_path, **KW)
    manifest = export.export_features(model, images, tmp_path, on_shard_done=done.append, **KW)
    assert manifest["complete"] and done == [0, 1, 2, 3, 4]


def test_progress_counts_images_per_batch(model, images, tmp_path, monkeypatch):
    """One bar over the images (not over 10,000-image shards), moved after every batch."""
    import tqdm

    bars = []

    class Recorder(tqdm.tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.steps, self.shown = [], not self.disable  # close() sets disable
            bars.append(self)

        def update(self, n=1):
            self.steps.append(n)
            return super().update(n)

    monkeypatch.setattr(tqdm, "tqdm", Recorder)
    export.export_features(model, images, tmp_path, **{**KW, "progress": True})
    shown = [b for b in bars if b.shown]
    assert len(shown) == 1
    bar = shown[0]
    assert bar.total == len(images) == 30 and bar.unit == "img"
    # shards of 7 images in batches of 4: 4+3 per shard, 2 for the last shard of 2 images
    assert bar.steps == [4, 3] * 4 + [2] and bar.n == 30


def test_script_help_runs_without_install(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "eval" / "export_features.py"), "--help"], cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": "", "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "--patch-tokens" in proc.stdout and "--shard-size" in proc.stdout


def _gather_worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from ssl_xcit.evaluate.runtime import gather_rows
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        # rank 0 holds 5 rows (indices 0, 2, 4, 6, 8), rank 1 holds 2 (7, 1), out of order
        idx = torch.tensor([8, 0, 4, 2, 6]) if rank == 0 else torch.tensor([7, 1])
        rows = torch.stack([idx.double() * 10, -idx.double()], dim=1).unsqueeze(1).repeat(1, 2, 1).half()
        got_rows, got_idx = gather_rows(rows, idx, chunk_rows=2)  # 3 chunks of at most 2 rows
        if rank == 0:
            torch.save({"rows": got_rows, "idx": got_idx}, out)
        else:
            assert got_rows is None and got_idx is None
    finally:
        dist.destroy_process_group()


def test_gather_rows_orders_uneven_shards_by_index(tmp_path):
    import socket

    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "gathered.pt"
    mp.spawn(_gather_worker, args=(2, port, str(out)), nprocs=2, join=True)
    got = torch.load(out, weights_only=True)
    expected_idx = torch.tensor([0, 1, 2, 4, 6, 7, 8])
    assert torch.equal(got["idx"], expected_idx)
    expected = torch.stack([expected_idx.double() * 10, -expected_idx.double()], 1).unsqueeze(1).repeat(1, 2, 1)
    assert got["rows"].dtype == torch.float16 and torch.equal(got["rows"].double(), expected)
