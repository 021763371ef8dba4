"""A crawled documentation page keeps its code as fenced blocks, served from a real server on 127.0.0.1."""

import functools
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

from nightshift.sources.web import Crawler, WebSettings

# An excerpt of git-doc's gitmodules.html (Debian), whose example sits in a <pre> with a blank line inside.
PAGE = """<!DOCTYPE html><html lang="en"><head><title>gitmodules(5)</title></head><body class="manpage">
<div id="content"><div class="sect1"><h2 id="_description">DESCRIPTION</h2><div class="sectionbody">
<div class="paragraph"><p>The <code>.gitmodules</code> file, located in the top-level directory of a Git working
tree, is a text file with a syntax matching the requirements of git-config(1).</p></div>
<div class="paragraph"><p>The file contains one subsection per submodule, and the subsection value is the name
of the submodule. The name is set to the path where the submodule has been added unless it was customized with
the <code>--name</code> option of <em>git submodule add</em>.</p></div></div></div>
<div class="sect1"><h2 id="_examples">EXAMPLES</h2><div class="sectionbody">
<div class="paragraph"><p>Consider the following <em>.gitmodules</em> file:</p></div>
<div class="listingblock"><div class="content"><pre><code>[submodule "libfoo"]
        path = include/foo
        url = git://foo.com/git/lib.git

[submodule "libbar"]
        path = include/bar
        url = git://bar.com/git/lib.git</code></pre></div></div>
<div class="paragraph"><p>This defines two submodules, <code>libfoo</code> and <code>libbar</code>. These are
expected to be checked out in the paths <em>include/foo</em> and <em>include/bar</em>, and for both submodules
a URL is specified which can be used for cloning the submodules.</p></div></div></div></div></body></html>"""


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_the_crawler_stores_code_blocks_fenced_with_their_blank_lines(tmp_path):
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "gitmodules.html").write_text(PAGE, encoding="utf-8")
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(tmp_path / "site")))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/gitmodules.html"
        crawler = Crawler(WebSettings(url=url, sitemaps=False, max_pages=5, timeout_s=2.0, retries=0),
                          tmp_path / "state.sqlite")
        documents = list(crawler.crawl())
    finally:
        server.shutdown()
        server.server_close()
    assert [d.id for d in documents] == [url]
    text = documents[0].content
    assert ('Consider the following *.gitmodules* file:\n\n```\n[submodule "libfoo"]\n        path = include/foo\n'
            '        url = git://foo.com/git/lib.git\n\n[submodule "libbar"]\n') in text
    assert "## EXAMPLES" in text and text.rstrip().endswith("which can be used for cloning the submodules.")


def test_xhtml_with_an_xml_declaration_is_crawled_and_its_links_followed(tmp_path):
    # DocBook and asciidoc write XHTML that starts with <?xml ... encoding="UTF-8"?> (PostgreSQL's and git's
    # manuals in Debian do); lxml refuses such a declaration on decoded text.
    declaration = '<?xml version="1.0" encoding="UTF-8" standalone="no"?>\n'
    site = tmp_path / "site"
    site.mkdir()
    (site / "index.html").write_text(declaration + PAGE.replace("</body>", "<a href='two.html'>two</a></body>"))
    (site / "two.html").write_text(declaration + PAGE.replace("gitmodules(5)", "second page"))
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(site)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        crawler = Crawler(WebSettings(url=base + "/index.html", sitemaps=False, max_pages=5, timeout_s=2.0,
                                      retries=0), tmp_path / "state.sqlite")
        documents = list(crawler.crawl())
    finally:
        server.shutdown()
        server.server_close()
    assert sorted(d.id for d in documents) == [base + "/index.html", base + "/two.html"]
    assert crawler.report.skipped == {} and all("```" in d.content for d in documents)
