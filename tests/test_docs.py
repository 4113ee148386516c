"""The documentation cannot drift from the command line, and its links lead somewhere.

Every `aecurves` command line shown in README.md and docs/*.md is parsed by the command line's own parser
(`aecurves.cli.get_args_parser().parse_args`): nothing runs, but a flag that does not exist, a value that is not a
number where one is wanted, a choice that is not one, or a subcommand that does not exist fails the test, naming
the file, the line and argparse's message.

What counts as a command line:
- in a fenced code block (any but ```python, ```toml, ```json and the like): each line, backslash continuations
  joined, a `$ ` prompt stripped, the comment after `#` cut, split at `|`, `&&`, `||` and `;`, redirections
  (`> FILE`) dropped, and leading `VAR=value` assignments and `time` skipped. A simple command counts when its
  program is `aecurves` (or `python -m aecurves`, or `torchrun ... aecurves` / `torchrun ... -m aecurves`); other
  lines (`python benchmarks/...`, the study folder's layout, whose lines begin with a path) are not ours.
- in an inline code span (it may run over a line break): `aecurves SUBCOMMAND ...` as above, and
  `SUBCOMMAND --flag ...`, a flag named with its command (`train --init`, `plane --margin*`). An inline span often
  names a flag rather than shows a whole command, so there a last flag that takes a value but is given none
  (`train --init`) only has to exist, and `--flag*` stands for the flags with that prefix, one of which must exist.

Placeholders: FILE, DIR, CURVE, A.pt ... are strings and parse as they are. An UPPER-CASE placeholder where a
number or a choice is wanted (`--seed S`) becomes 1, or the first choice, so the flag is still checked; `...` or `…`
as a value is a string, and a `...` after the last argument ("and more") is dropped. `aecurves COMMAND --help`
stands for every subcommand.

A line shown on purpose as one that fails (an error message, say) is marked as not a command: a comment containing
`not-a-command` on that line of its code block, or `<!-- not-a-command -->` on the line before the block (the whole
block is skipped).

Every `--flag` named in an inline code span, alone or not, must be a flag of some aecurves command (or of a
benchmark script, or one of OTHER_TOOLS' flags): a setting spelt as a flag that does not exist (`--align`, where
only `--no-align` does) fails.

Also: README.md stays a map (at most 150 lines), the test command of .ci/run is the README's, and every relative
link in README.md and docs/*.md points to a file that exists, and its #anchor to a heading there (GitHub's slugs).
"""

import argparse
import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest

from aecurves.cli import get_args_parser

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
NOT_SHELL = {"python", "py", "pycon", "toml", "json", "yaml", "yml", "ini", "diff", "markdown", "md"}
MARKER = "not-a-command"
PLACEHOLDER = re.compile(r"[A-Z][A-Z0-9_]*|\.\.\.|…")
ELLIPSIS = {"...", "…"}

PARSER = get_args_parser()
SUBPARSERS = next(a for a in PARSER._actions if isinstance(a, argparse._SubParsersAction)).choices


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


# ---------------------------------------------------------------------------------------------------- the markdown


def fenced_blocks(text: str):
    """(info string, first line number, [lines], skipped) for every fenced code block."""
    lines = text.split("\n")
    i = 0
    while i < len(lines):
        m = re.match(r"\s*(```+|~~~+)\s*([\w+-]*)", lines[i])
        if not m:
            i += 1
            continue
        fence, info = m.group(1), m.group(2).lower()
        previous = next((lines[k] for k in range(i - 1, -1, -1) if lines[k].strip()), "")
        skipped = f"<!-- {MARKER}" in previous
        start, body = i + 2, []
        i += 1
        while i < len(lines) and not lines[i].strip().startswith(fence):
            body.append(lines[i])
            i += 1
        yield info, start, body, skipped
        i += 1


def without_fences(text: str) -> str:
    """The text with every line of a fenced block blanked (so line numbers stay)."""
    out, inside, fence = [], False, ""
    for line in text.split("\n"):
        m = re.match(r"\s*(```+|~~~+)", line)
        if m and (not inside or line.strip().startswith(fence)):
            inside, fence = (not inside), m.group(1)
            out.append("")
        else:
            out.append("" if inside else line)
    return "\n".join(out)


def inline_spans(text: str):
    """(line number, content) of every inline code span outside fenced blocks, a span over a line break joined;
    none from a line that holds `<!-- not-a-command -->`."""
    prose = without_fences(text)
    lines = prose.split("\n")
    for m in re.finditer(r"(?<!`)`(?!`)((?:[^`\n]|\n(?![ \t]*\n))+?)`(?!`)", prose):
        lineno = prose.count("\n", 0, m.start()) + 1
        if f"<!-- {MARKER}" not in lines[lineno - 1]:
            yield lineno, " ".join(m.group(1).split())


# ---------------------------------------------------------------------------------------------- the command lines


def split_commands(line: str):
    """The simple commands of one shell line, as token lists (comments cut, redirections dropped)."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands, current, redirect = [], [], False
    for token in lexer:
        if token in ("|", "||", "&&", ";", "&"):  # not ( ): a parenthesis in a layout block is prose
            commands.append(current)
            current = []
        elif set(token) <= set("<>&|0123456789") and ">" in token or token == "<":
            redirect = True
        elif redirect:
            redirect = False
        else:
            current.append(token)
    commands.append(current)
    return [c for c in commands if c]


def aecurves_argv(tokens):
    """The arguments given to aecurves by this simple command, or None when its program is something else."""
    i = 0
    while i < len(tokens) and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", tokens[i]):
        i += 1  # VAR=value prefixes
    while i < len(tokens) and tokens[i] in ("time", "env", "nohup", "exec"):
        i += 1
    tokens = tokens[i:]
    if not tokens:
        return None
    if tokens[0] == "aecurves":
        return tokens[1:]
    if Path(tokens[0]).name in ("python", "python3", "torchrun"):
        for k in range(1, len(tokens)):
            if tokens[k] == "aecurves" and (tokens[k - 1] == "-m" or Path(tokens[0]).name == "torchrun"):
                return tokens[k + 1:]
    return None


def option(subparser, token):
    """The argparse action of `--flag` or `--flag=value` on this subcommand, or None."""
    return subparser._option_string_actions.get(token.split("=", 1)[0])


def takes_value(action) -> bool:
    return action.nargs != 0


def fill_placeholders(argv, inline: bool):
    """argv with number and choice placeholders filled in (see the module docstring), or a message naming a flag
    that does not exist when a span ends in a bare flag or names `--flag*`."""
    if not argv or argv[0] not in SUBPARSERS:
        return argv, None
    sub = SUBPARSERS[argv[0]]
    out = [argv[0]]
    i = 1
    while i < len(argv):
        token = argv[i]
        if inline and token.startswith("--") and token.endswith("*"):
            if not any(name.startswith(token[:-1]) for name in sub._option_string_actions):
                return argv, f"no flag of `{argv[0]}` starts with {token[:-1]}"
            i += 1
            continue
        action = option(sub, token) if token.startswith("--") else None
        if action is not None and "=" not in token and takes_value(action):
            count = action.nargs if isinstance(action.nargs, int) else 1
            values = argv[i + 1:i + 1 + count]
            if inline and not values:  # `train --init`: the flag is named, not used
                return out, None
            filled = []
            for value in values:
                if PLACEHOLDER.fullmatch(value):
                    if action.choices:
                        value = str(next(iter(action.choices)))
                    elif action.type in (int, float):
                        value = "1"
                filled.append(value)
            out += [token, *filled]
            i += 1 + len(values)
            continue
        if token in ELLIPSIS and i == len(argv) - 1:  # `train ...`: more flags
            break
        out.append(token)
        i += 1
    return out, None


def parse_error(argv):
    """argparse's message when the parser refuses argv, else None (`--help` and `--version` exit 0)."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
            PARSER.parse_args(argv)
    except SystemExit as exc:
        if exc.code not in (0, None):
            return (err.getvalue().strip().splitlines() or ["exit " + str(exc.code)])[-1]
    return None


def documented_command_lines():
    """(where, source text, argv, inline) for every aecurves command line of the docs."""
    found = []
    for path in DOCS:
        text = path.read_text()
        for info, start, body, skipped in fenced_blocks(text):
            if skipped or info in NOT_SHELL:
                continue
            k = 0
            while k < len(body):
                first, line = k, body[k]
                while line.rstrip().endswith("\\") and k + 1 < len(body):
                    k += 1
                    line = line.rstrip()[:-1] + " " + body[k]
                k += 1
                line = re.sub(r"^\s*\$ ", "", line)
                if "aecurves" not in line or MARKER in line:
                    continue
                where = f"{rel(path)}:{start + first}"
                try:
                    commands = split_commands(line)
                except ValueError as exc:  # an unbalanced quote: a command line only if it starts as one
                    if re.match(r"\s*(\w+=\S*\s+)*(time\s+)?aecurves\s", line):
                        found.append((where, line.strip(), None, f"cannot be split as a shell line: {exc}"))
                    continue
                for tokens in commands:
                    argv = aecurves_argv(tokens)
                    if argv is not None:
                        found.append((where, line.strip(), argv, False))
        for lineno, span in inline_spans(text):
            if MARKER in span:
                continue
            try:
                commands = split_commands(span)
            except ValueError:
                continue
            for tokens in commands:
                argv = aecurves_argv(tokens)
                if argv is None and tokens[0] in SUBPARSERS and any(t.startswith("--") for t in tokens[1:]):
                    argv = tokens  # `train --init`: a flag named with its command
                if argv:  # a bare `aecurves` names the program
                    found.append((f"{rel(path)}:{lineno}", f"`{span}`", argv, True))
    return found


def expand(argv):
    """`COMMAND` as the subcommand stands for each of them."""
    if argv and argv[0] == "COMMAND":
        return [[name, *argv[1:]] for name in SUBPARSERS]
    return [argv]


COMMAND_LINES = documented_command_lines()


def test_docs_show_enough_command_lines():
    """The extraction found the commands the docs are full of, so the parse test below cannot pass vacuously."""
    fenced = [c for c in COMMAND_LINES if not c[3]]
    inline = [c for c in COMMAND_LINES if c[3]]
    assert len(fenced) >= 20, fenced
    assert len(inline) >= 20, inline
    files = {where.split(":")[0] for where, *_ in COMMAND_LINES}
    assert {"README.md", "docs/study.md", "docs/commands.md", "docs/alignment.md"} <= files, files
    subcommands = {argv[0] for _, _, argv, _ in COMMAND_LINES if argv}
    assert set(SUBPARSERS) <= subcommands | {"COMMAND"}, set(SUBPARSERS) - subcommands


def test_every_documented_command_line_parses():
    failures = []
    for where, source, argv, inline in COMMAND_LINES:
        if argv is None:
            failures.append(f"{where}: {source}\n    {inline}")
            continue
        for one in expand(argv):
            filled, problem = fill_placeholders(one, inline)
            problem = problem or parse_error(filled)
            if problem:
                failures.append(f"{where}: {source}\n    aecurves {shlex.join(one)}\n    {problem}")
    assert not failures, "documented command lines the CLI refuses:\n" + "\n".join(failures)


OTHER_TOOLS = {"--nproc_per_node": "torchrun", "--KEY": "sbatch, through --slurm-extra KEY=VALUE",
               "--index-url": "pip"}


def known_flags() -> set:
    flags = set(PARSER._option_string_actions)
    for sub in SUBPARSERS.values():
        flags |= set(sub._option_string_actions)
    for script in [*(ROOT / "benchmarks").glob("*.py"), *(ROOT / "benchmarks").glob("*.sh")]:
        flags |= set(re.findall(r"--[a-z][a-z0-9-]*", script.read_text()))
    return flags | set(OTHER_TOOLS)


def test_every_flag_named_in_the_docs_exists():
    flags, unknown, named = known_flags(), [], 0
    for path in DOCS:
        for lineno, span in inline_spans(path.read_text()):
            for flag in re.findall(r"(?:^|[\s/(|])(--[A-Za-z][\w-]*)(\*?)", span):
                named += 1
                name, prefix = flag
                if not (name in flags or prefix and any(f.startswith(name) for f in flags)):
                    unknown.append(f"{rel(path)}:{lineno}: {name}{prefix} in `{span}`")
    assert named >= 100
    assert not unknown, "flags the docs name that no command has:\n" + "\n".join(unknown)


# ------------------------------------------------------------------------------------------------------ the README


def code_lines(text: str):
    """Every line of the shell code blocks, its comment cut."""
    for info, _, body, _ in fenced_blocks(text):
        if info not in NOT_SHELL:
            for line in body:
                yield line.split(" #")[0].strip()


def test_readme_is_a_map():
    lines = (ROOT / "README.md").read_text().split("\n")
    assert len(lines) - (lines[-1] == "") <= 150, f"README.md has {len(lines)} lines: move reference to docs/"


def test_ci_runs_the_readme_install_and_test_commands():
    """.ci/run installs and tests as the README says (its header: "the README's install command, the README's test
    command")."""
    ci = (ROOT / ".ci" / "run").read_text()
    readme = set(code_lines((ROOT / "README.md").read_text()))
    tests = [line.strip() for line in ci.splitlines() if line.strip().startswith("python -m pytest")]
    assert tests and all(line in readme for line in tests), (tests, readme)
    assert 'pip install -e ".[test]"' in readme
    assert re.search(r'pip install( -q)? -e "\.\[test\]"', ci)


# ------------------------------------------------------------------------------------------------------- the links


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set:
    seen, out = {}, set()
    for line in without_fences(path.read_text()).split("\n"):
        m = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            base = slug(m.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
    return out


def links(path: Path):
    """(line number, target) of every Markdown link and image outside code."""
    prose = without_fences(path.read_text())
    prose = re.sub(r"`[^`\n]*`", lambda m: " " * len(m.group(0)), prose)
    for m in re.finditer(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)", prose):
        yield prose.count("\n", 0, m.start()) + 1, m.group(1)


def test_relative_links_lead_to_files_and_headings():
    broken, checked = [], 0
    for path in DOCS:
        for lineno, target in links(path):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ...
                continue
            checked += 1
            file_part, _, anchor = target.partition("#")
            dest = (path.parent / file_part).resolve() if file_part else path
            if not dest.exists():
                broken.append(f"{rel(path)}:{lineno}: {target}: no such file")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                broken.append(f"{rel(path)}:{lineno}: {target}: no heading #{anchor} in {rel(dest)}")
    assert checked >= 30
    assert not broken, "\n".join(broken)


def test_every_docs_page_is_linked_from_the_index():
    index = {target.partition("#")[0] for _, target in links(ROOT / "docs" / "index.md")}
    pages = {p.name for p in (ROOT / "docs").glob("*.md")} - {"index.md"}
    assert pages <= index, pages - index


@pytest.mark.parametrize("heading, anchor", [
    ("Many GPUs and Slurm clusters (`--executor`)", "many-gpus-and-slurm-clusters---executor"),
    ("Study folder (`--out`, default `runs/study`)", "study-folder---out-default-runsstudy"),
    ("The GPU check's dry run", "the-gpu-checks-dry-run"),
])
def test_slug_is_githubs(heading, anchor):
    assert slug(heading) == anchor
