"""Video object segmentation (DINO's label propagation): the windowed propagation equals DINO's dense
affinity-then-mask computation (transcribed here) to fp tolerance; a colour 'oracle' feature tracks
a moving square through written PNGs to J close to 1 (coordinates, upsampling, palette, scoring);
resume, notes and one-line errors for bad DAVIS folders."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from ssl_xcit.evaluate import video_segmentation as vs
from ssl_xcit.models.dense import DenseFeatures


def dino_label_propagation(feat_tar, feat_sources, segs, size_mask_neighborhood, topk):
    """DINO's label_propagation and restrict_neighborhood (eval_video_segmentation.py), on
    (hw, C) target, (n, C, hw) sources, (n, K, h, w) labels: the dense (n, hw, hw) affinity, masked."""
    n, k, h, w = segs.shape
    feat_tar = F.normalize(feat_tar, dim=1, p=2).unsqueeze(0).repeat(n, 1, 1)
    feat_sources = F.normalize(feat_sources, dim=1, p=2)
    aff = torch.exp(torch.bmm(feat_tar, feat_sources) / 0.1)
    if size_mask_neighborhood > 0:
        r = size_mask_neighborhood
        mask = torch.zeros(h, w, h, w, dtype=aff.dtype)
        for i in range(h):
            for j in range(w):
                for p in range(2 * r + 1):
                    for q in range(2 * r + 1):
                        if i - r + p < 0 or i - r + p >= h or j - r + q < 0 or j - r + q >= w:
                            continue
                        mask[i, j, i - r + p, j - r + q] = 1
        aff = aff * mask.reshape(h * w, h * w).unsqueeze(0)
    aff = aff.transpose(2, 1).reshape(-1, h * w)
    tk_val, _ = torch.topk(aff, dim=0, k=topk)
    tk_val_min, _ = torch.min(tk_val, dim=0)
    aff[aff < tk_val_min] = 0
    aff = aff / torch.sum(aff, keepdim=True, axis=0)
    segs = segs.reshape(n, k, -1).transpose(2, 1).reshape(-1, k).T
    return torch.mm(segs, aff).reshape(k, h, w)


@pytest.mark.parametrize("radius,tile", [(2, 3), (2, 4), (1, 8), (0, 8), (12, 8)])
def test_windowed_propagation_equals_dino_dense_affinity(radius, tile):
    g = torch.Generator().manual_seed(radius * 10 + tile)
    n, c, h, w, k = 3, 16, 7, 9, 3
    tar = F.normalize(torch.randn(c, h, w, generator=g, dtype=torch.float64), dim=0)
    src = F.normalize(torch.randn(n, c, h, w, generator=g, dtype=torch.float64), dim=1)
    labels = torch.softmax(torch.randn(n, k, h, w, generator=g, dtype=torch.float64) * 3, dim=1)
    got = vs.propagate_labels(tar, src, labels, radius, topk=5, tile=tile)
    want = dino_label_propagation(tar.reshape(c, -1).T, src.reshape(n, c, -1), labels, radius, 5)
    assert got.shape == (k, h, w)
    assert torch.allclose(got, want, atol=1e-10, rtol=1e-9)


def test_the_window_is_respected():
    # one source patch is the perfect match of every target patch, but only targets within r of it see it
    c, h, w, r = 4, 9, 9, 2
    tar = F.normalize(torch.ones(c, h, w, dtype=torch.float64), dim=0)
    src = F.normalize(torch.randn(1, c, h, w, generator=torch.Generator().manual_seed(0), dtype=torch.float64), dim=1)
    src[0, :, 4, 4] = tar[:, 0, 0]
    labels = torch.zeros(1, 2, h, w, dtype=torch.float64)
    labels[:, 0] = 1
    labels[0, :, 4, 4] = torch.tensor([0.0, 1.0])
    got = vs.propagate_labels(tar, src, labels, r, topk=1)
    seen = got[1] > 0.5
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    assert (seen == (((yy - 4).abs() <= r) & ((xx - 4).abs() <= r))).all()


# ----------------------------------------------------------------------------- a synthetic DAVIS folder
class ColourFeatures(DenseFeatures):
    """An 'oracle' backbone: the mean colour of each 16-px patch (plus a constant), so a uniquely
    coloured object is found again in every frame."""

    def __init__(self) -> None:
        torch.nn.Module.__init__(self)
        self.out_indices = ("final",)

    @property
    def patch_size(self) -> int:
        return 16

    def forward(self, x):
        pooled = F.avg_pool2d(x, 16)
        return [torch.cat([pooled, torch.full_like(pooled[:, :1], 0.1)], dim=1)]


def make_davis(root: Path, n_frames: int = 5, size=(64, 128), objects: int = 1, palette=None) -> Path:
    """DAVIS-2017 layout: one sequence 'sq' of a red 32-px square moving one patch right per frame
    (and a blue 32x16 bar moving left) on a grey background, every frame annotated."""
    h, w = size
    for sub in ("JPEGImages/480p/sq", "Annotations/480p/sq", "ImageSets/2017"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    (root / "ImageSets/2017/val.txt").write_text("sq\n")
    pal = palette or vs.default_palette()
    for t in range(n_frames):
        img = np.full((h, w, 3), 128, np.uint8)
        mask = np.zeros((h, w), np.uint8)
        x = 16 * t
        img[16:48, x:x + 32] = (220, 20, 20)
        mask[16:48, x:x + 32] = 1
        if objects == 2:
            img[48:64, w - 32 - x:w - x] = (20, 20, 220)
            mask[48:64, w - 32 - x:w - x] = 2
        Image.fromarray(img).save(root / f"JPEGImages/480p/sq/{t:05d}.jpg", quality=95)
        m = Image.fromarray(mask)
        m.putpalette(pal)
        m.save(root / f"Annotations/480p/sq/{t:05d}.png")
    return root


@pytest.mark.parametrize("objects", [1, 2])
def test_an_oracle_feature_tracks_the_objects_through_written_pngs(tmp_path, objects):
    data = make_davis(tmp_path / "davis", objects=objects)
    out = tmp_path / "out"
    settings = vs.PropagationSettings(scale_size=(64,), size_mask_neighborhood=2)
    res = vs.evaluate_video_segmentation(ColourFeatures(), data, out, settings, progress=False)
    pngs = sorted((out / "sq").glob("*.png"))
    assert [p.name for p in pngs] == [f"{t:05d}.png" for t in range(5)]
    first = Image.open(pngs[0])
    assert first.mode == "P" and first.getpalette()[:9] == vs.default_palette()[:9]
    assert (np.array(first) == np.array(Image.open(data / "Annotations/480p/sq/00000.png"))).all()
    assert Image.open(pngs[-1]).size == (128, 64)
    assert res["sequences"]["sq"]["objects"] == objects and res["sequences"]["sq"]["frames_scored"] == 3
    # every frame's object sits where it is: same bounding box (bilinear upsampling rounds its corners,
    # as in DINO's code, so J and F stay below 1)
    for t, p in enumerate(pngs):
        got = np.argwhere(np.array(Image.open(p)) == 1)
        assert got.min(0).tolist() == [16, 16 * t] and got.max(0).tolist() == [47, 16 * t + 31]
        if objects == 2:
            got = np.argwhere(np.array(Image.open(p)) == 2)
            assert got.min(0).tolist() == [48, 96 - 16 * t] and got.max(0).tolist() == [63, 127 - 16 * t]
    assert res["J-Mean"] > 0.85 and res["F-Mean"] > 0.8
    assert len(res["per_frame_JF"]) == 3
    saved = json.loads((out / vs.RESULT_FILE).read_text())
    assert saved["J&F-Mean"] == pytest.approx(res["J&F-Mean"])


def test_random_features_score_below_the_oracle_and_resume_skips_done_sequences(tmp_path, monkeypatch):
    data = make_davis(tmp_path / "davis", n_frames=6)
    settings = vs.PropagationSettings(scale_size=(64,), size_mask_neighborhood=2)

    class Noise(ColourFeatures):
        def forward(self, x):
            g = torch.Generator().manual_seed(int(x.abs().sum().item() * 1000) % 2 ** 31)
            return [torch.randn(x.shape[0], 8, x.shape[2] // 16, x.shape[3] // 16, generator=g)]

    res = vs.evaluate_video_segmentation(Noise(), data, tmp_path / "noise", settings, progress=False)
    assert res["J-Mean"] < 0.8
    oracle = vs.evaluate_video_segmentation(ColourFeatures(), data, tmp_path / "o", settings, progress=False)
    monkeypatch.setattr(vs, "segment_sequence", lambda *a, **k: pytest.fail("a done sequence was segmented again"))
    again = vs.evaluate_video_segmentation(ColourFeatures(), data, tmp_path / "o", settings, progress=False)
    assert again["J&F-Mean"] == oracle["J&F-Mean"]
    other = vs.PropagationSettings(scale_size=(64,), size_mask_neighborhood=3)
    with pytest.raises(pytest.fail.Exception):   # other settings: computed again
        vs.evaluate_video_segmentation(ColourFeatures(), data, tmp_path / "o", other, progress=False)


def test_a_real_xcit_runs_and_a_side_not_divisible_by_the_patch_is_resized_with_a_note(tmp_path):
    from ssl_xcit.models import get_model
    data = make_davis(tmp_path / "davis", n_frames=3)
    torch.manual_seed(0)
    settings = vs.PropagationSettings(scale_size=(56, 120), features="11")
    res = vs.evaluate_video_segmentation(get_model("xcit_nano_12_p16", num_classes=0).eval(), data,
                                         tmp_path / "out", settings, progress=False)
    assert res["notes"] == ["frame size 120x56 is not divisible by the patch 16: resized to 112x48"]
    assert 0.0 <= res["J&F-Mean"] <= 1.0 and len(list((tmp_path / "out" / "sq").glob("*.png"))) == 3


def test_bad_davis_folders_are_one_line_errors(tmp_path):
    data = make_davis(tmp_path / "d1", n_frames=3)
    import shutil
    shutil.rmtree(data / "Annotations")
    with pytest.raises(vs.VideoInputError, match="no Annotations/480p/ folder"):
        vs.davis_sequences(data)
    data = make_davis(tmp_path / "d2", n_frames=3)
    (data / "Annotations/480p/sq/00000.png").unlink()
    with pytest.raises(vs.VideoInputError, match="has no first-frame mask"):
        vs.davis_sequences(data)
    data = make_davis(tmp_path / "d3", n_frames=3)
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(data / "Annotations/480p/sq/00000.png")
    with pytest.raises(vs.VideoInputError, match="mask is 32x32 but its frame is 128x64"):
        vs.evaluate_video_segmentation(ColourFeatures(), data, tmp_path / "o3",
                                       vs.PropagationSettings(scale_size=(64,)), progress=False)
    data = make_davis(tmp_path / "d4", n_frames=3)
    bad = np.zeros((64, 128), np.uint8)
    bad[:8, :8] = 3                     # a 3-colour palette (PNG bit depth 2 still stores index 3)
    m = Image.fromarray(bad)
    m.putpalette([0, 0, 0, 255, 0, 0, 0, 0, 255])
    m.save(data / "Annotations/480p/sq/00000.png")
    with pytest.raises(vs.VideoInputError, match="mask index 3 is beyond its palette of 3 colours"):
        vs.evaluate_video_segmentation(ColourFeatures(), data, tmp_path / "o4",
                                       vs.PropagationSettings(scale_size=(64,)), progress=False)
    for err in (vs.VideoInputError("x"),):
        from ssl_xcit.errors import UserError
        assert isinstance(err, UserError)


# ----------------------------------------------------------------------------- the command line
def _cli(argv, capsys):
    from ssl_xcit import cli
    from ssl_xcit.commands.video_segmentation import main
    try:
        cli.run(main, [str(a) for a in argv], prog="eval_video_segmentation.py")
        code = 0
    except SystemExit as stop:
        code = stop.code
    return code, capsys.readouterr()


def test_dino_command_line_runs_as_pasted(tmp_path, capsys):
    data = make_davis(tmp_path / "davis", n_frames=3)
    out = tmp_path / "out"
    code, printed = _cli(["--pretrained_weights", "xcit_nano_12_p16", "--arch", "xcit_nano_12", "--patch_size", "16",
                          "--checkpoint_key", "teacher", "--output_dir", out, "--data_path", data,
                          "--n_last_frames", "7", "--size_mask_neighborhood", "12", "--topk", "5", "--bs", "6",
                          "--scale-size", "64", "--no-progress"], capsys)
    assert code == 0, printed.err
    res = json.loads((out / vs.RESULT_FILE).read_text())
    assert res["settings"]["n_last_frames"] == 7 and res["source"]["arch"] == "xcit_nano_12_p16"
    assert "J&F-Mean" in printed.out and (out / "sq" / "00002.png").is_file()


@pytest.mark.parametrize("break_it,message", [
    (lambda d: __import__("shutil").rmtree(d / "Annotations"), "no Annotations/480p/ folder"),
    (lambda d: (d / "Annotations/480p/sq/00000.png").unlink(), "has no first-frame mask"),
])
def test_bad_folders_are_one_line_with_exit_status_2(tmp_path, capsys, break_it, message):
    data = make_davis(tmp_path / "davis", n_frames=3)
    break_it(data)
    code, printed = _cli(["--data_path", data, "--pretrained_weights", "xcit_nano_12_p16", "--output_dir",
                          tmp_path / "o"], capsys)
    assert code == 2 and message in printed.err and len(printed.err.strip().splitlines()) == 1


def test_frame_sizes_follow_dino():
    # DAVIS 854x480: short side 480, long side 854 floored to a multiple of 64 -> 832 (DINO's read_frame)
    assert vs.frame_size(480, 854, [480], 8) == (480, 832, None)
    assert vs.frame_size(854, 480, [480], 16) == (832, 480, None)
    h, w, note = vs.frame_size(480, 854, [481, 640], 8)
    assert (h, w) == (480, 640) and note == "frame size 640x481 is not divisible by the patch 8: resized to 640x480"


def test_a_library_error_is_said_with_this_commands_option(tmp_path, capsys, monkeypatch):
    """A device the machine lacks: the library's "device ..." becomes this command's "--device ..."."""
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    data = make_davis(tmp_path / "davis", n_frames=3)
    code, printed = _cli(["--data_path", data, "--pretrained_weights", "xcit_nano_12_p16", "--output_dir",
                          tmp_path / "o", "--device", "cuda"], capsys)
    assert code == 2 and printed.err.count("\n") == 1 and "--device cuda" in printed.err, printed.err
