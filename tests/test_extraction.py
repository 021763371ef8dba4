"""HTML to markdown: main content with every <pre> as a fenced block and tables as GFM tables.

The pages are excerpts of real manuals packaged in Debian (git-doc, postgresql-doc-15), copied small.
"""

import re

from nightshift.extraction import html_to_text

# git-add(1) and gitmodules(5), asciidoc's HTML: a synopsis <pre> holding <em> (trafilatura leaves it unfenced),
# a single-line <pre>, a <pre> with a blank line inside, and an admonition set in a table without header cells.
GIT_PAGE = """<!DOCTYPE html><html lang="en"><head><title>git-add(1)</title></head><body class="manpage">
<div id="header"><h1>git-add(1) Manual Page</h1><h2>NAME</h2><div class="sectionbody">
<p>git-add - Add file contents to the index</p></div></div>
<div id="content">
<div class="sect1"><h2 id="_synopsis">SYNOPSIS</h2><div class="sectionbody"><div class="verseblock">
<pre class="content"><em>git add</em> [--verbose | -v] [--dry-run | -n] [--force | -f]
          [--] [&lt;pathspec&gt;&#8230;]</pre>
<div class="attribution"></div></div></div></div>
<div class="sect1"><h2 id="_description">DESCRIPTION</h2><div class="sectionbody">
<div class="paragraph"><p>This command updates the index using the current content found in the working tree, to
prepare the content staged for the next commit.  It typically adds the current content of existing paths as a
whole, but with some options it can also be used to add content with only part of the changes made to the
working tree files applied, or remove paths that do not exist in the working tree anymore.</p></div>
<div class="paragraph"><p>The "index" holds a snapshot of the content of the working tree, and it is this snapshot
that is taken as the contents of the next commit.  Thus after making any changes to the working tree, and
before running the commit command, you must use the <code>add</code> command to add any new or modified files
to the index.</p></div>
<div class="admonitionblock"><table><tr><td class="icon"><div class="title">Note</div></td>
<td class="content">The Git build is parallelizable. <code>-j#</code> is not included above but you can
use it as you prefer, here and elsewhere.</td></tr></table></div>
</div></div>
<div class="sect1"><h2 id="_examples">EXAMPLES</h2><div class="sectionbody"><div class="ulist"><ul><li>
<p>Adds content from all <code>*.txt</code> files under <code>Documentation</code> directory
  and its subdirectories:</p>
<div class="listingblock"><div class="content">
<pre><code>$ git add Documentation/\\*.txt</code></pre></div></div>
<div class="paragraph"><p>Note that the asterisk <code>*</code> is quoted from the shell in this
example; this lets the command include the files from
subdirectories of <code>Documentation/</code> directory.</p></div></li></ul></div>
<div class="paragraph"><p>Consider the following <em>.gitmodules</em> file, which names two submodules and where
each of them is checked out:</p></div>
<div class="listingblock"><div class="content">
<pre><code>[submodule "libfoo"]
        path = include/foo
        url = git://foo.com/git/lib.git

[submodule "libbar"]
        path = include/bar
        url = git://bar.com/git/lib.git</code></pre></div></div>
<div class="paragraph"><p>This defines two submodules, <code>libfoo</code> and <code>libbar</code>. These are
expected to be checked out in the paths <em>include/foo</em> and <em>include/bar</em>, and for both
submodules a URL is specified which can be used for cloning the submodules.</p></div>
</div></div></div>
<div id="footnotes"><hr></div><div id="footer"><div id="footer-text">Last updated 2023-11-20</div></div>
</body></html>"""

GITMODULES = """[submodule "libfoo"]
        path = include/foo
        url = git://foo.com/git/lib.git

[submodule "libbar"]
        path = include/bar
        url = git://bar.com/git/lib.git"""


def fenced_blocks(text: str) -> list[str]:
    return re.findall(r"^```[\w+#.-]*\n(.*?)\n```$", text, flags=re.MULTILINE | re.DOTALL)


def test_every_pre_becomes_a_fenced_block_with_its_exact_text():
    text = html_to_text(GIT_PAGE)
    assert fenced_blocks(text) == [
        "git add [--verbose | -v] [--dry-run | -n] [--force | -f]\n"
        "          [--] [<pathspec>…]",
        "$ git add Documentation/\\*.txt",  # single-line, backslash as written
        GITMODULES,  # the blank line and the indentation inside are kept
    ]
    # the prose around the code, the headings and the list item are kept, in order
    assert text.index("## SYNOPSIS") < text.index("```\ngit add") < text.index("## DESCRIPTION")
    assert "- Adds content from all `*.txt` files" in text
    assert "\nNote that the asterisk `*` is quoted from the shell" in text
    assert "This defines two submodules, `libfoo` and `libbar`." in text


def test_a_table_without_header_cells_gets_a_separator_row():
    text = html_to_text(GIT_PAGE)
    row = "| Note | The Git build is parallelizable. `-j#` is not included above but you can use it as you prefer"
    lines = text.split("\n")
    at = next(i for i, line in enumerate(lines) if line.startswith(row))
    assert lines[at + 1] == "|---|---|"


# PostgreSQL's datatype-numeric.html, a table with header cells: trafilatura's separator row is kept, not doubled.
PG_TABLE = """<html><head><title>8.1. Numeric Types</title></head><body><div class="sect1">
<h2 class="title">8.1. Numeric Types</h2><p>Numeric types consist of two-, four-, and eight-byte integers,
four- and eight-byte floating-point numbers, and selectable-precision decimals.
<a class="xref" href="#DATATYPE-NUMERIC-TABLE">Table 8.2</a> lists the available types.</p>
<div class="table" id="DATATYPE-NUMERIC-TABLE"><p class="title"><strong>Table 8.2. Numeric Types</strong></p>
<div class="table-contents"><table class="table" summary="Numeric Types" border="1"><colgroup><col /><col /><col />
<col /></colgroup><thead><tr><th>Name</th><th>Storage Size</th><th>Description</th><th>Range</th></tr></thead>
<tbody><tr><td><code class="type">smallint</code></td><td>2 bytes</td><td>small-range integer</td>
<td>-32768 to +32767</td></tr><tr><td><code class="type">integer</code></td><td>4 bytes</td>
<td>typical choice for integer</td><td>-2147483648 to +2147483647</td></tr></tbody></table></div></div>
<p>The syntax of constants for the numeric types is described in Section 4.1.2. The numeric types have a full
set of corresponding arithmetic operators and functions. Refer to Chapter 9 for more information.</p>
</div></body></html>"""


def test_a_table_with_header_cells_keeps_one_separator_row():
    lines = [line.rstrip() for line in html_to_text(PG_TABLE).split("\n")]
    at = lines.index("| Name | Storage Size | Description | Range |")
    assert lines[at + 1] == "|---|---|---|---|"
    assert lines[at + 2].startswith("| `smallint` | 2 bytes | small-range integer |")
    assert sum(line.startswith("|---") for line in lines) == 1


# The examples of PostgreSQL's sql-declare.html, as its markup has them: a one-line <pre> between short
# paragraphs. A bare mark in place of the code made trafilatura drop the whole section as boilerplate.
PG_DECLARE = """   To declare a cursor:
</p><pre class="programlisting">
DECLARE liahona CURSOR FOR SELECT * FROM films;
</pre><p>
   examples of cursor usage.
  </p></div><div class="refsect1" id="id-1.9.3.99.10"><h2>Compatibility</h2><p>
   The SQL standard allows cursors only in embedded
  </p><p>
   According to the SQL standard, changes made to insensitive cursors by"""


def test_code_between_short_paragraphs_keeps_its_section():
    text = html_to_text(PG_DECLARE)
    assert "To declare a cursor:\n\n```\nDECLARE liahona CURSOR FOR SELECT * FROM films;\n```\n\nexamples of" in text


def test_inline_code_stays_inline_and_code_in_a_table_cell_becomes_inline():
    # gitglossary.html: an inline <code> whose source spans lines; functions-admin.html: a <pre> in a cell
    html = """<html><body><div class="content"><dl><dt>detached HEAD</dt><dd><p>Commands that update or inquire
information <em>about</em> the current branch (e.g. <code>git
branch --set-upstream-to</code> that sets what remote-tracking branch the current branch integrates with)
obviously do not work, as there is no (real) current branch to ask about in this state.</p></dd></dl>
<table><thead><tr><th>Function</th><th>Description</th></tr></thead><tbody><tr>
<td><code class="function">pg_read_binary_file</code></td><td>Returns all or part of a file. In combination with
the <code class="function">convert_from</code> function, this function can be used to read a text file in a
specified encoding and convert to the database's encoding:
<pre class="programlisting">
SELECT convert_from(pg_read_binary_file('file_in_utf8.txt'), 'UTF8');
</pre></td></tr></tbody></table></div></body></html>"""
    text = html_to_text(html)
    assert "(e.g. `git branch --set-upstream-to` that sets" in text
    row = next(line for line in text.split("\n") if line.startswith("| `pg_read_binary_file` | Returns all or part"))
    assert row.endswith("encoding: ` SELECT convert_from(pg_read_binary_file('file_in_utf8.txt'), 'UTF8'); ` |")
    assert "```" not in text


def test_fences_outlast_backticks_in_code_and_name_the_language():
    code = "Use ``` to open a fence:\n```python\nprint(1)\n```"
    html = f"""<html><body><article><h1>Fences</h1><p>A markdown fence is written with three backticks, and
a longer fence can hold a shorter one, which is how this page shows one inside a code block.</p>
<pre><code class="language-markdown">{code}</code></pre><p>The block above shows a fence inside a fence, as
written in a markdown file.</p></article></body></html>"""
    text = html_to_text(html)
    assert f"````markdown\n{code}\n````" in text
    # Sphinx names the language two levels up: <div class="highlight-python"><div class="highlight"><pre>
    sphinx = html.replace('<pre><code class="language-markdown">', '<div class="highlight-python notranslate">'
                          '<div class="highlight"><pre><code>').replace("</code></pre>", "</code></pre></div></div>")
    assert f"````python\n{code}\n````" in html_to_text(sphinx)


def test_page_text_that_looks_like_a_mark_is_left_alone():
    mark = "nightshiftcodeblock0q and nightshiftcodeblock0s"
    html = f"""<html><body><article><p>The words {mark} are page text, not marks, and stay as they are written
in this paragraph of an ordinary page about nothing in particular.</p><pre>make test</pre></article></body></html>"""
    text = html_to_text(html)
    assert mark in text and "```\nmake test\n```" in text


def test_pages_below_the_main_content_thresholds_fall_back_to_plain_text():
    assert html_to_text("<html><body><p>Short.</p></body></html>").strip() == "Short."
    assert html_to_text("") == ""


def test_blank_line_runs_inside_code_are_kept():
    # libpq-example.html (postgresql-doc-15): two blank lines between the includes and the first function
    code = "#include <arpa/inet.h>\n\n\nstatic void\nexit_nicely(PGconn *conn)\n{\n    PQfinish(conn);\n}"
    html = f"""<html><body><div class="example"><p>This program demonstrates the use of cursors from a client
program written in C, connecting to the server with the connection string given on its command line.</p>
<pre class="programlisting">
{code.replace("<", "&lt;")}
</pre><p>The program is found in the source distribution, in the examples directory.</p></div></body></html>"""
    assert fenced_blocks(html_to_text(html)) == [code]


def test_the_extractor_version_changes_with_the_libraries_that_shape_the_text(monkeypatch):
    import importlib.metadata

    from nightshift.extraction import extractor_version

    now = extractor_version()
    assert re.fullmatch(r"[0-9a-f]{16}", now)
    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda dist: "0.0" if dist == "trafilatura" else real(dist))
    extractor_version.cache_clear()
    try:
        assert extractor_version() != now
    finally:
        extractor_version.cache_clear()


def test_a_mark_forged_with_invisible_characters_is_neither_code_nor_a_failure():
    prose = ("<p>This page explains how the function works and why you would call it in your own programs.</p>"
             "<p>The second paragraph describes the return value, which is always an integer, and its errors.</p>")
    for forged in ("nightshift\u200bcodeblock5q", "nightshift\u00adcodeblock0q"):
        text = html_to_text(f"<html><body><main>{prose}<p>See {forged} here.</p><pre>rm -rf /tmp/x</pre>"
                            "</main></body></html>")
        assert text.count("rm -rf /tmp/x") == 1 and "```\nrm -rf /tmp/x\n```" in text
