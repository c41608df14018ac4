"""MkDocs hook: the parts of the manual that are generated, so that they cannot drift from the code.

- `<!-- config-reference -->` becomes the reference of every config group and option, read from the commented YAML
  in conf/ (each key, its default and the comment beside it) at every build.
- `<!-- options: eval.yaml -->` becomes the option table of one primary config (a command's page).
- `<!-- figure: NAME -->` becomes docs/images/NAME.png with a caption naming the command, the machine and the date
  that docs/make_figures.py recorded in docs/images/figures.json when it drew the figure.
- `<!-- text: NAME -->` becomes docs/images/NAME.txt as a code block (a command's printed output, e.g. cv_table).
"""

from __future__ import annotations

import json
import posixpath
import re
from dataclasses import dataclass
from pathlib import Path

from mkdocs.exceptions import PluginError

ROOT = Path(__file__).resolve().parents[2]
CONF = ROOT / "conf"
IMAGES = ROOT / "docs" / "images"

_KEY = re.compile(r"^(?P<indent> *)(?P<key>[\w.+@/-]+):(?:\s+(?P<value>[^#]*?))?\s*(?:#\s?(?P<comment>.*))?$")
_COMMENT_ONLY = re.compile(r"^(?P<indent> *)#\s?(?P<comment>.*)$")
_MARKER = re.compile(r"<!--\s*(config-reference|options|figure|text)\s*:?\s*([\w.\-/]*)\s*-->")
_ESCAPES = (("&", "&amp;"), ("<", "&lt;"), (">", "&gt;"), ("*", "\\*"), ("[", "\\["))  # "&" first
_SKIPPED = ("defaults", "hydra.help")  # the defaults list and the --help templates are not options


@dataclass
class Option:
    """One key of a YAML file: its dotted path, default and the comment beside it (continued lines joined)."""

    key: str
    default: str
    meaning: str


def header(text: str) -> str:
    """The comment lines at the top of a YAML file, without `# @package`, as one paragraph."""
    lines = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        if not line.startswith("# @package"):
            lines.append(line.lstrip("#").strip())
    return " ".join(lines)


def options(text: str, prefix: str = "") -> list[Option]:
    """Every key of a commented YAML file with its default and comment; nested keys as dotted paths."""
    found: list[Option] = []
    stack: list[tuple[int, str]] = []  # (indent, key) of the enclosing mappings
    last: Option | None = None
    last_comment_col = -1
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("- "):
            continue
        comment = _COMMENT_ONLY.match(line)
        if comment:  # a comment continued under the previous key's comment
            if last is not None and last_comment_col >= 0 and len(comment["indent"]) >= last_comment_col - 2:
                last.meaning += " " + comment["comment"].strip()
            else:
                last = None
            continue
        match = _KEY.match(line)
        if not match:
            last = None
            continue
        indent = len(match["indent"])
        while stack and stack[-1][0] >= indent:
            stack.pop()
        local = ".".join([k for _, k in stack] + [match["key"]])
        path = f"{prefix}.{local}" if prefix else local
        value = (match["value"] or "").strip()
        stack.append((indent, match["key"]))
        last_comment_col = line.index("#", match.end("key")) if match["comment"] is not None else -1
        if any(local == s or local.startswith(s + ".") for s in _SKIPPED):
            last = None
            continue
        last = Option(path, value, (match["comment"] or "").strip())
        if value or last.meaning:
            found.append(last)
    return found


def package(path: Path) -> str:
    """The config key a group file is placed under: its group (model, hydra.sweeper), or '' for _global_."""
    text = path.read_text()
    if "# @package _global_" in text or path.parent == CONF:
        return ""
    return ".".join(path.relative_to(CONF).parent.parts)


def _cell(text: str) -> str:
    """Comment text as Markdown that shows it as written (no tags from `<dir>`, links from `[a] [b]`, column breaks)."""
    parts = text.split("`")
    for i in range(0, len(parts), 2):  # outside code spans
        for raw, shown in _ESCAPES:
            parts[i] = parts[i].replace(raw, shown)
    return "`".join(parts).replace("|", "\\|")


def option_table(rows: list[Option]) -> str:
    lines = ["| key | default | meaning |", "|---|---|---|"]
    for row in rows:
        default = f"`{row.default}`" if row.default else ""
        lines.append(f"| `{row.key}` | {default} | {_cell(row.meaning)} |")
    return "\n".join(lines)


def config_reference() -> str:
    """Every group of conf/ (one section each) and each option file in it (header comment and key table)."""
    parts = []
    groups = sorted({p.parent for p in CONF.rglob("*.yaml") if p.parent != CONF})
    for group in groups:
        name = "/".join(group.relative_to(CONF).parts)
        files = sorted(group.glob("*.yaml"))
        parts.append(f"## `{name}`\n\nOptions: " + ", ".join(f"`{name}={f.stem}`" for f in files) + "\n")
        for f in files:
            text = f.read_text()
            parts.append(f"### `{name}={f.stem}`\n\n*conf/{f.relative_to(CONF).as_posix()}*. {_cell(header(text))}\n")
            rows = options(text, package(f))
            if rows:
                parts.append(option_table(rows) + "\n")
    return "\n".join(parts)


def primary_options(name: str) -> str:
    path = CONF / name
    if not path.is_file():
        raise PluginError(f"<!-- options: {name} -->: conf/{name} does not exist")
    return f"From *conf/{name}* (generated at build time):\n\n" + option_table(options(path.read_text()))


def _record(name: str, suffix: str) -> dict:
    """What docs/make_figures.py recorded about a figure; a missing one stops the build with the command to run."""
    records_file = IMAGES / "figures.json"
    records = json.loads(records_file.read_text()) if records_file.is_file() else {}
    if name not in records or not (IMAGES / f"{name}{suffix}").is_file():
        raise PluginError(f"docs/images/{name}{suffix} or its record in figures.json is missing; run make docs-figures")
    return records[name]


def figure(name: str, page_path: str) -> str:
    """The image with a caption saying which command drew it, on which machine, when."""
    rec = _record(name, ".png")
    src = posixpath.relpath(f"images/{name}.png", posixpath.dirname(page_path) or ".")
    caption = (
        f"{rec['what'][0].upper()}{rec['what'][1:]}. Drawn by <code>{rec['command']}</code> ({rec['seconds']} s) on "
        f"{rec['machine']}, {rec['date']}; <code>make docs-figures</code> redraws it."
    )
    return f'<figure markdown="span">\n  ![{rec["what"]}]({src})\n  <figcaption>{caption}</figcaption>\n</figure>'


def text_block(name: str) -> str:
    """A command's printed output that make_figures.py kept, with the command, machine and date under it."""
    rec = _record(name, ".txt")
    body = (IMAGES / f"{name}.txt").read_text().rstrip()
    note = f"*Printed by `{rec['command']}` ({rec['seconds']} s) on {rec['machine']}, {rec['date']}.*"
    return f"```text\n{body}\n```\n\n{note}"


def expand(markdown: str, page_path: str) -> str:
    """Replace every marker of the page by what it stands for."""

    def one(match: re.Match[str]) -> str:
        kind, arg = match[1], match[2]
        if kind == "config-reference":
            return config_reference()
        if kind == "options":
            return primary_options(arg)
        if kind == "figure":
            return figure(arg, page_path)
        return text_block(arg)

    return _MARKER.sub(one, markdown)


def on_page_markdown(markdown: str, page, config, files) -> str:  # noqa: ANN001 - MkDocs' hook signature
    return expand(markdown, page.file.src_uri)
