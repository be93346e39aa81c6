"""``eval/search.py`` / ``ssl-xcit-search``: the images of a feature export nearest to query images.

The parser is torch-free (``--help`` and a bad number answer at once); the work is
:func:`ssl_xcit.evaluate.search.search_images`.
"""
from __future__ import annotations


from ssl_xcit import cli
from ssl_xcit.errors import UserError

PROG = "eval/search.py"
EXPORT_HINT = "make one with eval/export_features.py --checkpoint CKPT --data-path FOLDER --out FEATURES"
# the words of the export-reading commands for the settings a library error may name (ssl_xcit.errors.hinted)
HINTS = {
    "make_export": EXPORT_HINT,
    "finish_export": "run the same eval/export_features.py command again: it resumes and finishes",
    "patch_tokens": "export again with eval/export_features.py ... --patch-tokens (GeM pools the patch tokens), "
                    "or use --descriptor cls",
    "cls_features": "export again with eval/export_features.py (the CLS features are always exported)",
    "checkpoint": "pass --checkpoint PATH, the checkpoint the export was made with",
    "k": "give a smaller --k",
}


def build_parser(prog: str = PROG) -> cli.ArgumentParser:
    p = cli.ArgumentParser(prog=prog, description="Find the images of a feature export most similar to query "
                           "images: ranked paths and cosine scores (JSON, CSV) and a page of thumbnails.")
    p.add_argument("--features", required=True, help="a folder written by eval/export_features.py")
    p.add_argument("--query", required=True, help="an image, or a folder of images (each one is a query)")
    p.add_argument("--k", type=int, default=10, help="neighbours per query")
    p.add_argument("--descriptor", default="cls", choices=("cls", "cls_gem"),
                   help="cls: the CLS feature; cls_gem: DINO's copy-detection descriptor, CLS + GeM(p=4) of the "
                        "patch tokens (needs an export made with --patch-tokens)")
    p.add_argument("--checkpoint", default=None,
                   help="the export's checkpoint, when it moved since (default: the path its manifest records; "
                        "its weights are checked against the export's)")
    p.add_argument("--out", default=None, help="where results go (default: FEATURES/searches/<query name>)")
    p.add_argument("--index", default="auto", choices=("auto", "flat", "cells"),
                   help="auto: exact below 100,000 images, the calibrated cells index above; built once in "
                        "FEATURES/search-index/ and rebuilt when the export changes")
    p.add_argument("--rebuild-index", action="store_true", help="build the index again even if it is current")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="where queries are embedded")
    p.add_argument("--no-html", action="store_true", help="no thumbnail page")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def _print(result: dict, shown: int = 5) -> None:
    for q in result["queries"][:shown]:
        print(q["query"])
        for h in q["results"][:shown]:
            print(f"  {h['rank']:>3}  {h['score']:.4f}  {h['path']}")
    t = result["timing"]
    print(f"index {result['index']} ({'built' if result['index_built'] else 'loaded'} in {t['index_s']:.2f} s); "
          f"model loaded in {t['load_model_s']:.2f} s; {len(result['queries'])} query embedding(s) "
          f"{t['embed_queries_s']:.2f} s; search {t['search_s'] * 1000:.1f} ms")


def main(argv: list[str] | None = None, prog: str = PROG) -> dict:
    args = build_parser(prog).parse_args(argv)
    if args.k < 1:
        raise cli.UsageError(f"--k must be >= 1, got {args.k}")
    from ssl_xcit.atomic import check_writable
    from ssl_xcit.evaluate import search
    from ssl_xcit.distributed import pick_device
    out = args.out or search.default_out(args.features, args.query)
    try:
        check_writable(out)
        result = search.search_images(args.features, args.query, args.k, args.descriptor, args.checkpoint,
                                      pick_device(args.device), args.index, args.rebuild_index,
                                      progress=not args.no_progress)
    except UserError as err:
        raise cli.own_words(err, HINTS, cli.flags_of(build_parser(prog)))
    written = search.write_search_results(result, out, html_page=not args.no_html)
    _print(result)
    print("results: " + ", ".join(str(p) for p in written.values()))
    return result
