"""Tar shards read in place: make_shards from real CIFAR-10, same images/labels as the folder,
resumable writing, corrupt members skipped, truncated shards refused, brace patterns and lists."""
from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ssl_xcit.commands import make_shards as make_shards_command
from ssl_xcit.data import make_shards as ms
from ssl_xcit.data.folders import ImageFiles, collate_skip_corrupt
from ssl_xcit.data.shards import ShardError, ShardImages, expand_braces, looks_like_shards
from ssl_xcit.data.sources import open_image_dataset


@pytest.fixture(scope="module")
def cifar_shards(cifar_small: Path, tmp_path_factory) -> Path:
    """cifar_small (200 train / 100 val real CIFAR-10 images) as shards of ~100 KB (6 + 3 shards)."""
    dest = tmp_path_factory.mktemp("cifar_shards")
    ms.make_shards(cifar_small, dest, "100KB", progress=False)
    return dest


def _pixels_sha(image: Image.Image) -> str:
    return hashlib.sha256(np.asarray(image).tobytes()).hexdigest()


def _file_sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_shards_hold_the_folders_images_and_labels_in_its_order(cifar_small: Path, cifar_shards: Path, tmp_path):
    for split in ("train", "val"):
        folder = ImageFiles(cifar_small / split, progress=False)
        shards = open_image_dataset(cifar_shards / split, cache_dir=tmp_path)
        assert isinstance(shards, ShardImages) and len(shards) == len(folder)
        assert shards.classes == folder.classes and shards.targets == folder.targets
        for i in range(len(folder)):
            assert shards.read_bytes(i) == folder.path(i).read_bytes(), f"{split} image {i} differs"
            a, b = folder[i], shards[i]
            assert _pixels_sha(a[0]) == _pixels_sha(b[0]) and a[1:] == b[1:]
    manifest = json.loads((cifar_shards / "train" / "manifest.json").read_text())
    assert manifest["images"] == 200 and manifest["skipped"] == 0 and len(manifest["shards"]) > 2
    assert manifest["class_counts"] == [20] * 10
    for entry in manifest["shards"]:
        shard = cifar_shards / "train" / entry["name"]
        assert entry["sha256"] == _file_sha(shard) and entry["bytes"] == shard.stat().st_size
        assert entry["bytes"] <= 100_000
    # plain WebDataset: the members are KEY.jpg and KEY.cls, consecutive, the label as text
    with tarfile.open(cifar_shards / "train" / "shard-000000.tar") as tar:
        names = tar.getnames()[:4]
        assert names[0].endswith(".jpg") and names[1] == names[0][:-4] + ".cls"
        assert tar.extractfile(names[1]).read() == b"0"


def test_foreign_shards_by_list_brace_pattern_and_folder_without_manifest(cifar_shards: Path, tmp_path):
    ref = open_image_dataset(cifar_shards / "train", cache_dir=tmp_path)
    tars = sorted((cifar_shards / "train").glob("*.tar"))
    bare = tmp_path / "bare"
    bare.mkdir()
    for t in tars:
        os.link(t, bare / t.name)   # shards without our manifest and index: scanned
    pattern = str(cifar_shards / "train" / f"shard-{{000000..{len(tars) - 1:06d}}}.tar")
    assert expand_braces(pattern) == [str(t) for t in tars]
    for source in ([str(t) for t in tars], pattern, bare):
        assert looks_like_shards(source)
        ds = open_image_dataset(source, cache_dir=tmp_path / "cache")
        assert len(ds) == len(ref) and ds.targets == ref.targets
        assert [ds.read_bytes(i) for i in (0, 57, 199)] == [ref.read_bytes(i) for i in (0, 57, 199)]
    assert list((tmp_path / "cache" / "shard-index").glob("*.npz")), "the scanned index is cached"


def test_select_transform_seed_and_collate_like_imagefiles(cifar_small: Path, cifar_shards: Path, tmp_path):
    from torchvision import transforms as T
    tf = T.Compose([T.RandomResizedCrop(16), T.ToTensor()])
    folder = ImageFiles(cifar_small / "train", tf, progress=False).select([5, 150, 7])
    shards = open_image_dataset(cifar_shards / "train", tf, cache_dir=tmp_path).select([5, 150, 7])
    for i in range(3):
        a, b = folder[(i, 1234 + i)], shards[(i, 1234 + i)]
        assert a[1:] == b[1:] and (a[0] == b[0]).all()
    batch = collate_skip_corrupt([shards[(i, i)] for i in range(3)])
    assert batch.images.shape == (3, 3, 16, 16) and batch.labels.tolist() == [0, 7, 0]


def _jpeg(value: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (value, 10, 20)).save(buf, "JPEG")
    return buf.getvalue()


def _write_shard(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_corrupt_member_is_skipped_and_counted(tmp_path: Path, caplog):
    shard = _write_shard(tmp_path / "a.tar", [("s0.jpg", _jpeg(1)), ("s0.cls", b"0"),
                                             ("s1.jpg", _jpeg(2)[:40]), ("s1.cls", b"1"),
                                             ("s2.jpg", b"not an image"), ("s2.cls", b"1"),
                                             ("s3.jpg", _jpeg(3)), ("s3.cls", b"1")])
    ds = ShardImages([str(shard)], lambda im: __import__("torch").zeros(1))
    assert len(ds) == 4 and ds.targets == [0, 1, 1, 1] and ds.classes == ["0", "1"]
    batch = collate_skip_corrupt([ds[i] for i in range(4)] + [ds[1]])
    assert batch.n_skipped == 3 and batch.indices.tolist() == [0, 3]
    warnings = [r for r in caplog.records if "skipping unreadable image" in r.getMessage()]
    assert len(warnings) == 2 and "a.tar" in warnings[0].getMessage()   # once per member


@pytest.mark.parametrize("how", ["manifest", "scanned"])
def test_truncated_shard_is_one_clear_error_naming_it(cifar_shards: Path, tmp_path: Path, how):
    folder = tmp_path / "copy"
    folder.mkdir()
    for f in (cifar_shards / "train").iterdir():
        if how == "manifest" or f.suffix == ".tar":
            (folder / f.name).write_bytes(f.read_bytes())
    victim = folder / "shard-000001.tar"
    victim.write_bytes(victim.read_bytes()[:30_000])
    with pytest.raises(ShardError, match=r"shard-000001\.tar.*truncated"):
        open_image_dataset(folder, cache_dir=tmp_path / "cache")
    # cut at a member boundary: only the end-of-archive check catches it
    data = (cifar_shards / "train" / "shard-000001.tar").read_bytes()
    with tarfile.open(cifar_shards / "train" / "shard-000001.tar") as tar:
        boundary = tar.getmembers()[6].offset
    victim.write_bytes(data[:boundary])
    with pytest.raises(ShardError, match=r"shard-000001\.tar.*truncated"):
        open_image_dataset(folder, cache_dir=tmp_path / "cache2")


def test_shard_truncated_after_opening_is_an_error_not_a_skip(cifar_shards: Path, tmp_path: Path):
    folder = tmp_path / "copy"
    folder.mkdir()
    for f in (cifar_shards / "val").iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    ds = open_image_dataset(folder, cache_dir=tmp_path)
    last = len(ds) - 1
    shard = folder / "shard-000002.tar"
    shard.write_bytes(shard.read_bytes()[:1024])
    with pytest.raises(ShardError, match="shard-000002.tar is truncated"):
        ds[last]


def test_make_shards_resumes_to_identical_shards(cifar_small: Path, cifar_shards: Path, tmp_path, monkeypatch):
    dest = tmp_path / "out"
    real_encode, calls = ms._encode, {"n": 0}

    def dying_encode(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 130:
            raise KeyboardInterrupt
        return real_encode(*args, **kwargs)
    monkeypatch.setattr(ms, "_encode", dying_encode)
    with pytest.raises(KeyboardInterrupt):
        ms.make_shards(cifar_small, dest, "100KB", progress=False)
    done = sorted(p.name for p in (dest / "train").glob("*.tar"))
    assert 0 < len(done) < 6 and not (dest / "train" / "manifest.json").exists()
    monkeypatch.setattr(ms, "_encode", real_encode)
    ms.make_shards(cifar_small, dest, "100KB", progress=False)
    for split in ("train", "val"):
        got = {p.name: _file_sha(p) for p in (dest / split).glob("*.tar")}
        want = {p.name: _file_sha(p) for p in (cifar_shards / split).glob("*.tar")}
        assert got == want
    assert not list((dest / "train").glob(".*.tmp"))
    with pytest.raises(ms.MakeShardsError, match="other input or options.*shard_size"):
        ms.make_shards(cifar_small, dest, "200KB", progress=False)


def test_make_shards_resize_and_flat_folder(tmp_path: Path):
    src = tmp_path / "flat"
    src.mkdir()
    Image.new("RGB", (400, 300), (200, 30, 30)).save(src / "big.png")
    Image.new("RGB", (50, 60), (30, 200, 30)).save(src / "small.png")
    (src / "broken.jpg").write_bytes(b"\xff\xd8 broken")
    manifest = ms.make_shards(src, tmp_path / "out", "1MB", resize=100, quality=80, progress=False)["."]
    assert manifest["images"] == 2 and manifest["skipped_files"] == ["broken.jpg"] and manifest["classes"] == []
    ds = open_image_dataset(tmp_path / "out", cache_dir=tmp_path)
    sizes = [ds[i][0].size for i in range(2)]
    assert sizes == [(133, 100), (50, 60)] and ds.targets == [-1, -1]   # shorter side 100, never upscaled
    assert ds.read_bytes(0)[:2] == b"\xff\xd8"                           # stored as JPEG


def test_make_shards_counts_trailing_unreadable_images_and_refuses_a_folder_of_them(tmp_path: Path):
    """Unreadable images after the last full shard go to the last shard's record and the manifest (no
    empty shard); a folder with no readable image is one line, and no shard is written."""
    src = tmp_path / "flat"
    src.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.png"):   # noise: each PNG is larger than the shard size, one per shard
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(src / name)
    for name in ("y.jpg", "z.jpg"):
        (src / name).write_bytes(b"\xff\xd8 broken")
    manifest = ms.make_shards(src, tmp_path / "out", "6KB", progress=False)["."]
    assert manifest["images"] == 2 and len(manifest["shards"]) == 2
    assert manifest["skipped_files"] == ["y.jpg", "z.jpg"]
    records = [json.loads((tmp_path / "out" / (ms.shard_name(k) + ".json")).read_text()) for k in (0, 1)]
    assert [r["skipped"] for r in records] == [[], ["y.jpg", "z.jpg"]] and records[1]["end"] == 4
    assert sorted(p.name for p in (tmp_path / "out").glob("*.tar")) == ["shard-000000.tar", "shard-000001.tar"]
    assert not list((tmp_path / "out").glob(".*.tmp"))
    for name in ("a.png", "b.png"):
        (src / name).unlink()
    with pytest.raises(ms.MakeShardsError, match="none of the 2 images could be read; no shard written"):
        ms.make_shards(src, tmp_path / "out2", "6KB", progress=False)
    assert not list((tmp_path / "out2").glob("*.tar")) and not list((tmp_path / "out2").glob(".*.tmp"))


def test_make_shards_command_line_errors_are_one_line(tmp_path: Path, capsys):
    from ssl_xcit import cli
    for argv, needle in ([str(tmp_path / "nope"), str(tmp_path / "o")], "does not exist"), \
                        ([str(tmp_path), str(tmp_path / "o"), "--shard-size", "big"], "--shard-size"), \
                        ([str(tmp_path), str(tmp_path / "o"), "--quality", "0"], "--quality: quality must be"):
        with pytest.raises(SystemExit) as exc:
            cli.run("ssl_xcit.commands.make_shards:main", argv, prog="make_shards")
        err = capsys.readouterr().err
        assert exc.value.code == 2 and err.count("\n") == 1 and needle in err, err
    with pytest.raises(ms.MakeShardsError) as exc:    # the library speaks in its arguments, not in flags
        ms.make_shards(tmp_path, tmp_path / "o", resize=0, progress=False)
    assert "--" not in str(exc.value) and exc.value.option == "resize"


def test_a_second_make_shards_into_the_same_dest_is_refused_naming_the_first(cifar_small: Path, tmp_path: Path,
                                                                              capsys):
    """Two make_shards into one DEST removed each other's temp files or both did the whole job: the
    second is refused in one line naming the first (host, pid, since), before writing anything."""
    import fcntl
    import socket
    import time

    from ssl_xcit import cli
    src, dest = cifar_small / "val", tmp_path / "dest"
    dest.mkdir()
    # the first make_shards, as its lock file shows it: flock held, its host, pid and start in the record
    first = open(dest / ".make_shards.lock", "w")
    fcntl.flock(first.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    first.write(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}))
    first.flush()
    try:
        with pytest.raises(SystemExit) as exc:
            cli.run(make_shards_command.main, [str(src), str(dest), "--shard-size", "100KB", "--no-progress"],
                    prog="make_shards")
        err = capsys.readouterr().err
        assert exc.value.code == 2 and err.count("\n") == 1, err
        assert f"{dest} is in use by another make_shards (host {socket.gethostname()}, pid {os.getpid()}, since" \
            in err and "give another DEST" in err, err
        assert sorted(p.name for p in dest.iterdir()) == [".make_shards.lock"]   # nothing written
    finally:
        first.close()
    manifest = ms.make_shards(src, dest, "100KB", progress=False)["."]   # free again: it runs
    assert manifest["images"] == 100


def test_a_damaged_index_names_its_shard_and_make_shards_rebuilds_it(cifar_small: Path, tmp_path: Path, capsys):
    """A corrupted .idx.npy was numpy's 37-line traceback naming neither shard nor cure: now one line
    naming the shard and the command that rebuilds it, and that command does."""
    import shlex

    from ssl_xcit import cli
    src, dest = cifar_small / "val", tmp_path / "shards"
    ms.make_shards(src, dest, "100KB", progress=False)
    idx = dest / ("shard-000001.tar" + ms.INDEX_SUFFIX)
    good = idx.read_bytes()
    first = ShardImages(dest)[0]
    for damage in (b"\x93NUMPY garbage" * 8, good[: len(good) // 2], b""):
        idx.write_bytes(damage)
        with pytest.raises(ShardError) as info:
            ShardImages(dest)
        message = str(info.value)
        assert message.startswith(f"shard {dest / 'shard-000001.tar'}: its index shard-000001.tar.idx.npy is "
                                  "unreadable (") and "\n" not in message, message
        with pytest.raises(SystemExit):                  # a command line reading it: the same one line
            cli.run(lambda argv: ShardImages(dest), [], prog="tool")
        assert capsys.readouterr().err.count("\n") == 1
    command = message.split("rebuild it with: ", 1)[1].split(" (", 1)[0]
    assert command == f"python -m ssl_xcit.data.make_shards {src} {dest}"
    before = {p.name: p.stat().st_mtime_ns for p in dest.glob("shard-*.tar")}
    cli.run(make_shards_command.main, [*shlex.split(command)[3:], "--shard-size", "100KB", "--no-progress"],
            prog="make_shards")
    assert idx.read_bytes() == good                      # the same index again
    assert (dest / "shard-000000.tar").stat().st_mtime_ns == before["shard-000000.tar"]   # the whole one kept
    rebuilt = ShardImages(dest)
    assert len(rebuilt) == 100 and _pixels_sha(rebuilt[0][0]) == _pixels_sha(first[0])


def test_parse_size():
    assert ms.parse_size("1GB") == 10**9 and ms.parse_size("512MiB") == 2**29 and ms.parse_size("1.5MB") == 1_500_000


def test_knn_tool_gives_the_same_figures_on_shards_as_on_the_folder(cifar_small: Path, cifar_shards: Path,
                                                                   tmp_path: Path):
    from ssl_xcit.commands import knn as knn_command
    from ssl_xcit.evaluate import knn

    def run(data: Path, out: Path) -> dict:
        return knn_command.main(["--checkpoint", "xcit_nano_12_p16", "--data-path", str(data), "--crop-size", "32",
                         "--batch-size", "100", "--num-workers", "0", "--device", "cpu", "--output-dir", str(out),
                         "--nb-knn", "5", "20", "--no-progress", "--dump-features", str(out / "feats")])
    on_folder, on_shards = run(cifar_small, tmp_path / "folder"), run(cifar_shards, tmp_path / "shards")
    assert on_shards["results"] == on_folder["results"]
    assert on_shards["num_train"] == 200 and on_shards["num_val"] == 100
    a, _ = knn.load_dumped(tmp_path / "folder" / "feats")
    b, _ = knn.load_dumped(tmp_path / "shards" / "feats")
    for key in a:   # the same features, image for image: the same images in the same order
        assert (a[key] == b[key]).all(), key


def test_training_on_shards_stopped_mid_epoch_and_resumed_ends_as_a_straight_run(cifar_small: Path,
                                                                                 cifar_shards: Path, tmp_path):
    """Straight on the folder == (4 steps on shards, stop, resume to the end on shards), bit for bit:
    shards give the same images in the same index order, and the index sampler resumes exactly."""
    from ssl_xcit.train.loop import train
    from tests.train_helpers import assert_same_weights, load_weights, tiny_config

    straight = train(tiny_config(cifar_small / "train", tmp_path / "straight"))
    assert straight.status == "finished" and straight.global_step == 12
    first = train(tiny_config(cifar_shards / "train", tmp_path / "pieces", max_steps=4))
    assert first.global_step == 4
    second = train(tiny_config(cifar_shards / "train", tmp_path / "pieces"))
    assert second.status == "finished" and second.global_step == 12
    assert_same_weights(load_weights(tmp_path / "straight"), load_weights(tmp_path / "pieces"), exact=True)


def test_brace_pattern_passes_resolve_data_path_unchanged(cifar_shards: Path):
    from ssl_xcit.data.sources import resolve_data_path
    pattern = str(cifar_shards / "val" / "shard-{000000..000002}.tar")
    assert str(resolve_data_path(pattern)) == pattern
    assert resolve_data_path(cifar_shards / "val") == (cifar_shards / "val").resolve()


def test_resume_on_another_number_of_ranks_reads_the_same_crops_from_shards(cifar_shards: Path, tmp_path):
    """1 process, batch 4, stopped after 2 steps; resumed as 2 ranks x batch 2: from step 2 on the
    two ranks' batches together are the single process's batches, crop for crop."""
    import torch
    from torch.utils.data import DataLoader
    from torchvision import transforms as T
    from ssl_xcit.data.sampler import ResumableDistributedSampler
    ds = open_image_dataset(cifar_shards / "train", T.Compose([T.RandomResizedCrop(8), T.ToTensor()]),
                            cache_dir=tmp_path).select(range(0, 200, 8))   # 25 images

    def batches(sampler, batch):
        return list(DataLoader(ds, batch_size=batch, sampler=sampler, collate_fn=collate_skip_corrupt))
    one = ResumableDistributedSampler(len(ds), 4, seed=5)
    whole = batches(one, 4)
    state = one.state_dict(step=2)
    ranks = []
    for r in range(2):
        s = ResumableDistributedSampler(len(ds), 2, num_replicas=2, rank=r, seed=5)
        s.load_state_dict(state)
        ranks.append(batches(s, 2))
    assert len(ranks[0]) == len(whole) - 2
    for step, (a, b) in enumerate(zip(*ranks), start=2):
        got = {int(i): img for part in (a, b) for i, img in zip(part.indices, part.images)}
        want = {int(i): img for i, img in zip(whole[step].indices, whole[step].images)}
        assert got.keys() == want.keys() and all(torch.equal(got[i], want[i]) for i in want)


def test_two_loader_workers_read_what_one_process_reads(cifar_shards: Path, tmp_path):
    """Workers inherit the open shard descriptors (pread needs no shared file position)."""
    import torch
    from torch.utils.data import DataLoader
    from torchvision import transforms as T
    from ssl_xcit.data.sampler import ResumableDistributedSampler
    ds = open_image_dataset(cifar_shards / "val", T.Compose([T.RandomResizedCrop(8), T.ToTensor()]),
                            cache_dir=tmp_path)
    ds[0]   # opens a shard in the parent before the workers fork
    runs = [list(DataLoader(ds, batch_size=10, sampler=ResumableDistributedSampler(len(ds), 10, seed=1),
                            num_workers=w, collate_fn=collate_skip_corrupt)) for w in (0, 2)]
    assert len(runs[0]) == 10
    for a, b in zip(*runs):
        assert torch.equal(a.indices, b.indices) and torch.equal(a.images, b.images)


@pytest.mark.heavy
def test_make_shards_from_the_real_cifar_archive_matches_the_folder(cifar_root: Path, tmp_path: Path, monkeypatch):
    """All 60,000 CIFAR-10 images: make_shards straight from ../shared/data/cifar10.tar.gz, then
    every image's bytes and label equal the unpacked folder's (by SHA-256), split by split."""
    import conftest
    monkeypatch.setenv("SSL_XCIT_HOME", str(tmp_path / "home"))   # the archive unpacks here
    result = ms.make_shards(conftest.CIFAR_TAR, tmp_path / "shards", "64MB", progress=False)
    assert set(result) == {"train", "val"}
    for split in ("train", "val"):
        folder = ImageFiles(cifar_root / split, progress=False)
        shards = ShardImages(tmp_path / "shards" / split)
        assert len(shards) == len(folder) and shards.targets == folder.targets and shards.classes == folder.classes
        want = [hashlib.sha256(folder.path(i).read_bytes()).digest() for i in range(len(folder))]
        got = [hashlib.sha256(shards.read_bytes(i)).digest() for i in range(len(shards))]
        assert got == want


def test_load_and_location_name_the_failing_member(tmp_path: Path):
    shard = _write_shard(tmp_path / "a.tar", [("s0.jpg", _jpeg(1)), ("s1.jpg", b"not an image")])
    ds = ShardImages([str(shard)])
    assert ds.load(0).size == (8, 8) and ds.root == tmp_path
    with pytest.raises(OSError):
        ds.load(1)
    with tarfile.open(shard) as tar:
        assert ds.location(1) == f"{shard}@{tar.getmember('s1.jpg').offset_data}"
    (tmp_path / "f").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "f" / "x.png")
    folder = ImageFiles(tmp_path / "f", progress=False)
    assert folder.location(0) == str(tmp_path / "f" / "x.png") and folder.load(0).mode == "RGB"


def test_a_flat_image_folder_with_a_stray_tar_is_still_a_folder(tmp_path: Path):
    Image.new("RGB", (4, 4)).save(tmp_path / "a.png")
    _write_shard(tmp_path / "backup.tar", [("s0.jpg", _jpeg(1))])
    assert not looks_like_shards(tmp_path)
    assert isinstance(open_image_dataset(tmp_path, cache_dir=tmp_path / ".c"), ImageFiles)


def test_quickstart_knn_on_a_shard_folder_equals_the_folder(cifar_small: Path, cifar_shards: Path):
    import torch
    from ssl_xcit.commands.quickstart import knn_predictions
    runs = [knn_predictions("xcit_nano_12_p16", root, crop=32, n_train=100, n_val=50, ks=[5],
                            device=torch.device("cpu"), num_workers=0, seed=1) for root in (cifar_small, cifar_shards)]
    (a, ya), (b, yb) = runs
    assert torch.equal(ya, yb) and torch.equal(a[5].top5, b[5].top5) and a[5].top1_acc == b[5].top1_acc


def test_export_tool_on_shards_gives_the_folders_features_labels_and_paths(cifar_small: Path, cifar_shards: Path,
                                                                          tmp_path: Path):
    from ssl_xcit.commands import export as export_command
    from ssl_xcit.evaluate import export

    def run(data: Path, out: Path) -> dict:
        export_command.main(["--checkpoint", "xcit_nano_12_p16", "--data-path", str(data), "--split", "val", "--out",
                     str(out), "--crop-size", "32", "--num-workers", "0", "--device", "cpu", "--no-progress"])
        return export.load_exported(out)
    a, b = run(cifar_small, tmp_path / "folder"), run(cifar_shards, tmp_path / "shards")
    assert (a["cls"] == b["cls"]).all() and (a["label"] == b["label"]).all()
    assert list(b["path"]) == list(a["path"]) and b["path"][0] == "airplane/0000.jpg"
