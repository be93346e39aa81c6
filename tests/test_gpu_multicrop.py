"""BatchedMultiCrop (data.augment=gpu), on CPU tensors: its parameter draws have the CPU path's
distributions (against torchvision's own get_params, independent streams), every op equals
torchvision's functional op applied per image with the same parameter, a fixed seed reproduces a
batch, and training with augment=gpu runs and resumes bit for bit."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T1
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from ssl_xcit.data.folders import ImageFiles, collate_skip_corrupt
from ssl_xcit.data.crop_ops import (BLUR, BRIGHT, CONTRAST, FLIP, GRAY, HEIGHT, HUE, JITTER, LEFT, N_PARAMS, O0,
                                     SATUR, SIGMA, SOLAR, TOP, WIDTH, augment_crops)
from ssl_xcit.data.gpu_multicrop import BatchedMultiCrop, _crop_box, _Rng
from ssl_xcit.data.multicrop import IMAGENET_MEAN, IMAGENET_STD, DinoMultiCrop, MultiCropConfig, blur_kernel_size
from ssl_xcit.data.sampler import ResumableDistributedSampler
from ssl_xcit.train.config import ConfigError
from tests.train_helpers import assert_same_weights, load_weights, tiny_config

N = 20_000
SMALL = MultiCropConfig(global_crops_size=32, local_crops_size=16, local_crops_number=2)
ONE_LOCAL = MultiCropConfig(global_crops_size=32, local_crops_size=16, local_crops_number=1)


def _ks(a, b) -> float:
    """Two-sample Kolmogorov-Smirnov statistic."""
    a, b = np.sort(np.asarray(a, float)), np.sort(np.asarray(b, float))
    grid = np.concatenate([a, b])
    return float(np.abs(np.searchsorted(a, grid, "right") / len(a) - np.searchsorted(b, grid, "right") / len(b)).max())


KS_CRIT = 1.95 * math.sqrt(2 / N)     # alpha = 0.001 for two samples of N


def _draws(cfg, h, w, n=N, seed=1):
    g = torch.Generator().manual_seed(seed)
    aug = BatchedMultiCrop(cfg)
    return torch.stack([aug.draw(h, w, g) for _ in range(n)]).numpy()   # (n, n_crops, P)


@pytest.fixture(scope="module")
def draws():
    return _draws(ONE_LOCAL, 60, 80)


def _crops(h, w, scale, seed, n=N):
    r = _Rng(torch.Generator().manual_seed(seed))
    return np.array([_crop_box(h, w, scale, r) for _ in range(n)], float)


@pytest.mark.parametrize("h,w,scales", [(60, 80, [(0.4, 1.0), (0.05, 0.4)]),
                                        (24, 200, [(0.05, 0.4)])])   # 24 x 200: the fallback is hit too
def test_crop_scale_ratio_and_position_match_torchvision(h, w, scales):
    torch.manual_seed(12345)
    img = torch.zeros(3, h, w)
    for scale in scales:
        ref = np.array([T1.RandomResizedCrop.get_params(img, list(scale), [3 / 4, 4 / 3]) for _ in range(N)], float)
        mine = _crops(h, w, scale, seed=h)
        for name, f in (("scale", lambda p: p[:, 2] * p[:, 3] / (h * w)), ("log ratio", lambda p: np.log(p[:, 3] / p[:, 2])),
                        ("top", lambda p: p[:, 0] / h), ("left", lambda p: p[:, 1] / w)):
            assert _ks(f(mine), f(ref)) < KS_CRIT, (name, scale, h, w)
        assert np.all(mine[:, 0] + mine[:, 2] <= h) and np.all(mine[:, 1] + mine[:, 3] <= w)


def test_ks_check_has_power():
    """Guards the test above: a 0.05 shift of the scale range is detected."""
    scale = lambda d: d[:, 2] * d[:, 3] / 4800   # noqa: E731
    assert _ks(scale(_crops(60, 80, (0.4, 1.0), 1)), scale(_crops(60, 80, (0.45, 1.0), 2))) > 3 * KS_CRIT


def test_probabilities(draws):
    def rate_is(values, p):
        tol = 4.5 * math.sqrt(p * (1 - p) / len(values))   # exact when p is 0 or 1
        assert abs(values.mean() - p) <= tol, (values.mean(), p)
    for k in range(3):                                    # global 1, global 2, a local
        rate_is(draws[:, k, FLIP], 0.5)
        rate_is(draws[:, k, JITTER], 0.8)
        rate_is(draws[:, k, GRAY], 0.2)
        rate_is(draws[:, k, BLUR], (1.0, 0.1, 0.5)[k])
        rate_is(draws[:, k, SOLAR], (0.0, 0.2, 0.0)[k])
    assert np.all(draws[:, :, SIGMA][draws[:, :, BLUR] == 0] == 0)


def test_jitter_factors_order_and_sigma_match_torchvision(draws):
    torch.manual_seed(54321)
    ref = [T1.ColorJitter.get_params([0.6, 1.4], [0.6, 1.4], [0.8, 1.2], [-0.1, 0.1]) for _ in range(N)]
    on = draws[:, 2][draws[:, 2, JITTER] == 1]           # a local crop's draws where jitter was applied
    for col, i in ((BRIGHT, 1), (CONTRAST, 2), (SATUR, 3), (HUE, 4)):
        assert _ks(on[:, col], [r[i] for r in ref]) < 1.95 * math.sqrt(1 / len(on) + 1 / N), col
    perms = lambda orders: np.unique([tuple(o) for o in orders], axis=0, return_counts=True)  # noqa: E731
    (ours_p, ours_n), (ref_p, ref_n) = perms(on[:, O0:O0 + 4].astype(int)), perms([r[0].tolist() for r in ref])
    assert len(ours_p) == len(ref_p) == 24 and np.array_equal(ours_p, ref_p)
    # two-sample chi-square over the 24 orders, 23 degrees of freedom: 49.7 is the 0.001 level
    k1, k2 = math.sqrt(N / len(on)), math.sqrt(len(on) / N)
    chi2 = float(((k1 * ours_n - k2 * ref_n) ** 2 / (ours_n + ref_n)).sum())
    assert chi2 < 49.7
    blurred = draws[:, 0, SIGMA]                          # global 1: always blurred
    ref_sigma = [T1.GaussianBlur.get_params(0.1, 2.0) for _ in range(N)]
    assert _ks(blurred, ref_sigma) < KS_CRIT


def test_same_seed_draws_the_cpu_paths_numbers(cifar_small):
    """Same seed -> the very parameters DinoMultiCrop draws: outputs differ only by its uint8
    rounding between ops; another seed gives other crops."""
    path = sorted((cifar_small / "train").rglob("*.jpg"))[0]
    with Image.open(path) as im:
        image = im.convert("RGB").resize((90, 70), Image.BICUBIC)
    cfg = MultiCropConfig(global_crops_size=48, local_crops_size=24, local_crops_number=2)
    cpu, ours = DinoMultiCrop(cfg), BatchedMultiCrop(cfg)
    uint8 = torch.from_numpy(np.array(image)).permute(2, 0, 1).unsqueeze(0)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255
    for seed in range(6):
        torch.manual_seed(seed)
        ref = cpu(image)
        same = ours(uint8, ours.draw(70, 90, torch.Generator().manual_seed(seed)).unsqueeze(0))
        other = ours(uint8, ours.draw(70, 90, torch.Generator().manual_seed(seed + 100)).unsqueeze(0))
        for r, a, b in zip(ref, same, other):
            diff = ((r - a[0]) * std[0]).abs()            # in grey levels
            assert diff.mean() < 2.5 and diff.max() < 12
            assert ((r - b[0]) * std[0]).abs().mean() > 8


def _reference(img: torch.Tensor, row: torch.Tensor, size: int) -> torch.Tensor:
    """torchvision's functional ops, one image at a time, in the row's order (float32 in [0, 1])."""
    x = TF.resized_crop(img, int(row[TOP]), int(row[LEFT]), int(row[HEIGHT]), int(row[WIDTH]), [size, size],
                        InterpolationMode.BICUBIC, antialias=True).clamp(0, 1)
    if row[FLIP]:
        x = TF.horizontal_flip(x)
    if row[JITTER]:
        ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
        for op in row[O0:O0 + 4].long().tolist():
            x = ops[op](x, float(row[(BRIGHT, CONTRAST, SATUR, HUE)[op]]))
    if row[GRAY]:
        x = TF.rgb_to_grayscale(x, num_output_channels=3)
    if row[BLUR]:
        k = blur_kernel_size(size)
        x = TF.gaussian_blur(x, [k, k], [float(row[SIGMA])] * 2)
    if row[SOLAR]:
        x = TF.solarize(x, 128 / 255)
    return TF.normalize(x, list(IMAGENET_MEAN), list(IMAGENET_STD))


def test_batch_equals_torchvision_ops_per_image():
    """Images of different sizes (a list), every op switched on often; crops up- and down-scaled."""
    cfg = MultiCropConfig(global_crops_size=32, local_crops_size=16, local_crops_number=3, color_jitter_prob=0.9,
                          grayscale_prob=0.3, blur_probs=(1.0, 0.5, 0.5), solarize_prob=0.5)
    aug = BatchedMultiCrop(cfg)
    gen = torch.Generator().manual_seed(7)
    sizes = [(20, 28), (64, 48), (41, 77), (33, 33), (90, 60), (16, 40)] * 3
    images = [torch.randint(0, 256, (3, h, w), generator=gen, dtype=torch.uint8) for h, w in sizes]
    params = torch.stack([aug.draw(h, w, gen) for h, w in sizes])
    out = aug(images, params)
    assert [tuple(o.shape) for o in out] == [(len(sizes), 3, s, s) for s in aug.crop_sizes]
    assert all(o.dtype == torch.float32 for o in out)
    used = params[:, :, JITTER].bool()
    for col in (O0, O0 + 1, O0 + 2, O0 + 3):   # every op appears in every slot of some crop
        assert set(params[:, :, col][used].long().tolist()) == {0, 1, 2, 3}
    for b, img in enumerate(images):
        for k, size in enumerate(aug.crop_sizes):
            want = _reference(img.float() / 255, params[b, k], size)
            torch.testing.assert_close(out[k][b], want, atol=2e-5, rtol=0, msg=lambda m: f"image {b} crop {k}: {m}")


def test_each_op_alone_is_not_identity():
    """Guards the comparison above: each op changes the crop (so a skipped op would be caught)."""
    x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    base = torch.zeros(1, N_PARAMS, dtype=torch.float64)
    base[0, BRIGHT:HUE + 1] = torch.tensor([1.0, 1.0, 1.0, 0.0])
    base[0, O0:O0 + 4] = torch.tensor([0.0, 1.0, 2.0, 3.0])
    changes = {FLIP: 1.0, GRAY: 1.0, SOLAR: 1.0}
    for col, value in {**changes, BRIGHT: 1.3, CONTRAST: 0.7, SATUR: 1.2, HUE: 0.08, SIGMA: 1.5}.items():
        p = base.clone()
        p[0, col] = value
        if col in (BRIGHT, CONTRAST, SATUR, HUE):
            p[0, JITTER] = 1.0
        if col == SIGMA:
            p[0, BLUR] = 1.0
        assert (augment_crops(x.clone(), p, 3) - x).abs().max() > 0.01, col


def _seeded_batch(root, aug, seed, epoch=0):
    dataset = ImageFiles(root, transform=aug.loader_transform)
    sampler = ResumableDistributedSampler(len(dataset), 8, seed=seed)
    sampler.set_epoch(epoch)
    batch = collate_skip_corrupt([dataset.__getitem__(item) for item, _ in zip(sampler, range(8))])
    return batch, aug(batch.images, batch.params)


def test_fixed_seed_reproduces_a_batch(cifar_small):
    aug = BatchedMultiCrop(SMALL)
    batch, first = _seeded_batch(cifar_small / "train", aug, seed=5)
    assert isinstance(batch.images, torch.Tensor) and batch.images.dtype == torch.uint8   # same sizes: stacked
    assert batch.params.shape == (8, 4, N_PARAMS)
    _, again = _seeded_batch(cifar_small / "train", aug, seed=5)
    _, other_epoch = _seeded_batch(cifar_small / "train", aug, seed=5, epoch=1)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[0], other_epoch[0])


def test_collate_keeps_differing_sizes_as_a_list():
    aug = BatchedMultiCrop(SMALL)
    items = [(aug.loader_transform(Image.new("RGB", (w, 30), (w, 0, 0))), 0, i) for i, w in enumerate((40, 50))]
    batch = collate_skip_corrupt([items[0], None, items[1]])
    assert isinstance(batch.images, list) and [tuple(t.shape) for t in batch.images] == [(3, 30, 40), (3, 30, 50)]
    assert batch.n_skipped == 1 and batch.params.shape == (2, 4, N_PARAMS) and len(batch) == 2
    crops = aug(batch.images, batch.params)
    assert [tuple(c.shape) for c in crops] == [(2, 3, 32, 32)] * 2 + [(2, 3, 16, 16)] * 2
    moved = batch.to("cpu")          # what the loader's pin_memory and .to do: every image, and params
    assert [torch.equal(a, b) for a, b in zip(moved.images, batch.images)] == [True, True]
    assert torch.equal(moved.params, batch.params)


def test_bad_params_and_augment_value_are_one_line_errors(cifar_small, tmp_path):
    with pytest.raises(ValueError, match=r"params must have shape \(B, 4, 18\)"):
        BatchedMultiCrop(SMALL)(torch.zeros(1, 3, 8, 8, dtype=torch.uint8), torch.zeros(1, 3, N_PARAMS))
    with pytest.raises(ValueError, match=r"images must be 2 uint8 \(3, H, W\) images"):
        BatchedMultiCrop(SMALL)(torch.zeros(2, 3, 8, 8), torch.zeros(2, 4, N_PARAMS))
    with pytest.raises(ConfigError, match="augment must be cpu or gpu, got 'kornia'"):
        tiny_config(cifar_small, tmp_path, augment="kornia")


def test_training_with_gpu_augment_resumes_exactly(cifar_small, tmp_path):
    """augment=gpu on the CPU: 3 steps straight = 1 step, resume, 2 steps (mid-epoch 0 into epoch 1)."""
    from ssl_xcit.train.loop import train
    kw = dict(augment="gpu", max_images=8, epochs=2)          # 2 steps per epoch
    straight = train(tiny_config(cifar_small, tmp_path / "straight", max_steps=3, **kw))
    assert straight.status == "finished" and straight.global_step == 3
    train(tiny_config(cifar_small, tmp_path / "pieces", max_steps=1, **kw))
    second = train(tiny_config(cifar_small, tmp_path / "pieces", max_steps=3, **kw))
    assert second.global_step == 3
    assert_same_weights(load_weights(tmp_path / "straight"), load_weights(tmp_path / "pieces"), exact=True)

    def losses(folder):
        return {e["global_step"]: e["loss"] for e in map(json.loads, (folder / "log.jsonl").read_text().splitlines())
                if e["event"] == "train"}
    assert losses(tmp_path / "pieces") == losses(tmp_path / "straight") and len(losses(tmp_path / "straight")) == 3
    events = [json.loads(line) for line in (tmp_path / "pieces" / "log.jsonl").read_text().splitlines()]
    assert [e["global_step"] for e in events if e["event"] == "resume"] == [1]
