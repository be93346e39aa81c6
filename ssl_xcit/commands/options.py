"""The command lines of the evaluation tools, without torch: their parsers and the input checks that
need no model or data loaded.

Why a module of its own: ``--help``, a mistyped option, a missing data folder or a checkpoint path
that is a folder must be answered in a fraction of a second, not after the 5-10 s that importing
torch takes. ``eval/*.py`` (through :func:`run_tool`) and ``launch/submit.py`` (to check a tool's
words before submitting) use the parsers here; each tool's ``main(argv)`` (``ssl_xcit/commands/knn.py``,
``linear.py``, ``export.py``, ``classification.py``) parses and checks with them, fills the library's
settings (:func:`settings`: the fields of the same names) and says a library error in its own words
(:func:`in_own_words`: ``hinted`` roles by ``TOOL_HINTS``, ``named`` parameters by the parser's flags).

DINO's flag names are aliases of ours (``--pretrained_weights`` is ``--checkpoint``, ``--data_path``
is ``--data-path``, ``--batch_size_per_gpu`` is ``--batch-size``, ...), so DINO's ``eval_knn.py`` and
``eval_linear.py`` command lines run as pasted; its process-group flags are accepted and ignored.

Imports: the standard library, :mod:`ssl_xcit.cli`, :mod:`ssl_xcit.evaluate.inputs` and the torch-free
zoo name table only.
"""
from __future__ import annotations

import argparse
import importlib
import os
from pathlib import Path
from typing import Any, Callable

from ssl_xcit.cli import ArgumentParser, bool_word, own_words
from ssl_xcit.cli import flags_of as own_flags
from ssl_xcit.errors import UserError
from ssl_xcit.evaluate.inputs import (DEFAULT_KS, DEFAULT_LR_GRID, DEFAULT_TEMPERATURE, DEFAULT_WD_GRID,  # noqa: F401
                                      SPECIAL_CHECKPOINTS, EvalInputError, MissingPathError, check_non_negative,
                                      check_positive, default_workers)

ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz")


# --------------------------------------------------------------------------------------------- flags
def add_backbone_args(parser: argparse.ArgumentParser, required: bool = True) -> None:
    g = parser.add_argument_group("backbone")
    g.add_argument("--checkpoint", "--pretrained_weights", required=required, default=None,
                   help="any checkpoint ssl_xcit.models.load_backbone reads (this project's training "
                        "checkpoints, official DINO/XCiT, timm, mmpretrain), or a model name for a "
                        "random-init backbone")
    g.add_argument("--arch", default=None, help="architecture, when the checkpoint does not name it")
    g.add_argument("--checkpoint-key", "--checkpoint_key", default="teacher", choices=("teacher", "student"),
                   help="which network of a DINO checkpoint to evaluate (default: teacher, as DINO)")


def add_data_args(parser: argparse.ArgumentParser, required: bool = True) -> None:
    g = parser.add_argument_group("data")
    g.add_argument("--data-path", "--data_path", required=required, default=None,
                   help="folder (or .tar.gz) with train/ and val/ class sub-folders")
    g.add_argument("--crop-size", type=int, default=224, help="centre crop side (default: 224, as DINO)")
    g.add_argument("--resize", type=int, default=None,
                   help="shorter side before the crop (default: crop*256/224, i.e. 256 for 224, as DINO)")
    g.add_argument("--batch-size", "--batch_size_per_gpu", type=int, default=None,
                   help="images per process (per GPU) and step")
    g.add_argument("--num-workers", "--num_workers", type=int, default=default_workers(),
                   help="data-loading worker processes (default: 4, at most the usable CPU cores)")


def add_runtime_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("runtime")
    g.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="auto: CUDA when available")
    g.add_argument("--output-dir", "--output_dir", default=None,
                   help="where results go (default: the checkpoint's folder; outputs/<name> for a model name)")
    g.add_argument("--seed", type=int, default=0,
                   help="seeds random-init backbones (identical on every rank) and shuffles")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    d = parser.add_argument_group("DINO's flags with other meanings")
    d.add_argument("--patch_size", type=int, default=None, metavar="N",
                   help="must match the patch of --arch (XCiT names carry it: xcit_small_12_p8); appended to "
                        "an --arch without one")
    d.add_argument("--dist_url", "--local_rank", "--local-rank", dest="dino_ignored", default=None, metavar="X",
                   help="accepted and ignored: the process group comes from the environment (torchrun)")


def knn_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="eval_knn.py",
                       description="Weighted k-NN evaluation of a frozen backbone (DINO protocol)")
    add_backbone_args(p, required=False)
    add_data_args(p, required=False)
    add_runtime_args(p)
    g = p.add_argument_group("k-NN")
    g.add_argument("--nb-knn", "--nb_knn", type=int, nargs="+", default=list(DEFAULT_KS), help="numbers of neighbours")
    g.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURE, help="vote weight exp(sim / T)")
    g.add_argument("--index", default="auto", choices=("auto", "flat", "cells", "ivf", "hnsw"),
                   help="auto: exact (flat) below 100,000 train features, cells above; cells: inverted "
                        "file searched cell by cell, nprobe calibrated to find 99.95%% of the true "
                        "neighbours; ivf/hnsw: faiss's approximate indexes (ssl_xcit.evaluate.knn_index)")
    g.add_argument("--nlist", type=int, default=None, help="ivf/cells cells (default: ~4*sqrt(N) / ~sqrt(N)/2)")
    g.add_argument("--nprobe", type=int, default=None,
                   help="cells searched per query (default: cells calibrated per search, ivf 32)")
    g.add_argument("--hnsw-m", type=int, default=32, help="hnsw graph degree")
    g.add_argument("--ef-search", type=int, default=256, help="hnsw search breadth")
    g.add_argument("--fp16-features", action="store_true", help="hold features (and the index) in float16")
    g.add_argument("--query-batch", type=int, default=1000, help="val queries per search call")
    g.add_argument("--dump-features", "--dump_features", default=None, help="save the extracted features to this folder")
    g.add_argument("--load-features", "--load_features", default=None,
                   help="read features saved by --dump-features; no extraction")
    g.add_argument("--use_cuda", type=bool_word, default=None, metavar="BOOL",
                   help="DINO's: keep the features and the search on the GPU (default: when --device is cuda); "
                        "false keeps them on the CPU")
    return p


def linear_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="eval_linear.py", description="Linear probe of a frozen backbone")
    add_backbone_args(p)
    add_data_args(p)
    add_runtime_args(p)
    g = p.add_argument_group("linear probe")
    g.add_argument("--mode", default="cached", choices=("cached", "full"),
                   help="cached: fast lr/wd grid on extracted features (not DINO's protocol); "
                        "full: DINO's protocol (augmented, 100 epochs, resumable)")
    g.add_argument("--n-last-blocks", "--n_last_blocks", type=int, default=None,
                   help="concatenate the CLS tokens of the last n blocks (default: 1 for XCiT, as DINO; 4 else)")
    g.add_argument("--avgpool-patchtokens", action="store_true", help="append the mean patch token")
    g.add_argument("--avgpool_patchtokens", type=bool_word, metavar="BOOL", dest="avgpool_patchtokens",
                   help="DINO's spelling of --avgpool-patchtokens, with a value (true/false)")
    g.add_argument("--epochs", type=int, default=100, help="training epochs of the probe")
    g.add_argument("--lr", type=float, default=0.001, help="full: base lr, scaled by global batch / 256")
    g.add_argument("--weight-decay", type=float, default=0.0, help="full: weight decay")
    g.add_argument("--val-freq", "--val_freq", type=int, default=1, help="full: validate every n epochs")
    g.add_argument("--num_labels", type=int, default=None,
                   help="DINO's: accepted; the classes are the class folders of train/")
    g.add_argument("--lr-grid", type=float, nargs="+", default=list(DEFAULT_LR_GRID),
                   help="cached: base lrs (scaled by batch / 256)")
    g.add_argument("--wd-grid", type=float, nargs="+", default=list(DEFAULT_WD_GRID), help="cached: weight decays")
    g.add_argument("--holdout", type=float, default=0.1, help="cached: fraction of train used to choose lr/wd")
    g.add_argument("--extract-batch-size", type=int, default=128,
                   help="cached: images per feature-extraction step")
    return p


def export_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="export_features.py", description="Export frozen backbone features to sharded files")
    add_backbone_args(p)
    add_data_args(p)
    add_runtime_args(p)
    g = p.add_argument_group("export")
    g.add_argument("--out", required=True, help="output folder (an interrupted export there is resumed)")
    g.add_argument("--split", default=None,
                   help="sub-folder of --data-path to export (e.g. train or val); default: --data-path itself")
    g.add_argument("--patch-tokens", action="store_true", help="also export the patch tokens (large)")
    g.add_argument("--n-last-blocks", type=int, default=0,
                   help="also export the concatenated CLS tokens of the last n blocks (XCiT: n <= 2)")
    g.add_argument("--format", default="npy", choices=("npy", "safetensors", "both"), help="file format")
    g.add_argument("--shard-size", type=int, default=10000, help="images per shard")
    g.add_argument("--dtype", default=None, choices=("float16", "float32"),
                   help="feature dtype (default: float16 with --dense-blocks, else float32)")
    g.add_argument("--dense-blocks", default=None, metavar="I,J,...",
                   help="also export (D, H/p, W/p) maps of these XCA blocks, e.g. 3,5,7,11 (the XCiT paper's), "
                        "'final' for the final normed patch tokens; images are resized to --dense-size (no crop)")
    g.add_argument("--dense-size", type=int, nargs=2, default=None, metavar=("H", "W"),
                   help="with --dense-blocks: every image resized to H x W (multiples of the patch); default: "
                        "each image's own size, cropped to the patch (then all images must share one size)")
    g.add_argument("--no-verify", action="store_true",
                   help="on resume, trust finished shards by size only (skip the sha256 re-read)")
    g.add_argument("--overwrite", action="store_true",
                   help="delete an earlier export in --out (other checkpoint or settings) and start over")
    return p


def classification_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="eval_classification.py",
                       description="Top-1 / top-5 accuracy of an XCiT classifier on an ImageFolder validation set.")
    p.add_argument("--model", required=True, help="zoo or arch name (ssl_xcit.list_models())")
    p.add_argument("--checkpoint", required=True,
                   help="checkpoint file (any supported format), 'pretrained' (published weights "
                        "of --model from the local cache) or 'none' (random init)")
    p.add_argument("--data-path", required=True,
                   help="ImageFolder root (<dir>/<class>/<img> or <dir>/val/<class>/<img>)")
    p.add_argument("--batch-size", type=int, default=64, help="images per step")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--limit", type=int, default=None, help="evaluate N evenly spaced images")
    p.add_argument("--num-workers", type=int, default=default_workers(8),
                   help="data-loading worker processes (default: 8, at most the usable CPU cores)")
    p.add_argument("--img-size", type=int, default=None, help="override the model's resolution")
    p.add_argument("--num-classes", type=int, default=None,
                   help="head size with --checkpoint none (default: number of class folders)")
    p.add_argument("--checkpoint-key", default="teacher", choices=("teacher", "student"),
                   help="network of a DINO training checkpoint")
    p.add_argument("--format", default="auto", help="checkpoint format (default: detect)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="allow unpickling arbitrary objects (trusted files only)")
    p.add_argument("--download", action="store_true",
                   help="with --checkpoint pretrained: download missing weights")
    return p


# --------------------------------------------------------------------------------------------- checks
def check_divisible(size: int, model: str, flag: str) -> None:
    """``size`` divides by the patch size of ``model`` (a zoo or arch name)."""
    from ssl_xcit.models.zoo import resolve  # the name table: no torch
    patch = resolve(model).arch.patch_size
    if size % patch:
        raise EvalInputError(f"{flag} {size} is not divisible by the patch size {patch} of {model}: use a "
                             f"multiple of {patch} (e.g. {max(patch, size // patch * patch)})")


def check_device(name: str) -> None:
    """auto, cpu, cuda or cuda:N (whether a GPU is there is known only once torch is loaded)."""
    if name not in ("auto", "cpu", "cuda") and not (name.startswith("cuda:") and name[5:].isdigit()):
        raise EvalInputError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}")


def check_model_name(name: str, flag: str) -> None:
    from ssl_xcit.models.zoo import resolve  # the name table: no torch
    try:
        resolve(name)
    except ValueError as err:
        raise EvalInputError(f"{flag}: {err}") from None


def check_checkpoint(text: str, flag: str = "--checkpoint", names_allowed: bool = True) -> None:
    """A checkpoint file that exists, or (``names_allowed``) a model name for a random backbone."""
    path = Path(text).expanduser()
    if path.is_dir():
        inside = sorted(p.name for p in path.glob("*.pth"))[:3]
        hint = f" (it holds {', '.join(inside)})" if inside else ""
        raise EvalInputError(f"{flag} {text} is a folder; give the checkpoint file in it{hint}")
    if path.exists():
        return
    looks_like_path = os.sep in text or path.suffix in (".pth", ".pt", ".safetensors", ".ckpt", ".bin")
    if looks_like_path or not names_allowed:
        raise MissingPathError(f"{flag} {text}: no such file")
    try:
        check_model_name(text, flag)
    except EvalInputError as err:
        raise EvalInputError(f"{flag} {text!r} is neither an existing file nor a model name "
                             f"({str(err).split(': ', 1)[1]})") from None


def _is_archive(path: Path) -> bool:
    return path.name.endswith(ARCHIVE_SUFFIXES)


def check_data_path(text: str, splits: tuple[str, ...] = (), flag: str = "--data-path") -> None:
    """The folder (or archive) exists; a folder holds ``splits`` (an archive is checked once unpacked)."""
    path = Path(text).expanduser()
    if not path.exists():
        raise MissingPathError(f"{flag} {text}: no such folder or archive")
    if _is_archive(path) and path.is_file():
        return
    if not path.is_dir():
        raise EvalInputError(f"{flag} {text} is a file; give a folder (or a .tar/.tar.gz archive) of images")
    missing = [s for s in splits if not (path / s).is_dir()]
    if missing:
        raise EvalInputError(f"{flag} {text} has no {' or '.join(m + '/' for m in missing)} folder "
                             f"(expected {' and '.join(s + '/' for s in splits)} with class sub-folders)")


def _check_numbers(args: argparse.Namespace) -> None:
    for name in ("batch_size", "crop_size", "resize"):
        check_positive(getattr(args, name, None), "--" + name.replace("_", "-"))
    if args.resize is not None and args.resize < args.crop_size:
        raise EvalInputError(f"--resize {args.resize} is smaller than --crop-size {args.crop_size}")
    if args.num_workers < 0:
        raise EvalInputError(f"--num-workers must be >= 0, got {args.num_workers}")


def check_output_folder(text: str | None, flag: str) -> None:
    """A folder results go to may not exist yet, but must not be a file (found now, not after the work)."""
    if text is not None and Path(text).expanduser().exists() and not Path(text).expanduser().is_dir():
        raise EvalInputError(f"{flag} {text} is a file; give a folder (it is created if missing)")


def apply_patch_size(args: argparse.Namespace) -> None:
    """DINO's ``--patch_size`` with ``--arch`` (:func:`ssl_xcit.models.zoo.arch_with_patch`): it must
    agree with the arch name, or is appended to a name without one. Without ``--arch`` the checkpoint
    names the architecture and DINO's flag has nothing to set."""
    from ssl_xcit.models.zoo import arch_with_patch  # the name table: no torch
    patch = getattr(args, "patch_size", None)
    if patch is not None and args.arch is not None:
        try:
            args.arch = arch_with_patch(args.arch, patch)
        except ValueError as err:
            raise EvalInputError(f"--patch_size {patch} does not match --arch: {err}") from None


def check_sources(args: argparse.Namespace, splits: tuple[str, ...]) -> None:
    """The names and paths, after the numbers: a bad number is reported whatever the paths (every
    tool that loads a backbone and reads a data folder: k-NN, linear, export, classification, the
    dense tools)."""
    for flag in ("output_dir", "dump_features", "out"):
        check_output_folder(getattr(args, flag, None), "--" + flag.replace("_", "-"))
    apply_patch_size(args)
    if args.arch is not None:
        check_model_name(args.arch, "--arch")
    if args.checkpoint is not None:
        check_checkpoint(args.checkpoint)
    if args.data_path is not None:
        check_data_path(args.data_path, splits)


def check_knn_args(args: argparse.Namespace) -> None:
    if args.load_features:
        if not Path(args.load_features).is_dir():
            raise MissingPathError(f"--load-features {args.load_features}: no such folder (written by "
                                   "--dump-features)")
    elif not args.checkpoint or not args.data_path:
        raise EvalInputError("--checkpoint and --data-path are required (unless --load-features is given)")
    _check_numbers(args)
    for name in ("temperature", "nlist", "nprobe", "hnsw_m", "ef_search", "query_batch"):
        check_positive(getattr(args, name), "--" + name.replace("_", "-"))
    if any(k <= 0 for k in args.nb_knn):
        raise EvalInputError(f"--nb-knn values must be positive, got {' '.join(map(str, args.nb_knn))}")
    if not args.load_features:
        check_sources(args, ("train", "val"))
    else:
        check_output_folder(args.output_dir, "--output-dir")


def check_linear_args(args: argparse.Namespace) -> None:
    _check_numbers(args)
    for name in ("epochs", "lr", "val_freq", "extract_batch_size", "n_last_blocks"):
        check_positive(getattr(args, name), "--" + name.replace("_", "-"))
    check_non_negative(args.weight_decay, "--weight-decay")
    for wd in args.wd_grid:
        check_non_negative(wd, "--wd-grid values")
    for lr in args.lr_grid:
        check_positive(lr, "--lr-grid values")
    if not 0.0 < args.holdout < 1.0:
        raise EvalInputError(f"--holdout must be in (0, 1), got {args.holdout}")
    check_sources(args, ("train", "val"))


def check_export_args(args: argparse.Namespace) -> None:
    _check_numbers(args)
    check_positive(args.shard_size, "--shard-size")
    if args.n_last_blocks < 0:
        raise EvalInputError(f"--n-last-blocks must be >= 0, got {args.n_last_blocks}")
    if args.dense_size is not None and min(args.dense_size) <= 0:
        raise EvalInputError(f"--dense-size must be two positive sizes, got {args.dense_size}")
    if args.dense_blocks is not None:
        args.dense_blocks = parse_dense_blocks(args.dense_blocks)
    elif args.dense_size is not None:
        raise EvalInputError("--dense-size is used with --dense-blocks only")
    check_sources(args, ())
    root = Path(args.data_path).expanduser()
    if root.is_dir():
        if args.split and not (root / args.split).is_dir():
            raise EvalInputError(f"--data-path {args.data_path} has no {args.split}/ folder (--split)")
        if not args.split and (root / "train").is_dir() and (root / "val").is_dir():
            raise EvalInputError(f"--data-path {args.data_path} holds train/ and val/: pass --split train or "
                                 "--split val (otherwise they would be exported as two classes)")


def parse_dense_blocks(text: str | list) -> list[int | str]:
    """``3,5,7,11`` or ``final,11`` -> [3, 5, 7, 11] / ["final", 11] (already parsed: as it is)."""
    if isinstance(text, list):
        return text
    out: list[int | str] = []
    for part in (p.strip() for p in str(text).split(",")):
        if part == "final":
            out.append(part)
        elif part.lstrip("-").isdigit():
            out.append(int(part))
        else:
            raise EvalInputError(f"--dense-blocks {text!r}: give XCA block indices and/or 'final', comma-separated "
                                 "(e.g. 3,5,7,11)")
    return out


def check_classification_args(args: argparse.Namespace) -> None:
    check_model_name(args.model, "--model")
    check_device(args.device)
    if args.checkpoint not in SPECIAL_CHECKPOINTS:
        check_checkpoint(args.checkpoint, names_allowed=False)
    for name in ("batch_size", "limit", "img_size", "num_classes"):
        check_positive(getattr(args, name), "--" + name.replace("_", "-"))
    if args.num_workers < 0:
        raise EvalInputError(f"--num-workers must be >= 0, got {args.num_workers}")
    if not Path(args.data_path).expanduser().is_dir():
        raise MissingPathError(f"--data-path {args.data_path}: folder not found")
    if args.img_size is not None:
        check_divisible(args.img_size, args.model, "--img-size")


# --------------------------------------------------------------------------------------------- tools
# command-line name -> (command module with main(argv, prog), parser, checks)
TOOLS: dict[str, tuple[str, Callable[[], argparse.ArgumentParser], Callable[[argparse.Namespace], None]]] = {
    "eval_knn": ("ssl_xcit.commands.knn", knn_parser, check_knn_args),
    "eval_linear": ("ssl_xcit.commands.linear", linear_parser, check_linear_args),
    "export_features": ("ssl_xcit.commands.export", export_parser, check_export_args),
    "eval_classification": ("ssl_xcit.commands.classification", classification_parser,
                            check_classification_args),
}


# A library error that a setting gets past names the setting by its role (ssl_xcit.errors.hinted);
# each tool's words for the roles it has an option for. A role a tool has no option for is left out
# of its message: a hint names only what can be typed into that command.
_ARCH = "pass --arch NAME (a zoo architecture, e.g. xcit_small_12_p16)"
TOOL_HINTS: dict[str, dict[str, str]] = {
    "eval_knn": {"arch": _ARCH, "load_features": "give --load-features a folder written by --dump-features"},
    "eval_linear": {"arch": _ARCH, "output_dir": "or use another --output-dir", "lr": "lower --lr"},
    "export_features": {"arch": _ARCH, "dense_size": "pass --dense-size H W",
                        "start_over": "use another --out folder, or --overwrite to start this export over",
                        "split": "pass --split train or --split val (otherwise they would be exported as two "
                                 "classes)"},
    "eval_classification": {
        "allow_pickle": "if you trust the file, pass --allow-pickle",
        "format": "pass --format with one of them",
        "download": "or pass --download to fetch them (uses the network)",
    },
}
# A library error about one Python parameter (ssl_xcit.errors.named) says it with the option that fills
# it: the parser's own (same name, ssl_xcit.cli.flags_of), or these where the library's name differs.
TOOL_FLAGS: dict[str, dict[str, str]] = {
    "eval_knn": {"kind": "--index", "ks": "--nb-knn"},
    "eval_linear": {},
    "export_features": {"formats": "--format"},
    "eval_classification": {"model": "--model"},
}


def parse(tool: str, argv: list[str] | None, check: bool = True, prog: str | None = None) -> argparse.Namespace:
    """``tool``'s arguments parsed (and, with ``check``, checked) without importing torch; ``prog``
    names the command in help and errors (default: ``<tool>.py``)."""
    _, make_parser, checks = TOOLS[tool]
    parser = make_parser()
    parser.prog = prog or parser.prog
    args = parser.parse_args(argv)
    if check:
        checks(args)
    return args


def settings(cls: type, args: argparse.Namespace, **more: Any) -> Any:
    """The library's parameters (the dataclass ``cls``) from a parsed command line: each field the
    option of the same name fills, ``progress`` from ``--no-progress``; ``more`` wins."""
    import dataclasses
    names = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in vars(args).items() if k in names}
    if "progress" in names and hasattr(args, "no_progress"):
        values["progress"] = not args.no_progress
    return cls(**{**values, **more})


def tool_flags(tool: str) -> dict[str, str]:
    """``tool``'s option for each Python parameter a library error may name."""
    return {**own_flags(TOOLS[tool][1]()), **TOOL_FLAGS.get(tool, {})}


def in_own_words(tool: str, args: argparse.Namespace, work: Callable[[], Any]) -> Any:
    """``work()`` (the library call of ``tool``), a library error said in this tool's words: its hints
    for a setting's role, its options for a Python parameter, its ``--device``."""
    try:
        return work()
    except UserError as err:
        raise own_words(_device_words(err, getattr(args, "device", None)), TOOL_HINTS.get(tool), tool_flags(tool))


def in_parser_words(parser: argparse.ArgumentParser, args: argparse.Namespace, work: Callable[[], Any]) -> Any:
    """``work()``, a library error naming a Python parameter said with ``parser``'s option for it (and
    its ``--device``): for the tools outside ``TOOLS`` (the dense ones)."""
    try:
        return work()
    except UserError as err:
        raise own_words(_device_words(err, getattr(args, "device", None)), None, own_flags(parser))


def run_tool(tool: str, argv: list[str], prog: str | None = None) -> Any:
    """The command line of ``eval/<tool>.py`` (or of its console command ``prog``): its command
    module's ``main``, which answers ``--help`` and bad input before it imports torch."""
    return importlib.import_module(TOOLS[tool][0]).main(argv, prog=prog)


def _device_words(err: UserError, device: str | None) -> UserError:
    """The device rule's error (:func:`ssl_xcit.distributed.pick_device`) naming this command's option."""
    if type(err).__name__ != "DeviceError" or device is None:
        return err
    text = str(err)
    err.args = (f"--{text}" if text.startswith("device must be") else f"--device {device}: {text}",)
    return err
