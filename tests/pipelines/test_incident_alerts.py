"""Checks outside monitor_model (a drifting corpus, a rejected candidate) alert as incidents."""

from nightshift.alerts.channels import Alert
from nightshift.pipelines.incidents import as_incident


def test_a_check_that_keeps_failing_alerts_once_and_resolves_once(tmp_path, monkeypatch):
    from nightshift.settings import load_settings

    monkeypatch.setenv("NIGHTSHIFT_HOME", str(tmp_path / "home"))
    settings = load_settings()
    sent: list[Alert] = []
    drift = Alert("corpus drift (drift) in chars", "beyond drift.yaml's thresholds", severity="warning",
                  dag_id="ingest_corpus", run_id="night-1", task_id="profile_corpus", report_url="http://r/1")
    passing = Alert("corpus drift", "", dag_id="ingest_corpus", run_id="night-3", task_id="profile_corpus",
                    report_url="http://r/3")

    assert as_incident(settings, "corpus_drift", "corpus", drift, passing, "ingest_corpus/night-1", sent.append) \
        == "opened"
    assert as_incident(settings, "corpus_drift", "corpus", drift, passing, "ingest_corpus/night-1", sent.append) \
        == ""  # a retried task
    assert as_incident(settings, "corpus_drift", "corpus", drift, passing, "ingest_corpus/night-2", sent.append) \
        == ""  # the next night, inside incidents.repeat_hours
    assert as_incident(settings, "corpus_drift", "corpus", None, passing, "ingest_corpus/night-3", sent.append) \
        == "resolved"
    assert as_incident(settings, "corpus_drift", "corpus", None, passing, "ingest_corpus/night-4", sent.append) == ""
    assert [a.title for a in sent] == ["corpus drift (drift) in chars", "resolved: corpus drift (drift) in chars"]
    assert sent[0].report_url == "http://r/1" and sent[0].severity == "warning"
    assert sent[1].report_url == "http://r/3" and sent[1].severity == "info" and sent[1].run_id == "night-3"
    assert sent[0].details["kind"] == "opened" and sent[1].details["kind"] == "resolved"
