"""Step 4's output: the report as a list of blocks, which both renderers (render.py) turn into text, so report.md
and report.html hold the same content.

Blocks hold plain text, and each renderer escapes all of it: no string from the study's files (a folder name, a
note, a host, a factory) can become markup. The only markup is the renderers' own (headings, boxes, lists, tables,
figures, folded sections) and Code pieces. A Figure names a file of report_files/ that the figures step makes: the
document references figures, it never draws one.
"""

from dataclasses import dataclass, field


class Code(str):
    """A piece of text shown verbatim as code, e.g. a command: <code> in HTML, a code span in Markdown."""


Text = str | tuple  # plain text, or a tuple of plain text and Code pieces


@dataclass
class Heading:
    level: int
    text: Text


@dataclass
class Paragraph:
    text: Text
    cls: str | None = None  # a box: "summary", "warn" or "muted"


@dataclass
class Items:
    items: list[Text]
    cls: str | None = None


@dataclass
class Table:
    headers: list[str]
    rows: list[list[str]]  # plain text: a code span would not keep a pipe inside its cell
    numeric_from: int = 1  # columns from this one on are right-aligned numbers


@dataclass
class Figure:
    rel: str                 # path relative to the study folder
    caption: Text
    pixels: bool = False     # small images: scale without smoothing
    width: int | None = None  # the width to show it at, in CSS pixels (a small image enlarged); None: its own


@dataclass
class Explorer:
    """report.html's explorer of one pair's paths along t (explorer.py makes it; report.md leaves it out). Values
    are preformatted strings; images PNG data URIs, [t][image] per path."""
    group: str
    pair: str                # "A-B"
    ts: list[float]
    ts_text: list[str]       # each t with 3 decimals
    paths: dict              # name: {label, dash, color, loss (floats), te_loss, te_psnr, te_ssim (strings), images}
    originals: list[str]     # the held-out images
    initial: int             # the index of t nearest 0.5
    plot: dict               # the loss figure's geometry (explorer.PLOT)
    picture: list = field(default_factory=list)  # per t, the t whose pictures show there (explorer.pictured)


@dataclass
class PlaneExplorer:
    """report.html's explorer of a group's loss plane: [i][j] per grid node (i along x, j along y)."""
    group: str
    seeds: str
    size: int
    points: list             # "(x, y)"
    loss: list               # the held-out loss, preformatted
    colors: list             # each cell's fill
    images: list             # [i][j][image]: PNG data URIs ([] when plane.npz has no reconstructions)
    originals: list
    initial: tuple
    bends: list              # the three points, in (fractional) cells
    picture: list = field(default_factory=list)  # per grid line, the line whose pictures show (explorer.pictured)


@dataclass
class Section:
    """A heading and what belongs under it. `fold`: folded in HTML (<details>, opened by a click; `open`: shown
    open), a plain section in Markdown."""
    level: int
    title: Text
    fold: bool = False
    open: bool = False
    blocks: list = field(default_factory=list)


class Doc:
    """Blocks in reading order; section() opens a Section and returns the Doc that fills it."""

    def __init__(self, blocks: list | None = None):
        self.blocks = blocks if blocks is not None else []

    def h(self, level: int, text: Text):
        self.blocks.append(Heading(level, text))

    def p(self, text: Text, cls: str | None = None):
        self.blocks.append(Paragraph(text, cls))

    def ul(self, items: list[Text], cls: str | None = None):
        self.blocks.append(Items(items, cls))

    def table(self, headers: list[str], rows: list[list[str]], numeric_from: int = 1):
        self.blocks.append(Table(headers, rows, numeric_from))

    def img(self, rel: str, caption: Text, pixels: bool = False, width: int | None = None):
        self.blocks.append(Figure(rel, caption, pixels, width))

    def add(self, block) -> None:
        self.blocks.append(block)

    def section(self, level: int, title: Text, fold: bool = False, open: bool = False) -> "Doc":
        section = Section(level, title, fold, open)
        self.blocks.append(section)
        return Doc(section.blocks)
