#!/usr/bin/env python
"""Does fine-tuning end at or above the linear probe of its own start? (issue 33)

Each row: ``launch/finetune.py`` as a user runs it (``recipe: auto``, ``max_steps=250``, batch 64), from
a DINO teacher -- where ``recipe: auto`` now fits the head on the frozen teacher's features first
(``head_init=probe``, the cached linear probe) and fine-tunes the backbone at a tenth of the head's
lr -- and from random weights of the same arch with the same seed (same labelled subset). The start's
linear probe is the fitted head scored at step 0 on the same val images as the fine-tuned model
(``head_fitted`` in the run's log.jsonl), so the three numbers are measured the same way.

    python benchmarks/finetune_lpft.py run --teacher T.pth --data DIR --name c2k --seeds 0 1 2 \\
        labels_per_class=200          # any extra key=value goes to both runs
    python benchmarks/finetune_lpft.py table [RUNS_DIR]

``run`` writes ``RUNS_DIR/{lp,rand}_<name>_s<seed>/`` (skipped when finished); ``table`` prints the
markdown rows of every pair found. Single-threaded runs (``OMP_NUM_THREADS=1``): on a shared 2-core
CPU two threads per run were 4x slower than one.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COMMON = ["max_steps=250", "eval_every_epochs=0", "max_val_images=1000", "device=cpu", "num_workers=1",
          "tensorboard=false"]


def _events(folder: Path) -> list[dict]:
    path = folder / "log.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def run(args: argparse.Namespace) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    for seed in args.seeds:
        for kind, start in (("lp", [f"pretrained_weights={args.teacher}"]), ("rand", [f"arch={args.arch}"])):
            out = Path(args.runs) / f"{kind}_{args.name}_s{seed}"
            if any(e["event"] == "finished" for e in _events(out)):
                continue
            cmd = [sys.executable, str(REPO / "launch" / "finetune.py"), f"data_path={args.data}",
                   f"output_dir={out}", f"seed={seed}", *COMMON, *start, *args.overrides]
            print(" ".join(cmd), flush=True)
            subprocess.run(cmd, env=env, check=True)


def summary(folder: Path) -> dict | None:
    events = _events(folder)
    vals = [e for e in events if e["event"] == "val"]
    start = next((e for e in events if e["event"] == "start"), None)
    if not vals or start is None:
        return None
    fitted = next((e for e in events if e["event"] == "head_fitted"), None)
    return {"top1": vals[-1]["top1"], "probe": fitted["top1"] if fitted else None, "images": start["images"],
            "minutes": (vals[-1]["time"] - start["time"]) / 60.0, "steps": vals[-1]["global_step"]}


def table(runs: Path) -> None:
    print("| run | seed | labelled images | start's probe (step 0) | fine-tuned from DINO | - probe | from random "
          "| DINO - random | minutes (DINO / random) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for lp in sorted(runs.glob("lp_*")):
        rand = runs / ("rand_" + lp.name[3:])
        a, b = summary(lp), summary(rand)
        if a is None or b is None:
            continue
        name, seed = lp.name[3:].rsplit("_s", 1)
        print(f"| {name} | {seed} | {a['images']:,} | {a['probe']:.2f} | {a['top1']:.2f} | {a['top1'] - a['probe']:+.2f} "
              f"| {b['top1']:.2f} | {a['top1'] - b['top1']:+.2f} | {a['minutes']:.1f} / {b['minutes']:.1f} |")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    r = sub.add_parser("run")
    r.add_argument("--teacher", required=True)
    r.add_argument("--data", required=True)
    r.add_argument("--name", required=True)
    r.add_argument("--arch", default="xcit_nano_12_p8")
    r.add_argument("--seeds", type=int, nargs="+", default=[0])
    r.add_argument("--runs", default="runs/finetune_lpft")
    r.add_argument("overrides", nargs="*", help="key=value for both runs (labels_per_class=200, input_size=32)")
    t = sub.add_parser("table")
    t.add_argument("runs", nargs="?", default="runs/finetune_lpft")
    args = p.parse_args(argv)
    run(args) if args.what == "run" else table(Path(args.runs))


if __name__ == "__main__":
    main()
