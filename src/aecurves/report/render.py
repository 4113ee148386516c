"""Step 5: the renderers. A Doc as Markdown (figures linked from report_files/) and as one self-contained HTML file
(figures embedded as data URIs, the style sheet report.css inlined, and the explorers with their script, which
Markdown leaves out: report.md keeps the static strips): both pure functions of the document."""

import base64
import html
import re
import urllib.parse
from importlib import resources

from .document import Code, Doc, Explorer, Figure, Heading, Items, Paragraph, PlaneExplorer, Section, Table, Text
from .explorer_html import SCRIPT, explorer_html, plane_explorer_html


def _pieces(text: Text) -> tuple:
    return text if isinstance(text, tuple) else (text,)


def plain(text: Text) -> str:
    return "".join(_pieces(text))


# ----------------------------------------------------------------------------------------------------------
# Markdown

# Every character Markdown may read as markup (CommonMark, and GitHub's tables, strikethrough and math), as text.
MD_ESCAPES = str.maketrans({**{c: "\\" + c for c in "\\`*_[]|~$#"}, "&": "&amp;", "<": "&lt;", ">": "&gt;"})


def md_text(text) -> str:
    """Plain text made inert in Markdown: its markup characters escaped, and every run of white space (line breaks
    too) made one space, as a browser shows it, so that the text stays in its line, table row or list item."""
    return re.sub(r"\s+", " ", str(text)).translate(MD_ESCAPES)


def md_code(text) -> str:
    """A Markdown code span showing `text` verbatim: fenced by one backtick more than its longest run of them."""
    text = re.sub(r"\s+", " ", str(text))
    fence = "`" * (max(map(len, re.findall("`+", text)), default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""  # Markdown strips one space each side
    return f"{fence}{pad}{text}{pad}{fence}"


def md_inline(text: Text) -> str:
    return "".join(md_code(p) if isinstance(p, Code) else md_text(p) for p in _pieces(text))


def md_block(text: Text) -> str:
    """The text of a paragraph or list item, with a start Markdown would read as a list marker escaped."""
    line = re.sub(r"^(\s?)([-+])", r"\1\\\2", md_inline(text))  # "- x", "+ x": a bullet
    return re.sub(r"^(\s?\d+)([.)])", r"\1\\\2", line)  # "1. x", "1) x": a numbered item


def to_markdown(doc: Doc) -> str:
    return "\n".join(_md_lines(doc.blocks)).rstrip() + "\n"


def _md_lines(blocks: list) -> list[str]:
    lines = []
    for b in blocks:
        if isinstance(b, (Heading, Section)):
            lines += ["#" * b.level + " " + md_inline(b.text if isinstance(b, Heading) else b.title), ""]
            lines += _md_lines(b.blocks) if isinstance(b, Section) else []
        elif isinstance(b, Paragraph):
            lines += [("> " if b.cls else "") + md_block(b.text), ""]
        elif isinstance(b, Items):
            lines += [("> " if b.cls else "") + "- " + md_block(item) for item in b.items] + [""]
        elif isinstance(b, Table):
            lines.append("| " + " | ".join(md_text(h) for h in b.headers) + " |")
            lines.append("|" + "|".join("---" if i < b.numeric_from else "---:" for i in range(len(b.headers))) + "|")
            lines += ["| " + " | ".join(md_text(c) for c in row) + " |" for row in b.rows]
            lines.append("")
        elif isinstance(b, Figure):
            caption = md_inline(b.caption).strip()
            lines += [f"![{caption}]({urllib.parse.quote(b.rel)})", "", f"*{caption}*", ""]
    return lines


# ----------------------------------------------------------------------------------------------------------
# HTML


def style_sheet() -> str:
    """report.css, shipped inside the package (pyproject.toml's package-data)."""
    return resources.files(__package__).joinpath("report.css").read_text(encoding="utf-8")


def html_inline(text: Text) -> str:
    esc = html.escape
    return "".join(f"<code>{esc(p)}</code>" if isinstance(p, Code) else esc(p) for p in _pieces(text))


def to_html(doc: Doc, title: str, images: dict[str, bytes]) -> str:
    """The document as one HTML file; `images`: the bytes of each figure it shows, by its path in the study folder
    (one missing is linked instead)."""
    head = (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{html.escape(title)}</title><style>{style_sheet()}</style></head><body>")
    parts = _html_parts(doc.blocks, images)
    script = [SCRIPT] if _has_explorer(doc.blocks) else []
    return "\n".join([head, *parts, *script, "</body></html>\n"])


def _has_explorer(blocks: list) -> bool:
    return any(isinstance(b, (Explorer, PlaneExplorer)) or isinstance(b, Section) and _has_explorer(b.blocks)
               for b in blocks)


def _html_parts(blocks: list, images: dict[str, bytes]) -> list[str]:
    esc, parts = html.escape, []
    for b in blocks:
        if isinstance(b, Section):
            heading = f"<h{b.level}>{html_inline(b.title)}</h{b.level}>"
            inner = "\n".join(_html_parts(b.blocks, images))
            parts.append(f"<details{' open' if b.open else ''}><summary>{heading}</summary>\n{inner}\n</details>"
                         if b.fold else f"<section>{heading}\n{inner}\n</section>")
        elif isinstance(b, Heading):
            parts.append(f"<h{b.level}>{html_inline(b.text)}</h{b.level}>")
        elif isinstance(b, Paragraph):
            cls = f" class=\"box {b.cls}\"" if b.cls else ""
            parts.append(f"<p{cls}>{html_inline(b.text)}</p>")
        elif isinstance(b, Items):
            items = "".join(f"<li>{html_inline(i)}</li>" for i in b.items)
            parts.append(f"<div class=\"box {b.cls}\"><ul>{items}</ul></div>" if b.cls else f"<ul>{items}</ul>")
        elif isinstance(b, Table):
            parts.append(_html_table(b))
        elif isinstance(b, Explorer):
            parts.append(explorer_html(b))
        elif isinstance(b, PlaneExplorer):
            parts.append(plane_explorer_html(b))
        elif isinstance(b, Figure):
            data = images.get(b.rel)
            src = f"data:image/png;base64,{base64.b64encode(data).decode('ascii')}" if data else esc(b.rel)
            cls = " class=\"pixels\"" if b.pixels else ""
            size = f" width=\"{b.width}\"" if b.width else ""
            parts.append(f"<figure{cls}><img src=\"{src}\"{size} alt=\"{esc(plain(b.caption))}\"><figcaption>"
                         f"{html_inline(b.caption)}</figcaption></figure>")
    return parts


def _html_table(b: Table) -> str:
    esc = html.escape
    head = "".join(f"<th>{esc(h)}</th>" for h in b.headers)
    body = "".join("<tr>" + "".join(
        f"<td class=\"num\">{_num_cell(str(c))}</td>" if i >= b.numeric_from else f"<td>{esc(str(c))}</td>"
        for i, c in enumerate(row)) + "</tr>" for row in b.rows)
    # a wide table wraps its numbers (each value, and each interval, kept whole), and scrolls inside its box
    # instead of widening the page where even that is too wide
    return f"<div class=\"scroll\"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>"


def _num_cell(text: str) -> str:
    """A number's cell: a line may break between a value and its interval, never inside either."""
    return "".join(f"<span class=\"interval\">{html.escape(p)}</span>" if p.startswith("[") else html.escape(p)
                   for p in re.split(r"(\[[^\]]*\])", text))
