"""Classification evaluation: top-1 / top-5 on real CIFAR-10 images must equal an independent
computation (PIL resize + numpy normalisation + timm's model + argsort)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from ssl_xcit.commands.classification import main
from ssl_xcit.evaluate.classification import spread_subset, topk_correct

REPO = Path(__file__).resolve().parents[1]
MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])
SIZE = 64



@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    """timm's XCiT-nano with a random 10-class head, saved as a timm state dict."""
    torch.manual_seed(0)
    model = timm.create_model("xcit_nano_12_p16_224", num_classes=10).eval()
    with torch.no_grad():
        model.head.weight.normal_(0, 1.0)  # spread the logits so top-k is not a near-tie
    path = tmp_path_factory.mktemp("clf") / "nano10.pth"
    torch.save(model.state_dict(), path)
    return model, path


def _expected(model, val_root: Path, indices=None) -> tuple[float, float, int]:
    """Top-1 / top-5 computed without the package: sorted class folders, sorted files."""
    classes = sorted(p.name for p in val_root.iterdir() if p.is_dir())
    items = [(f, c) for c, name in enumerate(classes)
             for f in sorted((val_root / name).iterdir())]
    if indices is not None:
        items = [items[i] for i in indices]
    batch, labels = [], []
    for f, c in items:
        img = Image.open(f).convert("RGB")
        w, h = img.size  # short side to SIZE (bicubic), then centre crop SIZE x SIZE
        s = SIZE / min(w, h)
        img = img.resize((round(w * s), round(h * s)), Image.BICUBIC)
        left, top = (img.size[0] - SIZE) // 2, (img.size[1] - SIZE) // 2
        img = img.crop((left, top, left + SIZE, top + SIZE))
        arr = (np.asarray(img, dtype=np.float64) / 255.0 - MEAN) / STD
        batch.append(torch.from_numpy(arr.transpose(2, 0, 1)).float())
        labels.append(c)
    with torch.no_grad():
        logits = model(torch.stack(batch)).numpy()
    order = np.argsort(-logits, axis=1)
    labels = np.array(labels)
    top1 = (order[:, 0] == labels).mean() * 100
    top5 = (order[:, :5] == labels[:, None]).any(axis=1).mean() * 100
    return top1, top5, len(items)


def _args(ckpt, data, *extra):
    return ["--model", "xcit_nano_12_p16", "--checkpoint", str(ckpt), "--data-path", str(data),
            "--batch-size", "16", "--device", "cpu", "--num-workers", "0",
            "--img-size", str(SIZE), *extra]


def test_topk_correct_against_numpy():
    g = torch.Generator().manual_seed(0)
    logits, target = torch.randn(50, 7, generator=g), torch.randint(0, 7, (50,), generator=g)
    order = np.argsort(-logits.numpy(), axis=1)
    for k in (1, 3, 5):
        want = int((order[:, :k] == target.numpy()[:, None]).any(axis=1).sum())
        assert topk_correct(logits, target, ks=(k,))[k] == want
    two = torch.randn(4, 2, generator=g)  # k capped at the number of classes
    assert topk_correct(two, torch.tensor([0, 1, 1, 0]), ks=(1, 5))[5] == 4


def test_spread_subset_covers_all_classes():
    idx = spread_subset(100, 10)  # 10 classes x 10 images, ImageFolder order
    assert len(idx) == 10 and sorted({i // 10 for i in idx}) == list(range(10))
    assert spread_subset(100, None) is None and spread_subset(100, 500) is None
    with pytest.raises(ValueError, match="limit must be positive"):   # the library names its parameter
        spread_subset(100, 0)


def test_accuracy_equals_independent_computation(cifar_small, classifier, capsys):
    model, ckpt = classifier
    result = main(_args(ckpt, cifar_small))  # root with val/ inside
    top1, top5, n = _expected(model, cifar_small / "val")
    assert result["n_images"] == n == 100 and result["num_classes"] == 10
    assert result["top1"] == pytest.approx(top1) and result["top5"] == pytest.approx(top5)
    assert 0 < result["top5"] < 100 and result["top1"] < result["top5"]  # a non-trivial check
    line = capsys.readouterr().out
    assert "top-1" in line and f"{top1:.2f}%" in line


def test_limit_takes_evenly_spaced_images(cifar_small, classifier):
    model, ckpt = classifier
    result = main(_args(ckpt, cifar_small / "val", "--limit", "20"))
    top1, top5, n = _expected(model, cifar_small / "val", indices=spread_subset(100, 20))
    assert result["n_images"] == n == 20
    assert result["top1"] == pytest.approx(top1) and result["top5"] == pytest.approx(top5)


def test_random_baseline_and_errors(cifar_small, classifier, tmp_path):
    _, ckpt = classifier
    result = main(_args("none", cifar_small, "--limit", "10"))
    assert result["num_classes"] == 10 and result["n_images"] == 10
    sd = {k: v for k, v in torch.load(ckpt).items() if not k.startswith("head.")}
    torch.save(sd, tmp_path / "backbone.pth")
    with pytest.raises(ValueError, match="backbone.pth.*no classifier head"):
        main(_args(tmp_path / "backbone.pth", cifar_small))
    with pytest.raises(FileNotFoundError, match="nowhere"):
        main(_args(ckpt, tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="xcit_nano_12_p16"):
        main(["--model", "xcit_nano_12_p61", "--checkpoint", str(ckpt), "--data-path",
              str(cifar_small)])
    with pytest.raises(ValueError, match="10 class folders.*5 classes"):
        main(_args("none", cifar_small, "--num-classes", "5"))


def test_command_line_script(cifar_small, classifier):
    _, ckpt = classifier
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH="")
    proc = subprocess.run([sys.executable, str(REPO / "eval" / "eval_classification.py"),
                           *_args(ckpt, cifar_small, "--limit", "10")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "top-1" in proc.stdout and "10 images" in proc.stdout


def test_unreadable_image_is_skipped_and_counted(cifar_small, classifier, tmp_path):
    """A corrupt file no longer stops the evaluation: the others are scored exactly as before."""
    model, ckpt = classifier
    val = tmp_path / "val"
    for cls_dir in sorted((cifar_small / "val").iterdir()):
        (val / cls_dir.name).mkdir(parents=True)
        for img in sorted(cls_dir.iterdir())[:2]:
            (val / cls_dir.name / img.name).symlink_to(img.resolve())
    top1, top5, n = _expected(model, val)
    (val / "cat" / "zz_broken.jpg").write_bytes(b"not a jpeg at all")
    result = main(_args(ckpt, val))
    assert (result["n_images"], result["n_skipped"]) == (n, 1) == (20, 1)
    assert result["top1"] == pytest.approx(top1) and result["top5"] == pytest.approx(top5)
