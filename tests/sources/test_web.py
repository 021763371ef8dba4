"""The crawler against a real website on 127.0.0.1 full of traps (tests/sources/web_site.py)."""

import zlib

import pytest

from nightshift.sources.web import Crawler, WebSettings, canonical_url
from sources.hostile_site import HostileSite, empty_blocks_bomb, gzip_bomb
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
        "content type": 1, "noindex": 1, "not canonical": 1, "budget": 1, "out of scope": 1,
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


def test_texts_of_another_extractor_are_extracted_again_not_reused(tmp_path):
    import sqlite3

    with TrapSite() as site:
        _, first = crawl(site, tmp_path / "state.sqlite")
        with sqlite3.connect(tmp_path / "state.sqlite") as db:  # as a state written before an extractor change
            db.execute("UPDATE pages SET extractor = 'older', text = 'old text'")
        site.requests.clear()
        crawler, second = crawl(site, tmp_path / "state.sqlite")
        conditional = [r for r in site.requests if r["if_none_match"]]
    assert conditional == [] and crawler.report.unchanged == 0 and crawler.report.fetched == len(first) + 2
    assert {k: d.content for k, d in second.items()} == {k: d.content for k, d in first.items()}


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
    assert crawler.report.skipped == {"robots.txt unavailable": 1} and crawler.report.requests == 1


# The hostile site (tests/sources/hostile_site.py): one test per way it tried to break the crawler. ---------

FAST = dict(timeout_s=1.0, retries=0, backoff_s=0.1, max_pages=20, max_depth=3)


def hostile_crawl(settings: dict, state):
    crawler = Crawler(WebSettings(**{**FAST, **settings}), state)
    return crawler, {d.id: d for d in crawler.crawl()}


def test_scope_is_scheme_host_port_and_the_allowed_root(tmp_path):
    from nightshift.sources.config import open_source, source_from_uri
    from nightshift.sources.document_store import SourceNotAllowed

    with HostileSite(traps=("other_port",)) as site:
        roots = (site.base + "/public", "s3://bucket/docs")
        # A run triggered with a source under http://host/public: the root bounds the crawl, not only its start.
        spec = source_from_uri(site.base + "/public/", roots)
        reader = open_source(spec, tmp_path / "state", None)
        documents = {d.id.removeprefix(site.base) for d in reader.read()}
        report = reader.summary()
        with pytest.raises(SourceNotAllowed):
            source_from_uri(site.base + "/public/../private/secret.html", roots)
        with pytest.raises(SourceNotAllowed):
            source_from_uri(site.other + "/public/", roots)
        requested = site.requested()
        other = site.requested("other")
    assert documents == {"/public/", "/public/about.html", "/public/guide.html"}
    # nothing under /private (links, sitemap entries), nothing from the other port (links, 302s, sitemaps)
    assert not [r for r in requested if r.startswith("/private")] and other == [], (requested, other)
    assert "/sitemap.xml" not in requested  # outside the root too: only robots.txt is asked outside it
    assert report["skipped"]["out of scope"] >= 6, report["skipped"]
    reasons = {s.reason for s in reader.skips}
    assert {"out of scope: link leaves the site", "out of scope: redirected off the site"} <= reasons


def test_other_port_links_redirects_and_sitemaps_are_never_requested(tmp_path):
    with HostileSite(traps=("other_port",)) as site:
        crawler, documents = hostile_crawl({"url": site.base + "/"}, tmp_path / "s.sqlite")
        requested = site.requested()
    # the site's sitemaps were read (one of them redirects to the other port and is not followed) ...
    assert {"/sitemap.xml", "/sitemap-pages.xml", "/sitemap-moved.xml"} <= set(requested)
    assert site.base + "/private/secret.html" in documents  # no root: the whole origin is in scope
    # ... and the other service on the same host was never asked for anything
    assert site.requested("other") == []
    assert {s.reason for s in crawler.skips if s.location.startswith(site.other)} == {
        "out of scope: link leaves the site", "out of scope: sitemap leaves the site",
        "out of scope: sitemap entry leaves the site"}
    assert any(s.reason == "out of scope: leaves the site" and s.location.endswith("/sitemap-moved.xml")
               for s in crawler.skips)


def test_a_gzip_bomb_stops_at_the_page_cap_with_memory_kept_small(tmp_path):
    import tracemalloc

    import lxml.html  # noqa: F401  (imports are not the crawl's memory)
    import protego  # noqa: F401
    import trafilatura  # noqa: F401
    import usp.tree  # noqa: F401

    with HostileSite(traps=("bomb",), bomb_mib=512) as site:
        tracemalloc.start()
        try:
            crawler, documents = hostile_crawl({"url": site.base + "/public/bomb.html", "sitemaps": False,
                                                "max_page_bytes": 2 * 1024 * 1024}, tmp_path / "s.sqlite")
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    print(f"gzip bomb (~{len(gzip_bomb(512))} bytes -> 512 MiB): peak traced memory {peak / 2**20:.1f} MiB")
    assert documents == {} and crawler.report.skipped == {"too large": 1}
    assert peak < 16 * 2**20, f"peak {peak / 2**20:.0f} MiB"


def test_a_bomb_that_decodes_to_nothing_is_stopped_by_the_work_of_its_layers(tmp_path):
    import time

    assert zlib.decompress(zlib.decompress(zlib.decompress(empty_blocks_bomb(), 31), 31), 31) == b""
    with HostileSite(traps=()) as site:
        started = time.monotonic()
        crawler, documents = hostile_crawl({"url": site.base + "/public/empty-bomb.html", "sitemaps": False,
                                            "max_page_bytes": 1024 * 1024, "max_seconds": 60, "timeout_s": 30},
                                           tmp_path / "s.sqlite")
        took = time.monotonic() - started
    print(f"empty-block bomb ({len(empty_blocks_bomb())} bytes, 64 MiB of inner blocks): {took:.2f}s")
    # Decoding all 64 MiB of inner layer would not be refused by the page cap: the body is empty.
    assert documents == {} and crawler.report.skipped == {"too large": 1}


def test_a_dripping_server_cannot_hold_the_crawl_past_its_budget(tmp_path):
    import time

    with HostileSite(traps=("drip",)) as site:
        started = time.monotonic()
        crawler, _ = hostile_crawl({"url": site.base + "/public/drip.html", "sitemaps": False, "max_seconds": 4,
                                    "timeout_s": 3, "retries": 2, "backoff_s": 1.0}, tmp_path / "s.sqlite")
        body_drip = time.monotonic() - started
        # headers dripped a byte at a time: the whole-response deadline holds there too
        started = time.monotonic()
        headers, _ = hostile_crawl({"url": site.base + "/drip-headers", "sitemaps": False, "max_seconds": 30,
                                    "timeout_s": 1, "retries": 0}, tmp_path / "h.sqlite")
        header_drip = time.monotonic() - started
    print(f"slow drip: crawl {body_drip:.2f}s against max_seconds 4 (timeout_s 3); header drip {header_drip:.2f}s "
          "against timeout_s 1")
    assert body_drip < 4 + 0.75 and crawler.report.seconds < 4 + 0.75
    assert crawler.report.budget_hits == {"wall time": 1} or crawler.report.skipped.get("timeout") == 1
    assert header_drip < 1 + 0.75 and headers.report.skipped == {"timeout": 1}


def test_robots_txt_governs_sitemaps_too(tmp_path):
    with HostileSite(traps=(), robots="User-agent: *\nDisallow: /\nSitemap: {base}/sitemap.xml\n") as site:
        crawler, documents = hostile_crawl({"url": site.base + "/"}, tmp_path / "a.sqlite")
        assert site.requested() == ["/robots.txt"] and documents == {}
        site.requests.clear()
        site.robots_status = 503
        hostile_crawl({"url": site.base + "/", "retries": 1}, tmp_path / "b.sqlite")
        assert site.requested() == ["/robots.txt", "/robots.txt"]
    assert crawler.report.skipped == {"blocked by robots.txt": 2}  # the start page and the listed sitemap


def test_an_unreadable_robots_txt_means_not_tonight_and_the_pages_come_from_the_state(tmp_path):
    state = tmp_path / "s.sqlite"
    with HostileSite(traps=("nonce",)) as site:
        _, first = hostile_crawl({"url": site.base + "/public/", "sitemaps": False}, state)
        site.requests.clear()
        site.robots_status = 503
        unavailable, second = hostile_crawl({"url": site.base + "/public/", "sitemaps": False, "retries": 1}, state)
        asked_503 = site.requested()
        site.robots_status = 200
        site.requests.clear()
        cut, third = hostile_crawl({"url": site.base + "/public/", "sitemaps": False, "max_pages": 1}, state)
        asked_cut = site.requested()
    assert len(first) == 5
    # not tonight: robots.txt (and its retry) only, every page of the previous night served from the state
    assert asked_503 == ["/robots.txt", "/robots.txt"]
    assert {k: (d.content, d.meta) for k, d in second.items()} == {k: (d.content, d.meta) for k, d in first.items()}
    assert unavailable.report.reused == len(first) and unavailable.report.documents == len(first)
    assert unavailable.report.to_dict()["reused"] == len(first)  # what the source's summary() reports
    # a budget cut: one page fetched, the others served from the state, none lost
    assert [p for p in asked_cut if p.startswith("/public")] == ["/public/"]
    assert third.keys() == first.keys() and cut.report.reused == len(first) - 1
    assert cut.report.budget_hits["pages"] > 0


def test_a_nonce_outside_the_text_leaves_the_document_identical(tmp_path):
    import hashlib

    state = tmp_path / "s.sqlite"
    with HostileSite(traps=("nonce",)) as site:
        _, first = hostile_crawl({"url": site.base + "/public/", "sitemaps": False}, state)
        site.requests.clear()
        crawler, second = hostile_crawl({"url": site.base + "/public/", "sitemaps": False}, state)
        conditional = {r["path"] for r in site.requests if r["if_none_match"]}
        site.about = "The dome was repainted white this spring. " + site.about
        _, third = hostile_crawl({"url": site.base + "/public/", "sitemaps": False}, state)
    nonce = site.base + "/public/nonce.html"
    assert nonce in first and crawler.report.fetched == 1  # fetched again (no validators), extracted again ...
    assert {k: (d.content, d.meta) for k, d in second.items()} == {k: (d.content, d.meta) for k, d in first.items()}
    assert first[nonce].meta["content_hash"] == hashlib.sha256(first[nonce].content.encode()).hexdigest()
    # ... while the pages with validators were revalidated, not downloaded
    assert conditional == {"/public/", "/public/about.html", "/public/guide.html", "/private/secret.html"}
    about = site.base + "/public/about.html"
    assert third[about].meta["content_hash"] != first[about].meta["content_hash"]
    assert third[about].meta["fetched_at"] >= first[about].meta["fetched_at"]
