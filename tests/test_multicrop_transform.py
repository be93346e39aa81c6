"""DinoMultiCrop: output contract, determinism under torch's seed, solarisation on global 2 only."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import default_collate
from torchvision.transforms import v2

from ssl_xcit.data.multicrop import (IMAGENET_MEAN, IMAGENET_STD, DinoMultiCrop, MultiCropConfig,
                                     MultiCropTransform, blur_kernel_size)


@pytest.fixture(scope="module")
def image(cifar_root) -> Image.Image:
    first_class = sorted(p for p in (cifar_root / "train").iterdir() if p.is_dir())[0]
    with Image.open(sorted(first_class.iterdir())[0]) as img:
        return img.convert("RGB")


SMALL = dict(global_crops_size=32, local_crops_size=16, local_crops_number=3)
NO_AUG = dict(global_crops_scale=(1.0, 1.0), local_crops_scale=(1.0, 1.0), flip_prob=0.0,
              color_jitter_prob=0.0, grayscale_prob=0.0, blur_probs=(0.0, 0.0, 0.0), solarize_prob=0.0)


def _unnormalize_to_uint8(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return ((x * std + mean) * 255).round().clamp(0, 255).to(torch.uint8)


def test_output_contract(image):
    t = DinoMultiCrop(MultiCropConfig(**SMALL))
    assert isinstance(t, MultiCropTransform)
    torch.manual_seed(0)
    crops = t(image)
    assert t.crop_sizes == (32, 32, 16, 16, 16)
    assert [tuple(c.shape) for c in crops] == [(3, s, s) for s in t.crop_sizes]
    assert all(type(c) is torch.Tensor and c.dtype == torch.float32 for c in crops)
    # normalised: values are not in [0, 1] any more (ImageNet mean/std)
    assert min(c.min().item() for c in crops) < 0.0


def test_default_config_shapes():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (60, 80, 3), dtype=np.uint8))
    torch.manual_seed(0)
    crops = DinoMultiCrop()(img)
    assert [tuple(c.shape[1:]) for c in crops] == [(224, 224)] * 2 + [(96, 96)] * 8


def test_deterministic_under_torch_seed_only(image):
    t = DinoMultiCrop(MultiCropConfig(**SMALL))
    runs = []
    for py_seed in (1, 2):
        random.seed(py_seed)
        np.random.seed(py_seed)  # other RNGs must not matter
        torch.manual_seed(123)
        runs.append(t(image))
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    torch.manual_seed(124)
    other = t(image)
    assert any(not torch.equal(a, b) for a, b in zip(runs[0], other))


def test_identity_pipeline_is_normalised_image(image):
    """With every random op off, a full-size global crop is exactly the normalised image."""
    t = DinoMultiCrop(MultiCropConfig(**{**SMALL, **NO_AUG}))
    crop = t(image)[0]
    want = torch.from_numpy(np.array(image)).permute(2, 0, 1)
    assert torch.equal(_unnormalize_to_uint8(crop), want)


def test_solarisation_only_on_global_two(image):
    cfg = MultiCropConfig(**{**NO_AUG, "global_crops_size": 32, "local_crops_size": 32,
                             "local_crops_number": 2, "solarize_prob": 1.0})
    crops = [_unnormalize_to_uint8(c) for c in DinoMultiCrop(cfg)(image)]
    pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1)
    solarised = torch.where(pixels >= 128, 255 - pixels, pixels)
    assert not torch.equal(solarised, pixels)
    assert torch.equal(crops[0], pixels)
    assert torch.equal(crops[1], solarised)
    for local in crops[2:]:
        assert torch.equal(local, pixels)
    # structure: the only RandomSolarize is in the global-2 pipeline
    t = DinoMultiCrop()
    count = {name: sum(isinstance(op, v2.RandomSolarize) for op in getattr(t, name).transforms)
             for name in ("global1", "global2", "local")}
    assert count == {"global1": 0, "global2": 1, "local": 0}


def _blur_ops(pipeline):
    return [op for ra in pipeline.transforms if isinstance(ra, v2.RandomApply)
            for op in ra.transforms if isinstance(op, v2.GaussianBlur)]


def test_blur_probabilities_and_kernels():
    t = DinoMultiCrop()
    probs = {name: [ra.p for ra in getattr(t, name).transforms if isinstance(ra, v2.RandomApply)
                    and isinstance(ra.transforms[0], v2.GaussianBlur)] for name in ("global1", "global2", "local")}
    assert probs == {"global1": [1.0], "global2": [0.1], "local": [0.5]}
    assert [op.kernel_size for op in _blur_ops(t.global1)] == [(23, 23)]
    assert [op.kernel_size for op in _blur_ops(t.local)] == [(9, 9)]
    assert list(_blur_ops(t.local)[0].sigma) == [0.1, 2.0]
    assert [blur_kernel_size(s) for s in (224, 96, 64, 32, 8, 3, 2, 448)] == [23, 9, 7, 3, 3, 3, 1, 45]
    with pytest.raises(ValueError, match="crop_size"):
        blur_kernel_size(0)


def _numpy_gaussian_blur(img: np.ndarray, kernel: int, sigma: float) -> np.ndarray:
    """Separable Gaussian blur with reflect padding, float64, written out independently."""
    x = np.arange(kernel) - (kernel - 1) / 2
    w = np.exp(-x ** 2 / (2 * sigma ** 2))
    w /= w.sum()
    r = kernel // 2
    padded = np.pad(img.astype(np.float64), ((0, 0), (r, r), (r, r)), mode="reflect")
    rows = sum(w[i] * padded[:, i:i + img.shape[1], :] for i in range(kernel))
    return sum(w[i] * rows[:, :, i:i + img.shape[2]] for i in range(kernel))


@pytest.mark.parametrize("size", [32, 64])
def test_blur_with_probability_one_matches_numpy(image, size):
    img = image.resize((size, size), Image.BICUBIC)
    cfg = {**NO_AUG, "global_crops_size": size, "local_crops_size": 16, "local_crops_number": 0,
           "blur_sigma": (1.5, 1.5), "blur_probs": (1.0, 0.0, 0.0)}
    got = _unnormalize_to_uint8(DinoMultiCrop(MultiCropConfig(**cfg))(img)[0]).numpy().astype(int)
    pixels = np.asarray(img).transpose(2, 0, 1)
    want = _numpy_gaussian_blur(pixels, blur_kernel_size(size), 1.5)
    assert np.abs(got - want).max() <= 1.0  # uint8 rounding
    assert np.abs(got - pixels).max() > 10  # and it did blur


def test_grayscale_and_tensor_inputs(image):
    t = DinoMultiCrop(MultiCropConfig(**SMALL))
    torch.manual_seed(0)
    assert t(image.convert("L"))[0].shape == (3, 32, 32)
    as_tensor = torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous()
    torch.manual_seed(5)
    a = t(as_tensor)
    torch.manual_seed(5)
    b = t(image)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    with pytest.raises(ValueError, match="uint8 RGB tensor"):
        t(torch.rand(3, 8, 8))
    with pytest.raises(TypeError, match="PIL image"):
        t(np.zeros((8, 8, 3), dtype=np.uint8))


def test_default_collate_gives_list_of_crop_batches(image):
    t = DinoMultiCrop(MultiCropConfig(**SMALL))
    batch = default_collate([(t(image), 0), (t(image), 1)])
    crops, labels = batch
    assert [tuple(c.shape) for c in crops] == [(2, 3, 32, 32)] * 2 + [(2, 3, 16, 16)] * 3


@pytest.mark.parametrize("kw,err", [
    (dict(global_crops_scale=(0.5, 0.4)), "global_crops_scale"),
    (dict(local_crops_scale=(0.0, 0.4)), "local_crops_scale"),
    (dict(local_crops_number=-1), "local_crops_number"),
    (dict(global_crops_size=0), "crop sizes"),
    (dict(solarize_prob=1.5), "solarize_prob"),
    (dict(blur_probs=(1.0, 0.1)), "blur_probs"),
    (dict(color_jitter=(0.4, 0.4, 0.2, 0.7)), "color_jitter"),
    (dict(std=(0.2, 0.0, 0.2)), "std"),
])
def test_config_validation(kw, err):
    with pytest.raises(ValueError, match=err):
        MultiCropConfig(**kw)


def test_config_from_dict():
    cfg = MultiCropConfig.from_dict({"global_crops_scale": [0.3, 1.0], "local_crops_number": 4})
    assert cfg.global_crops_scale == (0.3, 1.0) and cfg.local_crops_number == 4
    with pytest.raises(ValueError, match="unknown MultiCropConfig keys"):
        MultiCropConfig.from_dict({"global_crop_size": 32})
    with pytest.raises(TypeError, match="local_crops_size"):
        MultiCropConfig(local_crops_size=9.5)
