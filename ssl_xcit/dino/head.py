"""DINO projection head: MLP -> L2 normalisation -> weight-normalised linear to K prototypes.

The last layer uses ``torch.nn.utils.parametrizations.weight_norm``: its parameters are
``last_layer.parametrizations.weight.original0`` (g, shape ``(out_dim, 1)``) and ``...original1``
(v, shape ``(out_dim, bottleneck_dim)``). With ``norm_last_layer`` g is fixed to 1, so every
prototype has unit norm and the logits are cosine similarities: DINO reports this stabilises
training. Checkpoints from the old API (``last_layer.weight_g`` / ``weight_v``, e.g. the official
DINO checkpoints) still load: torch's weight_norm registers a pre-hook that renames those keys.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm


class DINOHead(nn.Module):
    """``in_dim -> hidden_dim (x nlayers-1) -> bottleneck_dim -> L2 norm -> out_dim`` (no bias)."""

    def __init__(self, in_dim: int, out_dim: int = 65536, use_bn: bool = False,
                 norm_last_layer: bool = True, nlayers: int = 3, hidden_dim: int = 2048,
                 bottleneck_dim: int = 256) -> None:
        super().__init__()
        for name, value in (("in_dim", in_dim), ("out_dim", out_dim), ("hidden_dim", hidden_dim),
                            ("bottleneck_dim", bottleneck_dim), ("nlayers", nlayers)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"DINOHead: {name} must be a positive int, got {value!r}")
        self.norm_last_layer = norm_last_layer
        if nlayers == 1:
            self.mlp: nn.Module = nn.Linear(in_dim, bottleneck_dim)
        else:
            layers: list[nn.Module] = []
            dims = [in_dim] + [hidden_dim] * (nlayers - 1)
            for d_in, d_out in zip(dims[:-1], dims[1:]):
                layers.append(nn.Linear(d_in, d_out))
                if use_bn:
                    layers.append(nn.BatchNorm1d(d_out))
                layers.append(nn.GELU())
            layers.append(nn.Linear(hidden_dim, bottleneck_dim))
            self.mlp = nn.Sequential(*layers)
        self.mlp.apply(_init_linear)
        # Default (Kaiming-uniform) init for v like DINO; only its direction matters.
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        g = self.last_layer.parametrizations.weight.original0
        with torch.no_grad():
            g.fill_(1.0)
        g.requires_grad_(not norm_last_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mlp(x)
        x = F.normalize(x, dim=-1, p=2)
        return self.last_layer(x)


def _init_linear(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


def last_layer_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters of the last layer of every DINOHead inside ``model`` (DDP/compile wrappers too)."""
    params = [p for m in model.modules() if isinstance(m, DINOHead)
              for p in m.last_layer.parameters()]
    if not params:
        raise ValueError(f"no DINOHead found inside {type(model).__name__}; "
                         "cancel_last_layer_gradients needs the student (or its head)")
    return params


def cancel_last_layer_gradients(model: nn.Module, epoch: int, freeze_last_layer: int) -> bool:
    """Drop the last layer's gradients while ``epoch < freeze_last_layer``; True when it did.

    Call after ``backward`` (and after gradient clipping) and before ``optimizer.step``. The
    gradients are set to ``None`` rather than zeroed, as in DINO: torch optimizers skip a
    parameter whose grad is None, whereas a zero grad would still let AdamW's weight decay and
    momentum move the prototypes during the freeze.
    """
    if epoch >= freeze_last_layer:
        return False
    for p in last_layer_parameters(model):
        p.grad = None
    return True
