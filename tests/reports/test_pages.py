"""Report pages render from whatever parts a run has published so far, and escape what came from outside."""

import re

from nightshift.reports import charts
from nightshift.reports.pages import render_overview, render_run
from nightshift.reports.store import ReportStore

HOSTILE = '<script>alert("x")</script>'


def test_a_run_page_grows_as_steps_publish_and_escapes_source_names(tmp_path):
    store = ReportStore(tmp_path)
    page = render_run(store, "ingest_corpus", "manual__2026-11-30T01:00:00+00:00")
    assert "Not collected yet" in page.read_text() and page.parent.name == "manual__2026-11-30T01_00_00_00_00"
    folder = page.parent
    store.write_json(folder, "collection.json", {"documents": 3, "skipped": 1, "failed": [], "sources": {
        HOSTILE: {"kind": "web", "documents": 3, "skipped": 1, "skip_reasons": {"robots": 1}}}})
    html = render_run(store, "ingest_corpus", "manual__2026-11-30T01:00:00+00:00").read_text()
    assert HOSTILE not in html and "&lt;script&gt;" in html and "robots: 1" in html
    assert "Not prepared yet" in html and "Not profiled yet" in html


def test_the_overview_lists_versions_models_and_alerts(tmp_path):
    store = ReportStore(tmp_path)
    store.record("datasets", "corpus-v0001", {"tag": "corpus-v0001", "documents": 16, "drift": "no_drift",
                                               "report": "runs/ingest_corpus/a"})
    store.record("datasets", "corpus-v0001", {"quality": "passed"})  # merged, not replaced
    store.record("models", "2", {"version": 2, "dataset_tag": "corpus-v0001", "gate": "passed", "perplexity": 3.5,
                                 "golden_perplexity": 9.25})
    store.add_alert({"title": "corpus drift (drift) in chars", "severity": "warning", "dag_id": "ingest_corpus",
                     "task_id": "profile_corpus", "created_at": "2026-11-30T01:00:00+00:00",
                     "report": "runs/ingest_corpus/a"})
    html = render_overview(store, champion=2).read_text()
    assert "corpus-v0001" in html and "no_drift" in html and "passed" in html
    assert "v2" in html and "champion" in html and "3.500 / 9.250" in html
    assert "corpus drift (drift) in chars" in html and 'href="runs/ingest_corpus/a/index.html"' in html


def test_alerts_kept_are_bounded(tmp_path):
    store = ReportStore(tmp_path)
    for i in range(210):
        store.add_alert({"title": f"alert {i}"})
    assert len(store.read_json(tmp_path / "alerts.json")) == 200
    assert store.alerts(limit=1)[0]["title"] == "alert 209"


def test_charts_are_self_contained_svg(tmp_path):
    files = [
        charts.histogram_svg({"edges": [0, 1, 2], "counts": [3, 4]}, "chars", "chars", tmp_path / "h.svg"),
        charts.shares_svg([{"value": "en", "count": 3}], 3, "language", tmp_path / "s.svg"),
        charts.drift_svg({"kind": "numeric", "edges": [0, 1, 2], "target": [0.2, 0.8], "reference": [0.5, 0.5]},
                         "chars", "new", "old", tmp_path / "d.svg"),
        charts.loss_svg([3.0, 2.5, 2.0], "loss", tmp_path / "l.svg"),
    ]
    for path in files:
        text = path.read_text()
        assert text.lstrip().startswith("<?xml") and "<svg" in text
        # XML namespaces name, they are never fetched; nothing here is loaded from anywhere.
        assert not re.search(r'(href|src)="https?:|url\((?!#)|<script|<image|@import|<text', text), path.name
