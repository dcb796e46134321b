"""A report built once from sections and rendered to both Markdown and HTML.

Markdown-to-HTML converters are extra dependencies for what is a handful of headings, tables and
images we generate ourselves, so both renderings are produced from the same section list.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass
class _Block:
    kind: str  # heading | text | table | image | code
    data: object


@dataclass
class Report:
    """Sections of a report; ``markdown()`` and ``html()`` render the same content."""

    title: str
    blocks: list[_Block] = field(default_factory=list)

    def heading(self, text: str, level: int = 2) -> Report:
        self.blocks.append(_Block("heading", (level, text)))
        return self

    def text(self, text: str) -> Report:
        self.blocks.append(_Block("text", text))
        return self

    def code(self, text: str) -> Report:
        self.blocks.append(_Block("code", text))
        return self

    def table(self, header: Sequence[str], rows: Sequence[Sequence[object]]) -> Report:
        self.blocks.append(_Block("table", (list(header), [list(r) for r in rows])))
        return self

    def image(self, path: str, caption: str) -> Report:
        self.blocks.append(_Block("image", (path, caption)))
        return self

    def markdown(self) -> str:
        out = [f"# {self.title}", ""]
        for b in self.blocks:
            if b.kind == "heading":
                level, text = b.data
                out += ["#" * level + " " + text, ""]
            elif b.kind == "text":
                out += [str(b.data), ""]
            elif b.kind == "code":
                out += ["```", str(b.data), "```", ""]
            elif b.kind == "table":
                header, rows = b.data
                out.append("| " + " | ".join(header) + " |")
                out.append("|" + "---|" * len(header))
                out += ["| " + " | ".join(_cell(c) for c in r) + " |" for r in rows]
                out.append("")
            elif b.kind == "image":
                path, caption = b.data
                out += [f"![{caption}]({path})", "", f"*{caption}*", ""]
        return "\n".join(out)

    def html(self) -> str:
        e = html.escape
        body = [f"<h1>{e(self.title)}</h1>"]
        for b in self.blocks:
            if b.kind == "heading":
                level, text = b.data
                body.append(f"<h{level}>{e(text)}</h{level}>")
            elif b.kind == "text":
                body.append(f"<p>{e(str(b.data))}</p>")
            elif b.kind == "code":
                body.append(f"<pre>{e(str(b.data))}</pre>")
            elif b.kind == "table":
                header, rows = b.data
                head = "".join(f"<th>{e(h)}</th>" for h in header)
                trs = "".join(
                    "<tr>" + "".join(f"<td>{e(_cell(c))}</td>" for c in r) + "</tr>" for r in rows
                )
                body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{trs}</tbody></table>")
            elif b.kind == "image":
                path, caption = b.data
                body.append(
                    f'<figure><img src="{e(path)}" alt="{e(caption)}">'
                    f"<figcaption>{e(caption)}</figcaption></figure>"
                )
        style = (
            "body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem}"
            "table{border-collapse:collapse;margin:1rem 0}td,th{border:1px solid #ccc;"
            "padding:.25rem .6rem;text-align:left}img{max-width:100%}pre{background:#f4f4f4;"
            "padding:.5rem;overflow-x:auto}"
        )
        return (
            f'<!doctype html><html><head><meta charset="utf-8"><title>{e(self.title)}</title>'
            f"<style>{style}</style></head><body>{''.join(body)}</body></html>\n"
        )


def _cell(value: object) -> str:
    if isinstance(value, float):
        if value != value:  # NaN
            return "n/a"
        return f"{value:.4g}"
    if value is None:
        return "n/a"
    return str(value).replace("|", "\\|").replace("\n", " ")
