"""XCiT models: the zoo (names), the model class, checkpoint formats and loading.

Names are imported lazily (PEP 562) so ``ssl_xcit.models.zoo`` — the name table, used by config
validation — can be imported without torch or timm.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    # zoo: names -> architectures and published weights (no torch)
    "ARCHS": "zoo", "ZOO": "zoo", "DINO_ZOO": "zoo", "ArchSpec": "zoo", "ZooEntry": "zoo",
    "DinoEntry": "zoo", "list_models": "zoo",
    "resolve": "zoo", "resolve_arch": "zoo",
    # the model class
    "XCiT": "xcit",
    # checkpoints
    "FORMATS": "checkpoints", "CheckpointError": "checkpoints", "LoadReport": "checkpoints",
    "detect_format": "checkpoints", "extract_state_dict": "checkpoints",
    "infer_arch": "checkpoints", "load_weights": "checkpoints", "read_checkpoint": "checkpoints",
    # building
    "build_model": "factory", "cache_dir": "factory", "get_model": "factory",
    "load_backbone": "factory", "pretrained_file": "factory",
    # dense feature maps
    "DenseFeatures": "dense", "dense_features": "dense",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'ssl_xcit.models' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
