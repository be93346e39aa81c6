"""``python -m ssl_xcit.publish CHECKPOINT OUT_DIR [--student] [--push-to-hub REPO_ID]``.

Writes the backbone of a checkpoint as timm reads it from the Hugging Face Hub or a local folder
(``model.safetensors``, ``config.json``, a model card ``README.md``); uploads only with
``--push-to-hub``. A known error is one line on stderr and exit status 2. Also ``ssl-xcit-publish``;
the work is :func:`ssl_xcit.publish.publish` (and :func:`~ssl_xcit.publish.push_to_hub`).
"""
from __future__ import annotations

import argparse
import sys

from ssl_xcit import cli
from ssl_xcit.errors import UserError

PROG = "python -m ssl_xcit.publish"
# this command's words for the settings a library error may name (ssl_xcit.errors.hinted)
HINTS = {"keep_head": "publish it without --keep-head"}


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    p = cli.ArgumentParser(
        prog=prog,
        description="Publish a backbone in the layout timm reads: model.safetensors (timm's key names), "
                    "config.json (timm's pretrained_cfg) and a model card README.md written from the run "
                    "folder. Loads with timm.create_model('local-dir:OUT_DIR', pretrained=True) or, once pushed, "
                    "timm.create_model('hf-hub:REPO_ID', pretrained=True) (without pretrained=True timm "
                    "builds random weights).")
    p.add_argument("checkpoint", help="a training checkpoint (this project's or DINO's) or any backbone file "
                                      "ssl_xcit.load_backbone reads")
    p.add_argument("out_dir", help="new or empty folder to write (the whole folder is what gets uploaded)")
    p.add_argument("--student", action="store_true", help="publish the student (default: the teacher, as DINO)")
    p.add_argument("--license", default="unknown",
                   help="licence of the weights for the card and config.json (a Hub licence id, e.g. apache-2.0, "
                        "cc-by-nc-4.0; default: unknown)")
    p.add_argument("--img-size", type=int, default=None,
                   help="resolution recorded in config.json (default: the run's k-NN crop, else 224)")
    p.add_argument("--push-to-hub", metavar="REPO_ID", default=None,
                   help="then upload the folder to this Hugging Face Hub repository (needs huggingface_hub and a "
                        "login); nothing touches the network without it")
    p.add_argument("--private", action="store_true", help="with --push-to-hub: create the repository private")
    p.add_argument("--keep-head", action="store_true",
                   help="publish a fine-tuned checkpoint's classifier (its head and class names), not only its "
                        "backbone")
    p.add_argument("--allow-pickle", action="store_true",
                   help="read a checkpoint that needs unpickling code (trusted files only)")
    return p


def main(argv: list[str] | None = None, prog: str = PROG) -> int:
    args = build_parser(prog).parse_args(sys.argv[1:] if argv is None else argv)
    if args.img_size is not None and args.img_size <= 0:
        raise cli.UsageError(f"--img-size must be positive, got {args.img_size}")
    try:
        return _publish(args)
    except UserError as err:
        raise cli.own_words(err, HINTS)


def _publish(args: argparse.Namespace) -> int:
    from ssl_xcit.publish import check_out_dir, hub_api, publish, push_to_hub

    check_out_dir(args.out_dir)   # before torch loads
    if args.push_to_hub:
        hub_api()                 # before minutes of work, not after
    done = publish(args.checkpoint, args.out_dir, checkpoint_key="student" if args.student else "teacher",
                   license=args.license, repo_id=args.push_to_hub, img_size=args.img_size,
                   allow_pickle=args.allow_pickle, keep_head=args.keep_head)
    print(f"{done.folder}: model.safetensors, config.json, README.md ({done.timm_name}; timm's features match "
          f"ours to {done.max_abs_diff:.1e})")
    if args.push_to_hub:
        result = push_to_hub(done.folder, args.push_to_hub, private=args.private)
        print(f"uploaded to {args.push_to_hub}: {result}")
    return 0


def run_as_script() -> None:
    """``python -m ssl_xcit.publish`` (:mod:`ssl_xcit.publish.__main__`): one line and exit status 2 on a
    known error."""
    sys.exit(cli.run(main, prog=PROG, hints=HINTS))
