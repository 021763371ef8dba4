"""ingest_corpus against a hostile website (tests/sources/hostile_site.py), three nights.

Night one: a gzip bomb, a server that drips bytes, links, redirects and sitemaps pointing at another service
on the same host, pages carrying a per-request nonce. Nothing off-scope is requested, memory stays small and
the crawl ends within its wall budget. Night two: robots.txt answers 503, so the site is not crawled; its
pages come from the crawl state and the corpus, hence the version, is night one's. Night three: the site is
back and unchanged but for its nonces: still no new version.
"""

import json
import resource

import pytest
import yaml

from cli_helpers import fresh, run
from conftest import REPO
from nightshift.settings import SAMPLE_STORE
from sources.hostile_site import HostileSite

pytestmark = pytest.mark.e2e

BUDGET_S = 4.0
BOMB_MIB = 1024


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _site_report(settings) -> dict:
    reports = (settings.work_dir / "ingest_corpus").glob("*/sources/hostile/report.json")
    return json.loads(max(reports, key=lambda p: p.stat().st_mtime).read_text())


def test_a_hostile_site_is_crawled_in_scope_in_budget_and_makes_no_version_for_nothing(tmp_path, monkeypatch,
                                                                                       airflow_db):
    from nightshift.settings import load_settings
    from nightshift.stores import dataset_repository

    monkeypatch.setenv("NIGHTSHIFT_HOME", str(tmp_path / "home"))
    settings = load_settings()
    dataset_repository(settings).ensure()

    with HostileSite(bomb_mib=BOMB_MIB) as site:
        sources = tmp_path / "sources.yaml"
        sources.write_text(yaml.safe_dump({"sources": [
            {"name": "samples", "kind": "files", "path": str(SAMPLE_STORE)},
            {"name": "hostile", "kind": "web", "url": site.base + "/public/", "max_pages": 20, "max_depth": 3,
             "timeout_s": 2, "max_seconds": BUDGET_S, "retries": 1, "backoff_s": 0.1},
        ]}))
        monkeypatch.setenv("NIGHTSHIFT_SOURCES_FILE", str(sources))
        monkeypatch.setenv("NIGHTSHIFT_PREP_RECIPE", str(REPO / "tests" / "e2e" / "prep_recipes" / "short.yaml"))

        # Night one: every trap at once.
        before = _peak_rss_mib()
        first, tasks = run(fresh("ingest_corpus"), {})
        grown = _peak_rss_mib() - before
        assert first.state == "success", {t: r.state for t, r in tasks.items()}
        assert tasks["merge_sources"].value["failed"] == []
        crawl = _site_report(settings)["details"]
        print(f"night one: crawl {crawl['seconds']:.2f}s against max_seconds {BUDGET_S:g}; peak RSS grew "
              f"{grown:.0f} MiB over the first run, imports included (the bomb decodes to {BOMB_MIB} MiB)")
        assert site.requested("other") == []  # links, a 302, sitemaps and sitemap entries to another port
        assert "/public/bomb.html" in site.requested() and "/public/drip.html" in site.requested()
        assert crawl["skipped"]["too large"] == 1 and crawl["skipped"]["out of scope"] >= 5
        assert crawl["seconds"] <= BUDGET_S + 1.0 and crawl["budget_hits"] == {"wall time": 1}
        # Decoded whole, the bomb alone would add twice its size (the decoded chunk and the body it joins).
        assert grown < BOMB_MIB
        documents = crawl["documents"]
        assert documents >= 5
        v1 = tasks["version_dataset"].value
        assert v1["created"]

        # Night two: robots.txt answers 503. Not tonight: the pages come from the state; no new version.
        site.robots_status = 503
        site.requests.clear()
        second, tasks = run(fresh("ingest_corpus"), {})
        assert second.state == "success", {t: r.state for t, r in tasks.items()}
        crawl = _site_report(settings)["details"]
        assert site.requested() == ["/robots.txt", "/robots.txt"] and site.requested("other") == []
        assert crawl["reused"] == documents and crawl["documents"] == documents
        assert tasks["version_dataset"].value["tag"] == v1["tag"] and not tasks["version_dataset"].value["created"]

        # Night three: back, unchanged but for the nonces (fetched and extracted again): no new version.
        site.robots_status = 200
        site.requests.clear()
        before = _peak_rss_mib()
        third, tasks = run(fresh("ingest_corpus"), {})
        grown = _peak_rss_mib() - before
        assert third.state == "success", {t: r.state for t, r in tasks.items()}
        crawl = _site_report(settings)["details"]
        print(f"night three: crawl {crawl['seconds']:.2f}s; peak RSS grew {grown:.0f} MiB (bomb fetched again)")
        assert crawl["skipped"]["too large"] == 1 and grown < 64
        assert "/public/nonce.html" in site.requested() and site.requested("other") == []
        assert crawl["seconds"] <= BUDGET_S + 1.0
        assert tasks["version_dataset"].value["tag"] == v1["tag"] and not tasks["version_dataset"].value["created"]
    assert dataset_repository(settings).versions() == [v1["tag"]]
