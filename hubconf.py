"""torch.hub entry points: ``torch.hub.load(REPO, NAME, ...)``, REPO a checkout (``source="local"``)
or ``owner/ssl_xcit:branch`` on GitHub.

* DINO's names, with DINO's signature: ``dino_xcit_small_12_p16``, ``dino_xcit_small_12_p8``,
  ``dino_xcit_medium_24_p16``, ``dino_xcit_medium_24_p8`` (``pretrained=True, **kwargs``): a backbone
  without head (``num_classes=0``) holding DINO's published weights; ``pretrained=False`` gives
  random weights.
* every name of the zoo (``ssl_xcit.list_models(aliases=True)``, e.g. ``xcit_small_12_p16`` or
  ``xcit-nano-12-p16_3rdparty_in1k``), with ``ssl_xcit.get_model``'s signature (``pretrained=False``).

Every entry point also takes ``weights=FILE`` (any checkpoint ``ssl_xcit.load_backbone`` reads:
this project's, DINO's, timm's, mmpretrain's) and ``download=False``. Published weights are read from
``$SSL_XCIT_HOME`` (else torch.hub's checkpoint folder) and fetched only with ``download=True``:
nothing goes to the network unless asked, unlike DINO's own hubconf.
"""
from __future__ import annotations

import os as _os
from typing import Any as _Any

dependencies = ["torch", "timm"]

_DINO = ("dino_xcit_small_12_p16", "dino_xcit_small_12_p8", "dino_xcit_medium_24_p16", "dino_xcit_medium_24_p8")


def _load(name: str, pretrained: bool, weights: str | _os.PathLike | None, **kwargs: _Any):
    """``get_model(name, ...)`` with ``weights=FILE`` meaning ``pretrained=FILE``."""
    from ssl_xcit import get_model

    if weights is not None:
        if pretrained not in (True, False):
            raise TypeError(f"{name}: give weights=FILE or pretrained=..., not both")
        pretrained = weights
    return get_model(name, pretrained=pretrained, **kwargs)


def _dino_entry(name: str):
    def entry(pretrained: bool = True, weights: str | _os.PathLike | None = None, download: bool = False,
              **kwargs: _Any):
        return _load(name, pretrained, weights, download=download, **kwargs)
    entry.__name__ = entry.__qualname__ = name
    entry.__doc__ = (f"{name[5:]} pre-trained with DINO on ImageNet-1k (no head, num_classes=0); "
                     "pretrained=False: random weights; weights=FILE: any checkpoint of this architecture; "
                     "download=True fetches DINO's file into $SSL_XCIT_HOME when it is not there.")
    return entry


dino_xcit_small_12_p16 = _dino_entry("dino_xcit_small_12_p16")
dino_xcit_small_12_p8 = _dino_entry("dino_xcit_small_12_p8")
dino_xcit_medium_24_p16 = _dino_entry("dino_xcit_medium_24_p16")
dino_xcit_medium_24_p8 = _dino_entry("dino_xcit_medium_24_p8")


def _zoo_entry(name: str):
    def entry(pretrained: bool = False, weights: str | _os.PathLike | None = None, **kwargs: _Any):
        return _load(name, pretrained, weights, **kwargs)
    entry.__name__ = entry.__qualname__ = name
    entry.__doc__ = f"ssl_xcit.get_model({name!r}, pretrained=False, num_classes=None, download=False, ...)"
    return entry


def __getattr__(name: str) -> _Any:
    """Every zoo name (also those that are not Python names, e.g. ``xcit-nano-12-p16_3rdparty_in1k``)."""
    from ssl_xcit.models.zoo import resolve

    if name.startswith("__"):
        raise AttributeError(name)
    try:
        resolve(name)
    except (ValueError, TypeError):
        raise AttributeError(f"module 'hubconf' has no entry point {name!r}") from None
    return _zoo_entry(name)


def __dir__() -> list[str]:
    from ssl_xcit.models.zoo import list_models

    # torch.hub looks an entry point up in dir(hubconf) before getattr: every name is listed
    return sorted({"dependencies", *_DINO, *list_models(aliases=True)})
