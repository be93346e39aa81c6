"""ssl_xcit: self-supervised DINO pretraining of XCiT vision transformers.

The top-level names are imported lazily so that ``import ssl_xcit`` stays cheap (no torch / timm
import) for command lines that only parse arguments or submit jobs.
"""
from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["get_model", "list_models", "load_backbone"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import models

        return getattr(models, name)
    raise AttributeError(f"module 'ssl_xcit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
