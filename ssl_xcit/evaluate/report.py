"""A run's report page: ``python eval/report.py OUTPUT_DIR`` -> ``OUTPUT_DIR/report/index.html``.

One HTML page with its PNGs beside it (no scripts, no network): the curves of ``log.jsonl``
(:mod:`ssl_xcit.evaluate.report_plots`), the teacher's k-NN curve when the k-NN monitor ran, the
collapse warnings and other events, the config, and the teacher's mean attention map of a few
fixed images for each saved checkpoint (``checkpointNNNN.pth`` and ``checkpoint.pth``), so the maps
can be seen to sharpen as training goes. It reads only files, so it works on a run still being
written (a half-written last log line is skipped) or one with no log or checkpoint yet: the page
then says what is missing.
"""
from __future__ import annotations

import html
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from ssl_xcit.errors import UserError

REPORT_DIR = "report"


class NotARunError(UserError, ValueError):
    """A folder that holds nothing a training run writes: no page is written into it."""


def looks_like_a_run(folder: Path) -> bool:
    """Whether ``folder`` holds what a training run writes first: config.yaml, log.jsonl or a checkpoint."""
    return ((folder / "config.yaml").is_file() or (folder / "log.jsonl").is_file()
            or any(folder.glob("checkpoint*.pth")))


@dataclass
class RunLog:
    records: list[dict] = field(default_factory=list)
    bad_lines: int = 0          # lines that are not JSON objects (e.g. the one being written)


def read_log(path: str | Path) -> RunLog:
    """The records of a ``log.jsonl``; unreadable lines are counted, not fatal."""
    log = RunLog()
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                log.bad_lines += 1
                continue
            if isinstance(rec, dict):
                log.records.append(rec)
            else:
                log.bad_lines += 1
    return log


def _config(output_dir: Path) -> tuple[dict, str]:
    import yaml
    path = output_dir / "config.yaml"
    if not path.is_file():
        return {}, ""
    text = path.read_text()
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError:
        data = None
    return (data if isinstance(data, dict) else {}), text


def _status(records: list[dict]) -> str:
    """finished / stopped from the last lifecycle event; otherwise the run is still going (or died)."""
    lifecycle = [r for r in records if r.get("event") in ("start", "resume", "stopped", "finished")]
    last = lifecycle[-1] if lifecycle else {}
    if last.get("event") == "finished":
        return f"finished at global step {last.get('global_step')}"
    if last.get("event") == "stopped":
        return f"stopped at global step {last.get('global_step')} (checkpointed; resumes when restarted)"
    steps = [r["global_step"] for r in records if isinstance(r.get("global_step"), (int, float))]
    return f"running or interrupted (last logged global step {max(steps)})" if steps else "no progress logged yet"


def _details(record: dict) -> str:
    """An event's fields as escaped HTML: ``key=value`` pairs, and a multi-line value (recipe: auto's
    choices, one per line with its reason) as a list, one item a line, not one run-on paragraph."""
    plain, lists = [], []
    for k, v in record.items():
        if k in ("event", "time"):
            continue
        lines = [line.strip() for line in v.splitlines() if line.strip()] if isinstance(v, str) else []
        if len(lines) > 1:
            items = "".join(f"<li>{html.escape(line)}</li>" for line in lines[1:])
            lists.append(f"{html.escape(k)}: {html.escape(lines[0])}<ul>{items}</ul>")
        else:
            plain.append(f"{k}={v}")
    return html.escape(", ".join(plain)) + "".join(lists)


def _event_rows(records: list[dict]) -> str:
    rows = []
    for r in records:
        name = r.get("event")
        if name in ("train", "knn", "val"):
            continue
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(r["time"])) if isinstance(r.get("time"), (int, float)) else ""
        cls = ' class="warn"' if "warning" in str(name) else ""
        rows.append(f"<tr{cls}><td>{html.escape(when)}</td><td>{html.escape(str(name))}</td>"
                    f"<td>{_details(r)}</td></tr>")
    return "<table><tr><th>time (UTC)</th><th>event</th><th>details</th></tr>" + "".join(rows) + "</table>" \
        if rows else "<p class=note>no events logged yet</p>"


STYLE = """body{font-family:sans-serif;margin:1.5em auto;max-width:1150px;color:#222}
h1{font-size:1.4em}h2{font-size:1.15em;border-bottom:1px solid #ccc;margin-top:1.6em}
figure{display:inline-block;margin:.4em;vertical-align:top}img{max-width:100%;border:1px solid #ddd}
figcaption{font-size:.8em;color:#555}table{border-collapse:collapse;font-size:.85em}
td,th{border:1px solid #ddd;padding:.2em .5em;text-align:left}tr.warn{background:#fdd}
.note{color:#666;font-style:italic}.alert{background:#fdd;padding:.5em;border-left:4px solid #c00}
pre{background:#f6f6f6;padding:.6em;font-size:.8em;overflow-x:auto}"""


def write_report(output_dir: str | Path, out_dir: str | Path | None = None, images: Sequence[Path] | None = None,
                 n_images: int = 6, max_checkpoints: int = 8) -> Path:
    """Write ``index.html`` and its PNGs into ``out_dir`` (default ``OUTPUT_DIR/report``); return it."""
    from ssl_xcit.evaluate.report_attention import attention_section
    from ssl_xcit.evaluate.report_plots import figure_html, plot_curves
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        raise FileNotFoundError(2, "No such directory (the run's output_dir)", str(output_dir))
    if not looks_like_a_run(output_dir):
        raise NotARunError(f"{output_dir} is not a training run's output_dir (no config.yaml, log.jsonl or "
                           "checkpoint*.pth in it): no report written")
    out = Path(out_dir) if out_dir is not None else output_dir / REPORT_DIR
    out.mkdir(parents=True, exist_ok=True)
    config, config_text = _config(output_dir)
    log_path = output_dir / "log.jsonl"
    log = read_log(log_path) if log_path.is_file() else RunLog()
    model_cfg, eval_cfg = config.get("model") or {}, config.get("eval") or {}
    finetuning = "mixup" in config
    parts = [f"<h1>{'Fine-tuning' if finetuning else 'DINO'} run {html.escape(str(output_dir))}</h1>",
             f"<p>{html.escape(_status(log.records))}; arch {html.escape(str(model_cfg.get('arch', '?')))}; "
             f"page written {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.</p>"]
    source = next((line[2:] for line in config_text.splitlines() if line.startswith("# pretrained_weights:")), None)
    if source:
        parts.append(f"<p>Started from {html.escape(source[len('pretrained_weights: '):])}.</p>")
    warnings = [r for r in log.records if r.get("event") == "collapse_warning"]
    if warnings:
        parts.append(f'<p class="alert">{len(warnings)} collapse warning(s), first at global step '
                     f'{warnings[0].get("global_step")}: {html.escape(str(warnings[0].get("kind")))}</p>')
    parts.append("<h2>Training curves</h2>")
    if not log_path.is_file():
        parts.append("<p class=note>no log.jsonl yet: the run has not started logging</p>")
    else:
        figs = plot_curves(log.records, out, model_cfg.get("out_dim"),
                           "Cross-entropy loss (labels; mixup/cutmix targets when on)" if finetuning else "DINO loss")
        parts += [figure_html(p, t) for t, p in figs] or ["<p class=note>no training records in log.jsonl yet</p>"]
        if log.bad_lines:
            parts.append(f"<p class=note>{log.bad_lines} unreadable line(s) of log.jsonl skipped "
                         "(a line being written)</p>")
    parts += _val_section(log.records, out)
    if not finetuning:
        parts += _knn_section(log.records, out, eval_cfg.get("eval_knn_k"))
    parts.append(f"<h2>Attention maps of the {'model' if finetuning else 'teacher'}, per checkpoint</h2>")
    parts.append(attention_section(output_dir, out, config, images, n_images, max_checkpoints))
    parts.append("<h2>Events</h2>" + _event_rows(log.records))
    parts.append("<h2>Config</h2>" + (f"<pre>{html.escape(config_text)}</pre>" if config_text
                                      else "<p class=note>no config.yaml</p>"))
    page = (f"<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>ssl_xcit report</title>"
            f"<style>{STYLE}</style></head><body>{''.join(parts)}</body></html>")
    index = out / "index.html"
    index.write_text(page, encoding="utf-8")
    return index


def _val_section(records: list[dict], out: Path) -> list[str]:
    """A fine-tuning run's validation curve, its last and its best point."""
    from ssl_xcit.evaluate.report_plots import figure_html, plot_accuracy
    val = [r for r in records if r.get("event") == "val"]
    if not val:
        return []
    best = max(val, key=lambda r: r.get("top1", float("-inf")))
    caption = (f"last: top-1 {val[-1].get('top1', float('nan')):.2f}% at global step {val[-1].get('global_step')}; "
               f"best: {best.get('top1', float('nan')):.2f}% at global step {best.get('global_step')} "
               "(checkpoint_best.pth)")
    probe = val[-1].get("start_probe_top1")
    if isinstance(probe, (int, float)):   # the baseline fine-tuning must pass to have paid
        caption += (f"; the start's linear probe: {probe:.2f}% (last {val[-1].get('top1', float('nan')) - probe:+.2f}, "
                    f"best {best.get('top1', float('nan')) - probe:+.2f})")
    return ["<h2>Validation</h2>", figure_html(plot_accuracy(val, out / "val.png", "val", "validation accuracy"),
                                               caption)]


def _knn_section(records: list[dict], out: Path, k: int | None) -> list[str]:
    """The k-NN monitor's curve of a DINO run (or how to turn it on)."""
    from ssl_xcit.evaluate.report_plots import figure_html, plot_knn
    knn = [r for r in records if r.get("event") == "knn"]
    if not knn:
        return ["<h2>k-NN of the teacher</h2>", "<p class=note>no k-NN records (set eval_every_epochs or "
                "eval_every_steps and eval_data_path to monitor k-NN while training)</p>"]
    last = knn[-1]
    return ["<h2>k-NN of the teacher</h2>", figure_html(plot_knn(knn, out / "knn.png", k),
            f"last: top-1 {last.get('top1', float('nan')):.2f}% at global step {last.get('global_step')}")]


def write_report_at_end_of_run(output_dir: str | Path) -> Path | None:
    """For the training loop (rank 0, after the last checkpoint): the page, or ``None`` and a warning
    when it cannot be made -- a finished run must not fail because of its report."""
    import warnings
    try:
        return write_report(output_dir)
    except Exception as err:  # noqa: BLE001 - reported, never raised: the training itself succeeded
        warnings.warn(f"report page not written for {output_dir}: {type(err).__name__}: {err} "
                      f"(retry with: python eval/report.py {output_dir})", RuntimeWarning, stacklevel=2)
        return None
