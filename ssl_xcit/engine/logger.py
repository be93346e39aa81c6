"""Run logging on rank 0: ``log.jsonl`` (one JSON object a line, flushed) and TensorBoard scalars."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any


class RunLogger:
    """Writes nothing on ranks other than 0, so callers need no rank checks."""

    def __init__(self, output_dir: str | Path, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self.path = Path(output_dir) / "log.jsonl"
        self._tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self._tb = SummaryWriter(log_dir=str(Path(output_dir) / "tensorboard"))
            except ImportError:  # tensorboard is a requirement, but logging must never kill a run
                self._tb = None

    def _write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:   # strict JSON: a value that is not finite is written as null
            f.write(json.dumps({k: _finite(v) for k, v in record.items()}, default=_plain, allow_nan=False) + "\n")

    def scalars(self, step: int, values: dict[str, float], epoch: int, group: str = "train") -> None:
        """One progress record: to log.jsonl (``event: group``) and TensorBoard (``<group>/<name>``);
        ``group="knn"`` for the k-NN monitor (ssl_xcit.train.monitor)."""
        if not self.enabled:
            return
        self._write({"event": group, "time": time.time(), "global_step": step, "epoch": epoch, **values})
        if self._tb is not None:
            for name, value in values.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb.add_scalar(f"{group}/{name}", value, step)

    def event(self, name: str, **fields: Any) -> None:
        self._write({"event": name, "time": time.time(), **fields})

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _finite(value: Any) -> Any:
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        value = value.item()
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _plain(obj: Any) -> Any:
    if hasattr(obj, "item"):
        return obj.item()
    return str(obj)
