"""HTML pages of image thumbnails for search results and duplicate groups.

Each page is one self-contained file: thumbnails are embedded as ``data:`` JPEG URIs (no files
beside it, no scripts, no network), every path and name is HTML-escaped, the style is the report
page's (:mod:`ssl_xcit.evaluate.report`). An image that cannot be read shows as a grey box with its
name, never an error: the page is a view of results already computed.
"""
from __future__ import annotations

import base64
import html
import io
import time
from pathlib import Path
from typing import Iterable, Sequence

from ssl_xcit.atomic import atomic_write_text
from ssl_xcit.evaluate.report import STYLE

THUMB = 160
EXTRA_STYLE = (".row{display:flex;flex-wrap:wrap;gap:.4em;margin:.6em 0 1.2em}.cell{width:%dpx;font-size:.72em;"
               "word-break:break-all}.cell img{width:%dpx;height:%dpx;object-fit:contain;background:#eee}"
               ".q{outline:3px solid #36c}.missing{width:%dpx;height:%dpx;background:#ccc;display:flex;"
               "align-items:center;justify-content:center}" % ((THUMB,) * 5))


def thumbnail_uri(path: str | Path, size: int = THUMB) -> str | None:
    """``data:image/jpeg;base64,...`` of a ``size``-px thumbnail, or ``None`` when unreadable."""
    from PIL import Image
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            im.thumbnail((size, size))
            buf = io.BytesIO()
            im.save(buf, "JPEG", quality=80)
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError):
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def cell(path: str, caption: str, query: bool = False) -> str:
    """One thumbnail with its caption (escaped) and the path as its tooltip."""
    uri = thumbnail_uri(path) if not str(path).startswith("#") else None
    tip = html.escape(str(path), quote=True)
    img = (f'<img src="{uri}" title="{tip}" alt=""{" class=q" if query else ""}>' if uri
           else f'<div class="missing" title="{tip}">not readable</div>')
    return f'<div class="cell">{img}<br>{html.escape(caption)}</div>'


def page(title: str, intro: str, sections: Iterable[str]) -> str:
    """A whole page: ``title`` and ``intro`` are escaped here; ``sections`` are HTML already escaped."""
    return (f"<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{STYLE}{EXTRA_STYLE}</style></head><body><h1>{html.escape(title)}</h1>"
            f"<p>{html.escape(intro)} Page written {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.</p>"
            f"{''.join(sections)}</body></html>")


def search_section(query: str, hits: Sequence[dict]) -> str:
    """The query, then its neighbours with rank and cosine score."""
    cells = [cell(query, "query: " + Path(query).name, query=True)]
    cells += [cell(h["path"], f"#{h['rank']}  {h['score']:.4f}  {Path(h['path']).name}") for h in hits]
    return f"<h2>{html.escape(query)}</h2><div class=row>{''.join(cells)}</div>"


def group_section(group: dict) -> str:
    """A duplicate group: its members (the kept one marked) and the strongest pair score."""
    kept = group.get("keep")
    cells = [cell(p, ("KEEP  " if p == kept else "") + Path(p).name, query=p == kept) for p in group["paths"]]
    title = f"group {group['group']}: {len(group['paths'])} images, max cosine {group['max_score']:.4f}"
    return f"<h2>{html.escape(title)}</h2><div class=row>{''.join(cells)}</div>"


def write_page(path: str | Path, title: str, intro: str, sections: Iterable[str]) -> Path:
    """Write the page atomically (a reader never sees half of it)."""
    return atomic_write_text(path, page(title, intro, sections))
