"""The plots of a run embedded in ``report.md``, and ``report.html``: the same report, self-contained.

``write_visual_report(directory)`` reads the run's ``report.json`` (so a saved run re-renders the same
way), draws the plots into ``plots/``, appends them to ``report.md`` and renders ``report.md`` as one
HTML file whose images are inlined as data URIs: no script, no stylesheet or font from elsewhere.
"""

from __future__ import annotations

import base64
import html
import json
import re
from pathlib import Path

HTML_NAME = "report.html"
_STYLE = """body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1100px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.45}table{border-collapse:collapse;margin:.6em 0}th,td{border:1px solid #ccc;
padding:.25em .6em;text-align:left}th{background:#f3f3f3}code{background:#f3f3f3;padding:0 .2em}
blockquote{border-left:4px solid #c33;margin:.6em 0;padding:.2em .8em;background:#fff4f4}img{max-width:100%;height:auto}
figure{margin:1em 0}figcaption{color:#555;font-size:.9em}"""


def write_visual_report(directory: Path) -> list[Path]:
    """Plots under ``directory/plots``, their section in ``report.md``, and ``report.html``; the files written."""
    from . import plots

    report = json.loads((directory / "report.json").read_text())
    files = plots.write_plots(report, directory)
    md_path = directory / "report.md"
    md = md_path.read_text() if md_path.exists() else ""
    if files:
        section = ["", "## Plots", ""]
        for f in files:
            rel_png, rel_svg = f.png.relative_to(directory).as_posix(), f.svg.relative_to(directory).as_posix()
            section += [f"![{f.title}]({rel_png})", "", f"[{f.title} (SVG)]({rel_svg})", ""]
        md = md.rstrip("\n") + "\n" + "\n".join(section)
        md_path.write_text(md)
    (directory / HTML_NAME).write_text(markdown_to_html(md, base=directory))
    return [p for f in files for p in (f.png, f.svg)] + [md_path, directory / HTML_NAME]


def _data_uri(path: Path) -> str | None:
    kinds = {".png": "image/png", ".svg": "image/svg+xml"}
    if path.suffix not in kinds or not path.is_file():
        return None
    return f"data:{kinds[path.suffix]};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"


def _inline(text: str) -> str:
    """Inline markdown of our reports: `code`, **bold**, [text](link); everything else escaped."""
    out, pos = [], 0
    for m in re.finditer(r"`([^`]*)`|\*\*(.+?)\*\*|\[([^\]]+)\]\(([^)\s]+)\)", text):
        out.append(html.escape(text[pos:m.start()]))
        if m.group(1) is not None:
            out.append(f"<code>{html.escape(m.group(1))}</code>")
        elif m.group(2) is not None:
            out.append(f"<strong>{_inline(m.group(2))}</strong>")
        else:
            out.append(html.escape(m.group(3)))  # links point at sibling files; the HTML stands alone
        pos = m.end()
    out.append(html.escape(text[pos:]))
    return "".join(out)


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def markdown_to_html(md: str, *, base: Path, title: str | None = None) -> str:
    """The subset of markdown our reports use (headings, tables, lists, quotes, images, paragraphs) as one HTML page.

    Images are read from ``base`` and inlined; one that is missing is shown as its alt text.
    """
    lines, body, i = md.splitlines(), [], 0
    page_title = title
    while i < len(lines):
        line = lines[i]
        if not line.strip():
            i += 1
            continue
        if m := re.match(r"^(#{1,6})\s+(.*)$", line):
            level = len(m.group(1))
            page_title = page_title or m.group(2)
            body.append(f"<h{level}>{_inline(m.group(2))}</h{level}>")
            i += 1
        elif m := re.match(r"^!\[([^\]]*)\]\(([^)\s]+)\)\s*$", line):
            uri = _data_uri(base / m.group(2))
            alt = html.escape(m.group(1))
            body.append(f'<figure><img alt="{alt}" src="{uri}"><figcaption>{alt}</figcaption></figure>' if uri
                        else f"<p>[{alt}: image missing]</p>")
            i += 1
        elif line.lstrip().startswith("|"):
            rows = []
            while i < len(lines) and lines[i].lstrip().startswith("|"):
                rows.append(_cells(lines[i]))
                i += 1
            head, rest = rows[0], [r for r in rows[1:] if not all(re.fullmatch(r":?-+:?", c) for c in r)]
            body.append("<table><thead><tr>" + "".join(f"<th>{_inline(c)}</th>" for c in head) + "</tr></thead><tbody>"
                        + "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in r) + "</tr>" for r in rest)
                        + "</tbody></table>")
        elif line.startswith("- "):
            items = []
            while i < len(lines) and lines[i].startswith("- "):
                items.append(f"<li>{_inline(lines[i][2:])}</li>")
                i += 1
            body.append("<ul>" + "".join(items) + "</ul>")
        elif line.startswith(">"):
            quote = []
            while i < len(lines) and lines[i].startswith(">"):
                quote.append(_inline(lines[i].lstrip(">").strip()))
                i += 1
            body.append("<blockquote>" + "<br>".join(quote) + "</blockquote>")
        else:
            para, i = [_inline(line)], i + 1
            while i < len(lines) and lines[i].strip() and not re.match(r"^(#|\||- |>|!\[)", lines[i]):
                para.append(_inline(lines[i]))
                i += 1
            body.append("<p>" + " ".join(para) + "</p>")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(page_title or 'Compression report')}</title><style>{_STYLE}</style></head>\n<body>\n"
            + "\n".join(body) + "\n</body></html>\n")
