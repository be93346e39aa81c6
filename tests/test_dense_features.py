"""Dense feature maps (get_model(..., features_only=True)): each map is the XCA block output it
claims to be (recomputed here block by block in float64), laid out (B, C, H/p, W/p) row-major, and
timm's own features_only=True on a published folder gives the same maps."""
from __future__ import annotations

import copy

import pytest
import torch

from ssl_xcit.models import get_model
from ssl_xcit.models.dense import FINAL, DenseFeatures, default_out_indices

ARCH = "xcit_nano_12_p16"


def _by_hand(model, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Token tensors (B, N, C) after every XCA block, and the final normed patch tokens, in float64,
    from the model's parts called one by one (patch embedding, Fourier encoding, blocks, class
    attention, norm)."""
    m = model.double()
    x = x.double()
    b = x.shape[0]
    tokens, (hp, wp) = m.patch_embed(x)
    pos = m.pos_embed(b, hp, wp)                       # (B, C, Hp, Wp)
    tokens = tokens + pos.flatten(2).transpose(1, 2)
    outs = []
    for blk in m.blocks:
        tokens = blk(tokens, hp, wp)
        outs.append(tokens)
    t = torch.cat([m.cls_token.expand(b, -1, -1), tokens], dim=1)
    for blk in m.cls_attn_blocks:
        t = blk(t)
    return outs, m.norm(t)[:, 1:]


@pytest.mark.parametrize("size", [(48, 80), (64, 64)])
def test_maps_are_the_block_outputs_they_claim(size):
    torch.manual_seed(0)
    dense = get_model(ARCH, features_only=True, out_indices=(3, 5, 7, 11, FINAL)).eval()
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        maps = dense(x)
        ref, final = _by_hand(copy.deepcopy(dense.model), x)
    hp, wp = size[0] // 16, size[1] // 16
    assert [tuple(m.shape) for m in maps] == [(2, 128, hp, wp)] * 5
    for got, i in zip(maps[:4], (3, 5, 7, 11)):
        want = ref[i].reshape(2, hp, wp, 128).permute(0, 3, 1, 2)
        assert (got.double() - want).abs().max() < 1e-4 * (1 + want.abs().max())
    want_final = final.reshape(2, hp, wp, 128).permute(0, 3, 1, 2)
    assert (maps[4].double() - want_final).abs().max() < 1e-4 * (1 + want_final.abs().max())
    # row-major layout: map[:, :, r, c] is token r * wp + c (checked at one corner-far position)
    r, c = hp - 1, 1
    assert torch.allclose(maps[1][:, :, r, c].double(), ref[5][:, r * wp + c], atol=1e-4)
    # distinct blocks give distinct maps (the test would notice indices shifted by one)
    assert (maps[0] - maps[1]).abs().max() > 1e-2


def test_feature_info_and_defaults():
    dense = get_model(ARCH, features_only=True)
    assert dense.out_indices == (3, 5, 7, 11) == default_out_indices(12)
    assert dense.feature_info.channels() == [128] * 4 and dense.feature_info.reduction() == [16] * 4
    assert dense.feature_info.module_name() == ["blocks.3", "blocks.5", "blocks.7", "blocks.11"]
    assert default_out_indices(24) == (7, 11, 15, 23)
    last = get_model(ARCH, features_only=True, out_indices=(-1, "final"))
    assert last.out_indices == (11, FINAL) and last.feature_info.module_name() == ["blocks.11", "norm"]


def test_bad_requests_say_what_is_valid():
    with pytest.raises(ValueError, match="12 XCA blocks"):
        get_model(ARCH, features_only=True, out_indices=(12,))
    with pytest.raises(ValueError, match="features_only"):
        get_model(ARCH, out_indices=(3,))
    dense = get_model(ARCH, features_only=True).eval()
    with pytest.raises(ValueError, match="not divisible by the patch size 16"):
        dense(torch.zeros(1, 3, 40, 64))


def test_timm_features_only_on_a_published_folder_gives_the_same_maps(tmp_path, capsys):
    import timm
    from ssl_xcit import cli
    from ssl_xcit.commands.publish import main as publish_main
    torch.manual_seed(1)
    model = get_model(ARCH, num_classes=0).eval()
    torch.save(model.state_dict(), tmp_path / "backbone.pth")
    cli.run(publish_main, [str(tmp_path / "backbone.pth"), str(tmp_path / "pub"), "--img-size", "64"],
            prog="python -m ssl_xcit.publish")
    theirs = timm.create_model("local-dir:" + str(tmp_path / "pub"), pretrained=True, features_only=True,
                               out_indices=(3, 5, 7, 11)).eval()
    ours = DenseFeatures(model, (3, 5, 7, 11))
    x = torch.randn(2, 3, 48, 80)
    with torch.no_grad():
        a, b = ours(x), theirs(x)
    assert len(a) == len(b) == 4
    for u, v in zip(a, b):
        assert u.shape == v.shape == (2, 128, 3, 5)
        assert (u - v).abs().max().item() <= 1e-5
    assert theirs.feature_info.channels() == ours.feature_info.channels()


# ----------------------------------------------------------------------------- export --dense-blocks
def _image_folder(folder, sizes):
    import numpy as np
    from PIL import Image
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
    return folder


def test_export_writes_dense_maps_equal_to_the_api(tmp_path):
    import numpy as np
    from PIL import Image

    from ssl_xcit.commands import export as export_command
    from ssl_xcit.evaluate import datasets, export
    data = _image_folder(tmp_path / "imgs", [(40, 60)] * 3)
    out = tmp_path / "out"
    argv = ["--checkpoint", ARCH, "--data-path", str(data), "--out", str(out), "--dense-blocks", "3,final",
            "--dense-size", "32", "48", "--num-workers", "0", "--no-progress"]
    manifest = export_command.main(argv)
    assert manifest["config"]["dtype"] == "float16" and manifest["arrays"]["dense3"]["row_shape"] == [128, 2, 3]
    got = export.load_exported(out)
    assert got["dense3"].shape == got["densefinal"].shape == (3, 128, 2, 3) and got["dense3"].dtype == np.float16
    assert sorted(got["path"].tolist()) == ["img0.png", "img1.png", "img2.png"]
    torch.manual_seed(0)    # the tool's random backbone: seed 0
    from ssl_xcit.evaluate.backbone import load_frozen_backbone
    model = load_frozen_backbone(ARCH, seed=0)
    tf = datasets.eval_transform((32, 48), (32, 48))
    x = torch.stack([tf(Image.open(data / p).convert("RGB")) for p in got["path"]])
    with torch.no_grad():
        want = DenseFeatures(model, (3, FINAL))(x)
    assert np.abs(got["dense3"].astype(np.float32) - want[0].numpy()).max() < 2e-2 * (1 + want[0].abs().max().item())
    assert np.abs(got["densefinal"].astype(np.float32) - want[1].numpy()).max() < 2e-2 * (1 + want[1].abs().max().item())
    assert export_command.main(argv)["complete"]                           # resumed: nothing to do, same manifest
    with pytest.raises(export.ExportError, match="other settings"):
        export_command.main([a if a != "3,final" else "5" for a in argv])


def test_export_at_each_images_own_size(tmp_path, capsys):
    from ssl_xcit import cli
    from ssl_xcit.commands import export as export_command
    from ssl_xcit.commands.options import run_tool
    data = _image_folder(tmp_path / "same", [(40, 60)] * 2)
    manifest = export_command.main(["--checkpoint", ARCH, "--data-path", str(data), "--out", str(tmp_path / "o1"),
                            "--dense-blocks", "11", "--num-workers", "0", "--no-progress"])
    assert manifest["arrays"]["dense11"]["row_shape"] == [128, 2, 3]          # 40x60 cropped to 32x48
    data = _image_folder(tmp_path / "mixed", [(40, 60), (48, 48)])
    with pytest.raises(SystemExit):
        cli.run(lambda argv: run_tool("export_features", argv),
                ["--checkpoint", ARCH, "--data-path", str(data), "--out", str(tmp_path / "o2"), "--dense-blocks",
                 "11", "--num-workers", "0", "--batch-size", "2", "--no-progress"], prog="export_features.py")
    err = capsys.readouterr().err.strip()
    assert "differ in size" in err and "--dense-size H W" in err and len(err.splitlines()) == 1
