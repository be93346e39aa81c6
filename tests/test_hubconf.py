"""torch.hub and DINO's published XCiT backbones (issue 25): ``hubconf.py`` gives DINO's names with DINO's
signature and the zoo's names; ``weights=FILE`` loads a local file; published weights come from
``$SSL_XCIT_HOME`` and are fetched only with ``download=True``."""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import torch

from ssl_xcit.models import DINO_ZOO, get_model, list_models, resolve
from ssl_xcit.models.checkpoints import CheckpointError

REPO = Path(__file__).resolve().parents[1]
DINO_NAME = "dino_xcit_small_12_p16"


def official_naming(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm's key names -> facebookresearch/xcit's (DINO's files): ``pos_embed.`` is ``pos_embeder.``
    and class attention's q, k, v are one fused ``qkv``. Written here from the official code's layout,
    the inverse of what ssl_xcit's reader does."""
    out, fused = {}, {}
    for k, v in sd.items():
        m = re.fullmatch(r"(cls_attn_blocks\.\d+\.attn)\.([qkv])\.(weight|bias)", k)
        if m:
            fused.setdefault((m.group(1), m.group(3)), {})[m.group(2)] = v
        elif k.startswith("pos_embed."):
            out["pos_embeder." + k[len("pos_embed."):]] = v
        else:
            out[k] = v
    for (prefix, kind), parts in fused.items():
        out[f"{prefix}.qkv.{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


@pytest.fixture(scope="module")
def dino_file(tmp_path_factory) -> Path:
    """A file laid out as DINO publishes its XCiT backbones: a plain state dict, official key names,
    no head; random weights of xcit_small_12_p16 (drawn with a seed of its own)."""
    torch.manual_seed(7)
    model = get_model("xcit_small_12_p16", num_classes=0)
    path = tmp_path_factory.mktemp("dino") / f"{DINO_NAME}_pretrain.pth"
    torch.save(official_naming(model.state_dict()), path)
    return path


def test_dino_zoo_entries_are_dinos_files():
    assert sorted(DINO_ZOO) == sorted(["dino_xcit_small_12_p16", "dino_xcit_small_12_p8", "dino_xcit_medium_24_p16",
                                       "dino_xcit_medium_24_p8"])
    for name, e in DINO_ZOO.items():
        assert e.url == f"https://dl.fbaipublicfiles.com/dino/{name}_pretrain/{name}_pretrain.pth"
        assert e.filename == e.url.rsplit("/", 1)[1] and e.sha256_prefix is None
        r = resolve(name)
        assert r.arch.name == name[len("dino_"):] and r.img_size == 224 and r.num_classes == 0
        assert name in list_models()
    with torch.device("meta"):
        assert get_model("dino_xcit_medium_24_p8").num_classes == 0          # a backbone, as DINO's
        assert get_model("xcit_medium_24_p8").num_classes == 1000            # the zoo's classifiers


def test_published_weights_come_from_the_cache_and_download_only_when_asked(dino_file, tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("SSL_XCIT_HOME", str(home))
    fetched = []

    def fake_download(url, dst, hash_prefix=None, progress=True):   # a local stand-in: no network
        fetched.append((url, Path(dst).name, hash_prefix))
        Path(dst).write_bytes(dino_file.read_bytes())
    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    with pytest.raises(FileNotFoundError) as info:
        get_model(DINO_NAME, pretrained=True)
    assert f"{DINO_NAME}_pretrain.pth" in str(info.value) and str(home) in str(info.value)
    assert DINO_ZOO[DINO_NAME].url in str(info.value) and fetched == []
    model = get_model(DINO_NAME, pretrained=True, download=True)
    assert fetched == [(DINO_ZOO[DINO_NAME].url, f"{DINO_NAME}_pretrain.pth", None)]
    # the fused class-attention qkv of DINO's file is split into timm's q, k, v
    ref = torch.load(dino_file, weights_only=True)["cls_attn_blocks.1.attn.qkv.weight"]
    own = model.state_dict()
    assert torch.equal(torch.cat([own[f"cls_attn_blocks.1.attn.{p}.weight"] for p in "qkv"]), ref)
    assert model.num_classes == 0
    get_model(DINO_NAME, pretrained=True, download=True)    # now in the cache: no second fetch
    assert len(fetched) == 1


def _hub(name: str, **kwargs):
    return torch.hub.load(str(REPO), name, source="local", trust_repo=True, verbose=False, **kwargs)


def test_torch_hub_load_with_a_local_file_is_get_model(dino_file):
    hub = _hub(DINO_NAME, weights=str(dino_file))
    ref = get_model(DINO_NAME, pretrained=str(dino_file))
    assert type(hub) is type(ref) and hub.num_classes == ref.num_classes == 0
    assert hub.state_dict().keys() == ref.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(hub.state_dict().values(), ref.state_dict().values()))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(hub.eval()(x), ref.eval()(x))
    random_init = _hub(DINO_NAME, pretrained=False)          # DINO's signature: random weights
    assert random_init.num_classes == 0
    assert not torch.equal(random_init.state_dict()["cls_token"], ref.state_dict()["cls_token"])


def test_torch_hub_knows_the_zoo_and_says_what_is_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("SSL_XCIT_HOME", str(tmp_path))
    assert _hub("xcit-nano-12-p16_3rdparty_in1k").num_classes == 1000    # zoo names: get_model's signature
    assert _hub("xcit_nano_12_p16", num_classes=7).num_classes == 7
    with pytest.raises(FileNotFoundError, match=f"{DINO_NAME}_pretrain.pth"):   # pretrained=True, offline
        _hub(DINO_NAME)
    with pytest.raises(RuntimeError, match="xcit_nano_12_p1"):
        _hub("xcit_nano_12_p1")
    with pytest.raises(CheckpointError, match="does not fit"):       # a file of another architecture
        nano = tmp_path / "nano.pth"
        torch.save(get_model("xcit_nano_12_p16", num_classes=0).state_dict(), nano)
        _hub(DINO_NAME, weights=str(nano))


def test_hubconf_lists_dinos_names_and_the_zoo():
    spec = importlib.util.spec_from_file_location("hubconf_under_test", REPO / "hubconf.py")
    hubconf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hubconf)
    names = dir(hubconf)
    assert {"dino_xcit_small_12_p16", "dino_xcit_small_12_p8", "dino_xcit_medium_24_p16",
            "dino_xcit_medium_24_p8"} <= set(names)
    assert set(list_models()) <= set(names) and hubconf.dependencies == ["torch", "timm"]
    assert callable(getattr(hubconf, "xcit-nano-12-p16_3rdparty_in1k"))
