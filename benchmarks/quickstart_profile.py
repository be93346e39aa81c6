#!/usr/bin/env python
"""Where a quickstart training step's time goes: data wait, forward + loss, backward + optimizer +
EMA, logging, on the real training loop (``ssl_xcit.train.loop.train``), for the augmentation in
DataLoader workers (``augment=cpu``, PIL per image) and batched in the training process
(``augment=gpu``, on the CPU here).

The loop's pieces are wrapped with timers (the wrappers add a few microseconds a step); "data
wait" is the rest of each step's wall time: waiting for the loader's next batch, moving it, and,
with ``augment=gpu``, making the crops.

    python benchmarks/quickstart_profile.py --data ../shared/data/cifar10.tar.gz --steps 60
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def profile(augment: str, args, root: Path) -> dict:
    import torch
    from ssl_xcit.train import loop
    from ssl_xcit.train.config import load_config

    spent = {"forward + loss": 0.0, "backward + optimizer + EMA": 0.0, "logging": 0.0}
    marks: list[float] = []

    def timed(name, fn):
        def wrapper(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                if len(marks) >= args.warmup:
                    spent[name] += time.perf_counter() - t
        return wrapper

    originals = {n: getattr(loop, n) for n in ("forward_loss", "apply_update", "_log_step")}
    loop.forward_loss = timed("forward + loss", originals["forward_loss"])
    update = timed("backward + optimizer + EMA", originals["apply_update"])

    def apply_and_mark(*a, **k):
        out = update(*a, **k)
        marks.append(time.perf_counter())
        return out
    loop.apply_update = apply_and_mark
    loop._log_step = timed("logging", originals["_log_step"])
    try:
        with tempfile.TemporaryDirectory() as out:
            cfg = load_config(args.config, [f"data_path={root / 'train'}", f"output_dir={out}", f"augment={augment}",
                                            f"max_steps={args.steps + args.warmup}", "report=false",
                                            "tensorboard=false", *args.overrides])
            loop.train(cfg)
    finally:
        for n, fn in originals.items():
            setattr(loop, n, fn)
    steps = len(marks) - args.warmup
    wall = marks[-1] - marks[args.warmup - 1]
    spent["data wait (and crops for gpu)"] = wall - sum(spent.values())
    return {"augment": augment, "steps": steps, "wall": wall, "img_s": steps * cfg.optim.batch_size_per_gpu / wall,
            **{k: v / steps * 1000 for k, v in spent.items()}}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "cifar10.tar.gz"))
    p.add_argument("--config", default=str(REPO / "configs" / "quickstart.yaml"))
    p.add_argument("--steps", type=int, default=60, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    p.add_argument("--augments", nargs="+", default=["cpu", "gpu"])
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    import torch
    from ssl_xcit.data.sources import resolve_data_path
    root = resolve_data_path(args.data)
    rows = [profile(a, args, root) for a in args.augments]
    keys = [k for k in rows[0] if k not in ("augment", "steps", "wall", "img_s")]
    print(f"\nquickstart step, ms per step ({torch.get_num_threads()} torch threads, {rows[0]['steps']} steps)")
    print("| augment | " + " | ".join(keys) + " | total | images/s |")
    print("|---" * (len(keys) + 3) + "|")
    for r in rows:
        total = r["wall"] / r["steps"] * 1000
        print(f"| {r['augment']} | " + " | ".join(f"{r[k]:.0f}" for k in keys) + f" | {total:.0f} | {r['img_s']:.0f} |")
    return rows


if __name__ == "__main__":
    main()
