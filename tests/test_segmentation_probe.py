"""Linear segmentation probe (DINOv2's linear protocol): mIoU against a case counted by hand, the
head learning a colour-coded segmentation from frozen features, the feature cache, the DAVIS
fg/bg split by sequence, and one-line errors for images and masks without partners."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ssl_xcit.evaluate import segmentation as seg
from ssl_xcit.models import get_model


def test_iou_counts_and_miou_by_hand():
    pred = np.array([[0, 0, 1], [1, 1, 2]])
    mask = np.array([[0, 1, 1], [255, 1, 0]], np.uint8)
    inter, union = seg.iou_counts(pred, mask, 4)
    # class 0: 1 shared of {00, 01, 12} -> 1/3; class 1: {02, 11} of {01, 02, 11} -> 2/3 (10 is ignored);
    # class 2: predicted once, never true -> 0; class 3: absent -> None
    assert inter.tolist() == [1, 2, 0, 0] and union.tolist() == [3, 3, 1, 0]
    miou, per = seg.mean_iou(inter, union)
    assert per == [pytest.approx(1 / 3), pytest.approx(2 / 3), 0.0, None]
    assert miou == pytest.approx(1 / 3)


def _write_split(folder: Path, n: int, seed: int, size=(64, 96)) -> None:
    """Images of coloured rectangles on grey; the mask: 1 where red, 2 where blue, a 255 border."""
    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir(parents=True)
    for i in range(n):
        img = np.full((*size, 3), 128, np.uint8)
        mask = np.zeros(size, np.uint8)
        for cls, colour in ((1, (220, 30, 30)), (2, (30, 30, 220))):
            y, x = rng.integers(0, size[0] - 32), rng.integers(0, size[1] - 32)
            img[y:y + 32, x:x + 32] = colour
            mask[y:y + 32, x:x + 32] = cls
        mask[0, :] = 255
        Image.fromarray(img).save(folder / "images" / f"{i:03d}.png")
        Image.fromarray(mask).save(folder / "masks" / f"{i:03d}.png")


def test_the_probe_learns_a_colour_coded_segmentation_and_caches_features(tmp_path, monkeypatch):
    data = tmp_path / "data"
    _write_split(data / "train", 12, 0)
    _write_split(data / "val", 4, 1)
    torch.manual_seed(0)
    model = get_model("xcit_nano_12_p8", num_classes=0).eval()
    settings = seg.ProbeSettings(image_size=(64, 96), steps=300, batch_size=8, lr=1e-2)
    res = seg.evaluate_segmentation_probe(model, data, tmp_path / "out", settings, progress=False)
    assert res["num_classes"] == 3 and res["data"] == "folders" and len(res["per_image_mIoU"]) == 4
    assert len(res["per_class_IoU"]) == 3 and res["mIoU"] > 0.5, res["per_class_IoU"]
    assert json.loads((tmp_path / "out" / seg.RESULT_FILE).read_text())["mIoU"] == pytest.approx(res["mIoU"])
    # a second run reads the cached features (no backbone pass) and trains the same head
    monkeypatch.setattr(seg, "extract_split", lambda *a, **k: pytest.fail("features computed again"))
    again = seg.evaluate_segmentation_probe(model, data, tmp_path / "out", settings, progress=False)
    assert again["mIoU"] == pytest.approx(res["mIoU"])


def test_n_blocks_concatenates_the_last_blocks_normed():
    torch.manual_seed(0)
    model = get_model("xcit_nano_12_p16", num_classes=0).eval()
    x = torch.randn(1, 3, 32, 48)
    with torch.no_grad():
        four = seg.PatchMaps(model, 4)(x)
        toks = model.forward_intermediates(x, indices=[8, 9, 10, 11], norm=True, output_fmt="NLC",
                                           intermediates_only=True)
    assert four.shape == (1, 4 * 128, 2, 3)
    # channel block j, position (r, c) is normed block 8+j, token r*3+c
    assert torch.allclose(four[0, 128:256, 1, 2], toks[1][0, 1 * 3 + 2], atol=1e-5)
    with pytest.raises(seg.SegmentationInputError, match="give 1..12"):
        seg.PatchMaps(model, 13)


def test_davis_is_split_by_sequence_into_foreground_and_background(tmp_path):
    from tests.test_video_segmentation import make_davis
    data = make_davis(tmp_path / "davis", n_frames=4, objects=2)
    with pytest.raises(seg.SegmentationInputError, match="disjoint, non-empty"):
        seg.split_pairs(data)          # one sequence cannot be split
    shutil.copytree(data / "JPEGImages/480p/sq", data / "JPEGImages/480p/sq2")
    shutil.copytree(data / "Annotations/480p/sq", data / "Annotations/480p/sq2")
    (data / "ImageSets/2017/val.txt").write_text("sq\nsq2\n")
    train, val, kind = seg.split_pairs(data)
    assert kind == "davis" and {p.group for p in train} == {"sq"} and {p.group for p in val} == {"sq2"}
    _, mask = seg.read_pair(val[0], (64, 128), binary=True)
    assert set(np.unique(mask)) == {0, 1}          # objects 1 and 2 are both foreground


def test_images_and_masks_without_partners_are_one_line(tmp_path):
    data = tmp_path / "data"
    _write_split(data / "train", 3, 0)
    _write_split(data / "val", 2, 1)
    (data / "train/masks/001.png").unlink()
    shutil.copy(data / "train/masks/000.png", data / "train/masks/777.png")
    with pytest.raises(seg.SegmentationInputError) as err:
        seg.split_pairs(data)
    assert "1 image(s) without a mask (e.g. 001.png) and 1 mask(s) without an image (e.g. 777.png)" in str(err.value)
    shutil.rmtree(data / "val")
    with pytest.raises(seg.SegmentationInputError, match="has no val/ folder"):
        seg.split_pairs(data)


def test_command_line_runs_and_bad_data_is_one_line(tmp_path, capsys):
    from ssl_xcit import cli
    from ssl_xcit.commands.segmentation import main
    data = tmp_path / "data"
    _write_split(data / "train", 4, 0)
    _write_split(data / "val", 2, 1)
    cli.run(main, ["--data-path", str(data), "--checkpoint", "xcit_nano_12_p16", "--output-dir", str(tmp_path / "o"),
                   "--image-size", "64", "96", "--steps", "5", "--no-progress"], prog="eval_segmentation.py")
    assert "mIoU" in capsys.readouterr().out and (tmp_path / "o" / seg.RESULT_FILE).is_file()
    (data / "val/masks/000.png").unlink()
    with pytest.raises(SystemExit) as stop:
        cli.run(main, ["--data-path", str(data), "--checkpoint", "xcit_nano_12_p16", "--output-dir",
                       str(tmp_path / "o2")], prog="eval_segmentation.py")
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "1 image(s) without a mask (e.g. 000.png)" in err and len(err.splitlines()) == 1


def test_balanced_weights_give_each_present_class_the_same_share_of_the_loss():
    # 8 counted pixels: 6 of class 0, 2 of class 1, class 2 absent; 255 left out
    targets = torch.tensor([[[0, 0, 0, 1], [0, 0, 1, 255]], [[0, 255, 255, 255], [255, 255, 255, 255]]],
                           dtype=torch.uint8)
    w = seg.balanced_weights(targets, 3)
    # K = 2 present classes: w_k = 8 / (2 * n_k) -> 8/12, 8/4, and 0 for the absent class
    assert w.tolist() == pytest.approx([2 / 3, 2.0, 0.0])
    n = np.array([6, 2])
    assert (w[:2].double().numpy() * n).tolist() == pytest.approx([4.0, 4.0])     # equal shares


def test_balanced_loss_finds_a_small_foreground_that_plain_loss_learns_away():
    """One feature channel, shifted by 2 on a 4 %-of-pixels foreground (unit noise): the plain loss's
    best rule thresholds near 1 + ln(24)/2 = 2.6 (foreground recall about 0.28), the balanced loss's
    near the midpoint 1 (recall about 0.84): each class's pixels count the same."""
    g = torch.Generator().manual_seed(0)
    targets = (torch.rand(64, 8, 8, generator=g) < 0.04).to(torch.uint8)
    feats = (targets.float() * 2.0 + torch.randn(64, 8, 8, generator=g))[:, None].half()
    recall = {}
    for name, w in (("none", None), ("balanced", seg.balanced_weights(targets, 2))):
        head = seg.train_head(feats, targets, 2, steps=300, batch_size=64, lr=5e-2, progress=False, class_weights=w)
        with torch.no_grad():
            pred = head(feats.float()).argmax(1)
        recall[name] = float((pred[targets == 1] == 1).float().mean())
    assert recall["none"] < 0.5 and recall["balanced"] > 0.7, recall


def test_an_unknown_class_weighting_is_one_line(tmp_path):
    with pytest.raises(seg.SegmentationInputError, match="class_weights='inverse': give one of none, balanced"):
        seg.evaluate_segmentation_probe(torch.nn.Identity(), tmp_path, tmp_path / "o",
                                        seg.ProbeSettings(class_weights="inverse"), progress=False)
