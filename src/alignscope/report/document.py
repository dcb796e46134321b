"""A report built once from structured blocks and rendered to Markdown and to HTML.

The HTML comes from a Jinja2 template with autoescaping, so text from results (paths, labels,
formulas such as ``|P_d g| / |g|``) is shown as written and never parsed as markup. Every number
goes through :func:`alignscope.report.format.fmt`. Plots are embedded as base64 data URIs, so a
page can be sent on its own.
"""

from __future__ import annotations

import base64
import re
import shlex
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2

from alignscope.report.format import fmt


@dataclass(frozen=True)
class Code:
    """Inline code: a path, a command, an option or an identifier."""

    text: str


@dataclass(frozen=True)
class Link:
    """A link, relative to the page (the index page's links to each report)."""

    text: str
    href: str


@dataclass(frozen=True)
class Keyed:
    """A value from a results.json, shown through fmt() and tagged with where it came from
    (``data-key``: a dotted path, ``file#path`` on the index page) so it can be checked."""

    value: Any
    key: str


# An inline part: text, code, a link, a keyed value, or a value shown through fmt().
Inline = Any


def code_spans(text: str) -> list[Inline]:
    """Split plain text written for a terminal ("check with `alignscope verify`") into text and
    :class:`Code` parts, so the backticks never reach a page."""
    parts: list[Inline] = []
    for i, piece in enumerate(re.split(r"`([^`]+)`", text)):
        if piece:
            parts.append(Code(piece) if i % 2 else piece)
    return parts


@dataclass
class _Block:
    kind: str  # heading | text | note | table | image | gallery | facts | code
    data: Any


@dataclass
class Figure:
    """A plot file (relative to the report's folder) and its caption."""

    path: str
    caption: str


@dataclass
class Report:
    """Sections of a report; ``markdown()`` and ``html()`` render the same content."""

    title: str
    blocks: list[_Block] = field(default_factory=list)

    def heading(self, text: str, level: int = 2) -> Report:
        self.blocks.append(_Block("heading", (level, text)))
        return self

    def text(self, *parts: Inline) -> Report:
        """A paragraph; ``parts`` are strings, :class:`Code`, :class:`Link` or values."""
        self.blocks.append(_Block("text", list(parts)))
        return self

    def note(self, *parts: Inline) -> Report:
        """A muted paragraph (what a table leaves out, how to read it)."""
        self.blocks.append(_Block("note", list(parts)))
        return self

    def code(self, text: str) -> Report:
        self.blocks.append(_Block("code", text))
        return self

    def table(self, header: Sequence[str], rows: Iterable[Sequence[Inline]]) -> Report:
        self.blocks.append(_Block("table", (list(header), [list(r) for r in rows])))
        return self

    def image(self, path: str, caption: str) -> Report:
        self.blocks.append(_Block("image", Figure(path, caption)))
        return self

    def gallery(self, figures: Sequence[Figure]) -> Report:
        """Plots side by side (wrapping on a narrow window)."""
        if figures:
            self.blocks.append(_Block("gallery", list(figures)))
        return self

    def headline(self, facts: Sequence[tuple[str, Any, str | None]]) -> Report:
        """The key numbers, shown first: ``(label, value, key)``; ``key`` is the value's dotted
        path in results.json, kept on the page (``data-key``) so a reader or a test can check
        the number against the file."""
        parts = [(label, Keyed(value, key) if key else value) for label, value, key in facts]
        self.blocks.append(_Block("facts", parts))
        return self

    def provenance(self, results: dict[str, Any]) -> Report:
        """How the results were made: command line, seed, schema and versions."""
        self.heading("How this was made")
        argv = results.get("argv")
        if argv:
            self.text("Command line:")
            self.code(shlex.join([Path(argv[0]).name, *argv[1:]]))
        else:
            self.note("The command line was not recorded in results.json.")
        env = results.get("environment", {})
        rows = [["seed", results.get("seed")], ["results schema", Code(str(results["schema"]))]]
        rows += [[k, v] for k, v in env.items()]
        self.table(["", "value"], rows)
        return self

    # -- rendering --------------------------------------------------------------------------

    def markdown(self) -> str:
        """GitHub-flavoured Markdown; images referenced by file name beside report.md."""
        out = [f"# {self.title}", ""]
        for b in self.blocks:
            if b.kind == "heading":
                level, text = b.data
                out += ["#" * level + " " + text, ""]
            elif b.kind in ("text", "note"):
                line = "".join(_md_inline(p) for p in b.data)
                out += [f"*{line}*" if b.kind == "note" else line, ""]
            elif b.kind == "code":
                out += ["```", str(b.data), "```", ""]
            elif b.kind == "table":
                header, rows = b.data
                out.append("| " + " | ".join(header) + " |")
                out.append("|" + "---|" * len(header))
                out += ["| " + " | ".join(_md_cell(c) for c in r) + " |" for r in rows]
                out.append("")
            elif b.kind in ("image", "gallery"):
                for fig in [b.data] if b.kind == "image" else b.data:
                    out += [f"![{fig.caption}]({fig.path})", "", f"*{fig.caption}*", ""]
            elif b.kind == "facts":
                out += [f"- {label}: **{_md_inline(value)}**" for label, value in b.data]
                out.append("")
        return "\n".join(out)

    def html(self, base: str | Path | None = None) -> str:
        """A standalone HTML page. With ``base`` (the folder holding the plots) each plot is
        embedded as a data URI; without it, plots are linked by relative path."""
        base_dir = Path(base) if base is not None else None
        blocks = [_html_block(b, base_dir) for b in self.blocks]
        figures = [f for b in blocks if b["kind"] in ("image", "gallery") for f in b["figures"]]
        return _TEMPLATE.render(
            title=self.title,
            blocks=blocks,
            has_figures=bool(figures),
            embedded=bool(figures) and all(f["embedded"] for f in figures),
        )

    def write(self, folder: str | Path, embed: bool = True) -> None:
        """report.md and report.html into ``folder`` (the plots must already be there)."""
        folder = Path(folder)
        (folder / "report.md").write_text(self.markdown(), encoding="utf-8")
        html = self.html(folder if embed else None)
        (folder / "report.html").write_text(html, encoding="utf-8")


def _md_inline(part: Inline) -> str:
    if isinstance(part, list):
        return "".join(_md_inline(p) for p in part)
    if isinstance(part, Code):
        fence = "``" if "`" in part.text else "`"
        pad = " " if fence == "``" else ""
        return f"{fence}{pad}{part.text}{pad}{fence}"
    if isinstance(part, Link):
        return f"[{part.text}]({part.href})"
    if isinstance(part, Keyed):
        return _md_inline(part.value)
    return part if isinstance(part, str) else fmt(part)


def _md_cell(part: Inline) -> str:
    # GFM splits table cells on every "|", so only report.md escapes it
    return _md_inline(part).replace("|", "\\|").replace("\n", " ")


def _html_inline(parts: Inline) -> list[dict[str, Any]]:
    out = []
    for p in parts if isinstance(parts, list) else [parts]:
        if isinstance(p, Code):
            out.append({"kind": "code", "text": p.text})
        elif isinstance(p, Link):
            out.append({"kind": "link", "text": p.text, "href": p.href})
        elif isinstance(p, Keyed):
            text = p.value if isinstance(p.value, str) else fmt(p.value)
            out.append({"kind": "keyed", "text": text, "key": p.key})
        else:
            out.append({"kind": "text", "text": p if isinstance(p, str) else fmt(p)})
    return out


def _is_number(value: Any) -> bool:
    if isinstance(value, Keyed):
        return _is_number(value.value)
    return isinstance(value, int | float) and not isinstance(value, bool)


def _html_figure(fig: Figure, base: Path | None) -> dict[str, Any]:
    src, embedded = fig.path, False
    if base is not None and (base / fig.path).is_file():
        data = base64.b64encode((base / fig.path).read_bytes()).decode("ascii")
        src, embedded = f"data:image/png;base64,{data}", True
    return {"src": src, "caption": fig.caption, "embedded": embedded}


def _html_block(b: _Block, base: Path | None) -> dict[str, Any]:
    if b.kind == "heading":
        return {"kind": "heading", "level": b.data[0], "text": b.data[1]}
    if b.kind in ("text", "note"):
        return {"kind": b.kind, "parts": _html_inline(b.data)}
    if b.kind == "code":
        return {"kind": "code", "text": str(b.data)}
    if b.kind == "table":
        header, rows = b.data
        cells = [[{"parts": _html_inline(c), "num": _is_number(c)} for c in r] for r in rows]
        return {"kind": "table", "header": header, "rows": cells}
    if b.kind == "image":
        return {"kind": "image", "figures": [_html_figure(b.data, base)]}
    if b.kind == "gallery":
        return {"kind": "gallery", "figures": [_html_figure(f, base) for f in b.data]}
    if b.kind == "facts":
        return {
            "kind": "facts",
            "facts": [{"label": k, "parts": _html_inline(v)} for k, v in b.data],
        }
    raise ValueError(f"unknown block {b.kind}")


_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="generator" content="alignscope">
<title>{{ title }}</title>
<style>
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;line-height:1.45;color:#1d1d1f;
 max-width:62rem;margin:2rem auto;padding:0 1rem}
h1{font-size:1.6rem;margin-bottom:.5rem}h2{font-size:1.25rem;margin-top:2rem;
 border-bottom:1px solid #ddd;padding-bottom:.2rem}
code,pre{font-family:ui-monospace,"SFMono-Regular",Menlo,Consolas,monospace;font-size:.9em}
code{background:#f2f2f4;padding:.05rem .25rem;border-radius:3px;overflow-wrap:anywhere}
pre{background:#f2f2f4;padding:.6rem;overflow-x:auto;white-space:pre-wrap;
 overflow-wrap:anywhere}
.table-wrap{overflow-x:auto;margin:1rem 0;max-width:100%}
table{border-collapse:collapse}td,th{border:1px solid #d0d0d5;padding:.25rem .6rem;
 text-align:left;vertical-align:top}th{background:#f6f6f8}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
p.note{color:#555;font-size:.92em}
dl.headline{display:grid;grid-template-columns:repeat(auto-fill,minmax(13rem,1fr));gap:.5rem;
 margin:1rem 0}
dl.headline div{border:1px solid #d0d0d5;border-radius:6px;padding:.4rem .6rem}
dl.headline dt{font-size:.85em;color:#555}dl.headline dd{margin:0;font-size:1.15em;
 font-weight:600;overflow-wrap:anywhere}
figure{margin:1rem 0}img{max-width:100%;height:auto}figcaption{font-size:.9em;color:#555}
.gallery{display:grid;grid-template-columns:repeat(auto-fit,minmax(20rem,1fr));gap:1rem}
.gallery figure{min-width:0;margin:0}
td code{white-space:nowrap;overflow-wrap:normal}
footer{margin-top:2rem;font-size:.85em;color:#666}
</style>
</head>
<body>
<main>
<h1>{{ title }}</h1>
{%- macro inline(parts) -%}
{%- for p in parts -%}
{%- if p.kind == "code" -%}<code>{{ p.text }}</code>
{%- elif p.kind == "link" -%}<a href="{{ p.href }}">{{ p.text }}</a>
{%- elif p.kind == "keyed" -%}<span data-key="{{ p.key }}">{{ p.text }}</span>
{%- else -%}{{ p.text }}{%- endif -%}
{%- endfor -%}
{%- endmacro %}
{%- macro figure(f) -%}
<figure><img src="{{ f.src }}" alt="{{ f.caption }}"><figcaption>{{ f.caption }}</figcaption>
</figure>
{%- endmacro %}
{% for b in blocks %}
{%- if b.kind == "heading" %}
<h{{ b.level }}>{{ b.text }}</h{{ b.level }}>
{%- elif b.kind == "text" %}
<p>{{ inline(b.parts) }}</p>
{%- elif b.kind == "note" %}
<p class="note">{{ inline(b.parts) }}</p>
{%- elif b.kind == "code" %}
<pre><code>{{ b.text }}</code></pre>
{%- elif b.kind == "facts" %}
<dl class="headline">
{%- for f in b.facts %}
<div><dt>{{ f.label }}</dt><dd>{{ inline(f.parts) }}</dd></div>
{%- endfor %}
</dl>
{%- elif b.kind == "table" %}
<div class="table-wrap"><table>
<thead><tr>{% for h in b.header %}<th>{{ h }}</th>{% endfor %}</tr></thead>
<tbody>
{%- for row in b.rows %}
<tr>{% for c in row %}<td{% if c.num %} class="num"{% endif %}>{{ inline(c.parts) }}</td>
{%- endfor %}</tr>
{%- endfor %}
</tbody></table></div>
{%- elif b.kind == "image" %}
{{ figure(b.figures[0]) }}
{%- elif b.kind == "gallery" %}
<div class="gallery">{% for f in b.figures %}{{ figure(f) }}{% endfor %}</div>
{%- endif %}
{%- endfor %}
<footer>
{%- if has_figures %}
<p>{% if embedded %}The plots are embedded in this page (PNG data URIs): it can be sent on its
own.{% else %}The plots are linked relative to this page: send the folder with it.{% endif %}</p>
{%- endif %}
<p>Written by alignscope.</p>
</footer>
</main>
</body>
</html>
"""

_TEMPLATE = jinja2.Environment(
    autoescape=True, undefined=jinja2.StrictUndefined, keep_trailing_newline=True
).from_string(_PAGE)
