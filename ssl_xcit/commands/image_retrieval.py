"""``eval/eval_image_retrieval.py`` / ``ssl-xcit-image-retrieval``: DINO's retrieval protocol on revisited
Oxford / Paris, with DINO's flags (``--data_path --dataset roxford5k|rparis6k --imsize --multiscale
--pretrained_weights --arch --patch_size --checkpoint_key``). The work is :mod:`ssl_xcit.evaluate.retrieval`.
"""
from __future__ import annotations

import json
from pathlib import Path

from ssl_xcit import cli
from ssl_xcit.errors import UserError

PROG = "eval/eval_image_retrieval.py"
HINTS = {"data_path": "give --data_path the folder above roxford5k/ and rparis6k/ (revisitop's download.py "
                      "fetches them)", "arch": "pass --arch NAME"}


def build_parser(prog: str = PROG) -> cli.ArgumentParser:
    p = cli.ArgumentParser(prog=prog, description="Image retrieval on revisited Oxford / Paris (DINO's "
                           "eval_image_retrieval.py): mAP Medium and Hard, junk images ignored as revisitop defines.")
    p.add_argument("--data_path", "--data-path", required=True,
                   help="folder holding <dataset>/gnd_<dataset>.pkl and <dataset>/jpg/ (revisitop's layout)")
    p.add_argument("--dataset", default="roxford5k", choices=("roxford5k", "rparis6k"))
    p.add_argument("--multiscale", type=cli.bool_word, default=False, metavar="BOOL",
                   help="mean of the features at scales 1, 1/sqrt(2), 1/2 (DINO's)")
    p.add_argument("--imsize", type=int, default=224, help="longer side at most this (images are never enlarged)")
    p.add_argument("--pretrained_weights", "--checkpoint", dest="checkpoint", required=True,
                   help="checkpoint, or a model name for random weights")
    p.add_argument("--arch", default=None, help="architecture, when the checkpoint does not name it")
    p.add_argument("--patch_size", type=int, default=None, help="DINO's: must match --arch")
    p.add_argument("--checkpoint_key", "--checkpoint-key", default="teacher", choices=("teacher", "student"))
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--out", default=None, help="also write the scores to this JSON file")
    p.add_argument("--seed", type=int, default=0, help="seeds a random-init backbone")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--use_cuda", "--num_workers", "--dist_url", "--local_rank", dest="dino_ignored", default=None,
                   metavar="X", help="DINO's: accepted and ignored (images are read one at a time; --device says where)")
    return p


def main(argv: list[str] | None = None, prog: str = PROG) -> dict:
    args = build_parser(prog).parse_args(argv)
    if args.imsize < 1:
        raise cli.UsageError(f"--imsize must be >= 1, got {args.imsize}")
    from ssl_xcit.atomic import atomic_write_json
    from ssl_xcit.evaluate import retrieval
    from ssl_xcit.evaluate.backbone import load_frozen_backbone
    from ssl_xcit.commands.options import apply_patch_size
    from ssl_xcit.distributed import pick_device
    apply_patch_size(args)
    try:
        retrieval.load_revisitop(args.data_path, args.dataset)       # the layout first, before the model
        device = pick_device(args.device)
        model = load_frozen_backbone(args.checkpoint, args.arch, args.checkpoint_key, device, seed=args.seed)
        res = retrieval.evaluate_retrieval(model, args.data_path, args.dataset, args.imsize, args.multiscale, device,
                                           progress=not args.no_progress)
    except UserError as err:
        raise cli.own_words(err, HINTS, cli.flags_of(build_parser(prog)))
    print(f">> {args.dataset}: mAP M: {res['mAP_M']:.2f}, H: {res['mAP_H']:.2f}")
    print(f">> {args.dataset}: mP@k[1 5 10] M: {[round(res[f'mP@{k}_M'], 2) for k in (1, 5, 10)]}, "
          f"H: {[round(res[f'mP@{k}_H'], 2) for k in (1, 5, 10)]}")
    if args.out:
        atomic_write_json(Path(args.out), {**res, "checkpoint": args.checkpoint}, indent=2)
    return res



if __name__ == "__main__":  # pragma: no cover
    print(json.dumps(main()))
