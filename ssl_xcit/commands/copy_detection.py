"""``eval/eval_copy_detection.py`` / ``ssl-xcit-copy-detection``: a seeded copy-detection benchmark built
from any image folder, scored for one or more backbones (and a pixels baseline).

DINO's flags are accepted (``--data_path``, ``--distractors_path``, ``--whitening_path``, ``--imsize``,
``--pretrained_weights``, ``--arch``, ``--patch_size``, ``--checkpoint_key``, ``--batch_size_per_gpu``,
``--num_workers``); DINO reads the Copydays folders, this command builds its copies from ``--data_path``.
The work is :mod:`ssl_xcit.evaluate.copy_detection`.
"""
from __future__ import annotations

from pathlib import Path

from ssl_xcit import cli
from ssl_xcit.errors import UserError

PROG = "eval/eval_copy_detection.py"
HINTS = {"originals": "give a smaller --originals", "distractors": "give a smaller --n-distractors",
         "whitening": "give a smaller --n-whiten", "arch": "pass --arch NAME"}


def build_parser(prog: str = PROG) -> cli.ArgumentParser:
    from ssl_xcit.evaluate.copy_edits import FAMILIES
    p = cli.ArgumentParser(prog=prog, description="Copy detection measured on your own images: N originals of "
                           "--data-path, a copy of each under every edit family (crop, rescale, rotation, flip, JPEG, "
                           "blur, colour, text/emoji overlay, border, combined; three strengths), distractors from "
                           "another folder; mAP and recall@1 per edit family (DINO's protocol).")
    p.add_argument("--data-path", "--data_path", required=True, help="folder the originals are drawn from")
    p.add_argument("--originals", type=int, default=1000, help="originals drawn (seeded) from --data-path")
    p.add_argument("--distractors", "--distractors_path", default=None,
                   help="folder of distractor images added to the database (DINO: 10k YFCC images)")
    p.add_argument("--n-distractors", type=int, default=10000, help="distractors drawn from --distractors")
    p.add_argument("--whiten-data", "--whitening_path", default=None,
                   help="folder the PCA-whitening is learned on (images apart from originals and distractors); "
                        "results are given without and with it")
    p.add_argument("--n-whiten", type=int, default=20000, help="images drawn from --whiten-data (DINO: 20k)")
    p.add_argument("--checkpoint", "--pretrained_weights", nargs="+", required=True,
                   help="checkpoints or model names (random weights) to score, and/or 'pixels' (the image "
                        "squashed to 8x8 RGB: the baseline that needs no network)")
    p.add_argument("--arch", default=None, help="architecture, when a checkpoint does not name it")
    p.add_argument("--patch_size", type=int, default=None, help="DINO's: must match --arch")
    p.add_argument("--checkpoint-key", "--checkpoint_key", default="teacher", choices=("teacher", "student"))
    p.add_argument("--imsize", type=int, default=320, help="images are squashed to imsize x imsize (DINO: 320)")
    p.add_argument("--descriptor", nargs="+", default=["cls", "cls_gem"], choices=("cls", "cls_gem"),
                   help="cls, and/or DINO's cls_gem: CLS + GeM(p=4) of the patch tokens")
    p.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES), help="edit families")
    p.add_argument("--out", required=True, help="folder of the benchmark (reused when it matches) and the results")
    p.add_argument("--seed", type=int, default=0, help="draws the originals, distractors and every edit")
    p.add_argument("--batch-size", "--batch_size_per_gpu", type=int, default=32, help="images per step")
    p.add_argument("--num-workers", "--num_workers", type=int, default=2, help="data-loading worker processes")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--use_cuda", "--dist_url", "--local_rank", dest="dino_ignored", default=None, metavar="X",
                   help="DINO's: accepted and ignored (--device says where)")
    return p


def _check(args) -> None:
    for name in ("originals", "imsize", "batch_size", "n_whiten"):
        if getattr(args, name) < 1:
            raise cli.UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.n_distractors < 0 or args.num_workers < 0:
        raise cli.UsageError("--n-distractors and --num-workers must be >= 0")
    for flag, folder in (("--data-path", args.data_path), ("--distractors", args.distractors),
                         ("--whiten-data", args.whiten_data)):
        if folder is not None and not Path(folder).expanduser().is_dir():
            raise cli.UsageError(f"{flag} {folder}: no such folder")


def _whiten_files(args, bench) -> list[str] | None:
    from ssl_xcit.evaluate.copy_detection import image_files, seeded_sample
    if not args.whiten_data:
        return None
    files = image_files(args.whiten_data, "whitening")
    used = {Path(p) for p in bench.database}
    n = min(args.n_whiten, len([f for f in files if f not in used]))
    return [str(p) for p in seeded_sample(files, n, args.seed + 2, "whitening", exclude=used)]


def main(argv: list[str] | None = None, prog: str = PROG) -> list[dict]:
    args = build_parser(prog).parse_args(argv)
    _check(args)
    from ssl_xcit.atomic import atomic_write, atomic_write_json, atomic_write_text
    from ssl_xcit.evaluate import copy_detection as cd
    from ssl_xcit.evaluate.backbone import load_frozen_backbone
    from ssl_xcit.commands.options import apply_patch_size
    from ssl_xcit.distributed import pick_device
    apply_patch_size(args)
    device, out = pick_device(args.device), Path(args.out)
    rows: list[dict] = []
    try:
        n_dis = 0
        if args.distractors:
            n_dis = min(args.n_distractors, len(cd.image_files(args.distractors, "distractors")))
        bench = cd.build_benchmark(args.data_path, out, args.originals, args.distractors, n_dis, args.families,
                                   args.seed, progress=not args.no_progress)
        whiten = _whiten_files(args, bench)
        print(f"benchmark {out}: {len(bench.originals)} originals, {len(bench.queries)} copies, "
              f"{len(bench.distractors)} distractors; whitening on {len(whiten) if whiten else 0} images")
        for ckpt in args.checkpoint:
            pixels = ckpt == cd.PIXELS
            model = None if pixels else load_frozen_backbone(ckpt, args.arch, args.checkpoint_key, device,
                                                             seed=args.seed, crop_size=args.imsize)
            rows += cd.evaluate_copies(bench, model, ckpt, [cd.PIXELS] if pixels else args.descriptor, args.imsize,
                                       whiten, args.batch_size, args.num_workers, device, not args.no_progress)
            atomic_write_json(out / "results.json", {"settings": {**vars(args)}, "rows": rows}, indent=1)
            atomic_write_text(out / "results.md", cd.results_table(rows) + "\n")
            png = cd.results_png(rows)
            atomic_write(out / "results.png", lambda tmp: Path(tmp).write_bytes(png))
    except UserError as err:
        raise cli.own_words(err, HINTS, cli.flags_of(build_parser(prog)))
    print(cd.results_table(rows))
    return rows
