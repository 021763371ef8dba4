"""sources.yaml and the `source` Param's URIs: validated into specs, refused outside the allowed roots."""

import pytest

from nightshift.settings import CONFIG_DIR, SAMPLE_STORE
from nightshift.sources.config import SourceSpec, load_sources, source_from_uri
from nightshift.sources.document_store import SourceNotAllowed

ROOTS = (str(SAMPLE_STORE), "https://docs.example.com/", "sql://docs_db", "memory://stores")


def test_the_shipped_sources_file_reads_the_sample_store_and_approved_feedback():
    samples, feedback = load_sources(CONFIG_DIR / "sources.yaml")
    assert samples.name == "samples" and samples.kind == "files"
    assert samples.settings["path"] == str(SAMPLE_STORE.resolve())
    assert (feedback.name, feedback.kind, feedback.prep) == ("feedback", "feedback", "feedback")


def test_every_kind_by_uri():
    assert source_from_uri(str(SAMPLE_STORE), ROOTS).kind == "files"
    web = source_from_uri("https://docs.example.com/guide/", ROOTS)
    assert web.kind == "web" and web.typed().url == "https://docs.example.com/guide/"
    sql = source_from_uri("sql://docs_db/articles?text=body&updated=updated_at", ROOTS).typed()
    assert (sql.conn_id, sql.table, sql.text_column, sql.updated_column) == ("docs_db", "articles", "body",
                                                                             "updated_at")
    assert source_from_uri("memory://stores/docs", ROOTS).settings == {"path": "memory://stores/docs"}


@pytest.mark.parametrize("uri", ["https://docs.example.com.evil.net/", "http://169.254.169.254/latest/",
                                 "sql://other_db/users", "s3://bucket/secrets", "/etc",
                                 "https://docs.example.comx/"])
def test_anything_outside_the_roots_is_refused(uri):
    with pytest.raises(SourceNotAllowed, match="NIGHTSHIFT_SOURCE_ROOTS"):
        source_from_uri(uri, ROOTS)


def test_bad_entries_are_named(tmp_path):
    bad = tmp_path / "sources.yaml"
    bad.write_text("sources:\n  - name: Help Centre\n    kind: web\n    url: https://x.example/\n")
    with pytest.raises(ValueError, match="source name 'Help Centre'"):
        load_sources(bad)
    bad.write_text("sources:\n  - name: site\n    kind: web\n    url: https://x.example/\n    max_pagez: 3\n")
    with pytest.raises(ValueError, match="source site: .*max_pagez"):
        load_sources(bad)
    bad.write_text("sources:\n  - name: db\n    kind: sql\n    conn_id: x\n    table: 'a; drop'\n")
    with pytest.raises(ValueError, match="source db: .*identifiers"):
        load_sources(bad)
    bad.write_text("sources:\n  - {name: a, kind: ftp, path: x}\n")
    with pytest.raises(ValueError, match="kind must be one of"):
        load_sources(bad)
    bad.write_text("sources:\n  - {name: a, kind: files, path: x}\n  - {name: a, kind: files, path: y}\n")
    with pytest.raises(ValueError, match="unique"):
        load_sources(bad)


def test_specs_round_trip_through_xcom():
    spec = SourceSpec("site", "web", {"url": "https://docs.example.com/", "max_pages": 3})
    assert SourceSpec.from_dict(spec.to_dict()) == spec


def test_a_source_names_its_preparation_profile_and_keeps_it_through_xcom(tmp_path):
    (tmp_path / "sources.yaml").write_text(
        "sources:\n  - {name: manual, kind: files, path: docs, prep: docs}\n  - {name: blog, kind: files, path: b}\n")
    manual, blog = load_sources(tmp_path / "sources.yaml")
    assert (manual.prep, manual.settings, blog.prep) == ("docs", {"path": str(tmp_path / "docs")}, None)
    assert SourceSpec.from_dict(manual.to_dict()) == manual
    assert source_from_uri(str(SAMPLE_STORE), ROOTS).prep is None  # the one-off source: the default profile
    with pytest.raises(ValueError, match="source manual: prep must name a preparation profile"):
        SourceSpec(name="manual", kind="files", settings={"path": "x"}, prep="Docs Profile")
