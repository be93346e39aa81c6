"""Dense features of a trained teacher against the same arch from random weights, on DAVIS.

Video object segmentation (DINO's protocol, ``eval/eval_video_segmentation.py``) of every sequence
of a DAVIS folder, once per model, each in its own process: J&F-Mean, wall time and the process's
peak resident memory; then a paired sign test across frames (per-frame J&F, the same frames for
both models): of the frames where the two differ, how many the teacher wins, and the exact
one-sided binomial p-value. With ``--probe``, the linear segmentation probe
(``eval/eval_segmentation.py``, fg/bg, train on the first half of the sequences, test on the rest)
of both models, with the same paired test on per-frame mIoU.

Also printed: what DINO's dense affinity would hold at the same frame size (its (n, hw, hw) float32
affinity, the neighbourhood mask of the same shape, and the transposed copy it reshapes).

    python benchmarks/dense_eval.py --teacher runs/x/checkpoint.pth --data /path/to/davis \
        --out /tmp/dense_bench [--probe] [--max-frames 25] [--features final]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from ssl_xcit.commands.quickstart import paired_gain  # noqa: E402


def run_tool(script: str, args: list[str], log: Path) -> dict:
    """Run ``eval/<script>`` in a fresh process; its wall time, CPU time (user + system, less
    sensitive than wall time to other jobs on a shared machine) and peak RSS."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, str(REPO / "eval" / script), *args], env=env, stdout=f,
                                stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)     # this child's own rusage (peak RSS)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status):
        raise SystemExit(f"{script} failed (exit {os.waitstatus_to_exitcode(status)}); see {log}")
    return {"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime, "peak_rss_mb_process": usage.ru_maxrss / 1024}


def sign_test(a: list[float], b: list[float]) -> dict:
    """Paired sign test of "a beats b" on the same units (exact one-sided binomial, ties dropped)."""
    import torch
    ta, tb = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    if ta.shape != tb.shape:
        raise SystemExit(f"paired test needs the same frames: {len(a)} vs {len(b)}")
    test = paired_gain(ta > tb, tb > ta)    # exact McNemar on wins / losses = the sign test
    return {"n": len(a), "mean_a": float(ta.mean()), "mean_b": float(tb.mean()),
            "mean_diff": float((ta - tb).mean()), "a_wins": test["a_only"], "b_wins": test["b_only"],
            "ties": len(a) - test["n_discordant"], "p_value": test["p_value"]}


def dino_dense_affinity_gb(h: int, w: int, patch: int, contexts: int) -> dict:
    """Bytes DINO's label_propagation holds per frame at h x w pixels: the (n, hw, hw) float32
    affinity, the mask repeated to the same shape, and the transposed reshape copy."""
    hw = (h // patch) * (w // patch)
    one = contexts * hw * hw * 4 / 2 ** 30
    return {"tokens": hw, "affinity_gb": one, "with_mask_and_copy_gb": 3 * one}


def vos(args: argparse.Namespace, name: str, checkpoint: str) -> dict:
    out = Path(args.out) / f"vos_{name}"
    extra = ["--max-frames", str(args.max_frames)] if args.max_frames else []
    if args.features:
        extra += ["--features", args.features]
    cost = run_tool("eval_video_segmentation.py", ["--data_path", args.data, "--pretrained_weights", checkpoint,
                                                   "--output_dir", str(out), "--no-progress", *extra],
                    Path(args.out) / f"vos_{name}.log")
    res = json.loads((out / "video_segmentation.json").read_text())
    return {**cost, "J&F-Mean": res["J&F-Mean"], "J-Mean": res["J-Mean"], "F-Mean": res["F-Mean"],
            "per_frame": res["per_frame_JF"], "in_process_s": res["seconds"]["total"],
            "peak_rss_mb": res["peak_rss_mb"], "frames": res["frames_segmented"],
            "sequences": {k: v["J&F"] for k, v in res["sequences"].items()}}


def probe(args: argparse.Namespace, name: str, checkpoint: str) -> dict:
    out = Path(args.out) / f"probe_{name}"
    cost = run_tool("eval_segmentation.py", ["--data-path", args.data, "--checkpoint", checkpoint,
                                             "--output-dir", str(out), "--no-progress", *args.probe_args],
                    Path(args.out) / f"probe_{name}.log")
    res = json.loads((out / "segmentation.json").read_text())
    return {**cost, "mIoU": res["mIoU"], "per_class": res["per_class_IoU"], "per_frame": res["per_image_mIoU"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", required=True)
    p.add_argument("--baseline", default="xcit_nano_12_p8", help="random weights of this arch")
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--features", default=None)
    p.add_argument("--max-frames", type=int, default=None)
    p.add_argument("--probe", action="store_true", help="also the linear segmentation probe")
    p.add_argument("--no-vos", action="store_true")
    p.add_argument("--probe-args", nargs=argparse.REMAINDER, default=[], help="passed to eval_segmentation.py")
    args = p.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    summary: dict = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpu_count": os.cpu_count(),
                     "dino_dense_affinity_480x832_p8": dino_dense_affinity_gb(480, 832, 8, 8)}
    if not args.no_vos:
        t, r = vos(args, "teacher", args.teacher), vos(args, "random", args.baseline)
        summary["vos"] = {"teacher": t, "random": r, "paired": sign_test(t["per_frame"], r["per_frame"])}
    if args.probe:
        t, r = probe(args, "teacher", args.teacher), probe(args, "random", args.baseline)
        summary["probe"] = {"teacher": t, "random": r, "paired": sign_test(t["per_frame"], r["per_frame"])}
    (Path(args.out) / "summary.json").write_text(json.dumps(summary, indent=1))
    brief = {k: {m: {x: y for x, y in v[m].items() if x != "per_frame"} if isinstance(v.get(m), dict) else v[m]
                 for m in v} if isinstance(v, dict) else v for k, v in summary.items()}
    print(json.dumps(brief, indent=1))


if __name__ == "__main__":
    main()
