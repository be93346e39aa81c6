"""KoLeo: a regulariser that spreads the student's features within a batch (DINOv2, §4).

The Kozachenko-Leonenko estimator of differential entropy (Sablayrolles et al., "Spreading vectors
for similarity search", ICLR 2019) on L2-normalised features: each row's distance to its nearest
other row in the batch,

    L = -1/n sum_i log(min_{j != i} ||x_i - x_j|| + eps),      x_i = f_i / ||f_i||.

DINOv2 adds ``koleo_loss_weight * sum over global crops of L(class tokens of that crop)`` to the
DINO loss (weight 0.1 there, no gather across GPUs: each rank's batch on its own). Here it is what
lifts a short run on a small data set above the plateau where DINO alone stalls: a fresh XCiT's
class tokens are nearly parallel (cosines ~0.998), and spreading them gives the teacher's targets
something to tell apart (``benchmarks/RESULTS.md``, issue 13).

Example (runnable)::

    >>> import torch
    >>> x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    >>> round(koleo_loss(x).item(), 4)          # every nearest neighbour at sqrt(2)
    -0.3466
    >>> koleo_loss(torch.tensor([[1.0, 0.0], [1.0, 0.01]])).item() > 4   # near-duplicates cost a lot
    True
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

EPS = 1e-8


def koleo_loss(features: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """``-mean_i log(distance from row i to its nearest other row + eps)`` on L2-normalised rows
    of ``features`` (N, D), N >= 2; computed in float32 (or float64) whatever the autocast."""
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"koleo_loss: features must be (N >= 2, D), got {tuple(features.shape)}")
    dtype = torch.float64 if features.dtype == torch.float64 else torch.float32
    with torch.autocast(device_type=features.device.type, enabled=False):
        x = F.normalize(features.to(dtype), p=2, dim=-1, eps=eps)
        with torch.no_grad():                                   # which row is nearest: no gradient
            dots = x @ x.T
            dots.fill_diagonal_(-2.0)                           # below any cosine: never oneself
            nearest = dots.argmax(dim=1)
        distances = F.pairwise_distance(x, x[nearest], p=2, eps=eps)
        return -torch.log(distances + eps).mean()


def koleo_over_crops(features: torch.Tensor, n_crops: int) -> torch.Tensor:
    """DINOv2's term: ``features`` holds ``n_crops`` crops of the same batch one after the other
    (as the student's backbone returns them); the sum over crops of each crop's :func:`koleo_loss`."""
    if n_crops < 1 or features.shape[0] % n_crops:
        raise ValueError(f"koleo_over_crops: {features.shape[0]} rows are not {n_crops} equal crops")
    return sum(koleo_loss(chunk) for chunk in features.chunk(n_crops))
