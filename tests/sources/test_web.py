"""The crawler against a real website on 127.0.0.1 full of traps (tests/sources/web_site.py)."""

import pytest

from nightshift.sources.web import Crawler, WebSettings, canonical_url
from sources.web_site import TrapSite

SETTINGS = dict(max_pages=40, max_depth=4, timeout_s=0.5, retries=1, backoff_s=0.1, max_page_bytes=50_000)


def crawl(site, state, **overrides):
    crawler = Crawler(WebSettings(url=site.base + "/", **{**SETTINGS, **overrides}), state)
    documents = {d.id.removeprefix(site.base): d for d in crawler.crawl()}
    return crawler, documents


def test_canonical_urls_fold_variants_into_one():
    assert canonical_url("HTTP://Example.com/a?b=2&a=1#frag") == "http://example.com/a?a=1&b=2"
    assert canonical_url("https://example.com/p?utm_source=x&utm_medium=y&id=3") == "https://example.com/p?id=3"
    assert canonical_url("https://example.com/p?PHPSESSID=abc&sid=9") == "https://example.com/p"
    assert canonical_url("mailto:someone@example.com") is None and canonical_url("javascript:void(0)") is None


def test_first_crawl_takes_exactly_the_right_pages_and_counts_every_trap(tmp_path):
    with TrapSite() as site:
        crawler, docs = crawl(site, tmp_path / "state.sqlite")
        requested = site.requested()
    report = crawler.report
    assert set(docs) == {
        "/", "/guide/a.html", "/guide/b.html", "/orphan.html", "/private/open.html", "/from-noindex.html",
        "/flaky", "/s/page", "/calendar?month=1", "/calendar?month=2", "/calendar?month=3", "/calendar?month=4",
    }
    # robots first, sitemaps (index followed, /sitemap.xml tried), then pages; never a disallowed or external one
    assert requested[:4] == ["/robots.txt", "/sitemap_index.xml", "/sitemap.xml", "/sitemap-pages.xml"]
    assert "/private/secret.html" not in requested and not any("elsewhere" in r for r in requested)
    assert requested.count("/guide/a.html") == 1  # fragment and utm variants folded
    assert [r for r in requested if r.startswith("/s/page")] == ["/s/page"]  # session ids stripped
    assert requested.count("/flaky") == 2 and requested.count("/error") == 2 and requested.count("/slow") == 2
    assert requested.count("/loop1") == 1 and requested.count("/loop2") == 1
    assert "/calendar?month=5" not in requested
    assert report.robots_blocked == 1
    assert report.skipped == {
        "blocked by robots.txt": 1, "gone": 1, "http 500": 1, "redirect loop": 1, "timeout": 1, "too large": 1,
        "content type": 1, "noindex": 1, "not canonical": 1, "budget": 1,
    }, report.skipped
    assert report.budget_hits == {"depth": 1}
    assert report.fetched == len(docs) + 2 and report.documents == len(docs)  # + noindex + non-canonical pages
    meta = docs["/guide/a.html"].meta
    assert meta["status"] == 200 and len(meta["content_hash"]) == 64 and meta["url"].endswith("/guide/a.html")
    assert "dusk until midnight" in docs["/guide/a.html"].content


def test_second_crawl_revalidates_and_reuses_without_extracting(tmp_path, monkeypatch):
    with TrapSite() as site:
        _, first = crawl(site, tmp_path / "state.sqlite")
        site.requests.clear()
        import trafilatura

        monkeypatch.setattr(trafilatura, "extract", lambda *a, **k: pytest.fail("re-extracted an unchanged page"))
        crawler, second = crawl(site, tmp_path / "state.sqlite")
        conditional = [r for r in site.requests if r["if_none_match"]]
    assert {k: (d.content, d.meta) for k, d in second.items()} == {k: (d.content, d.meta) for k, d in first.items()}
    assert crawler.report.unchanged == len(first) + 2 and crawler.report.fetched == 0
    assert len(conditional) == len(first) + 2


def test_pages_that_are_gone_leave_the_next_crawl_and_failing_ones_are_kept(tmp_path):
    with TrapSite() as site:
        _, first = crawl(site, tmp_path / "state.sqlite")
        site.removed.add("/orphan.html")
        original = site.answer

        def guide_b_down(path, query, headers):
            return (503, {}, "down") if path == "/guide/b.html" else original(path, query, headers)

        site.answer = guide_b_down
        crawler, second = crawl(site, tmp_path / "state.sqlite")
    assert set(first) - set(second) == {"/orphan.html"}
    assert crawler.report.dropped == 1 and crawler.report.reused_after_error == 1
    assert second["/guide/b.html"].content == first["/guide/b.html"].content


def test_budgets_end_a_crawl_and_say_so(tmp_path):
    with TrapSite() as site:
        crawler, docs = crawl(site, tmp_path / "state.sqlite", max_pages=5)
    assert crawler.report.budget_hits["pages"] > 0 and len(docs) <= 5
    with TrapSite() as site:
        crawler, _ = crawl(site, tmp_path / "state2.sqlite", max_seconds=0.3)
    assert crawler.report.budget_hits["wall time"] > 0 and crawler.report.seconds < 5


def test_robots_crawl_delay_paces_the_crawl(tmp_path):
    robots = "User-agent: *\nCrawl-delay: 0.3\nDisallow: /private/\n"
    with TrapSite(robots=robots) as site:
        crawler, _ = crawl(site, tmp_path / "state.sqlite", max_pages=4, sitemaps=False)
    # robots.txt, then 4 pages, each after the Crawl-delay the robots.txt set (the first one follows robots.txt)
    assert crawler.report.requests == 5 and crawler.report.seconds >= 0.3 * 3


def test_an_unreachable_site_crawls_nothing_and_says_why(tmp_path):
    crawler = Crawler(WebSettings(url="http://127.0.0.1:9/", timeout_s=0.5, retries=0), tmp_path / "s.sqlite")
    assert list(crawler.crawl()) == []
    assert any("robots.txt unavailable" in s.reason for s in crawler.skips)
    assert crawler.report.robots_blocked == 1
