"""The XCiT zoo: every name builds the published architecture, and the model computes what timm's
port computes. Big models are built on the ``meta`` device (shapes only, no memory, no compute)."""
from __future__ import annotations

import csv
from pathlib import Path

import pytest
import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

import ssl_xcit
from ssl_xcit.models import ARCHS, DINO_ZOO, ZOO, XCiT, get_model, list_models, resolve

REFERENCE_TSV = Path(__file__).resolve().parents[2] / "shared" / "reference" / "xcit_zoo.tsv"


def _reference_rows() -> list[dict]:
    """The issue's reference table when this checkout has it, else the package table."""
    if REFERENCE_TSV.exists():
        with open(REFERENCE_TSV) as f:
            return [dict(name=r["name"], params_M=float(r["params_M"]), flops_G=float(r["flops_G"]),
                         img_size=int(r["img_size"]), distilled=r["distilled"] == "yes")
                    for r in csv.DictReader(f, delimiter="\t")]
    return [dict(name=e.name, params_M=e.params / 1e6, flops_G=e.macs / 1e9, img_size=e.img_size,
                 distilled=e.distilled) for e in ZOO.values()]


ROWS = _reference_rows()



def _macs_on_meta(model: torch.nn.Module, h: int, w: int) -> tuple[float, torch.Size]:
    """Multiply-accumulates of one forward; FlopCounterMode counts 2 FLOPs per MAC."""
    x = torch.empty(1, 3, h, w, device="meta")
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        out = model(x)
    return counter.get_total_flops() / 2, out.shape


def _macs_sharing_blocks(model: XCiT, h: int, w: int) -> tuple[float, torch.Size]:
    """Like :func:`_macs_on_meta`, with XCA blocks 1..depth-1 counted as copies of block 0.

    Meta tensors cost ~1 ms of Python per op, a 24-block forward seconds; the XCA blocks are the
    same module with the same parameter shapes and see the same token shape (asserted), so their
    counts are equal. Every other op (stem, positional encoding, class attention, head) is
    counted. The heavy test counts the whole model.
    """
    blocks = model.blocks
    shapes = [[(n, p.shape) for n, p in b.named_parameters()] for b in blocks]
    assert all(type(b) is type(blocks[0]) for b in blocks) and all(s == shapes[0] for s in shapes)
    model.blocks = torch.nn.ModuleList(blocks[:1])
    try:
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            out = model(torch.empty(1, 3, h, w, device="meta"))
    finally:
        model.blocks = blocks
    per_block = sum(counter.get_flop_counts()[f"{type(model).__name__}.blocks.0"].values())
    return (counter.get_total_flops() + (len(blocks) - 1) * per_block) / 2, out.shape


def test_package_table_matches_reference():
    if not REFERENCE_TSV.exists():
        pytest.skip(f"reference table {REFERENCE_TSV} not in this checkout")
    assert [r["name"] for r in ROWS] == list(ZOO)
    for r in ROWS:
        e = ZOO[r["name"]]
        assert abs(e.params / 1e6 - r["params_M"]) <= 0.005 + 1e-9, r
        assert abs(e.macs / 1e9 - r["flops_G"]) <= 0.005 + 1e-9, r
        assert (e.img_size, e.distilled) == (r["img_size"], r["distilled"]), r


def test_flop_counter_counts_two_flops_per_mac():
    """The FLOP -> MAC halving used below, checked on a matmul of known size."""
    a, b = torch.empty(7, 5, device="meta"), torch.empty(5, 3, device="meta")
    counter = FlopCounterMode(display=False)
    with counter:
        a @ b
    assert counter.get_total_flops() == 2 * 7 * 5 * 3


@pytest.fixture
def fast_meta_init(monkeypatch):
    """Weight initialisation is pointless on ``meta`` (no values) yet costs seconds in Python
    decompositions; parameter shapes, counts and FLOPs do not depend on it."""
    noop = lambda *args, **kwargs: None  # noqa: E731
    monkeypatch.setattr(timm.models.xcit, "trunc_normal_", noop)
    for cls in (torch.nn.Linear, torch.nn.modules.conv._ConvNd, torch.nn.LayerNorm,
                torch.nn.modules.batchnorm._NormBase):
        monkeypatch.setattr(cls, "reset_parameters", noop)


SMALL_ARCHS = [a for a in ARCHS if a.startswith(("xcit_nano", "xcit_tiny"))]


@pytest.mark.parametrize("row", ROWS, ids=[r["name"] for r in ROWS])
def test_zoo_name_params_flops_and_shapes(row, fast_meta_init):
    with torch.device("meta"):
        model = get_model(row["name"])
    model.eval()
    assert model.img_size == (row["img_size"], row["img_size"])
    assert resolve(row["name"]).entry.distilled == row["distilled"]
    n_params = sum(p.numel() for p in model.parameters())
    assert abs(n_params / 1e6 - row["params_M"]) / row["params_M"] < 0.005
    macs, shape = _macs_sharing_blocks(model, row["img_size"], row["img_size"])
    assert shape == (1, 1000)
    assert abs(macs / 1e9 - row["flops_G"]) / row["flops_G"] < 0.02, macs
    if model.arch not in SMALL_ARCHS:  # small ones: a real forward at 96 px, below
        _, shape = _macs_sharing_blocks(model, 96, 96)
        assert shape == (1, 1000)


@pytest.mark.parametrize("arch", SMALL_ARCHS)
def test_real_forward_at_96px_small_archs(arch):
    torch.manual_seed(0)
    model = get_model(arch).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 96, 96))
    assert out.shape == (1, 1000) and torch.isfinite(out).all()


@pytest.mark.heavy
@pytest.mark.parametrize("name", list(ZOO))
def test_real_forward_at_table_resolution(name):
    """Every zoo model, really computed at its resolution and at 96 px (GPU when there is one),
    and its FLOPs counted over every block on meta."""
    row = next(r for r in ROWS if r["name"] == name)
    with torch.device("meta"):
        meta_model = get_model(name).eval()
    macs, _ = _macs_on_meta(meta_model, row["img_size"], row["img_size"])
    assert abs(macs / 1e9 - row["flops_G"]) / row["flops_G"] < 0.02
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = get_model(name).eval().to(device)
    s = model.img_size[0]
    with torch.no_grad():
        out = model(torch.randn(1, 3, s, s, device=device))
        local = model(torch.randn(1, 3, 96, 96, device=device))
        feats = model.forward_features_all(torch.randn(1, 3, 96, 128, device=device))
    assert out.shape == local.shape == (1, 1000)
    assert torch.isfinite(out).all() and torch.isfinite(local).all()
    assert feats["patch_tokens"].shape[1] == (96 // model.patch_size) * (128 // model.patch_size)


# ------------------------------------------------------------------------------------------ names
def test_list_models_and_name_kinds():
    names = list_models()
    assert len(names) == len(ZOO) + len(DINO_ZOO) + len(ARCHS) == 60
    assert set(ZOO) <= set(names) and set(DINO_ZOO) <= set(names) and set(ARCHS) <= set(names)
    assert ssl_xcit.list_models("*small_12_p16*") == ["dino_xcit_small_12_p16", "xcit_small_12_p16"]
    assert "xcit_small_12_p16_384" in list_models(aliases=True)
    r = resolve("xcit_small_12_p16")
    assert (r.arch.name, r.img_size, r.entry.name) == ("xcit_small_12_p16", 224,
                                                       "xcit-small-12-p16_3rdparty_in1k")
    r = resolve("xcit_small_12_p16_384")  # timm's name: only distilled weights exist at 384
    assert (r.img_size, r.entry.name) == (384, "xcit-small-12-p16_3rdparty-dist_in1k-384px")
    r = resolve("xcit_tiny_24_p8_224.fb_dist_in1k")
    assert r.entry.name == "xcit-tiny-24-p8_3rdparty-dist_in1k"
    for arch in ARCHS:  # every short arch name has non-distilled 224 px weights
        e = resolve(arch).entry
        assert e is not None and not e.distilled and e.img_size == 224 and e.arch == arch


def test_zoo_entries_are_consistent_with_their_names():
    for name, e in ZOO.items():
        spec = ARCHS[e.arch]
        assert f"-p{spec.patch_size}_" in name and f"-{spec.depth}-" in name
        assert e.url.startswith("https://download.openmmlab.com/") and e.url.endswith(".pth")
        assert e.filename == e.url.rsplit("/", 1)[1] and len(e.sha256_prefix) == 8
        assert e.official_url.endswith(f"_{e.img_size}{'_dist' if e.distilled else ''}.pth")


def test_unknown_name_lists_closest_matches():
    with pytest.raises(ValueError) as info:
        get_model("xcit_smal_12_p16")
    msg = str(info.value)
    assert "xcit_smal_12_p16" in msg and "xcit_small_12_p16" in msg
    with pytest.raises(ValueError, match="xcit-nano-12-p16_3rdparty_in1k"):
        get_model("xcit-nano-12-p16_3rdparty_in1")


def test_overrides_pass_through_and_are_checked():
    model = get_model("xcit_nano_12_p16", drop_path_rate=0.1, num_classes=7)
    assert model.blocks[0].drop_path1.drop_prob == pytest.approx(0.1)
    assert model.head.out_features == 7
    with pytest.raises(TypeError, match="drop_path"):
        get_model("xcit_nano_12_p16", drop_pth_rate=0.1)
    with pytest.raises(ValueError, match="100.*16|16.*100"):
        get_model("xcit_nano_12_p16", img_size=100)


# ------------------------------------------------------------------------------------------ model
def _same_weights(name: str, timm_name: str) -> tuple[XCiT, torch.nn.Module]:
    torch.manual_seed(0)
    ref = timm.create_model(timm_name, pretrained=False).eval()
    with torch.no_grad():  # make the BatchNorm statistics matter
        for n, b in ref.named_buffers():
            if n.endswith("running_mean"):
                b.normal_(0, 0.1)
            elif n.endswith("running_var"):
                b.uniform_(0.5, 1.5)
    ours = get_model(name).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours, ref


@pytest.mark.parametrize("name,timm_name", [("xcit_nano_12_p16", "xcit_nano_12_p16_224"),
                                            ("xcit_nano_12_p8", "xcit_nano_12_p8_224"),
                                            ("xcit_tiny_12_p16", "xcit_tiny_12_p16_224")])
def test_same_outputs_as_timm_port(name, timm_name):
    ours, ref = _same_weights(name, timm_name)
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        tokens = ref.forward_features(x)
        assert torch.equal(ours(x), ref(x))
        assert torch.equal(ours.extract_feat(x), tokens[:, 0])
        all_ = ours.forward_features_all(x)
        torch.testing.assert_close(all_["cls"], tokens[:, 0], rtol=0, atol=1e-6)
        torch.testing.assert_close(all_["patch_tokens"], tokens[:, 1:], rtol=0, atol=1e-6)
        assert all_["grid"] == (64 // ours.patch_size, 96 // ours.patch_size)
        backbone = get_model(name, num_classes=0).eval()
        backbone.load_state_dict({k: v for k, v in ref.state_dict().items()
                                  if not k.startswith("head.")})
        assert torch.equal(backbone(x), tokens[:, 0])


def test_cls_of_last_blocks_against_timm_hooks():
    """cls_blocks / get_intermediate_layers are the class-attention blocks' outputs through the
    final norm, captured here independently with hooks on timm's module."""
    ours, ref = _same_weights("xcit_nano_12_p16", "xcit_nano_12_p16_224")
    seen, xca_out = [], []
    hooks = [b.register_forward_hook(lambda m, i, o: seen.append(o)) for b in ref.cls_attn_blocks]
    hooks.append(ref.blocks[-1].register_forward_hook(lambda m, i, o: xca_out.append(o)))
    x = torch.randn(3, 3, 48, 80)
    with torch.no_grad():
        ref.forward_features(x)
        for h in hooks:
            h.remove()
        expected = [ref.norm(t) for t in seen]
        all_ = ours.forward_features_all(x)
        layers = ours.get_intermediate_layers(x, n=2)
        cat2 = ours.get_last_cls_tokens(x, n=2)
        one = ours.get_last_cls_tokens(x, n=1)
    assert len(all_["cls_blocks"]) == 2 and len(layers) == 2
    for got, want, full in zip(all_["cls_blocks"], expected, layers):
        torch.testing.assert_close(got, want[:, 0], rtol=0, atol=1e-6)
        torch.testing.assert_close(full, want, rtol=0, atol=1e-6)
    torch.testing.assert_close(cat2, torch.cat([e[:, 0] for e in expected], -1), rtol=0, atol=1e-6)
    torch.testing.assert_close(one, ours.extract_feat(x), rtol=0, atol=1e-6)
    torch.testing.assert_close(all_["xca_tokens"], xca_out[0], rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="class-attention"):
        ours.get_intermediate_layers(x, n=3)


def test_last_cls_attention_is_the_class_attention_softmax():
    """Recompute the last block's class attention in float64 from its weights."""
    ours, _ = _same_weights("xcit_tiny_12_p16", "xcit_tiny_12_p16_224")
    blk = ours.cls_attn_blocks[-1]
    seen = []
    hook = blk.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    x = torch.randn(2, 3, 64, 48)
    with torch.no_grad():
        ours(x)
        hook.remove()
        attn = ours.get_last_cls_attention(x)
        y = blk.norm1(seen[0]).double()
        b, n, c = y.shape
        h = ours.num_heads
        q = torch.nn.functional.linear(y[:, :1], blk.attn.q.weight.double(), blk.attn.q.bias.double())
        k = torch.nn.functional.linear(y, blk.attn.k.weight.double(), blk.attn.k.bias.double())
        v = torch.nn.functional.linear(y, blk.attn.v.weight.double(), blk.attn.v.bias.double())
        q = q.reshape(b, 1, h, c // h).transpose(1, 2)
        k = k.reshape(b, n, h, c // h).transpose(1, 2)
        v = v.reshape(b, n, h, c // h).transpose(1, 2)
        want = torch.softmax(q @ k.transpose(-1, -2) / (c // h) ** 0.5, dim=-1)
        out = blk.attn.proj(((want @ v).transpose(1, 2).reshape(b, 1, c)).float())
        module_out = blk.attn(blk.norm1(seen[0]))
    assert attn.shape == (2, h, 1 + (64 // 16) * (48 // 16))
    torch.testing.assert_close(attn.double(), want.squeeze(2), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out, module_out, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name,size", [("xcit_nano_12_p16", (96, 96)),
                                       ("xcit_nano_12_p16", (32, 80)),
                                       ("xcit_nano_12_p8", (40, 56))])
def test_any_size_divisible_by_patch(name, size):
    model = get_model(name, num_classes=0).eval()
    with torch.no_grad():
        all_ = model.forward_features_all(torch.randn(1, 3, *size))
    p = model.patch_size
    assert all_["grid"] == (size[0] // p, size[1] // p)
    assert all_["patch_tokens"].shape == (1, size[0] // p * size[1] // p, model.embed_dim)


def test_bad_input_sizes_are_clear_errors():
    model = get_model("xcit_nano_12_p16", num_classes=0).eval()
    with pytest.raises(ValueError, match=r"100x96.*patch size 16"):
        model(torch.randn(1, 3, 100, 96))
    with pytest.raises(ValueError, match="channels"):
        model.extract_feat(torch.randn(1, 1, 96, 96))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model(torch.randn(3, 96, 96))
    p8 = get_model("xcit_nano_12_p8", num_classes=0).eval()
    with pytest.raises(ValueError, match="36x36.*patch size 8"):
        p8.forward_features_all(torch.randn(1, 3, 36, 36))


def test_integer_images_get_a_one_line_hint_to_normalise():
    """A uint8 batch (as decoded from disk) fails at the check with what to do, not with a conv's
    dtype error; the recipe the message gives runs."""
    model = get_model("xcit_nano_12_p16", num_classes=0).eval()
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    calls = [model, model.extract_feat, model.forward_features, model.forward_features_all,
             model.get_intermediate_layers, model.get_last_cls_attention]
    for call in calls:
        with pytest.raises(TypeError) as info:
            call(x)
        msg = str(info.value)
        assert "\n" not in msg and "torch.uint8" in msg and "x.float() / 255" in msg, msg
        assert "(0.485, 0.456, 0.406)" in msg and "(0.229, 0.224, 0.225)" in msg
    with pytest.raises(TypeError, match="torch.int64"):
        model(x.long())
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        assert model((x.float() / 255 - mean) / std).shape == (2, model.embed_dim)


def test_input_check_does_not_break_a_compiled_graph():
    model = get_model("xcit_nano_12_p16", num_classes=0).eval()
    torch._dynamo.reset()
    check = torch.compile(model.check_input, backend="eager", fullgraph=True)  # fullgraph: no break allowed
    check(torch.randn(1, 3, 32, 32))
    with pytest.raises(Exception, match="x.float"):
        check(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))


def test_model_attributes():
    model = get_model("xcit-small-12-p8_3rdparty-dist_in1k-384px", num_classes=0)
    assert (model.arch, model.patch_size, model.embed_dim, model.num_cls_blocks) == \
        ("xcit_small_12_p8", 8, 384, 2)
    assert model.zoo_name == "xcit-small-12-p8_3rdparty-dist_in1k-384px"
    cfg = model.data_config
    assert cfg["input_size"] == (3, 384, 384) and cfg["interpolation"] == "bicubic"
    assert cfg["crop_pct"] == 1.0


def test_backbone_trains_with_grad_checkpointing():
    model = get_model("xcit_nano_12_p16", num_classes=0, drop_path_rate=0.1)
    model.set_grad_checkpointing(True)
    out = model.forward_features_all(torch.randn(2, 3, 32, 32))
    (out["cls"].sum() + out["patch_tokens"].mean()).backward()
    assert model.cls_token.grad is not None and model.blocks[0].attn.qkv.weight.grad is not None
