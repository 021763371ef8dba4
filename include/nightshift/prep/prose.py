"""Split a document's text into its prose and the rest (code, tables, signatures), so quality is judged on prose.

Filters tuned on web crawls (Gopher's share of words with a letter, stop words, line punctuation, language
identification) fail technical documentation on its code samples, option lists and function signatures,
though the prose around them is good. ``prose_part`` keeps what such filters were made for. The text is
read as the markdown ``nightshift.extraction`` writes (plain text reads the same way), by these rules:

1. Fenced code blocks (```` ``` ```` or ``~~~``, to the closing fence or the end) are removed.
2. Indented code blocks are removed: lines indented by 4+ spaces (or a tab) after a blank line, with the
   indented and blank lines that follow, unless the line before the blank one is a list item or indented
   (then the block continues a list item, as in markdown).
3. Table rows (lines starting with ``|``) are removed, separator rows too; a cell that is itself a sentence
   (6+ tokens, mostly words, ending with ``.``, ``!``, ``?`` or ``:``) is kept, as admonitions
   ("| Note | ... |") are prose set in a table.
4. The rest is cut into units: a heading, a list item with its continuation lines, a paragraph. A unit is
   dropped as signature-like when fewer than 60% of its tokens (split on whitespace, inline code spans and
   lone punctuation such as a dash left out) are words: letters with inner apostrophes or hyphens, a number
   before (``4-byte``) or after (``SHA-1``), a manual section (``git-log(1)``), wrapped in quotes, brackets
   or emphasis and followed by punctuation at most; ``--verbose``, ``<pathspec>...``, ``foo(bar,``,
   ``pg_size`` and ``2.43`` are not words. A unit with no token left is dropped too, and so is one that looks
   like code: a whole call (``foo(bar, baz)``), a line starting with a shell, Python or psql prompt
   (``$ ``, ``>>> ``, ``postgres=# ``), or a single line ending with ``{`` or ``}``.
5. Horizontal rules and setext underlines are removed; markdown markup is taken off what is kept (heading
   and list markers, emphasis, backticks, backslash escapes, link targets), and each kept unit becomes one
   line with its whitespace collapsed, so line-based filters see one line per paragraph or item.
"""

from __future__ import annotations

import re

_MIN_WORD_SHARE = 0.6
"""Below this share of word tokens a unit is signature-like (prose in manuals measures 0.8 and more)."""
_MIN_CELL_TOKENS = 6
"""A table cell needs at least this many tokens to count as a sentence."""

_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
_INDENTED = re.compile(r"^(?: {4}|\t)")
_TABLE_ROW = re.compile(r"^\s*\|")
_CELL_SPLIT = re.compile(r"(?<!\\)\|")
_RULE = re.compile(r"^\s*(?:[-=*_]\s*){3,}$")
_HEADING = re.compile(r"^\s{0,3}#{1,6}(?:\s+|$)")
_LIST_ITEM = re.compile(r"^\s*(?:[-*+]|\d{1,9}[.)])\s+")
_QUOTE = re.compile(r"^\s*(?:>\s?)+")
_ESCAPE = re.compile(r"\\([!-/:-@\[-`{-~])")
_WORD = re.compile(r"""^[(\[{"'“‘«*_]*(?:\d+-)?[^\W\d_]+(?:['’-][^\W\d_]+)*(?:-\d+)?(?:\(\d[a-z]*\))?"""
                   r"""[)\]}"'”’»*_]*[.,;:!?]*[)\]}"'”’»]*$""")
_PUNCTUATION = re.compile(r"^[.,;:!?\-–—]+$")
"""Punctuation standing alone (left by a code span, or a dash between clauses) is no token."""
# Spans, their backtick runs and links are bounded so that hostile text (unclosed backticks or brackets, a run
# of thousands of backticks) costs linear time, not quadratic.
_CODE_SPAN = re.compile(r"(?<!`)(`{1,8})(?!`)(.{0,500}?)(?<!`)\1(?!`)")
_CALL = re.compile(r"^[\w.:$@>-]+\s*\(.*\)\s*;?$")
_PROMPT = re.compile(r"^(?:\$|%|>>>|\w*=[#>])\s")
_LINK = re.compile(r"!?\[([^\]\n]{0,500})\]\([^)\n]{0,2000}\)")
_EMPHASIS = re.compile(r"(?<![\w*])[*_]{1,3}(?=\S)|(?<=\S)[*_]{1,3}(?![\w*])")
_SENTENCE_END = re.compile(r"[.!?:][)\"'”’»]*$")


def prose_part(text: str) -> str:
    """Return the prose of a text, one paragraph, heading or list item a line, code, tables and signatures removed."""
    kept = [_plain(unit) for unit in _units(_without_code_and_tables(text)) if _is_prose(unit)]
    return "\n".join(line for line in kept if line)


def prose_share(text: str) -> float:
    """Return the share of a text's non-space characters that are prose (0.0 for an empty text)."""
    total = sum(not ch.isspace() for ch in text)
    if not total:
        return 0.0
    return min(1.0, sum(not ch.isspace() for ch in prose_part(text)) / total)


def _without_code_and_tables(text: str) -> list[str]:
    """Return the lines of text without code blocks and rules; table rows become their sentence cells."""
    if "\\" in text:
        text = _ESCAPE.sub(r"\1", text)
    lines: list[str] = []
    fence = ""
    in_indented = False
    previous = before_blank = ""
    for line in text.split("\n"):
        if not line.strip():
            if previous.strip():
                before_blank = previous
            previous = line
            if not fence:
                lines.append("")
            continue
        after_blank, previous = not previous.strip(), line
        if fence:
            closing = _FENCE.match(line)
            if closing and closing.group(1)[0] == fence[0] and len(closing.group(1)) >= len(fence):
                fence = ""
            continue
        opening = _FENCE.match(line)
        if opening:
            fence, in_indented = opening.group(1), False
            continue
        if _INDENTED.match(line) and (in_indented or (after_blank and not _continues_item(before_blank))):
            in_indented = True
            continue
        in_indented = False
        if _TABLE_ROW.match(line):
            lines.extend(["", *_sentence_cells(line), ""])
        elif not _RULE.match(line):
            lines.append(line)
    return lines


def _continues_item(line: str) -> bool:
    """Return whether an indented block after this line (and a blank one) continues a list item."""
    return bool(_LIST_ITEM.match(line) or _INDENTED.match(line))


def _sentence_cells(row: str) -> list[str]:
    """Return the cells of a table row that are sentences."""
    cells = [cell.strip() for cell in _CELL_SPLIT.split(row.strip().strip("|"))]
    return [cell for cell in cells
            if len(cell.split()) >= _MIN_CELL_TOKENS and _SENTENCE_END.search(cell) and _is_prose(cell)]


def _units(lines: list[str]) -> list[str]:
    """Return the headings, list items (with their continuation lines) and paragraphs of the lines."""
    units: list[str] = []
    current: list[str] = []
    for line in lines:
        if not line.strip() or _HEADING.match(line) or _LIST_ITEM.match(line):
            if current:
                units.append("\n".join(current))
            current = [] if not line.strip() else [line]
            if _HEADING.match(line):
                units.append(line)
                current = []
            continue
        current.append(line)
    if current:
        units.append("\n".join(current))
    return units


def _is_prose(unit: str) -> bool:
    """Return whether a unit is prose: mostly words and not shaped like code."""
    body = _LIST_ITEM.sub("", _HEADING.sub("", unit)).strip()
    if _PROMPT.match(body):  # before quote markers go: ">>> " is a prompt, "> " a quote
        return False
    body = _QUOTE.sub("", body)
    if _CALL.match(body) or ("\n" not in body and body.endswith(("{", "}"))):
        return False
    # Inline code in a sentence names a thing, as a noun does; the words around it decide.
    tokens = [token for token in _CODE_SPAN.sub(" ", body).split() if not _PUNCTUATION.match(token)]
    if not tokens:
        return False
    return sum(bool(_WORD.match(token)) for token in tokens) >= _MIN_WORD_SHARE * len(tokens)


def _plain(unit: str) -> str:
    """Return a unit without markdown markup, on one line; inline code keeps its text as written."""
    lines = [_LIST_ITEM.sub("", _HEADING.sub("", _QUOTE.sub("", line))) for line in unit.split("\n")]
    text = " ".join(lines)
    pieces: list[str] = []
    at = 0
    for span in _CODE_SPAN.finditer(text):
        pieces += [_EMPHASIS.sub("", _LINK.sub(r"\1", text[at:span.start()])), span.group(2).strip()]
        at = span.end()
    pieces.append(_EMPHASIS.sub("", _LINK.sub(r"\1", text[at:])))
    return " ".join("".join(pieces).split())
