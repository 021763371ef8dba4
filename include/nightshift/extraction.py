"""Turn an HTML page into the markdown text a model trains on: main content, code blocks and tables kept as structure.

trafilatura finds the main content and writes it as markdown (headings, lists, emphasis, tables), but it fences
only some ``<pre>`` blocks (not single-line ones, not those holding markup such as a synopsis with ``<em>``),
drops blank lines inside code, and writes a table without header cells (an admonition box, a layout table)
as rows with no separator line, which is not a GFM table. So each ``<pre>`` is set aside before extraction
and put back as a fenced block with its exact text, and separator rows are added where a table lacks one.
Shared by the crawler and the preparation step, which must not import each other.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import re
import unicodedata
from pathlib import Path

_TOKEN = "nightshiftcodeblock"
"""Placeholder stem for a ``<pre>`` set aside; letters only, so markdown output leaves it as it is."""
_LANGUAGE = re.compile(r"(?:^|\s)(?:language|lang|highlight)-([A-Za-z0-9][A-Za-z0-9_+#.-]{0,19})(?:\s|$)")
_NOT_A_LANGUAGE = frozenset({"default", "none", "text", "plain", "plaintext"})
_LEADING_BLANK_LINES = re.compile(r"\A(?:[ \t]*\n)+")
_WHITESPACE = re.compile(r"\s+")
_BACKTICK_RUN = re.compile(r"`+")
_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
_CELL_SPLIT = re.compile(r"(?<!\\)\|")


@functools.cache
def extractor_version() -> str:
    """Return a hash of what decides ``html_to_text``'s output: this module and the trafilatura and lxml versions."""
    # A crawl state or cache that keeps extracted text compares it, so that a new extractor re-extracts.
    import importlib.metadata

    h = hashlib.sha256(Path(__file__).read_bytes())
    for dist in ("trafilatura", "lxml"):
        h.update(f"\0{dist}=={importlib.metadata.version(dist)}".encode())
    return h.hexdigest()[:16]


def html_to_text(html: str, url: str | None = None) -> str:
    """Return the main content of an HTML page as markdown, with every ``<pre>`` kept as a fenced code block."""
    import trafilatura

    tree = trafilatura.load_html(html)
    if tree is None:
        return trafilatura.html2txt(html)
    # Invisible characters (U+200B, soft hyphens) are dropped on the way out: the stem must be unused without them.
    token = _unused_token("".join(ch for ch in tree.text_content() if unicodedata.category(ch) != "Cf"))
    codes = _set_code_aside(tree, token)
    _collapse_inline_code(tree)
    text = trafilatura.extract(tree, url=url, output_format="markdown", include_formatting=True,
                               include_tables=True, include_comments=False, favor_recall=True)
    if not text:
        # Short pages fall under trafilatura's main-content thresholds; its plain-text pass still strips markup.
        return trafilatura.html2txt(html)
    return _restore_code(_add_table_separators(_mark_code(text, token)), token, codes)


def _unused_token(page_text: str) -> str:
    """Return a placeholder stem that the page's text does not contain, so no page text is taken for a mark."""
    # One pass over the text, whatever the page holds (a loop of `in` tests would be quadratic on a hostile page).
    longest = max((len(tail) for tail in re.findall(rf"{_TOKEN}(x*)", page_text)), default=-1)
    return _TOKEN + "x" * (longest + 1)


def _set_code_aside(tree, token: str) -> list[str]:
    """Replace each outermost ``<pre>`` of the tree by a paragraph naming it; return their fenced blocks."""
    import lxml.html

    codes: list[str] = []
    for pre in tree.xpath("//pre[not(ancestor::pre)]"):
        code = _LEADING_BLANK_LINES.sub("", pre.text_content()).rstrip()
        if not code.strip():
            pre.drop_tree()
            continue
        # The placeholder keeps the code's text between two marks: trafilatura judges a section by its text
        # and link density, and a bare mark would make a section of short prose around code look like boilerplate.
        placeholder = lxml.html.Element("p")
        placeholder.text = f"{token}{len(codes)}s {code} {token}{len(codes)}e"
        placeholder.tail = pre.tail
        codes.append(_fenced(code, _language_of(pre)))
        pre.getparent().replace(pre, placeholder)
    return codes


def _collapse_inline_code(tree) -> None:
    """Collapse the whitespace of inline code to single spaces, as a browser shows it."""
    # trafilatura writes inline code whose source spans lines as a fenced block in mid-sentence.
    for code in tree.xpath("//code[not(ancestor::pre)]"):
        for element in code.iter():
            if element.text:
                element.text = _WHITESPACE.sub(" ", element.text)
            if element is not code and element.tail:
                element.tail = _WHITESPACE.sub(" ", element.tail)


def _language_of(pre) -> str:
    """Return the language a code block's classes name (highlight.js, Prism, Sphinx), or ""."""
    candidates = [pre, *pre.xpath("./code")[:1], *itertools.islice(pre.iterancestors(), 2)]
    for element in candidates:
        match = _LANGUAGE.search(element.get("class", ""))
        if match and match.group(1).lower() not in _NOT_A_LANGUAGE:
            return match.group(1).lower()
    return ""


def _fenced(code: str, language: str) -> str:
    """Return code as a fenced block, the fence longer than any backtick run inside it."""
    fence = "`" * max(3, 1 + max((len(run) for run in _BACKTICK_RUN.findall(code)), default=0))
    return f"{fence}{language}\n{code}\n{fence}"


def _inline(fenced_block: str) -> str:
    """Return a fenced block as inline code on one line, for a block trafilatura placed inside a table cell."""
    code = " ".join(fenced_block.split("\n", 1)[1].rsplit("\n", 1)[0].split())
    ticks = "`" * (1 + max((len(run) for run in _BACKTICK_RUN.findall(code)), default=0))
    return f"{ticks} {code} {ticks}"


def _mark_code(text: str, token: str) -> str:
    """Return text with each code placeholder cut to a one-line mark; marks left unpaired are removed."""
    text = re.sub(rf"{token}(\d+)s.*?{token}\1e", rf"{token}\1q", text, flags=re.DOTALL)
    return re.sub(rf"{token}\d+[se]", "", text)


def _restore_code(text: str, token: str, codes: list[str]) -> str:
    """Return text with each mark replaced by its code: a fenced block, inline code inside a table row."""
    placeholder = re.compile(rf"{token}(\d+)q")
    lines: list[str] = []
    for line in text.split("\n"):
        if token not in line:
            lines.append(line)
        elif line.lstrip().startswith("|"):
            lines.append(placeholder.sub(lambda m: _inline(_code(codes, m.group(1))), line))
        else:
            for i, piece in enumerate(placeholder.split(line)):
                if i % 2:
                    lines.extend(["", _code(codes, piece), ""])
                elif piece.strip(" \t-*+>#"):  # a list or quote marker alone belonged to the block
                    lines.append(piece.rstrip() if i == 0 else piece.strip())
    # Blank-line runs around the blocks are folded; those inside a block are its own and stay.
    kept = [line for at, line in enumerate(lines) if line or (at and lines[at - 1])]
    return "\n".join(kept).strip("\n")


def _code(codes: list[str], index: str) -> str:
    """Return the code block a mark names; a mark the page forged names none and stands for nothing."""
    at = int(index)
    return codes[at] if at < len(codes) else ""


def _add_table_separators(text: str) -> str:
    """Return text where every markdown table outside code has a separator row after its first row."""
    lines = text.split("\n")
    out: list[str] = []
    fence = ""
    for i, line in enumerate(lines):
        out.append(line)
        opening = _FENCE.match(line)
        if fence:
            if opening and opening.group(1)[0] == fence[0] and len(opening.group(1)) >= len(fence):
                fence = ""
            continue
        if opening:
            fence = opening.group(1)
            continue
        starts_table = line.lstrip().startswith("|") and not (i and lines[i - 1].lstrip().startswith("|"))
        if starts_table and not (i + 1 < len(lines) and _is_separator_row(lines[i + 1])):
            cells = _CELL_SPLIT.split(line.strip())
            count = max(1, len(cells) - (cells[0] == "") - (len(cells) > 1 and cells[-1] == ""))
            out.append("|" + "---|" * count)
    return "\n".join(out)


def _is_separator_row(line: str) -> bool:
    """Return whether a line is a GFM table's separator row (``|---|:--:|``)."""
    # Not a regex: the natural one backtracks quadratically on a long run of spaces.
    return "-" in line and set(line.strip()) <= set("|-: \t")
