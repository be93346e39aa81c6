"""The curves of a run's ``log.jsonl`` as PNGs (matplotlib, Agg backend), for the report page.

One figure per question: is the loss falling (and far from ln K, the loss of a uniform teacher)?
what did the schedules do? is the teacher collapsing (entropy at ln K: uniform; KL to uniform at
ln K: one prototype)? how fast did it run? is k-NN rising? Resumes are dashed vertical lines and
collapse warnings red crosses, so a jump in a curve can be matched with what happened.
"""
from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Sequence

import numpy as np

from ssl_xcit.evaluate.figures import pyplot, save_figure

# (file stem, title, [(record key, label)]) -- one figure per entry, one panel per key
FIGURES = [
    ("loss", "DINO loss", [("loss", "loss")]),
    ("schedules", "Schedules", [("lr", "learning rate"), ("weight_decay", "weight decay"),
                                ("teacher_momentum", "teacher momentum"), ("teacher_temp", "teacher temperature")]),
    ("teacher", "Teacher output (collapse check)", [("teacher_entropy", "teacher entropy"),
                                                    ("teacher_kl_uniform", "teacher KL to uniform")]),
    ("speed", "Speed and gradients", [("images_per_s", "images / s"), ("grad_norm", "gradient norm")]),
]
LN_K_KEYS = {"loss", "teacher_entropy", "teacher_kl_uniform"}


def _series(records: Sequence[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    pts = [(r["global_step"], r[key]) for r in records
           if isinstance(r.get(key), (int, float)) and isinstance(r.get("global_step"), (int, float))
           and math.isfinite(r[key])]
    if not pts:
        return np.zeros(0), np.zeros(0)
    steps, values = np.asarray(pts, dtype=np.float64).T
    return steps, values


def _marks(ax, events: Sequence[dict]) -> None:
    for e in events:
        if e.get("event") == "resume" and isinstance(e.get("global_step"), (int, float)):
            ax.axvline(e["global_step"], color="0.5", ls="--", lw=0.8)


def plot_curves(records: Sequence[dict], out_dir: str | Path, out_dim: int | None = None,
                loss_title: str = "DINO loss") -> list[tuple[str, Path]]:
    """The training figures of :data:`FIGURES` that have data: ``[(title, png path)]``; ``loss_title``
    names the loss the run minimises (a fine-tuning run's is a cross-entropy, not DINO's)."""
    plt = pyplot()
    out_dir = Path(out_dir)
    train = [r for r in records if r.get("event") == "train"]
    events = [r for r in records if r.get("event") != "train"]
    warnings = [e for e in events if e.get("event") == "collapse_warning"]
    written = []
    for stem, title, keys in FIGURES:
        title = loss_title if stem == "loss" else title
        keys = [(k, label) for k, label in keys if _series(train, k)[0].size]
        if not keys:
            continue
        ncols = min(2, len(keys))
        nrows = math.ceil(len(keys) / ncols)
        fig, axes = plt.subplots(nrows, ncols, figsize=(5.2 * ncols, 3.0 * nrows), squeeze=False)
        for ax in axes.flat[len(keys):]:
            ax.axis("off")
        for ax, (key, label) in zip(axes.flat, keys):
            steps, values = _series(train, key)
            ax.plot(steps, values, marker="." if steps.size < 30 else None, lw=1.4, color="tab:blue")
            if key in LN_K_KEYS and out_dim:
                ax.axhline(math.log(out_dim), color="tab:orange", ls=":", lw=1,
                           label=f"ln K = {math.log(out_dim):.2f} (K = {out_dim})")
                ax.legend(fontsize=7, loc="best")
            if key == "loss":
                for w in warnings:
                    near = np.argmin(np.abs(steps - w.get("global_step", 0))) if steps.size else None
                    if near is not None:
                        ax.plot(steps[near], values[near], "x", color="red", ms=9, mew=2)
            _marks(ax, events)
            ax.set_title(label, fontsize=10)
            ax.set_xlabel("global step", fontsize=8)
            ax.tick_params(labelsize=8)
            ax.grid(alpha=0.3)
        fig.suptitle(title, fontsize=11)
        written.append((title, save_figure(fig, out_dir / f"{stem}.png", dpi=90)))
    return written


def plot_knn(records: Sequence[dict], path: str | Path, k: int | None = None) -> Path:
    """k-NN top-1 (and top-5) of the teacher against the global step, from ``event: knn`` records."""
    return plot_accuracy(records, path, "knn", f"teacher weighted k-NN{f' (k={k}, T=0.07)' if k else ''}")


def plot_accuracy(records: Sequence[dict], path: str | Path, event: str, title: str) -> Path:
    """Top-1 and top-5 (and an EMA's, when logged) against the global step, from ``event`` records
    (``knn``: the k-NN monitor; ``val``: a fine-tuning run's validation)."""
    plt = pyplot()
    rows = [r for r in records if r.get("event", event) == event]
    fig, ax = plt.subplots(figsize=(5.6, 3.4))
    for key, style in (("top1", "o-"), ("top5", "s--"), ("ema_top1", "^:"), ("ema_top5", "v:")):
        steps, values = _series(rows, key)
        if steps.size:
            order = np.argsort(steps, kind="stable")
            ax.plot(steps[order], values[order], style, ms=4, lw=1.4,
                    label=key.replace("top", "top-").replace("ema_", "EMA "))
    probe = rows[-1].get("start_probe_top1") if rows else None
    if isinstance(probe, (int, float)):   # a fine-tuning run's baseline: its start's linear probe
        ax.axhline(probe, color="tab:red", ls="--", lw=1, label=f"start's linear probe {probe:.2f}")
    ax.set_xlabel("global step")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path, dpi=90)


def figure_html(path: Path, alt: str) -> str:
    """An <img> of a PNG beside the page (relative link), captioned."""
    return f'<figure><img src="{html.escape(path.name)}" alt="{html.escape(alt)}"><figcaption>{html.escape(alt)}</figcaption></figure>'
