"""Attention maps (ssl_xcit.evaluate.attention) and eval/visualize_attention.py.

The maps are checked against an independent float64 recomputation of the class-attention softmax
from the block's weights and the tokens it receives (captured with a hook on the *block*, before
its LayerNorm), and DINO's thresholded mask against DINO's own cumulative-sum rule.
"""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ssl_xcit import cli
from ssl_xcit.evaluate.attention import (AttentionMaps, attention_maps, cls_attention, load_image,
                                         resolve_layer, threshold_mask)
from ssl_xcit.models import build_model

visualize = pytest.importorskip("eval.visualize_attention")


def _model(name: str = "xcit_nano_12_p16", sharpen: float = 6.0, seed: int = 0) -> torch.nn.Module:
    """A random XCiT in eval mode whose class-attention q/k are scaled up, so the softmax is peaked
    (a random init is nearly uniform, which would let a wrong patch order pass unnoticed)."""
    torch.manual_seed(seed)
    model = build_model(name, num_classes=0).eval()
    with torch.no_grad():
        for blk in model.cls_attn_blocks:
            blk.attn.q.weight.mul_(sharpen)
            blk.attn.k.weight.mul_(sharpen)
    return model


def _reference_softmax(model, x: torch.Tensor, layer: int) -> torch.Tensor:
    """float64 softmax of the CLS query over 1+N keys, from the block input and its weights."""
    with torch.no_grad():
        return _reference_softmax_nograd(model, x, layer)


def _reference_softmax_nograd(model, x: torch.Tensor, layer: int) -> torch.Tensor:
    blk = model.cls_attn_blocks[layer]
    seen = []
    handle = blk.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()))
    with torch.no_grad():
        model(x)
    handle.remove()
    tokens = seen[0].double()
    y = F.layer_norm(tokens, tokens.shape[-1:], blk.norm1.weight.double(), blk.norm1.bias.double(),
                     blk.norm1.eps)
    heads = blk.attn.num_heads
    d = y.shape[-1] // heads
    wq, wk = blk.attn.q.weight.double(), blk.attn.k.weight.double()
    bq = blk.attn.q.bias.double() if blk.attn.q.bias is not None else 0.0
    bk = blk.attn.k.bias.double() if blk.attn.k.bias is not None else 0.0
    q = y[:, 0] @ wq.T + bq                      # (B, C)
    k = y @ wk.T + bk                            # (B, 1+N, C)
    out = []
    for h in range(heads):
        sl = slice(h * d, (h + 1) * d)
        logits = torch.einsum("bc,bnc->bn", q[:, sl], k[:, :, sl]) / d ** 0.5
        out.append(torch.softmax(logits, dim=-1))
    return torch.stack(out, dim=1)               # (B, heads, 1+N)


@pytest.mark.parametrize("layer", [0, -1])
def test_maps_are_the_models_own_attention(layer):
    model = _model()
    torch.manual_seed(1)
    x = torch.randn(2, 3, 64, 96)
    ref = _reference_softmax(model, x, layer)
    spread = ref[:, :, 1:].amax(-1) / ref[:, :, 1:].amin(-1)
    assert spread.min().item() > 3.0   # peaked in every head: a wrong patch order would show
    got = cls_attention(model, x, layer).double()
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-6)
    maps = attention_maps(model, x, layer)
    hp, wp = 4, 6
    for b in range(2):
        patches = ref[b, :, 1:] / ref[b, :, 1:].sum(-1, keepdim=True)
        for h in range(model.cls_attn_blocks[layer].attn.num_heads):
            for r in range(hp):
                for c in range(wp):   # row-major patch order on the (Hp, Wp) grid
                    assert maps[b].heads[h, r, c] == pytest.approx(patches[h, r * wp + c].item(), rel=1e-4)
        np.testing.assert_allclose(maps[b].cls_self, ref[b, :, 0].numpy(), rtol=1e-4)
    if layer == -1:   # the model's own API for the last layer agrees
        torch.testing.assert_close(got.float(), model.get_last_cls_attention(x), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name, size, grid", [
    ("xcit_nano_12_p16", (64, 96), (4, 6)),
    ("xcit_nano_12_p8", (32, 32), (4, 4)),
    ("xcit_nano_12_p16", (80, 48), (5, 3)),   # non-square, taller than wide
])
def test_grid_shape_and_maps_sum_to_one(name, size, grid):
    model = _model(name)
    x = torch.randn(1, 3, *size)
    m = attention_maps(model, x)[0]
    assert m.grid == grid
    assert m.heads.shape == (model.num_heads, *grid)
    np.testing.assert_allclose(m.heads.reshape(model.num_heads, -1).sum(1), 1.0, atol=1e-5)
    assert m.mean.sum() == pytest.approx(1.0, abs=1e-5)
    assert m.upsample(m.mean).shape == size
    assert m.upsample(m.mean).sum() == pytest.approx(m.patch_size ** 2, rel=1e-5)
    assert m.head_masks.shape == m.heads.shape and m.mean_mask.shape == grid


def test_layer_out_of_range_is_an_error_naming_the_range():
    model = _model()
    assert resolve_layer(model, -2) == 0
    with pytest.raises(ValueError, match=r"\[-2, 1\]"):
        resolve_layer(model, 2)


def _dino_mask(att: np.ndarray, threshold: float) -> np.ndarray:
    """DINO's visualize_attention.py rule, transcribed: ascending sort, cumulative share > 1 - t."""
    a = torch.as_tensor(att, dtype=torch.float64).reshape(-1)
    val, idx = torch.sort(a)
    val = val / val.sum()
    keep = torch.cumsum(val, 0) > (1 - threshold)
    mask = torch.zeros_like(keep)
    mask[idx] = keep
    return mask.reshape(att.shape).numpy()


@pytest.mark.parametrize("threshold", [0.6, 0.3, 0.9, 1.0])
def test_threshold_mask_holds_the_mass_and_is_minimal(threshold):
    rng = np.random.default_rng(0)
    for trial in range(50):
        att = rng.dirichlet(np.full(48, 0.3 if trial % 2 else 3.0)).reshape(6, 8)
        mask = threshold_mask(att, threshold)
        kept = att[mask].sum() / att.sum()
        assert kept >= threshold - 1e-12
        # minimal: the same number of patches less one cannot reach the threshold, whichever they are
        best_smaller = np.sort(att.reshape(-1))[::-1][: mask.sum() - 1].sum() / att.sum()
        assert best_smaller < threshold
        if threshold < 1.0:
            np.testing.assert_array_equal(mask, _dino_mask(att, threshold))


def test_threshold_mask_rejects_bad_input():
    with pytest.raises(ValueError):
        threshold_mask(np.ones(4), 0.0)
    with pytest.raises(ValueError):
        threshold_mask(np.array([0.5, -0.1]), 0.6)


def test_load_image_crops_to_patch_multiples(cifar_root, tmp_path):
    from PIL import Image
    src = next((cifar_root / "val" / "cat").iterdir())
    wide = tmp_path / "wide.png"
    Image.open(src).convert("RGB").resize((70, 45)).save(wide)
    t, pic = load_image(wide, None, 16, (0.5,) * 3, (0.5,) * 3)
    assert t.shape == (3, 32, 64) and pic.shape == (32, 64, 3) and pic.dtype == np.uint8
    t, pic = load_image(wide, 48, 16, (0.5,) * 3, (0.5,) * 3)   # shorter side 48 -> 75x48, crop 64x48
    assert t.shape == (3, 48, 64)
    t, _ = load_image(wide, (40, 24), 8, (0.5,) * 3, (0.5,) * 3)
    assert t.shape == (3, 40, 24)
    assert torch.isfinite(t).all()


def _ssl_xcit_checkpoint(path, arch: str = "xcit_nano_12_p8"):
    """A file in this project's training-checkpoint format with different teacher and student."""
    teacher, student = _model(arch, seed=1), _model(arch, seed=2)
    torch.save({"format": "ssl_xcit", "version": 1, "config": {"model": {"arch": arch}},
                "teacher": {f"backbone.{k}": v for k, v in teacher.state_dict().items()},
                "student": {f"backbone.{k}": v for k, v in student.state_dict().items()}}, path)
    return teacher, student


def test_cli_writes_every_picture_for_teacher_and_student(cifar_root, tmp_path):
    images = tmp_path / "images"
    for cls in ("cat", "ship"):
        (images / cls).mkdir(parents=True)
        shutil.copy(sorted((cifar_root / "val" / cls).iterdir())[0], images / cls / "a.jpg")
    ckpt = tmp_path / "checkpoint.pth"
    teacher, student = _ssl_xcit_checkpoint(ckpt)
    results = {}
    for key, model in (("teacher", teacher), ("student", student)):
        out = tmp_path / key
        written = cli.run(visualize.main, ["--checkpoint", str(ckpt), "--images", str(images), "--out", str(out),
                                           "--checkpoint-key", key, "--device", "cpu", "--no-progress"],
                          prog="visualize_attention.py")
        assert sorted(p.name for p in written) == ["cat__a", "ship__a"]
        folder = out / "cat__a"
        names = {p.name for p in folder.iterdir()}
        assert {"grid.png", "mean.png", "mask.png", "attention.npz"} <= names
        assert {f"head{i:02d}.png" for i in range(4)} <= names and "head03_mask.png" in names
        arrays = np.load(folder / "attention.npz")
        tensor, _ = load_image(images / "cat" / "a.jpg", None, 8, model.data_config["mean"], model.data_config["std"])
        expected = attention_maps(model, tensor[None])[0]
        np.testing.assert_allclose(arrays["heads"], expected.heads, rtol=1e-5, atol=1e-7)
        results[key] = arrays["heads"]
        from PIL import Image
        with Image.open(folder / "mean.png") as im:
            assert im.size == (224, 224)    # 32 px enlarged 7x, patch squares kept
    assert not np.allclose(results["teacher"], results["student"])   # the key picks the network


def _one_line_error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as stop:
        cli.run(visualize.main, argv, prog="visualize_attention.py")
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("visualize_attention.py: error: "), err
    return err


def test_cli_errors_are_one_line(tmp_path, capsys, cifar_root):
    bad = tmp_path / "bad.jpg"
    bad.write_text("not an image")
    good = sorted((cifar_root / "val" / "cat").iterdir())[0]
    base = ["--out", str(tmp_path / "o"), "--no-progress"]
    assert "bad.jpg: not a readable image" in _one_line_error(
        ["--checkpoint", "xcit_nano_12_p8", "--images", str(bad), *base], capsys)
    assert "no_such_model" in _one_line_error(["--checkpoint", "no_such_model", "--images", str(good), *base], capsys)
    assert "runs/none/checkpoint.pth" in _one_line_error(
        ["--checkpoint", "runs/none/checkpoint.pth", "--images", str(good), *base], capsys)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"\x00" * 64)
    assert "junk.pth" in _one_line_error(["--checkpoint", str(junk), "--images", str(good), *base], capsys)
    assert "--threshold" in _one_line_error(
        ["--checkpoint", "xcit_nano_12_p8", "--images", str(good), "--threshold", "1.5", *base], capsys)
    line = _one_line_error(["--checkpoint", "xcit_nano_12_p8", "--images", str(good), "--layer", "5", *base], capsys)
    assert "--layer 5: this XCiT has 2 class-attention layers" in line and "--checkpoint" not in line, line
    assert "missing_dir" in _one_line_error(
        ["--checkpoint", "xcit_nano_12_p8", "--images", str(tmp_path / "missing_dir"), *base], capsys)


def test_cli_skips_unreadable_images_in_a_folder_when_asked(tmp_path, capsys, cifar_root):
    folder = tmp_path / "imgs"
    folder.mkdir()
    (folder / "bad.jpg").write_text("not an image")
    shutil.copy(sorted((cifar_root / "val" / "dog").iterdir())[0], folder / "dog.jpg")
    argv = ["--checkpoint", "xcit_nano_12_p8", "--images", str(folder), "--out", str(tmp_path / "o"),
            "--no-progress"]
    _one_line_error(argv, capsys)
    written = cli.run(visualize.main, [*argv, "--skip-unreadable"], prog="visualize_attention.py")
    assert [p.name for p in written] == ["dog"]
    assert "skipped" in capsys.readouterr().err


def test_a_huge_image_is_bounded_by_default_and_the_warning_names_image_size(tmp_path, capsys):
    """A 10000 x 10000 photo ran the model on 1.56M tokens until memory ran out. Without --image-size the
    longer side is now at most 1024 px (here a 1600 x 1200 image, which runs either way)."""
    from PIL import Image
    big = tmp_path / "big.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (1200, 1600, 3), dtype=np.uint8)).save(big)
    argv = ["--checkpoint", "xcit_nano_12_p16", "--images", str(big), "--out", str(tmp_path / "o"), "--no-progress"]
    cli.run(visualize.main, argv, prog="visualize_attention.py")
    with np.load(tmp_path / "o" / "big" / "attention.npz") as saved:
        assert saved["image"].shape[:2] == (768, 1024)     # aspect kept, multiples of the patch
    err = capsys.readouterr().err
    assert "big.png is 1600x1200 px; resized to 1024x768" in err and "--image-size" in err, err
    cli.run(visualize.main, [*argv, "--image-size", "64"], prog="visualize_attention.py")   # asked for: as asked
    with np.load(tmp_path / "o" / "big" / "attention.npz") as saved:
        assert saved["image"].shape[:2] == (64, 80)       # shorter side 64: 85 x 64, cropped to 80
    assert "resized" not in capsys.readouterr().err


def test_attention_maps_without_image_have_no_overlay():
    m = AttentionMaps(heads=np.full((2, 2, 2), 0.25, dtype=np.float32), cls_self=np.zeros(2), patch_size=8,
                      layer=1, threshold=0.6)
    from ssl_xcit.evaluate.attention_plots import mask_overlay
    with pytest.raises(ValueError, match="no image"):
        mask_overlay(m, m.mean_mask)
