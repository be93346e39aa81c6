"""The quickstart: DINO on a small real dataset on the CPU, then k-NN of the trained teacher next to
a randomly initialised backbone of the same architecture, on the same images.

It answers the first question a newcomer has — does this train anything? — in minutes, with the
same code paths a real run uses (config, loop, checkpoint, feature extraction, faiss k-NN). While it
trains, the k-NN monitor scores the teacher every ``--monitor-every-steps`` steps on a smaller fixed
subset, so the output also shows the curve rising (``train/knn.png``, ``quickstart.json``), and the
run's report page is written at its end (``train/report/index.html``).

The recipe is the packaged ``quickstart`` one (``--config`` takes a file or a packaged recipe's name),
so an installed package needs no checkout. The images, without ``--data``: in a source checkout, the
CIFAR-10 archive next to the repository (``../shared/data/cifar10.tar.gz``) when it is there, else
CIFAR-10 downloaded earlier into ``--download-dir``, else CIFAR-10 downloaded now through torchvision
(with a progress bar); with no network that ends in one line saying what to pass. ``--data`` never
downloads anything.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from ssl_xcit.atomic import atomic_write_json, check_writable
from ssl_xcit.cli import ArgumentParser
from ssl_xcit.commands.options import (EvalInputError, MissingPathError, check_data_path, check_output_folder,
                                       default_workers)
from ssl_xcit.train.config import find_recipe, load_config, recipes_dir

if TYPE_CHECKING:  # torch loads only when the work starts: --help answers at once
    import torch

REPO = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = recipes_dir() / "quickstart.yaml"
# only a source checkout has the project's data folder beside it; an installed package reads --data
DEFAULT_DATA: Path | None = (REPO.parent / "shared" / "data" / "cifar10.tar.gz"
                             if (REPO / "pyproject.toml").is_file() else None)
# the completeness marker of a CIFAR-10 download (ssl_xcit.data.sources.MARKER, which imports torch:
# the choice of data is made before torch loads; tests/test_quickstart.py checks the two agree)
DOWNLOAD_MARKER = ".ssl_xcit_complete"
WHAT_TO_PASS = ("pass --data PATH (an ImageFolder root with train/ and val/ class folders, or a .tar.gz of "
                "one), or put CIFAR-10's archive at {archive}")


# On the user's own images the quickstart keeps CIFAR-10's cost, so that the README's minutes hold:
# crops of CIFAR-10's side (the compute per step scales with the tokens: 224-px crops cost 49x), and a
# training budget of the minutes the CIFAR-10 run's training takes on 2 cores, which stops a run whose
# images are slow to decode. The k-NN grows with the classes: 10,000 / 2,000 images is 50 / 10 a class
# at 200 classes, too few for a gain to stand out from the noise.
QUICKSTART_CROP = 32
QUICKSTART_BUDGET_MINUTES = 5.0
KNN_TRAIN, KNN_TRAIN_PER_CLASS = 10_000, 100
KNN_VAL, KNN_VAL_PER_CLASS = 2_000, 20


class DataDownloadError(EvalInputError):
    """CIFAR-10 could not be downloaded (no network, a proxy, a full disk): what to pass instead."""


def build_parser(prog: str = "launch/quickstart.py") -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog=prog,
        description="Pretrain a small XCiT with DINO on a small real dataset (CPU is fine), then "
                    "compare k-NN top-1 of the trained teacher with a random backbone.")
    p.add_argument("--data", default=None,
                   help="ImageFolder root with train/ and val/, or a .tar.gz of one; never downloads. "
                        f"Default: {DEFAULT_DATA or 'the checkout archive'} if it exists, else CIFAR-10 "
                        "downloaded earlier into "
                        "--download-dir, else CIFAR-10 downloaded now through torchvision into --download-dir "
                        "(about 170 MB; the only case that uses the network)")
    p.add_argument("--download", action="store_true",
                   help="use CIFAR-10 in --download-dir, downloading it through torchvision if it is not "
                        "there yet (needs network), even when the archive above exists; not with --data")
    p.add_argument("--download-dir", default="data",
                   help="where CIFAR-10 is downloaded to and looked for (default: data)")
    p.add_argument("--config", default="quickstart",
                   help="training recipe: a file, or a packaged recipe's name (default: quickstart)")
    p.add_argument("--output", default="runs/quickstart", help="output folder (resumes if it holds a run)")
    p.add_argument("--knn-train-images", type=int, default=None,
                   help=f"train images in the k-NN memory bank (evenly spread over classes; default "
                        f"{KNN_TRAIN:,}, or {KNN_TRAIN_PER_CLASS} a class when that is more)")
    p.add_argument("--knn-val-images", type=int, default=None,
                   help=f"val images queried (default {KNN_VAL:,}, or {KNN_VAL_PER_CLASS} a class when that is more)")
    p.add_argument("--knn-k", type=int, nargs="+", default=[20], help="numbers of neighbours")
    p.add_argument("--monitor-every-steps", type=int, default=50,
                   help="k-NN of the teacher while training every N steps, and before the first (0: off)")
    p.add_argument("--monitor-images", type=int, default=500,
                   help="train images and val images (each) of the k-NN while training")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="training config overrides")
    return p


def parse_args(argv: list[str] | None = None, prog: str = "launch/quickstart.py") -> argparse.Namespace:
    """Like argparse, but ``key=value`` overrides may stand anywhere, also after ``--knn-k 10 20``
    (whose list would otherwise swallow them and fail with "invalid int value")."""
    argv = list(sys.argv[1:] if argv is None else argv)
    is_override = [("=" in a and not a.startswith("-")) for a in argv]
    options = [a for a, o in zip(argv, is_override) if not o]
    overrides = [a for a, o in zip(argv, is_override) if o]
    args = build_parser(prog).parse_args([*options, "--", *overrides] if overrides else options)
    check_args(args)
    return args


def check_args(args: argparse.Namespace) -> None:
    """The k-NN numbers, the data and the recipe, checked before torch loads and before minutes of
    training rather than after."""
    for flag in ("knn_train_images", "knn_val_images"):
        if getattr(args, flag) is not None and getattr(args, flag) <= 0:
            raise EvalInputError(f"--{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}")
    if args.monitor_every_steps < 0 or args.monitor_images <= 0:
        raise EvalInputError(f"--monitor-every-steps must be >= 0 and --monitor-images positive, got "
                             f"{args.monitor_every_steps} and {args.monitor_images}")
    if any(k <= 0 for k in args.knn_k):
        raise EvalInputError(f"--knn-k values must be positive, got {' '.join(map(str, args.knn_k))}")
    if args.knn_train_images is not None and max(args.knn_k) > args.knn_train_images:
        raise EvalInputError(f"--knn-k {max(args.knn_k)} exceeds the {args.knn_train_images} k-NN train images "
                             "(--knn-train-images)")
    args.source, args.source_path = choose_data(args)
    check_output_folder(args.output, "--output")
    args.config = str(find_recipe(args.config))
    load_config(args.config, args.overrides)  # the recipe and overrides, checked before torch loads


def choose_data(args: argparse.Namespace) -> tuple[str, Path]:
    """Where the images come from, decided before torch loads: ``("data", --data)``, ``("archive",
    DEFAULT_DATA)`` when it exists, ``("downloaded", <download-dir>/cifar10)`` when an earlier download
    is complete there, else ``("download", <download-dir>)``: only that one uses the network."""
    if args.data is not None:
        if args.download:
            raise EvalInputError("give --data or --download, not both (--download fetches CIFAR-10 into "
                                 "--download-dir; --data never downloads)")
        if not Path(args.data).expanduser().exists():
            raise MissingPathError(f"--data {args.data}: not found; give an ImageFolder root with train/ and "
                                   "val/ or a .tar.gz of one, or leave --data out to use or download CIFAR-10")
        check_data_path(args.data, ("train", "val"), flag="--data")
        return "data", Path(args.data).expanduser()
    if not args.download and DEFAULT_DATA is not None and DEFAULT_DATA.exists():
        check_data_path(str(DEFAULT_DATA), ("train", "val"), flag="the default archive")
        return "archive", DEFAULT_DATA
    folder = Path(args.download_dir).expanduser()
    if folder.exists() and not folder.is_dir():
        raise EvalInputError(f"--download-dir {args.download_dir} is a file; give a folder")
    if (folder / "cifar10" / DOWNLOAD_MARKER).is_file():
        return "downloaded", folder / "cifar10"
    return "download", folder


def fetch_cifar10(folder: Path) -> Path:
    """CIFAR-10 through torchvision into ``folder`` (progress bars: torchvision's for the download,
    ours for the conversion); a failure (no network) is one line saying what to pass instead."""
    from ssl_xcit.data.sources import download_cifar10
    archive = DEFAULT_DATA or "checkout archive"
    print(f"[quickstart] no --data and no {archive}: downloading CIFAR-10 through torchvision into "
          f"{folder} (about 170 MB, once)", flush=True)
    try:
        return download_cifar10(folder)
    except (OSError, RuntimeError) as err:   # URLError and socket errors are OSErrors; torchvision's
        reason = str(err).strip() or type(err).__name__   # bad download is a RuntimeError
        raise DataDownloadError(f"could not download CIFAR-10 into {folder} ({type(err).__name__}: {reason}); "
                                + WHAT_TO_PASS.format(archive=archive)) from err


def data_root(args: argparse.Namespace) -> Path:
    """The ImageFolder root (train/, val/) of :func:`choose_data`'s choice: unpacked, found or downloaded."""
    from ssl_xcit.data.sources import resolve_data_path
    flag = "--data" if args.source == "data" else str(args.source_path)
    if args.source == "download":
        root = fetch_cifar10(args.source_path)
    else:
        root = resolve_data_path(args.source_path)
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise EvalInputError(f"{flag} {root} has no {split}/ folder; the quickstart needs an ImageFolder "
                                 "root with train/ and val/")
    return root


def training_config(args: argparse.Namespace, root: Path, out: Path):
    """The recipe with the data and output folders and, unless ``--monitor-every-steps 0``, the k-NN
    monitor on ``root``'s train/ and val/ at the final k-NN's resolution (crop = resize = the global
    crop). The user's ``key=value`` overrides come last, so ``eval_*=`` keys win."""
    paths = [f"data_path={root / 'train'}", f"output_dir={out / 'train'}"]
    fitted, args.chosen = fit_to_data(args, load_config(args.config, [*paths, *args.overrides]))
    paths += fitted    # before the user's overrides: a key=value the user gives wins
    for line in args.chosen:
        print(f"[quickstart] chose {line}", flush=True)
    cfg = load_config(args.config, [*paths, *args.overrides])
    if not args.monitor_every_steps:
        return cfg
    from ssl_xcit.train.build import resolved_config
    crop = resolved_config(cfg).data.global_crops_size    # the resolution recipe=auto trains at
    monitor = [f"eval_data_path={root}", f"eval_every_steps={args.monitor_every_steps}",
               f"eval_max_images={args.monitor_images}", f"eval_crop_size={crop}", f"eval_resize={crop}"]
    return load_config(args.config, [*paths, *monitor, *args.overrides])


def fit_to_data(args: argparse.Namespace, cfg) -> tuple[list[str], list[str]]:
    """On the user's images larger than CIFAR-10's (``--data``): overrides that keep the quickstart's
    cost (crops of ``QUICKSTART_CROP`` px, a ``QUICKSTART_BUDGET_MINUTES`` training budget) for the
    keys the user left unset, and the lines that say so and why."""
    if getattr(args, "source", "data") != "data":
        return [], []
    from ssl_xcit.train.build import open_training_images
    from ssl_xcit.train.recipe import data_facts
    from ssl_xcit.train.config import user_set_keys
    side = data_facts(open_training_images(cfg)).image_side
    if side <= QUICKSTART_CROP:
        return [], []
    mine = user_set_keys(load_config(None, args.overrides))
    fitted, said = [], []
    if "data.global_crops_size" not in mine:
        fitted.append(f"global_crops_size={QUICKSTART_CROP}")
        said.append(f"global crops of {QUICKSTART_CROP} px, not your images' median side {side} px: CIFAR-10's cost "
                    f"per step, which the README's minutes were measured at ({(side // QUICKSTART_CROP) ** 2}x less "
                    f"compute than full size; global_crops_size={side} trains at full size, slower)")
    if not mine & {"optim.time_budget_minutes", "optim.epochs", "run.max_steps"}:
        fitted.append(f"time_budget_minutes={QUICKSTART_BUDGET_MINUTES:g}")
        said.append(f"a {QUICKSTART_BUDGET_MINUTES:g}-minute training budget (the CIFAR-10 run's training time on 2 "
                    "cores): the run plans its steps from its own pace, so images that are slow to decode end it "
                    "sooner, not later (time_budget_minutes=, epochs= or max_steps= sets the length)")
    return fitted, said


def size_knn(args: argparse.Namespace, root: Path) -> list[str]:
    """The k-NN's memory and queries, unless given: the defaults, or more with many classes (at least
    ``KNN_TRAIN_PER_CLASS`` / ``KNN_VAL_PER_CLASS`` a class), so a gain stands out from the noise."""
    classes = sum(1 for p in (root / "train").iterdir() if p.is_dir())
    said = []
    for flag, default, per_class in (("knn_train_images", KNN_TRAIN, KNN_TRAIN_PER_CLASS),
                                     ("knn_val_images", KNN_VAL, KNN_VAL_PER_CLASS)):
        if getattr(args, flag) is None:
            setattr(args, flag, max(default, per_class * classes))
            if per_class * classes > default:
                said.append(f"k-NN {flag.split('_')[1]} images: {getattr(args, flag):,} ({per_class} a class for "
                            f"{classes} classes; --{flag.replace('_', '-')} sets it)")
                print(f"[quickstart] chose {said[-1]}", flush=True)
    return said


def check_knn_k(args: argparse.Namespace, root: Path) -> None:
    """--knn-k against the train images the k-NN will really have (--knn-train-images, or fewer when the
    folder has fewer), before minutes of training rather than after."""
    from ssl_xcit.data.sources import open_image_dataset
    n_train = min(args.knn_train_images, len(open_image_dataset(root / "train", progress=False)))
    if max(args.knn_k) > n_train:
        raise EvalInputError(f"--knn-k {max(args.knn_k)} exceeds the {n_train} train images the k-NN has "
                             f"({root / 'train'}); give --knn-k values of at most {n_train}")


def knn_curve(train_dir: Path) -> list[dict]:
    """The k-NN monitor's points in ``train_dir/log.jsonl``, by step (a resumed run's earlier ones
    too; a step scored twice, e.g. a finished run started again, keeps its last point)."""
    from ssl_xcit.evaluate.report import read_log
    log = train_dir / "log.jsonl"
    records = read_log(log).records if log.is_file() else []
    by_step = {r["global_step"]: {k: r[k] for k in ("global_step", "top1", "top5", "seconds")}
               for r in records if r.get("event") == "knn"}
    return [by_step[step] for step in sorted(by_step)]


def knn_predictions(checkpoint: str, root: Path, crop: int, n_train: int, n_val: int, ks: list[int],
                    device: torch.device, num_workers: int, seed: int = 0):
    """DINO's weighted k-NN (T=0.07) of one backbone: :func:`knn_predictions_each` of ``[(checkpoint, seed)]``."""
    preds, val_y = knn_predictions_each([(checkpoint, seed)], root, crop, n_train, n_val, ks, device, num_workers)
    return preds[0], val_y


def knn_predictions_each(backbones: list[tuple[str, int]], root: Path, crop: int, n_train: int, n_val: int,
                         ks: list[int], device: torch.device, num_workers: int):
    """DINO's weighted k-NN (T=0.07) of each ``(checkpoint, seed)`` backbone on the same evenly spread
    train/val subsets.

    Returns ``([{k: KnnPrediction} of each backbone], val_labels)``; per-query predictions let two
    backbones be compared on the same queries (see :func:`paired_gain`). A model name instead of a
    checkpoint gives the random backbone drawn from its seed: with the training seed that is exactly
    the network the training run started from. Each image is decoded once for all the backbones
    (``extract_features_each``), and JPEGs much larger than ``crop`` decode at reduced scale
    (``draft_side``): on 224-px photos the k-NN of the trained teacher and its random start otherwise
    decoded every image twice, at full size, to score it at 32 px. Neither applies to CIFAR-10's 32-px
    images at a 32-px crop, whose features are unchanged bit for bit.
    """
    from ssl_xcit.data.sources import open_image_dataset
    from ssl_xcit.data.subsets import evenly_spread
    from ssl_xcit.evaluate.backbone import load_frozen_backbone
    from ssl_xcit.evaluate.datasets import eval_transform
    from ssl_xcit.evaluate.features import extract_features_each
    from ssl_xcit.evaluate.knn import build_index, knn_predict, l2_normalize

    models = [load_frozen_backbone(checkpoint, device=device, seed=seed) for checkpoint, seed in backbones]
    names = " + ".join(Path(checkpoint).name for checkpoint, _ in backbones)
    transform = eval_transform(crop, resize=crop)
    feats = {}
    for split, n in (("train", n_train), ("val", n_val)):
        ds = open_image_dataset(root / split, transform=transform, progress=False, draft_side=crop)
        ds.select(evenly_spread(len(ds), n))
        feats[split] = extract_features_each(models, ds, batch_size=256, device=device, num_workers=num_workers,
                                             desc=f"{names}: {split} features")
    (train_f, train_y), (val_f, val_y) = feats["train"], feats["val"]
    preds = [knn_predict(build_index(l2_normalize(tf)), train_y, l2_normalize(vf), val_y, ks, temperature=0.07)
             for tf, vf in zip(train_f, val_f)]
    return preds, val_y


def accuracies(preds) -> dict[int, dict[str, float]]:
    """``{k: {"top1": %, "top5": %}}`` of :func:`knn_predictions`' predictions."""
    return {k: {"top1": p.top1_acc, "top5": p.top5_acc} for k, p in preds.items()}


def paired_gain(hits_a: torch.Tensor, hits_b: torch.Tensor) -> dict[str, float]:
    """How much better A is than B on the *same* queries, and whether that could be luck.

    ``gain`` is the top-1 difference in points. ``p_value`` is the exact one-sided McNemar test:
    of the queries exactly one of the two gets right (``n_discordant``), A wins ``a_only``; under
    "A is no better than B" that count is Binomial(n_discordant, 1/2), and p = P(X >= a_only).
    Pairing removes the query-difficulty noise that two separate accuracies carry.
    """
    import torch
    a, b = torch.as_tensor(hits_a, dtype=torch.bool), torch.as_tensor(hits_b, dtype=torch.bool)
    if a.shape != b.shape or a.ndim != 1 or a.numel() == 0:
        raise ValueError(f"paired_gain needs two equal, non-empty 1-D hit vectors, got {tuple(a.shape)} "
                         f"and {tuple(b.shape)}")
    a_only, b_only = int((a & ~b).sum()), int((b & ~a).sum())
    n = a_only + b_only
    tail = sum(math.comb(n, i) for i in range(a_only, n + 1))
    return {"gain": 100.0 * (int(a.sum()) - int(b.sum())) / a.numel(), "a_only": a_only, "b_only": b_only,
            "n_discordant": n, "p_value": tail / 2 ** n}


def train_or_stop(cfg, prog: str):
    """Train as ``launch/train.py`` does: SIGTERM, SIGHUP, SIGUSR2 or Ctrl-C (to the process or its
    whole group: a terminal, ``timeout``, a closing session) save the step and end with one line and
    status 128 + the signal, and the same command resumes the run and then scores it; a second
    Ctrl-C quits at once. (Without this the default handlers killed the quickstart mid-step: no
    checkpoint, no line, the lock left behind.)"""
    import signal

    from ssl_xcit.train.loop import train
    from ssl_xcit.engine.signals import StopSignals
    signals = StopSignals(log=lambda msg: print(msg, flush=True), plain=True)
    signals.install(interrupt=True)
    try:
        result = train(cfg, stop_requested=signals.stop_requested)
    finally:
        signals.restore()
    if result.status == "stopped":
        signum = signals.signums[0] if signals.signums else signal.SIGTERM
        print(f"{prog}: stopped on {signal.Signals(signum).name}: {result.checkpoint} holds global step "
              f"{result.global_step}; run the same command to resume (then the k-NN comparison runs)",
              file=sys.stderr, flush=True)
        raise SystemExit(128 + int(signum))
    return result


def main(argv: list[str] | None = None, prog: str = "launch/quickstart.py") -> dict:
    args = parse_args(argv, prog)
    check_writable(args.output)   # a read-only --output: one line before any download or training
    import yaml
    from ssl_xcit.distributed import pick_device
    from ssl_xcit.train.build import open_training_images

    t0 = time.perf_counter()
    root = data_root(args)
    size_knn(args, root)
    check_knn_k(args, root)
    out = Path(args.output)
    cfg = training_config(args, root, out)

    n_images = len(open_training_images(cfg))    # what the run trains on: max_images of the folder, or all
    print(f"[quickstart] DINO pretraining of {cfg.model.arch} on {root / 'train'} "
          f"({n_images:,} images, {cfg.optim.epochs} epochs) -> {out / 'train'}", flush=True)
    result = train_or_stop(cfg, prog)     # with the k-NN monitor's points and, at the end, the report page
    t_train = time.perf_counter() - t0
    curve = knn_curve(out / "train")

    device = pick_device(cfg.run.device)
    used = yaml.safe_load((out / "train" / "config.yaml").read_text())    # what the run used (recipe=auto)
    crop = used["data"]["global_crops_size"]
    common = dict(root=root, crop=crop, n_train=args.knn_train_images, n_val=args.knn_val_images,
                  ks=args.knn_k, device=device, num_workers=default_workers())   # training is over: every core
    print("[quickstart] k-NN of the trained teacher and of the random backbone it started from", flush=True)
    # seed = the training seed: the random backbone is the trained teacher's own starting point
    (trained_preds, random_preds), val_y = knn_predictions_each(
        [(str(result.checkpoint), 0), (cfg.model.arch, cfg.run.seed)], **common)
    elapsed = time.perf_counter() - t0
    trained, random_init = accuracies(trained_preds), accuracies(random_preds)
    paired = {k: paired_gain(trained_preds[k].top5[:, 0] == val_y, random_preds[k].top5[:, 0] == val_y)
              for k in trained_preds}

    n_train, n_val = next(iter(trained_preds.values())).n_train, len(val_y)    # used: at most the data's
    scores = (trained, random_init, paired)
    print(_summary(root, crop, n_train, n_val, scores, curve, cfg, out), flush=True)
    print(_timing(t_train, elapsed, result, curve, out), flush=True)
    report = {"arch": cfg.model.arch, "data": str(root), "steps": result.global_step,
              "final_loss": result.last_loss if math.isfinite(result.last_loss) else None,   # null: diverged
              "train_minutes": t_train / 60, "total_minutes": elapsed / 60,
              "knn_train_images": n_train, "knn_val_images": n_val,
              "trained": {str(k): v for k, v in trained.items()},
              "random": {str(k): v for k, v in random_init.items()},
              "paired": {str(k): v for k, v in paired.items()},
              "knn_curve": curve, "knn_curve_images": cfg.eval.eval_max_images if curve else 0}
    atomic_write_json(out / "quickstart.json", report, indent=2)
    return report


def _summary(root: Path, crop: int, n_train: int, n_val: int, scores: tuple, curve: list, cfg, out: Path) -> str:
    """The k-NN table: the trained teacher, the random backbone, the paired gain; and the curve while training."""
    trained, random_init, paired = scores
    lines = [f"k-NN (DINO weighted vote, T=0.07) on {root.name}: {n_train:,} train images as "
             f"memory, {n_val:,} val images as queries, {crop}px",
             f"{'k':>5} {'trained teacher top-1':>22} {'random backbone top-1':>22} {'gain':>7} "
             f"{'McNemar p (one-sided)':>22}"]
    for k in sorted(trained):
        lines.append(f"{k:>5} {trained[k]['top1']:>22.2f} {random_init[k]['top1']:>22.2f} "
                     f"{paired[k]['gain']:>+7.2f} {paired[k]['p_value']:>22.2g}")
    if curve:
        lines.append(f"k-NN while training (top-1, k={cfg.eval.eval_knn_k}, {cfg.eval.eval_max_images} train / "
                     f"{cfg.eval.eval_max_images} val images): "
                     + ", ".join(f"step {r['global_step']}: {r['top1']:.2f}" for r in curve)
                     + f" -> {out / 'train' / 'knn.png'}")
    return "\n".join(lines)


def _timing(t_train: float, elapsed: float, result, curve: list, out: Path) -> str:
    return (f"training {t_train / 60:.1f} min ({result.global_step} steps, final loss "
            f"{result.last_loss:.3f}; k-NN while training {sum(r['seconds'] for r in curve) / 60:.1f} min "
            f"of it), total {elapsed / 60:.1f} min; report page {out / 'train' / 'report' / 'index.html'}")
