"""Image descriptors for search, duplicates and copy detection, computed from a backbone's outputs.

* ``cls``: the final CLS feature, what an export holds by default and what k-NN uses.
* ``cls_gem``: DINO's copy-detection descriptor (``eval_copy_detection.py``): the CLS feature
  concatenated with a generalised-mean (GeM, p = 4) pooling of the final patch tokens,
  ``(mean over patches of max(x, 1e-6)^4)^(1/4)`` per channel. GeM with a large p behaves like a
  max pool that is not decided by one patch, so a copy that keeps part of the image (a crop, an
  overlay elsewhere) keeps most of its local evidence; the CLS part carries the global look.

Every descriptor is L2-normalised at the end, so inner products are cosine similarities.
:class:`Whitening` is DINO's PCA-whitening (``utils.PCA(whit=0.5)``), learned on a separate set of
images: it gives every direction of the feature space the same variance, so similarities stop being
dominated by the few directions every image shares.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ssl_xcit.errors import UserError

DESCRIPTORS = ("cls", "cls_gem")
GEM_P = 4.0
GEM_EPS = 1e-6


class DescriptorError(UserError, ValueError):
    """A descriptor that is unknown or that the given outputs cannot make (GeM without patch tokens)."""


def check_descriptor(name: str) -> str:
    if name not in DESCRIPTORS:
        raise DescriptorError(f"unknown descriptor {name!r}; choose one of {', '.join(DESCRIPTORS)}")
    return name


def outputs_for(descriptor: str) -> tuple[str, ...]:
    """The backbone outputs (:mod:`ssl_xcit.evaluate.backbone` names) ``descriptor`` is made of."""
    return ("cls", "patch") if check_descriptor(descriptor) == "cls_gem" else ("cls",)


def gem(patch: torch.Tensor, p: float = GEM_P, eps: float = GEM_EPS) -> torch.Tensor:
    """Generalised mean over the patch axis of ``patch`` (B, P, D) -> (B, D), computed in float32."""
    x = patch.float().clamp(min=eps)
    return x.pow(p).mean(dim=1).pow(1.0 / p)


def describe(outputs: dict[str, torch.Tensor], descriptor: str, normalize: bool = True) -> torch.Tensor:
    """``descriptor`` of a batch from its backbone ``outputs`` (``cls`` (B, D), ``patch`` (B, P, D)).
    ``normalize=False`` keeps the raw concatenation (what whitening is learned on, as in DINO)."""
    check_descriptor(descriptor)
    missing = [n for n in outputs_for(descriptor) if n not in outputs]
    if missing:
        raise DescriptorError(f"descriptor {descriptor!r} needs the {' and '.join(missing)} output(s)")
    x = outputs["cls"].float()
    if descriptor == "cls_gem":
        x = torch.cat([x, gem(outputs["patch"])], dim=1)
    return l2n(x) if normalize else x


def l2n(x: torch.Tensor | np.ndarray, eps: float = 1e-12):
    """Rows scaled to unit length (torch or numpy, float32 for numpy)."""
    if isinstance(x, torch.Tensor):
        return torch.nn.functional.normalize(x.float(), dim=1, eps=eps)
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), eps)


@dataclass
class Whitening:
    """``x -> diag(eigval^-power) V^T (x - mean)``, then L2 norm: PCA-whitening as DINO's ``utils.PCA``.

    Learned with :meth:`fit` on raw (unnormalised) descriptors of images that are neither queries
    nor database. Unlike DINO's code, the covariance is of the *centred* features (DINO computes
    it from the raw ones and centres only the data it whitens); for features far from the origin
    the uncentred "covariance" would spend its first direction on the mean.
    """

    mean: np.ndarray        # (D,)
    projection: np.ndarray  # (D, dim): columns are eigenvectors scaled by eigval^-power
    energy: float           # share of the variance the kept directions hold

    @classmethod
    def fit(cls, features: np.ndarray | torch.Tensor, dim: int | None = None, power: float = 0.5) -> "Whitening":
        x = np.asarray(features.float().numpy() if isinstance(features, torch.Tensor) else features, np.float64)
        if x.ndim != 2 or len(x) < 2:
            raise DescriptorError(f"whitening needs at least 2 feature rows, got shape {x.shape}")
        mean = x.mean(axis=0)
        cov = (x - mean).T @ (x - mean) / len(x)
        eigval, eigvec = np.linalg.eigh(cov)
        eigval = np.maximum(eigval, eigval.max() * 1e-5)  # as DINO: tiny eigenvalues floored, not inverted
        order = np.argsort(eigval)[::-1][:dim or len(eigval)]
        energy = float(eigval[order].sum() / eigval.sum())
        proj = eigvec[:, order] * eigval[order] ** -power
        return cls(mean.astype(np.float32), proj.astype(np.float32), energy)

    def apply(self, x: np.ndarray | torch.Tensor) -> np.ndarray:
        """Whitened, L2-normalised rows (float32 numpy)."""
        x = np.asarray(x.float().numpy() if isinstance(x, torch.Tensor) else x, np.float32)
        return l2n((x - self.mean) @ self.projection)
