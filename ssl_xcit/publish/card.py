"""The model card (``README.md``) of a published backbone, written from the files of its run.

Why from files only: a card must not claim what nobody measured. Every figure it shows is read from
the run folder (the checkpoint's folder): the k-NN monitor's points in ``log.jsonl``, and the result
files the evaluation tools write next to the checkpoint (``knn.json``, ``linear.json``, any other
``*.json`` with a ``tool`` and top-1), each with its date and the checkpoint it measured. The
training facts (data, images, steps, batch, dates) come from ``config.yaml``, ``log.jsonl`` and the
checkpoint itself. What is missing is said to be missing.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


def _date(seconds: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(seconds)) if seconds else "date unknown"


@dataclass
class RunFacts:
    """What the run folder says about the published weights."""

    folder: Path
    checkpoint: Path
    checkpoint_key: str
    format: str
    arch: str
    config: dict = field(default_factory=dict)
    global_step: int | None = None
    epoch: int | None = None
    start: dict = field(default_factory=dict)        # log.jsonl's first start event
    end: dict = field(default_factory=dict)          # its last finished / stopped event
    knn_curve: list[dict] = field(default_factory=list)
    results: list[dict] = field(default_factory=list)   # evaluation result files, with path and date
    kind: str = "dino"                               # the checkpoint's kind: dino | finetune
    head_kept: bool = False                          # a classifier head is published with the backbone
    val: dict = field(default_factory=dict)          # a fine-tuning run's last val event (log.jsonl)


def _read_log(folder: Path) -> list[dict]:
    from ssl_xcit.evaluate.report import read_log
    path = folder / "log.jsonl"
    return read_log(path).records if path.is_file() else []


def _result_files(folder: Path) -> list[dict]:
    """The evaluation tools' result files in ``folder``: JSON objects naming their ``tool`` with a
    top-1 (linear, fine-tuning) or per-k results (k-NN)."""
    found = []
    for path in sorted(folder.glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and "tool" in data and ("top1" in data or isinstance(data.get("results"), dict)):
            found.append({**data, "_file": path.name, "_time": path.stat().st_mtime})
    return found


def gather(checkpoint: Path, raw: Any, weights: Any, checkpoint_key: str) -> RunFacts:
    """The facts of the run that wrote ``checkpoint`` (``raw``: the loaded file; ``weights``: its
    :class:`~ssl_xcit.models.checkpoints.ExtractedWeights`; ``arch``: the architecture published)."""
    folder = checkpoint.absolute().parent     # the folder named, even when the file is a link
    facts = RunFacts(folder, checkpoint, checkpoint_key, weights.format, weights.arch or "")
    cfg_file = folder / "config.yaml"
    if isinstance(raw, dict) and isinstance(raw.get("config"), dict):
        facts.config = raw["config"]
    elif cfg_file.is_file():
        facts.config = yaml.safe_load(cfg_file.read_text()) or {}
    if isinstance(raw, dict):
        facts.global_step, facts.epoch = raw.get("global_step"), raw.get("epoch")
    records = _read_log(folder)
    facts.start = next((r for r in records if r.get("event") == "start"), {})
    facts.end = next((r for r in reversed(records) if r.get("event") in ("finished", "stopped")), {})
    facts.knn_curve = [r for r in records if r.get("event") == "knn"
                       and (facts.global_step is None or r.get("global_step", 0) <= facts.global_step)]
    facts.results = _result_files(folder)
    if isinstance(raw, dict) and raw.get("kind") == "finetune":
        facts.kind = "finetune"
        vals = [r for r in records if r.get("event") == "val"
                and (facts.global_step is None or r.get("global_step", 0) <= facts.global_step)]
        facts.val = vals[-1] if vals else {}
    return facts


def _finetune_lines(f: RunFacts, raw_best: dict, start: dict | None, classes: list) -> list[str]:
    """What a fine-tuned classifier is: its data, its start, its length, its val top-1 (read from the
    checkpoint and log.jsonl, never assumed)."""
    data, optim = f.config.get("data", {}), f.config.get("optim", {})
    labels = (f"{data['labels_per_class']} labelled images per class" if data.get("labels_per_class")
              else f"{data.get('train_fraction', 1.0):.0%} of the labelled train images")
    images = f", {f.start['images']:,} images" if isinstance(f.start.get("images"), int) else ""
    origin = (f"`{start.get('path')}` ({start.get('format')}, sha256 {str(start.get('sha256', ''))[:12]}…; "
              f"{start.get('loaded', '?')})" if start else "random weights (no pretrained_weights: a baseline)")
    val = f.val
    top1 = (f"{val['top1']:.2f}% top-1, {val.get('top5', float('nan')):.2f}% top-5 on {val.get('images', '?')} val "
            f"images at step {val.get('global_step')}" if isinstance(val.get("top1"), (int, float)) else
            "no validation recorded")
    best = (f"; best {raw_best['top1']:.2f}% at step {raw_best.get('global_step')}"
            if isinstance(raw_best.get("top1"), (int, float)) else "")
    return [f"- **Method**: supervised fine-tuning (labels, cross-entropy) with ssl_xcit's `launch/finetune.py`.",
            f"- **Fine-tuned on**: `{data.get('data_path', '?')}` train/, {labels}{images}, "
            f"{len(classes) or '?'} classes ({', '.join(map(str, classes[:10]))}{' …' if len(classes) > 10 else ''}).",
            f"- **Started from**: {origin}.",
            f"- **Validation** (`{data.get('data_path', '?')}` val/): {top1}{best}.",
            f"- **Length**: {f.global_step if f.global_step is not None else '?'} optimizer steps at "
            f"{data.get('input_size')} px, batch {optim.get('batch_size_per_gpu')} per process."]


def _training_lines(f: RunFacts) -> list[str]:
    cfg = f.config
    data, optim, model = cfg.get("data", {}), cfg.get("optim", {}), cfg.get("model", {})
    if not cfg:
        return [f"Weights read from `{f.checkpoint.name}` (format `{f.format}`); no training config was found "
                "beside it, so how they were trained is not stated here."]
    world = f.start.get("world_size")
    batch = optim.get("batch_size_per_gpu")
    lines = [f"- **Method**: DINO self-supervised pretraining with ssl_xcit; published network: the "
             f"**{f.checkpoint_key}** backbone of `{f.checkpoint.name}`.",
             f"- **Data**: `{data.get('data_path', '?')}`"
             + (f", {f.start['images']:,} images" if isinstance(f.start.get("images"), int) else "")
             + (" (max_images)" if data.get("max_images") else "") + "; no labels used.",
             f"- **Architecture**: `{model.get('arch', f.arch)}`, global crops {data.get('global_crops_size')} px, "
             f"{data.get('local_crops_number')} local crops of {data.get('local_crops_size')} px.",
             f"- **Length**: {f.global_step if f.global_step is not None else '?'} optimizer steps "
             f"(epochs configured: {optim.get('epochs')}), batch {batch} per process"
             + (f" x {world} process{'es' if world > 1 else ''} = {batch * world} images per step"
                if world and batch else "") + "."]
    if f.start:
        end = f"; {f.end.get('event')} {_date(f.end.get('time'))}" if f.end else "; no end recorded"
        lines.append(f"- **When**: started {_date(f.start.get('time'))}{end}.")
    return lines


def _row(what: str, top1: Any, top5: Any, on: str, when: str) -> str:
    def pct(v: Any) -> str:
        return f"{v:.2f}" if isinstance(v, (int, float)) else "-"
    return f"| {what} | {pct(top1)} | {pct(top5)} | {on} | {when} |"


def _result_rows(f: RunFacts, r: dict) -> list[str]:
    """One evaluation result file's rows, saying which checkpoint and network it measured."""
    measured = Path(str(r.get("checkpoint", ""))).name
    note = "" if measured == f.checkpoint.name else f"; measured on `{measured}`, not the file published"
    if r.get("checkpoint_key") not in (None, f.checkpoint_key):
        note += f"; measured on the {r['checkpoint_key']}, not the published {f.checkpoint_key}"
    at = f" at {r['crop_size']} px" if r.get("crop_size") else ""
    data = f" of `{r['data_path']}`" if r.get("data_path") else ""
    on = (f"{r.get('num_train', '?')} train / {r.get('num_val', '?')} val images{data}{at}, "
          f"{r.get('num_classes', '?')} classes; `{r['_file']}`{note}")
    if isinstance(r.get("results"), dict):
        return [_row(f"{r['tool']} (k={k})", v.get("top1"), v.get("top5"), on, _date(r["_time"]))
                for k, v in r["results"].items() if isinstance(v, dict)]
    mode = f" ({r['mode']})" if r.get("mode") else ""
    return [_row(f"{r['tool']}{mode}", r.get("top1"), r.get("top5"), on, _date(r["_time"]))]


def _figure_lines(f: RunFacts) -> list[str]:
    """Every figure found: the result files, then the k-NN monitor's points."""
    lines = [row for r in f.results for row in _result_rows(f, r)]
    ev = f.config.get("eval", {})
    on = f"{ev.get('eval_max_images') or 'all'} images of `{ev.get('eval_data_path', '?')}`; log.jsonl"
    for p in f.knn_curve:
        what = f"k-NN while training (k={ev.get('eval_knn_k', '?')}, teacher, step {p.get('global_step')})"
        lines.append(_row(what, p.get("top1"), p.get("top5"), on, _date(p.get("time"))))
    if not lines:
        return [f"No evaluation figures were found in `{f.folder}` (the evaluation tools write `knn.json` and "
                "`linear.json` next to the checkpoint they evaluate)."]
    return ["| evaluation | top-1 | top-5 | on | date |", "|---|---|---|---|---|", *lines]


def _what_it_is(f: RunFacts, timm_name: str) -> tuple[str, str, str]:
    """(title tag, the card's first words, the output line of the snippet) for what the file is."""
    if f.kind != "finetune":
        return ("DINO", f"An XCiT backbone (`{timm_name}` in timm, no classifier head: the model returns the image's "
                        "normed CLS feature) pretrained without labels by DINO with ssl_xcit.",
                "features = model(transform(image).unsqueeze(0))   # (1, num_features)")
    if f.head_kept:
        return ("fine-tuned classifier", f"An XCiT classifier (`{timm_name}` in timm, with its classifier head; "
                "class names in `config.json`'s `label_names`) fine-tuned with labels by ssl_xcit.",
                "logits = model(transform(image).unsqueeze(0))   # (1, num_classes)")
    return ("fine-tuned backbone", f"The backbone of an XCiT classifier fine-tuned with labels by ssl_xcit (`{timm_name}` "
            "in timm, classifier head removed: the model returns the image's normed CLS feature).",
            "features = model(transform(image).unsqueeze(0))   # (1, num_features)")


def model_card(f: RunFacts, timm_name: str, license: str, repo_id: str | None, data_config: dict,
               raw: Any = None) -> str:
    """The ``README.md`` text: Hub metadata, how to load, how it was trained, every figure found
    (``raw``: the loaded checkpoint, for a fine-tuned one's start, classes and best validation)."""
    source = f"hf-hub:{repo_id}" if repo_id else "local-dir:/path/to/this/folder"
    tag, what, use = _what_it_is(f, timm_name)
    title = repo_id.split("/")[-1] if repo_id else f"{f.arch or timm_name} ({tag}, ssl_xcit)"
    size = data_config["input_size"][-1]
    raw = raw if isinstance(raw, dict) else {}
    front = {"library_name": "timm", "license": license,
             "tags": ["image-classification" if f.head_kept else "image-feature-extraction", "timm", "ssl_xcit",
                      "fine-tuned" if f.kind == "finetune" else "dino", "xcit"]}
    training = (_finetune_lines(f, raw.get("best") or {}, raw.get("pretrained"), list(raw.get("classes") or []))
                if f.kind == "finetune" else _training_lines(f))
    parts = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "", f"# {title}", "",
             f"{what} Weights in timm's key names "
             f"(`model.safetensors`); preprocessing in `config.json`: {size} px, bicubic resize, centre crop "
             f"ratio {data_config['crop_pct']:.3f}, ImageNet mean/std.", "",
             "## Use", "", "```python", "import timm", "",
             f'model = timm.create_model("{source}", pretrained=True).eval()',
             "cfg = timm.data.resolve_data_config({}, model=model)",
             "transform = timm.data.create_transform(**cfg)", use, "```", "",
             "## Training", "", *training, "",
             "## Evaluation", "", *_figure_lines(f), ""]
    if f.config:
        parts += ["## Config", "", "The run's full configuration (`config.yaml`):", "", "```yaml",
                  yaml.safe_dump(f.config, sort_keys=False).strip(), "```", ""]
    parts += [f"Written by `python -m ssl_xcit.publish` on {_date(time.time())}."]
    return "\n".join(parts) + "\n"
