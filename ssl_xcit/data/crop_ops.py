"""The batched image ops of ``data.augment=gpu`` (:mod:`ssl_xcit.data.gpu_multicrop`): every crop of a
batch resized, jittered, blurred and solarised at once, each with its own parameter row.

A row holds one crop's drawn parameters in the columns below (float64: every integer is exact).
Crop + resize is two batched matmuls with per-crop weights that reproduce
``interpolate(mode="bicubic", antialias=True)`` (PIL's a=-0.5 kernel, support scaled when
shrinking); jitter applies the 4 ops in each crop's own order on index subsets; blur is a per-crop
separable Gaussian (reflect padding). torchvision's functional ops are the reference in the tests.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# columns of a crop's parameter row
TOP, LEFT, HEIGHT, WIDTH, FLIP, JITTER, BRIGHT, CONTRAST, SATUR, HUE, O0, O1, O2, O3, GRAY, BLUR, SIGMA, SOLAR = range(18)
N_PARAMS = 18
_GRAY_WEIGHTS = (0.2989, 0.587, 0.114)


def _aa_bicubic(x: torch.Tensor) -> torch.Tensor:
    """PIL's / torch's antialiased bicubic filter (a = -0.5)."""
    a, x = -0.5, x.abs()
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return torch.where(x < 1, near, torch.where(x < 2, far, torch.zeros_like(x)))


def resize_weights(start: torch.Tensor, length: torch.Tensor, in_size: int, out_size: int) -> torch.Tensor:
    """(N, out_size, in_size) matrices: row i resamples [start, start + length) to output pixel i as
    ``interpolate(mode="bicubic", antialias=True, align_corners=False)`` does (torch's aa kernel)."""
    start, length = start.float().view(-1, 1, 1), length.float().view(-1, 1, 1)
    scale = length / out_size
    support = torch.where(scale >= 1, 2.0 * scale, torch.full_like(scale, 2.0))
    invscale = torch.where(scale >= 1, 1.0 / scale, torch.ones_like(scale))
    i = torch.arange(out_size, device=start.device, dtype=torch.float32).view(1, -1, 1)
    center = scale * (i + 0.5)
    xmin = torch.trunc(center - support + 0.5).clamp_(min=0)
    xmax = torch.minimum(torch.trunc(center + support + 0.5), length)
    j = torch.arange(in_size, device=start.device, dtype=torch.float32).view(1, 1, -1) - start
    w = _aa_bicubic((j - center + 0.5) * invscale) * ((j >= xmin) & (j < xmax))
    return w / w.sum(-1, keepdim=True)


def resized_crops(x: torch.Tensor, params: torch.Tensor, size: int) -> torch.Tensor:
    """Float images (B, 3, H, W) + params (B, K, P) -> (B, K, 3, size, size): crop, bicubic resize, clamp."""
    b, k = params.shape[:2]
    _, c, h, w = x.shape
    p = params.reshape(b * k, -1)
    wy = resize_weights(p[:, TOP], p[:, HEIGHT], h, size).view(b, k * size, h)
    wx = resize_weights(p[:, LEFT], p[:, WIDTH], w, size)                             # (BK, S, W)
    rows = torch.bmm(wy, x.permute(0, 2, 1, 3).reshape(b, h, c * w))                  # (B, K*S, C*W)
    out = torch.bmm(rows.view(b * k, size * c, w), wx.transpose(1, 2))                # (BK, S*C, S)
    # clamped as the CPU path's uint8 result is (bicubic overshoots at edges)
    return out.view(b, k, size, c, size).permute(0, 1, 3, 2, 4).clamp(0, 1)


def grayscale(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(-3)
    return (r * _GRAY_WEIGHTS[0] + g * _GRAY_WEIGHTS[1] + b * _GRAY_WEIGHTS[2]).unsqueeze(-3)


def _blend(x: torch.Tensor, other: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    f = f.view(-1, 1, 1, 1)
    return (x * f + other * (1 - f)).clamp_(0, 1)


def adjust_hue(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """Per-image hue shift: torchvision's RGB -> HSV -> RGB (PIL's formulas), batched."""
    r, g, b = x.unbind(-3)
    maxc, minc = x.amax(-3), x.amin(-3)
    eqc, crange = maxc == minc, maxc - minc
    s = crange / torch.where(eqc, torch.ones_like(maxc), maxc)
    rc, gc, bc = ((maxc.unsqueeze(-3) - x) / torch.where(eqc, torch.ones_like(crange), crange).unsqueeze(-3)).unbind(-3)
    h = ((maxc == r) * (bc - gc) + ((maxc == g) & (maxc != r)) * (2.0 + rc - bc)
         + ((maxc != g) & (maxc != r)) * (4.0 + gc - rc))
    h = ((h / 6.0 + 1.0).fmod(1.0) + f.view(-1, 1, 1)).remainder(1.0) * 6
    i = torch.floor(h)
    fr, v = h - i, maxc
    vpqt = torch.stack((v, ((1 - s) * v).clamp(0, 1), ((1 - s * fr) * v).clamp(0, 1),
                        ((1 - s + s * fr) * v).clamp(0, 1)), dim=-3)
    select = torch.tensor([[0, 2, 1, 1, 3, 0], [3, 0, 0, 2, 1, 1], [1, 1, 3, 0, 0, 2]], device=x.device)
    return vpqt.gather(-3, select[:, i.long().remainder(6)].movedim(0, -3))   # v, p, q or t per channel


_JITTER_OPS = (
    lambda x, f: (x * f.view(-1, 1, 1, 1)).clamp_(0, 1),                                  # brightness
    lambda x, f: _blend(x, grayscale(x).mean((-3, -2, -1), keepdim=True), f),             # contrast
    lambda x, f: _blend(x, grayscale(x), f),                                              # saturation
    adjust_hue,
)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Per-image sigma, torchvision's kernel (exp(-t^2 / 2 sigma^2), normalised), reflect padding."""
    n, c, h, w = x.shape
    t = torch.arange(kernel_size, device=x.device, dtype=x.dtype) - (kernel_size - 1) / 2
    k1 = torch.softmax(-0.5 * (t.view(1, -1) / sigma.view(-1, 1).to(x.dtype)) ** 2, dim=1)
    k1 = k1.repeat_interleave(c, 0)                                                      # (n*c, k)
    pad = kernel_size // 2
    y = F.pad(x, (pad, pad, pad, pad), mode="reflect").reshape(1, n * c, h + 2 * pad, w + 2 * pad)
    y = F.conv2d(y, k1.view(n * c, 1, kernel_size, 1), groups=n * c)
    y = F.conv2d(y, k1.view(n * c, 1, 1, kernel_size), groups=n * c)
    return y.view(n, c, h, w)


def _subset(mask: torch.Tensor, device) -> torch.Tensor | None:
    idx = mask.nonzero().flatten()
    return idx.to(device, non_blocking=True) if idx.numel() else None


def augment_crops(x: torch.Tensor, p: torch.Tensor, blur_kernel: int) -> torch.Tensor:
    """Flip, colour jitter (each crop's own op order), grayscale, blur, solarise: x (N, 3, S, S) in
    [0, 1], p (N, P) on the CPU (index subsets are computed there, no device sync)."""
    dev = x.device
    pd = p.to(dev)
    x = torch.where(pd[:, FLIP].bool().view(-1, 1, 1, 1), x.flip(-1), x)
    jitter = p[:, JITTER].bool()
    for slot in range(4):
        for op, col in enumerate((BRIGHT, CONTRAST, SATUR, HUE)):
            idx = _subset(jitter & (p[:, O0 + slot] == op), dev)
            if idx is not None:
                x[idx] = _JITTER_OPS[op](x[idx], pd[idx, col].float())
    idx = _subset(p[:, GRAY].bool(), dev)
    if idx is not None:
        x[idx] = grayscale(x[idx]).expand(-1, 3, -1, -1)
    idx = _subset(p[:, BLUR].bool(), dev)
    if idx is not None:
        x[idx] = gaussian_blur(x[idx], pd[idx, SIGMA], blur_kernel)
    solar = pd[:, SOLAR].bool().view(-1, 1, 1, 1) & (x >= 128 / 255)
    return torch.where(solar, 1.0 - x, x)
