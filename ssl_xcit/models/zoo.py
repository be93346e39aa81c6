"""The XCiT model zoo: names -> architecture hyper-parameters and published ImageNet weights.

Why a table in the package: model names must resolve without network access or files outside
the package, and the numbers in it (parameters, multiply-accumulates) are what tests hold the
built models to. Facts come from the XCiT paper / facebookresearch/xcit (architectures) and
open-mmlab/mmpretrain ``configs/xcit/metafile.yml`` (the 42 zoo names, their parameter and
FLOP counts and their weight files). mmpretrain's "FLOPs" are multiply-accumulates (MACs).

Four kinds of names are accepted by :func:`resolve`:

* the 42 zoo names, e.g. ``xcit-small-12-p16_3rdparty-dist_in1k-384px``;
* DINO's 4 self-supervised XCiT backbones (facebookresearch/dino's README and ``hubconf.py``), e.g.
  ``dino_xcit_small_12_p16``: no classifier head, so their models default to ``num_classes=0``;
* the 14 architecture names (timm's family names), e.g. ``xcit_small_12_p16`` (224 px);
* timm's model names, e.g. ``xcit_small_12_p16_224`` / ``xcit_small_12_p16_384``, optionally with
  timm's pretrained tag ``.fb_in1k`` / ``.fb_dist_in1k``.
"""
from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field

MMPRETRAIN_URL = "https://download.openmmlab.com/mmclassification/v0/xcit"
OFFICIAL_URL = "https://dl.fbaipublicfiles.com/xcit"


@dataclass(frozen=True)
class ArchSpec:
    """Hyper-parameters of one XCiT architecture (the arguments timm's ``Xcit`` needs)."""

    name: str
    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    eta: float  # layer-scale initial value: 1.0 for 12-layer models, 1e-5 for 24-layer ones
    tokens_norm: bool  # class-attention normalises all tokens (True) or only CLS (nano models)
    cls_attn_layers: int = 2

    def model_kwargs(self) -> dict:
        return dict(patch_size=self.patch_size, embed_dim=self.embed_dim, depth=self.depth,
                    num_heads=self.num_heads, eta=self.eta, tokens_norm=self.tokens_norm,
                    cls_attn_layers=self.cls_attn_layers)


# size -> (embed_dim, num_heads, tokens_norm); depth sets eta.
_SIZES = {
    "nano": (128, 4, False),
    "tiny": (192, 4, True),
    "small": (384, 8, True),
    "medium": (512, 8, True),
    "large": (768, 16, True),
}
_FAMILIES = [("nano", 12), ("tiny", 12), ("tiny", 24), ("small", 12), ("small", 24),
             ("medium", 24), ("large", 24)]


def _arch(size: str, depth: int, patch: int) -> ArchSpec:
    dim, heads, tokens_norm = _SIZES[size]
    return ArchSpec(name=f"xcit_{size}_{depth}_p{patch}", patch_size=patch, embed_dim=dim,
                    depth=depth, num_heads=heads, eta=1.0 if depth == 12 else 1e-5,
                    tokens_norm=tokens_norm)


ARCHS: dict[str, ArchSpec] = {
    a.name: a for a in (_arch(s, d, p) for p in (16, 8) for s, d in _FAMILIES)
}


@dataclass(frozen=True)
class ZooEntry:
    """One published checkpoint: an architecture, a resolution and an mmpretrain weight file."""

    name: str
    params: int  # exact parameter count (with the 1000-class head)
    macs: int  # multiply-accumulates of one forward at ``img_size`` (mmpretrain's "FLOPs")
    img_size: int
    distilled: bool
    file_suffix: str  # date and sha256 prefix of mmpretrain's file name
    arch: str = field(init=False)

    def __post_init__(self) -> None:
        m = re.fullmatch(r"xcit-(\w+)-(\d+)-p(\d+)_3rdparty(-dist)?_in1k(-384px)?", self.name)
        if m is None:
            raise ValueError(f"zoo name {self.name!r} does not follow mmpretrain's pattern")
        object.__setattr__(self, "arch", f"xcit_{m.group(1)}_{m.group(2)}_p{m.group(3)}")

    @property
    def filename(self) -> str:
        """File name in the local checkpoint cache (mmpretrain's, hash included)."""
        return f"{self.name}_{self.file_suffix}.pth"

    @property
    def url(self) -> str:
        return f"{MMPRETRAIN_URL}/{self.filename}"

    @property
    def sha256_prefix(self) -> str:
        return self.file_suffix.rsplit("-", 1)[1]

    @property
    def official_url(self) -> str:
        """The facebookresearch/xcit file mmpretrain converted (same weights, official key names)."""
        return f"{OFFICIAL_URL}/{self.arch}_{self.img_size}{'_dist' if self.distilled else ''}.pth"


def _e(name: str, params: int, macs: int, img_size: int, distilled: bool, suffix: str) -> ZooEntry:
    return ZooEntry(name, params, macs, img_size, distilled, suffix)


# Order and numbers as in mmpretrain's metafile (sorted by FLOPs).
_ENTRIES = [
    _e("xcit-nano-12-p16_3rdparty_in1k", 3053224, 557074560, 224, False, "20230213-ed776c38"),
    _e("xcit-nano-12-p16_3rdparty-dist_in1k", 3053224, 557074560, 224, True, "20230213-fb247f7b"),
    _e("xcit-tiny-12-p16_3rdparty_in1k", 6716272, 1239698112, 224, False, "20230213-82c547ca"),
    _e("xcit-tiny-12-p16_3rdparty-dist_in1k", 6716272, 1239698112, 224, True, "20230213-d5fde0a3"),
    _e("xcit-nano-12-p16_3rdparty-dist_in1k-384px", 3053224, 1636347520, 384, True, "20230213-712db4d4"),
    _e("xcit-nano-12-p8_3rdparty_in1k", 3049016, 2156861056, 224, False, "20230213-3370c293"),
    _e("xcit-nano-12-p8_3rdparty-dist_in1k", 3049016, 2156861056, 224, True, "20230213-2f87d2b3"),
    _e("xcit-tiny-24-p16_3rdparty_in1k", 12116896, 2339305152, 224, False, "20230213-366c1cd0"),
    _e("xcit-tiny-24-p16_3rdparty-dist_in1k", 12116896, 2339305152, 224, True, "20230213-b472e80a"),
    _e("xcit-tiny-12-p16_3rdparty-dist_in1k-384px", 6716272, 3641468352, 384, True, "20230213-00a20023"),
    _e("xcit-tiny-12-p8_3rdparty_in1k", 6706504, 4807399872, 224, False, "20230213-8b02f8f5"),
    _e("xcit-tiny-12-p8_3rdparty-dist_in1k", 6706504, 4807399872, 224, True, "20230213-f3f9b44f"),
    _e("xcit-small-12-p16_3rdparty_in1k", 26253304, 4814951808, 224, False, "20230213-d36779d2"),
    _e("xcit-small-12-p16_3rdparty-dist_in1k", 26253304, 4814951808, 224, True, "20230213-c95bbae1"),
    _e("xcit-nano-12-p8_3rdparty-dist_in1k-384px", 3049016, 6337760896, 384, True, "20230213-09d925ef"),
    _e("xcit-tiny-24-p16_3rdparty-dist_in1k-384px", 12116896, 6872966592, 384, True, "20230213-20e13917"),
    _e("xcit-small-24-p16_3rdparty_in1k", 47671384, 9095064960, 224, False, "20230213-40febe38"),
    _e("xcit-small-24-p16_3rdparty-dist_in1k", 47671384, 9095064960, 224, True, "20230213-130d7262"),
    _e("xcit-tiny-24-p8_3rdparty_in1k", 12107128, 9205828032, 224, False, "20230213-4b9ba392"),
    _e("xcit-tiny-24-p8_3rdparty-dist_in1k", 12107128, 9205828032, 224, True, "20230213-ad9c44b0"),
    _e("xcit-tiny-12-p8_3rdparty-dist_in1k-384px", 6706504, 14126142912, 384, True, "20230213-a072174a"),
    _e("xcit-small-12-p16_3rdparty-dist_in1k-384px", 26253304, 14143179648, 384, True, "20230213-ba36c982"),
    _e("xcit-medium-24-p16_3rdparty_in1k", 84395752, 16129561088, 224, False, "20230213-ad0aa92e"),
    _e("xcit-medium-24-p16_3rdparty-dist_in1k", 84395752, 16129561088, 224, True, "20230213-aca5cd0c"),
    _e("xcit-small-12-p8_3rdparty_in1k", 26213032, 18691601280, 224, False, "20230213-9e364ce3"),
    _e("xcit-small-12-p8_3rdparty-dist_in1k", 26213032, 18691601280, 224, True, "20230213-71886580"),
    _e("xcit-small-24-p16_3rdparty-dist_in1k-384px", 47671384, 26721471360, 384, True, "20230213-28fa2d0e"),
    _e("xcit-tiny-24-p8_3rdparty-dist_in1k-384px", 12107128, 27052135872, 384, True, "20230213-30d5e5ec"),
    _e("xcit-small-24-p8_3rdparty_in1k", 47631112, 35812053888, 224, False, "20230213-280ebcc7"),
    _e("xcit-small-24-p8_3rdparty-dist_in1k", 47631112, 35812053888, 224, True, "20230213-f2773c78"),
    _e("xcit-large-24-p16_3rdparty_in1k", 189096136, 35855948544, 224, False, "20230214-d29d2529"),
    _e("xcit-large-24-p16_3rdparty-dist_in1k", 189096136, 35855948544, 224, True, "20230214-4fea599c"),
    _e("xcit-medium-24-p16_3rdparty-dist_in1k-384px", 84395752, 47388932608, 384, True, "20230214-6c23a201"),
    _e("xcit-small-12-p8_3rdparty-dist_in1k-384px", 26213032, 54923537280, 384, True, "20230214-9f2178bc"),
    _e("xcit-medium-24-p8_3rdparty_in1k", 84323624, 63524706816, 224, False, "20230214-c362850b"),
    _e("xcit-medium-24-p8_3rdparty-dist_in1k", 84323624, 63524706816, 224, True, "20230214-625c953b"),
    _e("xcit-small-24-p8_3rdparty-dist_in1k-384px", 47631112, 105236704128, 384, True, "20230214-57298eca"),
    _e("xcit-large-24-p16_3rdparty-dist_in1k-384px", 189096136, 105345095424, 384, True, "20230214-bd515a34"),
    _e("xcit-large-24-p8_3rdparty_in1k", 188932648, 141225699072, 224, False, "20230214-08f2f664"),
    _e("xcit-large-24-p8_3rdparty-dist_in1k", 188932648, 141225699072, 224, True, "20230214-8c092b34"),
    _e("xcit-medium-24-p8_3rdparty-dist_in1k-384px", 84323624, 186672626176, 384, True, "20230214-5db925e0"),
    _e("xcit-large-24-p8_3rdparty-dist_in1k-384px", 188932648, 415003137792, 384, True, "20230214-9f718b1a"),
]
ZOO: dict[str, ZooEntry] = {e.name: e for e in _ENTRIES}

DINO_URL = "https://dl.fbaipublicfiles.com/dino"


@dataclass(frozen=True)
class DinoEntry:
    """One of DINO's published XCiT backbones (ImageNet-1k, self-supervised, no head).

    The file is a plain backbone state dict in the official XCiT key names (format
    ``dino_backbone``); DINO publishes no hash, so none is checked. ``knn`` / ``linear`` are the
    ImageNet top-1 figures of DINO's README table, for the record (not measured here).
    """

    name: str
    knn: float
    linear: float
    img_size: int = 224
    distilled: bool = False
    arch: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "arch", self.name[len("dino_"):])

    @property
    def filename(self) -> str:
        return f"{self.name}_pretrain.pth"

    @property
    def url(self) -> str:
        return f"{DINO_URL}/{self.name}_pretrain/{self.filename}"

    @property
    def sha256_prefix(self) -> None:
        return None


DINO_ZOO: dict[str, DinoEntry] = {e.name: e for e in (
    DinoEntry("dino_xcit_small_12_p16", knn=76.0, linear=77.8),
    DinoEntry("dino_xcit_small_12_p8", knn=77.1, linear=79.2),
    DinoEntry("dino_xcit_medium_24_p16", knn=76.4, linear=78.8),
    DinoEntry("dino_xcit_medium_24_p8", knn=77.9, linear=80.3),
)}


@dataclass(frozen=True)
class ResolvedName:
    """What a model name means: the architecture, the default resolution, the weights for
    ``pretrained=True`` (None when no published file matches the name)."""

    name: str
    arch: ArchSpec
    img_size: int
    entry: ZooEntry | DinoEntry | None

    @property
    def num_classes(self) -> int:
        """The head the weights come with: none (0) for DINO's backbones, ImageNet's 1000 else."""
        return 0 if isinstance(self.entry, DinoEntry) else 1000


def _default_entry(arch: str, img_size: int, distilled: bool | None) -> ZooEntry | None:
    """The zoo entry for an arch at a resolution: non-distilled unless asked (or only 384 exists)."""
    candidates = [e for e in _ENTRIES if e.arch == arch and e.img_size == img_size]
    if distilled is not None:
        candidates = [e for e in candidates if e.distilled == distilled]
    candidates.sort(key=lambda e: e.distilled)  # non-distilled first
    return candidates[0] if candidates else None


_TIMM_RE = re.compile(r"(xcit_\w+_\d+_p\d+)_(224|384)(?:\.(fb_in1k|fb_dist_in1k))?")


def _timm_aliases() -> list[str]:
    return [f"{a}_{r}" for a in ARCHS for r in (224, 384)]


def list_models(pattern: str | None = None, aliases: bool = False) -> list[str]:
    """Zoo names, DINO's backbones, then architecture names (``aliases=True`` adds timm's
    ``*_224`` / ``*_384``).

    ``pattern`` is a shell-style filter, e.g. ``"*small*"``.
    """
    import fnmatch

    names = list(ZOO) + list(DINO_ZOO) + list(ARCHS) + (_timm_aliases() if aliases else [])
    if pattern:
        names = [n for n in names if fnmatch.fnmatch(n, pattern)]
    return names


def resolve(name: str) -> ResolvedName:
    """Map any accepted model name to its architecture, resolution and published weights.

    Raises ValueError with the closest valid names when ``name`` is unknown.
    """
    if not isinstance(name, str):
        raise TypeError(f"model name must be a string, got {type(name).__name__}: {name!r}")
    key = name.strip()
    if key in ZOO:
        e = ZOO[key]
        return ResolvedName(key, ARCHS[e.arch], e.img_size, e)
    low = key.lower()
    if low in DINO_ZOO:
        d = DINO_ZOO[low]
        return ResolvedName(key, ARCHS[d.arch], d.img_size, d)
    if low in ARCHS:
        return ResolvedName(key, ARCHS[low], 224, _default_entry(low, 224, False))
    m = _TIMM_RE.fullmatch(low)
    if m and m.group(1) in ARCHS:
        arch, res, tag = m.group(1), int(m.group(2)), m.group(3)
        distilled = None if tag is None else tag == "fb_dist_in1k"
        return ResolvedName(key, ARCHS[arch], res, _default_entry(arch, res, distilled))
    close = difflib.get_close_matches(key, list_models(aliases=True), n=5, cutoff=0.5)
    if not close:
        close = difflib.get_close_matches(low, list(ARCHS), n=5, cutoff=0.0)
    raise ValueError(
        f"unknown model name {name!r}; closest valid names: {', '.join(close)} "
        f"(all {len(ZOO)} zoo names, {len(DINO_ZOO)} DINO backbones and {len(ARCHS)} arch names: "
        "ssl_xcit.list_models())")


def resolve_arch(name: str) -> str:
    """The architecture name (e.g. ``xcit_small_12_p16``) of any accepted model name; ValueError
    with the closest valid names otherwise. Cheap: no torch import."""
    return resolve(name).arch.name


def arch_with_patch(name: str, patch: int) -> str:
    """DINO's ``--patch_size`` applied to a model name. XCiT names carry their patch: ``name`` itself
    when its patch is ``patch``; ``name`` + ``_p{patch}`` when only that is a model name
    (``xcit_small_12`` and 8); ``name`` unchanged when neither is a name (the caller's name check
    reports it). A name whose patch differs is a ValueError naming the name to use."""
    try:
        own = resolve(name).arch.patch_size
    except (ValueError, TypeError):
        try:
            return resolve(f"{name}_p{patch}").name
        except ValueError:
            return name
    if own != patch:
        family = re.sub(r"_p\d+$", "", resolve(name).arch.name)
        raise ValueError(f"{name} has patch {own}, not {patch} (XCiT names carry their patch): use {family}_p{patch}")
    return name

