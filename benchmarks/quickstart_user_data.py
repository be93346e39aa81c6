#!/usr/bin/env python
"""The quickstart's time on the user's own images against CIFAR-10, measured in one run (issue 33).

Runs ``launch/quickstart.py --data X`` for each data set in turn, in fresh processes on the same
machine, and records each one's wall time (the whole command: training, k-NN of both backbones),
its training minutes, its k-NN minutes (the quickstart's total less its training), steps, the crop and
budget it chose and its k-NN gain; then the ratio of each to the first (CIFAR-10) and to the mean of
the runs on the first data set (give it again last, ``--data cifar10 imagenette cifar10``, so a load
that changes during the runs shows). The promise checked: on 224-px photos at most 1.5x CIFAR-10's time.

    python benchmarks/quickstart_user_data.py --data /work/data/cifar10 /work/data/imagenette \\
        --out /work/artifacts/33/quickstart_user_data
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_one(data: str, out: Path, extra: list[str]) -> dict:
    """One quickstart command on ``data`` into ``out``: its wall time and quickstart.json."""
    argv = [sys.executable, str(REPO / "launch" / "quickstart.py"), "--data", data, "--output", str(out), *extra]
    t0 = time.perf_counter()
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    wall = time.perf_counter() - t0
    (out.parent / f"{out.name}.stdout.txt").write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr[-20000:])
    if proc.returncode != 0:
        raise SystemExit(f"quickstart on {data} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    report = json.loads((out / "quickstart.json").read_text())
    used = (out / "train" / "config.yaml").read_text()
    chosen = [line for line in proc.stdout.splitlines() if line.startswith("[quickstart] chose")]
    k = next(iter(report["paired"]))
    return {"data": data, "wall_minutes": wall / 60, "train_minutes": report["train_minutes"],
            "knn_minutes": report["total_minutes"] - report["train_minutes"],
            "steps": report["steps"], "chosen": chosen, "trained_top1": report["trained"][k]["top1"],
            "random_top1": report["random"][k]["top1"], "gain": report["paired"][k]["gain"],
            "p_value": report["paired"][k]["p_value"], "knn_train": report["knn_train_images"],
            "knn_val": report["knn_val_images"], "crop": next((ln.split(":")[1].strip() for ln in used.splitlines()
                                                              if ln.strip().startswith("global_crops_size:")), "?")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", nargs="+", required=True, help="data sets, the reference (CIFAR-10) first")
    p.add_argument("--out", required=True, help="folder for the runs and results.json")
    p.add_argument("extra", nargs="*", help="further quickstart arguments (key=value overrides)")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, data in enumerate(args.data):
        rows.append(run_one(data, out / f"run{i}_{Path(data).name}", args.extra))
        rows[-1]["ratio_to_first"] = rows[-1]["wall_minutes"] / rows[0]["wall_minutes"]
        print(json.dumps(rows[-1]), flush=True)
    reference = [r["wall_minutes"] for r in rows if r["data"] == rows[0]["data"]]
    for r in rows:
        r["ratio_to_reference_mean"] = r["wall_minutes"] / (sum(reference) / len(reference))
    result = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "rows": rows}
    (out / "results.json").write_text(json.dumps(result, indent=2))
    print("| data | crop | steps | training | k-NN | whole command | x the first | x the first's mean "
          "| trained / random k-NN top-1 | gain | p |")
    for r in rows:
        print(f"| {r['data']} | {r['crop']} | {r['steps']} | {r['train_minutes']:.1f} min | {r['knn_minutes']:.1f} min "
              f"| {r['wall_minutes']:.1f} min | {r['ratio_to_first']:.2f} | {r['ratio_to_reference_mean']:.2f} "
              f"| {r['trained_top1']:.2f} / {r['random_top1']:.2f} | {r['gain']:+.2f} | {r['p_value']:.1g} |")


if __name__ == "__main__":
    main()
