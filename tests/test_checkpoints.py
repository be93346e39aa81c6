"""Checkpoint formats: each foreign format is written here with its own key mapping (written from
the formats' descriptions, not by calling the package's converters) and must load back into a model
that computes exactly what the source model computes."""
from __future__ import annotations

import argparse
import pathlib
import re

import pytest
import timm
import torch

from ssl_xcit import get_model, load_backbone
from ssl_xcit.models import (CheckpointError, cache_dir, detect_format, infer_arch, load_weights,
                             read_checkpoint)
from ssl_xcit.models import factory

ARCH = "xcit_nano_12_p16"



def _randomised(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter and BatchNorm statistic random, so a mis-mapped key changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith("num_batches_tracked"):
                continue
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            else:
                t.copy_(torch.randn(t.shape, generator=g) * 0.05 + (1.0 if "gamma" in name else 0))
    return model.eval()


@pytest.fixture(scope="module")
def source() -> torch.nn.Module:
    """timm's own XCiT (not ours) with 1000-class head: the reference computation."""
    return _randomised(timm.create_model("xcit_nano_12_p16_224", pretrained=False), seed=1)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(2, 3, 64, 48, generator=torch.Generator().manual_seed(0))


def _timm_sd(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


# ------------------------------------------------------------- foreign key namings (test's own)
def to_official(sd: dict) -> dict:
    """facebookresearch/xcit naming: the positional encoder is ``pos_embeder`` and class attention
    has one fused ``qkv`` Linear (rows: q, then k, then v)."""
    out = {}
    for k, v in sd.items():
        if re.search(r"cls_attn_blocks\.\d+\.attn\.[kv]\.", k):
            continue
        m = re.fullmatch(r"(cls_attn_blocks\.\d+\.attn)\.q\.(weight|bias)", k)
        if m:
            base, kind = m.groups()
            out[f"{base}.qkv.{kind}"] = torch.cat([sd[f"{base}.{x}.{kind}"] for x in "qkv"], 0)
        elif k.startswith("pos_embed."):
            out["pos_embeder." + k[len("pos_embed."):]] = v
        else:
            out[k] = v
    return out


def to_mmpretrain(sd: dict) -> dict:
    """mmpretrain's ImageClassifier naming (from mmpretrain/models/backbones/xcit.py)."""
    out = {}
    for k, v in sd.items():
        if k.startswith("head."):
            out["head.fc." + k[len("head."):]] = v
            continue
        m = re.fullmatch(r"patch_embed\.proj\.(\d+)\.(\d)\.(.+)", k)
        if m:  # timm Sequential(conv-bn, GELU, conv-bn, ...) -> ConvModule list proj.i.{conv,bn}
            i, j, rest = int(m.group(1)), m.group(2), m.group(3)
            k = f"patch_embed.proj.{i // 2}.{'conv' if j == '0' else 'bn'}.{rest}"
        k = (k.replace("local_mp.conv1.", "local_mp.conv1.conv.")
              .replace("local_mp.bn.", "local_mp.conv1.bn.")
              .replace("local_mp.conv2.", "local_mp.conv2.conv.")
              .replace("mlp.fc1.", "ffn.layers.0.0.")
              .replace("mlp.fc2.", "ffn.layers.1.")
              .replace("pos_embed.token_projection.", "pos_embed.token_projection.conv."))
        k = re.sub(r"^blocks\.", "xca_layers.", k)
        k = re.sub(r"^cls_attn_blocks\.", "ca_layers.", k)
        out["backbone." + k] = v
    return out


def _no_head(sd: dict) -> dict:
    return {k: v for k, v in sd.items() if not k.startswith("head.")}


def _dino_head(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"mlp.0.weight": torch.randn(32, 128, generator=g), "mlp.0.bias": torch.zeros(32),
            "last_layer.weight_g": torch.ones(64, 1), "last_layer.weight_v": torch.randn(64, 16)}


def _assert_same_logits(model, source, images):
    with torch.no_grad():
        assert torch.equal(model.eval()(images), source(images))


def _assert_same_features(model, source, images):
    with torch.no_grad():
        assert torch.equal(model.eval()(images), source.forward_features(images)[:, 0])


# ------------------------------------------------------------------------------- round trips
def test_official_format(tmp_path, source, images):
    path = tmp_path / "xcit_nano_12_p16_224.pth"
    torch.save({"model": to_official(_timm_sd(source)), "epoch": 399,
                "args": argparse.Namespace(model="xcit_nano_12_p16", lr=5e-4)}, path)
    assert detect_format(read_checkpoint(path)) == "official"
    _assert_same_logits(get_model(ARCH, pretrained=path), source, images)
    _assert_same_logits(get_model(ARCH, pretrained=path, format="official"), source, images)


def test_dino_backbone_format(tmp_path, source, images):
    path = tmp_path / "dino_xcit_nano_12_p16_pretrain.pth"
    torch.save(_no_head(to_official(_timm_sd(source))), path)
    assert detect_format(read_checkpoint(path)) == "dino_backbone"
    model = load_backbone(path)  # arch inferred from the shapes
    assert model.arch == ARCH and not model.training
    _assert_same_features(model, source, images)


def test_dino_training_checkpoint_student_and_teacher(tmp_path, source, images):
    other = _randomised(timm.create_model("xcit_nano_12_p16_224"), seed=2)
    teacher = {f"backbone.{k}": v for k, v in _no_head(to_official(_timm_sd(source))).items()}
    teacher.update({f"head.{k}": v for k, v in _dino_head(3).items()})
    student = {f"module.backbone.{k}": v
               for k, v in _no_head(to_official(_timm_sd(other))).items()}
    student.update({f"module.head.{k}": v for k, v in _dino_head(4).items()})
    path = tmp_path / "checkpoint.pth"
    torch.save({"student": student, "teacher": teacher, "epoch": 10, "optimizer": {},
                "args": argparse.Namespace(arch="xcit_nano_12_p16", out_dim=64),
                "dino_loss": {"center": torch.zeros(1, 64)}}, path)
    assert detect_format(read_checkpoint(path)) == "dino"
    _assert_same_features(load_backbone(path), source, images)  # default: teacher
    _assert_same_features(load_backbone(path, arch=ARCH, checkpoint_key="student"), other, images)
    with pytest.raises(CheckpointError, match="checkpoint_key='ema'.*student"):
        load_backbone(path, checkpoint_key="ema")


def test_ssl_xcit_checkpoint_uses_config_arch(tmp_path, source, images):
    teacher = {f"backbone.{k}": v for k, v in _no_head(_timm_sd(source)).items()}
    teacher.update({f"head.{k}": v for k, v in _dino_head(5).items()})
    ckpt = {"format": "ssl_xcit", "student": {f"module.{k}": v for k, v in teacher.items()},
            "teacher": teacher, "epoch": 1, "config": {"model": {"arch": ARCH}}}
    path = tmp_path / "ssl.pth"
    torch.save(ckpt, path)
    assert detect_format(read_checkpoint(path)) == "ssl_xcit"
    _assert_same_features(load_backbone(path), source, images)
    _assert_same_features(load_backbone(path, checkpoint_key="student"), source, images)
    # the config's arch is what is built: a wrong one is a clear error naming the file
    ckpt["config"] = {"model": {"arch": "xcit_tiny_12_p16"}}
    torch.save(ckpt, path)
    with pytest.raises(CheckpointError, match=r"ssl\.pth.*does not fit xcit_tiny_12_p16"):
        load_backbone(path)


def test_timm_format_pth_and_safetensors(tmp_path, source, images):
    from safetensors.torch import save_file

    pth, st = tmp_path / "timm.pth", tmp_path / "model.safetensors"
    torch.save(_timm_sd(source), pth)
    save_file({k: v.contiguous() for k, v in _timm_sd(source).items()}, str(st))
    assert detect_format(read_checkpoint(pth)) == "timm"
    _assert_same_logits(get_model(ARCH, pretrained=pth), source, images)
    _assert_same_logits(get_model(ARCH, pretrained=st), source, images)


def test_mmpretrain_format(tmp_path, source, images):
    sd = to_mmpretrain(_timm_sd(source))
    assert any(k.startswith("backbone.xca_layers.0.ffn.layers.0.0") for k in sd)
    path = tmp_path / "xcit-nano-12-p16_3rdparty_in1k_20230213-ed776c38.pth"
    torch.save({"meta": {"epoch": 300, "mmpretrain_version": "1.0.0"}, "state_dict": sd}, path)
    assert detect_format(read_checkpoint(path)) == "mmpretrain"
    _assert_same_logits(get_model(ARCH, pretrained=path), source, images)
    # without the wrapper, too
    torch.save(sd, path)
    _assert_same_logits(get_model(ARCH, pretrained=path, format="mmpretrain"), source, images)


def test_in_memory_and_p8_official(source):
    """Patch-8 (3 stem convs) official weights, passed as an already-loaded dict."""
    ref = _randomised(timm.create_model("xcit_nano_12_p8_224"), seed=7)
    model = get_model("xcit_nano_12_p8")
    load_weights(model, {"model": to_official(_timm_sd(ref))})
    x = torch.randn(1, 3, 32, 40)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), ref(x))


# ------------------------------------------------------------------------------- errors
def test_missing_unreadable_and_unknown_files(tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        get_model(ARCH, pretrained=missing)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"definitely not a checkpoint")
    with pytest.raises(CheckpointError, match="garbage.pth is not a PyTorch checkpoint"):
        load_backbone(garbage)
    unknown = tmp_path / "unknown.pth"
    torch.save({"weights": [1, 2, 3], "version": 2}, unknown)
    with pytest.raises(CheckpointError, match="unknown.pth.*unknown checkpoint format"):
        load_backbone(unknown)
    with pytest.raises(CheckpointError, match="format='caffe'"):
        get_model(ARCH, pretrained=unknown, format="caffe")


def test_pickled_objects_refused_unless_allowed(tmp_path, source, images):
    path = tmp_path / "pickled.pth"
    torch.save({"model": to_official(_timm_sd(source)), "out_dir": pathlib.PurePosixPath("/x")},
               path)
    with pytest.raises(CheckpointError, match="pickled.pth.*PurePosixPath.*allow_pickle=True"):
        get_model(ARCH, pretrained=path)
    with pytest.warns(UserWarning, match="weights_only=False"):
        model = get_model(ARCH, pretrained=path, allow_pickle=True)
    _assert_same_logits(model, source, images)


class _RunsShell:
    """Unpickling this calls os.system: a file holding it must never be executed."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):
        import os
        return os.system, (f"touch {self.marker}",)


def test_random_bytes_and_refused_globals_get_different_messages(tmp_path):
    """torch says "unsupported GLOBAL ... is blocked" (os.system) or "Unsupported global: GLOBAL ..."
    (a class not allowed); random bytes, an empty and a truncated file are not checkpoints."""
    import pickle
    import random
    marker = tmp_path / "EXECUTED"
    evil_zip, evil_pickle = tmp_path / "evil.pth", tmp_path / "evil_legacy.pth"
    torch.save({"model": {"w": torch.ones(2)}, "x": _RunsShell(marker)}, evil_zip)
    evil_pickle.write_bytes(pickle.dumps({"x": _RunsShell(marker)}, protocol=2))
    for path in (evil_zip, evil_pickle):
        with pytest.raises(CheckpointError) as info:
            load_backbone(path)
        msg = str(info.value)
        assert msg.startswith(f"{path} contains GLOBAL posix.system that weights_only loading refuses "
                              "(unpickling it would run code from the file); if you trust the file"), msg
        # the library names its Python argument; each command line says its own option, or none
        assert "allow_pickle=True" in msg and "--allow-pickle" not in msg and "\n" not in msg
        assert info.value.needs == "allow_pickle"
    assert not marker.exists()  # never executed
    cls_file = tmp_path / "path.pth"
    torch.save({"model": {"w": torch.ones(2)}, "out": pathlib.PurePosixPath("/x")}, cls_file)
    with pytest.raises(CheckpointError, match=r"path.pth contains GLOBAL pathlib.PurePosixPath that weights_only"):
        read_checkpoint(cls_file)

    noise = tmp_path / "noise.pth"
    noise.write_bytes(random.Random(0).randbytes(4096))
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    good = tmp_path / "good.pth"
    torch.save({"w": torch.ones(10000)}, good)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[:20000])
    for path in (noise, empty, truncated):
        with pytest.raises(CheckpointError) as info:
            read_checkpoint(path)
        msg = str(info.value)
        assert msg.startswith(f"{path} is not a PyTorch checkpoint ("), msg
        assert "GLOBAL" not in msg and "allow_pickle" not in msg and "\n" not in msg and len(msg) < 300
    assert "empty" in str(pytest.raises(CheckpointError, read_checkpoint, empty).value)


def test_a_folder_is_not_a_checkpoint_file(tmp_path):
    from ssl_xcit.evaluate.backbone import load_frozen_backbone
    empty_dir, run_dir = tmp_path / "empty", tmp_path / "run"
    empty_dir.mkdir()
    run_dir.mkdir()
    torch.save({"w": torch.ones(1)}, run_dir / "checkpoint.pth")
    model = get_model(ARCH, num_classes=0)
    loaders = [read_checkpoint, load_backbone, load_frozen_backbone, lambda p: get_model(ARCH, pretrained=p),
               lambda p: load_weights(model, p), lambda p: load_weights(model, str(p))]
    for load in loaders:
        with pytest.raises(CheckpointError) as info:
            load(empty_dir)
        assert str(info.value) == f"{empty_dir} is a folder, not a checkpoint file"
        with pytest.raises(CheckpointError) as info:
            load(run_dir)
        assert str(info.value) == (f"{run_dir} is a folder, not a checkpoint file; "
                                   f"did you mean {run_dir / 'checkpoint.pth'}?")


def test_wrong_arch_is_a_clear_error(tmp_path, source):
    path = tmp_path / "nano.pth"
    torch.save(_timm_sd(source), path)
    with pytest.raises(CheckpointError) as info:
        get_model("xcit_tiny_12_p16", pretrained=path)
    msg = str(info.value)
    assert "nano.pth" in msg and "xcit_tiny_12_p16" in msg and "looks like xcit_nano_12_p16" in msg


def test_strict_loading_lists_missing_and_unexpected_keys(tmp_path, source):
    sd = _timm_sd(source)
    del sd["blocks.3.attn.temperature"], sd["norm.weight"]
    sd["blocks.0.extra.weight"] = torch.zeros(3)
    path = tmp_path / "broken.pth"
    torch.save(sd, path)
    with pytest.raises(CheckpointError) as info:
        get_model(ARCH, pretrained=path)
    msg = str(info.value)
    for part in ("broken.pth", "missing keys", "blocks.3.attn.temperature", "norm.weight",
                 "unexpected keys", "blocks.0.extra.weight"):
        assert part in msg
    with pytest.warns(UserWarning, match="non-strict"):
        get_model(ARCH, pretrained=path, strict=False)


def test_head_of_another_size_is_dropped_with_warning(tmp_path, source, images):
    path = tmp_path / "in1k.pth"
    torch.save(_timm_sd(source), path)
    torch.manual_seed(0)
    fresh_head = get_model(ARCH, num_classes=10).head.weight.clone()
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="1000 classes.*10.*dropped"):
        model = get_model(ARCH, pretrained=path, num_classes=10)
    assert torch.equal(model.head.weight, fresh_head)  # untouched by the checkpoint
    with torch.no_grad():
        assert torch.equal(model.eval().extract_feat(images), source.forward_features(images)[:, 0])


def test_backbone_checkpoint_into_classifier_warns_head_kept(tmp_path, source, images):
    path = tmp_path / "backbone.pth"
    torch.save(_no_head(_timm_sd(source)), path)
    with pytest.warns(UserWarning, match="no classifier head"):
        model = get_model(ARCH, pretrained=path, num_classes=5)
    with torch.no_grad():
        assert torch.equal(model.eval().extract_feat(images), source.forward_features(images)[:, 0])


# ------------------------------------------------------------------------------- zoo weights
def test_pretrained_true_reads_the_local_cache(tmp_path, monkeypatch, source, images):
    monkeypatch.setenv("SSL_XCIT_HOME", str(tmp_path / "cache"))
    assert cache_dir() == tmp_path / "cache"
    with pytest.raises(FileNotFoundError) as info:
        get_model(ARCH, pretrained=True)
    msg = str(info.value)
    assert "xcit-nano-12-p16_3rdparty_in1k_20230213-ed776c38.pth" in msg
    assert str(tmp_path / "cache") in msg and "download=True" in msg
    (tmp_path / "cache").mkdir()
    torch.save({"meta": {}, "state_dict": to_mmpretrain(_timm_sd(source))},
               tmp_path / "cache" / "xcit-nano-12-p16_3rdparty_in1k_20230213-ed776c38.pth")
    _assert_same_logits(get_model(ARCH, pretrained=True), source, images)
    # the distilled zoo name looks for its own file
    with pytest.raises(FileNotFoundError, match="xcit-nano-12-p16_3rdparty-dist_in1k_20230213"):
        get_model("xcit-nano-12-p16_3rdparty-dist_in1k", pretrained=True)


def test_cache_defaults_to_torch_hub(monkeypatch, tmp_path):
    monkeypatch.delenv("SSL_XCIT_HOME", raising=False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    assert cache_dir() == tmp_path / "hub" / "checkpoints"


def test_download_only_when_asked(tmp_path, monkeypatch, source, images):
    monkeypatch.setenv("SSL_XCIT_HOME", str(tmp_path))
    calls = []
    sd = {"meta": {}, "state_dict": to_mmpretrain(_timm_sd(source))}

    def fake_download(url, dst, hash_prefix=None, progress=True):
        calls.append((url, pathlib.Path(dst), hash_prefix))
        torch.save(sd, dst)

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    with pytest.raises(FileNotFoundError):
        get_model("xcit-nano-12-p16_3rdparty_in1k", pretrained=True)
    assert calls == []
    model = get_model("xcit-nano-12-p16_3rdparty_in1k", pretrained=True, download=True)
    name = "xcit-nano-12-p16_3rdparty_in1k_20230213-ed776c38.pth"
    assert calls == [(f"https://download.openmmlab.com/mmclassification/v0/xcit/{name}",
                      tmp_path / name, "ed776c38")]
    _assert_same_logits(model, source, images)
    assert factory.pretrained_file(ARCH) == tmp_path / name  # now cached: no second download
    assert len(calls) == 1


# ------------------------------------------------------------------------------- load_backbone
def test_load_backbone_with_a_model_name_is_random_init():
    model = load_backbone("xcit-nano-12-p8_3rdparty_in1k")
    assert model.arch == "xcit_nano_12_p8" and not model.training and model.num_classes == 0
    with pytest.raises(ValueError, match="neither an existing file nor a model name"):
        load_backbone("xcit_nano_13_p16")
    with pytest.raises(FileNotFoundError, match="runs/ckpt.pth"):
        load_backbone("runs/ckpt.pth")


def test_infer_arch_for_every_architecture(monkeypatch):
    from ssl_xcit.models import ARCHS

    noop = lambda *args, **kwargs: None  # noqa: E731  (no values on meta: skip the init)
    monkeypatch.setattr(timm.models.xcit, "trunc_normal_", noop)
    for cls in (torch.nn.Linear, torch.nn.modules.conv._ConvNd, torch.nn.LayerNorm):
        monkeypatch.setattr(cls, "reset_parameters", noop)
    for arch in ARCHS:
        with torch.device("meta"):
            sd = get_model(arch, num_classes=0).state_dict()
        assert infer_arch(sd) == arch
    with pytest.raises(CheckpointError, match="cannot infer"):
        infer_arch({"foo": torch.zeros(1)})
