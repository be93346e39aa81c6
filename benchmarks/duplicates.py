"""find_duplicates at scale and on planted duplicates.

``scale``: a synthetic export of ``--n`` x 384 float16 ImageNet-like features (``search_scale.py``'s)
with ``--planted`` near-copies (an image's feature plus noise, cosine ~0.97-0.99) replacing rows;
``eval/find_duplicates.py`` runs in a child process, timed (wall and CPU) with its peak memory
(``ru_maxrss``); recall = planted pairs that end in one group, false pairs = pairs found that were not planted.

``planted``: real images. ``--originals`` images of a folder copied into a scratch folder, plus planted
duplicates of some of them -- exact copies, resized to half, re-encoded as JPEG quality 50 -- exported
with ``--checkpoint`` (the export's own command), then ``find_duplicates`` at several thresholds:
recall of each kind of duplicate and the false pairs (pairs not planted: some may be true duplicates
already in the data).

    python benchmarks/duplicates.py scale --out /tmp/dup100k
    python benchmarks/duplicates.py planted --data /work/data/imagenette/val --checkpoint CKPT --out /tmp/dupreal
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
from knn import clustered_features  # noqa: E402
from search_scale import synthetic_export  # noqa: E402

THRESHOLDS = (0.8, 0.85, 0.9, 0.95, 0.98)


def _run_child(argv: list[str]) -> dict:
    """Run ``argv`` (a python command) as a child: wall and CPU seconds, peak RSS (GiB)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    subprocess.run([sys.executable, *argv], check=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                   stdout=subprocess.DEVNULL)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall_s": round(time.perf_counter() - t, 1), "cpu_s": round(cpu, 1),
            "peak_rss_gib": round(after.ru_maxrss / 2 ** 20, 2)}


def _pair_recall(groups: list[dict], planted: list[tuple[int, int]]) -> float:
    group_of = {r: g["group"] for g in groups for r in g["rows"]}
    return float(np.mean([a in group_of and group_of.get(a) == group_of.get(b) for a, b in planted]))


def scale(args) -> dict:
    out = Path(args.out)
    x, _, _, _ = clustered_features(args.n, 0, dim=384, seed=0)
    rng = np.random.default_rng(0)
    src, dst = np.split(rng.choice(args.n, 2 * args.planted, replace=False), 2)
    noise = torch.randn(args.planted, 384, generator=torch.Generator().manual_seed(1))
    x[dst] = torch.nn.functional.normalize(x[src] + args.noise * noise, dim=1)
    synthetic_export(out / "feats", args.n, x=x)
    run = _run_child(["eval/find_duplicates.py", "--features", str(out / "feats"), "--threshold", str(args.threshold),
                      "--out", str(out / "result"), "--no-progress", "--no-html"])
    res = json.loads((out / "result" / "duplicates.json").read_text())
    planted = [(int(a), int(b)) for a, b in zip(src, dst)]
    planted_set = {tuple(sorted(p)) for p in planted}
    found = {(p["a"], p["b"]) for g in res["groups"] for p in g["pairs"]}
    cos = (x[src] * x[dst]).sum(1)
    return {"n": args.n, "dim": 384, "dtype": "float16", "planted": args.planted,
            "planted_cosine_min_median": [round(float(cos.min()), 3), round(float(cos.median()), 3)],
            "threshold": args.threshold, "method": res["method"], **run,
            "pairs_s": round(res["timing"]["pairs_s"], 1), "recall": _pair_recall(res["groups"], planted),
            "false_pairs": len(found - planted_set), "n_pairs": res["n_pairs"]}


def _plant(data: Path, out: Path, originals: int, per_kind: int, seed: int = 0) -> dict[str, list[tuple[str, str]]]:
    """Copy ``originals`` images of ``data`` (sorted, evenly spread) to ``out`` and plant duplicates."""
    from PIL import Image

    from ssl_xcit.data.common import IMAGE_EXTENSIONS
    files = sorted(p for p in data.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    files = [files[i] for i in np.linspace(0, len(files) - 1, originals).astype(int)]
    out.mkdir(parents=True, exist_ok=True)
    names = []
    for i, f in enumerate(files):
        names.append(f"o{i:05d}{f.suffix.lower()}")
        shutil.copy(f, out / names[-1])
    pick = np.random.default_rng(seed).choice(originals, 3 * per_kind, replace=False)
    planted: dict[str, list[tuple[str, str]]] = {"exact": [], "resized": [], "jpeg50": []}
    for kind, rows in zip(planted, np.split(pick, 3)):
        for r in rows.tolist():
            src, name = out / names[r], f"dup_{kind}_{r:05d}.jpg" if kind != "exact" else f"dup_exact_{names[r]}"
            if kind == "exact":
                shutil.copy(src, out / name)
            else:
                im = Image.open(src).convert("RGB")
                if kind == "resized":
                    im = im.resize((max(1, im.width // 2), max(1, im.height // 2)), Image.BICUBIC)
                im.save(out / name, quality=95 if kind == "resized" else 50)
            planted[kind].append((names[r], name))
    return planted


def planted_real(args) -> dict:
    out = Path(args.out)
    if not (out / "imgs").is_dir():
        planted = _plant(Path(args.data), out / "imgs", args.originals, args.per_kind)
        (out / "planted.json").write_text(json.dumps(planted))
    planted = json.loads((out / "planted.json").read_text())
    feats = out / f"feats-{Path(args.checkpoint).parent.name or 'x'}-{Path(args.checkpoint).stem}-{args.crop_size}"
    export = _run_child(["eval/export_features.py", "--checkpoint", args.checkpoint, "--arch", "xcit_nano_12_p8",
                         "--data-path", str(out / "imgs"), "--out", str(feats), "--num-workers", "1",
                         "--batch-size", "32", "--crop-size", str(args.crop_size), "--no-progress"])
    rows = {}
    for th in args.thresholds:
        res_dir = out / f"result-{feats.name}-{th}"
        run = _run_child(["eval/find_duplicates.py", "--features", str(feats), "--threshold", str(th),
                          "--out", str(res_dir), "--no-progress", "--no-html"])
        res = json.loads((res_dir / "duplicates.json").read_text())
        group_of = {Path(p).name: g["group"] for g in res["groups"] for p in g["paths"]}
        recall = {k: float(np.mean([group_of.get(a) is not None and group_of.get(a) == group_of.get(b)
                                    for a, b in v])) for k, v in planted.items()}
        wanted = {tuple(sorted(p)) for v in planted.values() for p in v}
        found = {tuple(sorted((Path(p["path_a"]).name, Path(p["path_b"]).name))) for g in res["groups"]
                 for p in g["pairs"]}
        rows[th] = {"recall": recall, "false_pairs": len(found - wanted), "pairs": res["n_pairs"],
                    "pairs_s": round(res["timing"]["pairs_s"], 2), **run}
    return {"checkpoint": args.checkpoint, "crop_size": args.crop_size, "images": args.originals + 3 * args.per_kind,
            "export": export,
            "by_threshold": rows}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    s = sub.add_parser("scale")
    s.add_argument("--out", required=True)
    s.add_argument("--n", type=int, default=100_000)
    s.add_argument("--planted", type=int, default=1000)
    s.add_argument("--noise", type=float, default=0.012)
    s.add_argument("--threshold", type=float, default=0.95)
    r = sub.add_parser("planted")
    r.add_argument("--data", required=True)
    r.add_argument("--checkpoint", required=True)
    r.add_argument("--out", required=True)
    r.add_argument("--originals", type=int, default=1000)
    r.add_argument("--per-kind", type=int, default=50)
    r.add_argument("--crop-size", type=int, default=224, help="the export's crop (its default: 224)")
    r.add_argument("--thresholds", type=float, nargs="+", default=list(THRESHOLDS))
    args = p.parse_args()
    print(json.dumps(scale(args) if args.what == "scale" else planted_real(args)))


if __name__ == "__main__":
    main()
