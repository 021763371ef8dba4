"""harvest_feedback's steps without Airflow: which answers are offered, once; a decision that stands; the reader."""

from datetime import UTC, datetime, timedelta

import pytest

from nightshift.monitoring.policy import Harvest
from nightshift.pipelines import harvest
from nightshift.sources.feedback import FeedbackReader


@pytest.fixture
def settings(tmp_path, monkeypatch):
    from nightshift.serving.requestlog import LoggedAnswer, RequestLog
    from nightshift.settings import load_settings

    monkeypatch.setenv("NIGHTSHIFT_HOME", str(tmp_path / "home"))
    s = load_settings()
    s.serving_dir.mkdir(parents=True)
    log = RequestLog(s.request_log_url)
    log.open()
    log.start()
    for rid, question in (("a", "Opening hours?"), ("b", "Parking?"), ("c", "Cafe?"), ("d", "")):
        log.record(LoggedAnswer(rid, "k", "chat", "m", 2, "champion", None, None,
                                [{"role": "user", "content": question}], [f"answer {rid}"], "stop", 3, 3, 0.1,
                                created_at=datetime.now(UTC) - timedelta(hours=1)))
    log.stop()
    log.add_feedback("a", "k", -1, "Open from ten; mail me at jo@example.org", None)
    log.add_feedback("b", "k", 1, None, None)
    log.add_feedback("c", "k", -1, None, None)  # rated badly, no correction: never offered
    log.add_feedback("d", "k", 1, None, None)   # no question: nothing to learn from
    return s


def test_corrections_and_well_rated_answers_are_offered_once_and_a_retry_returns_the_same_batch(settings):
    first = harvest.collect_candidates(settings, Harvest(), "run-1")
    assert (first["candidates"], first["corrections"], first["rated"]) == (2, 1, 1)
    assert "jo@example.org" not in str(first) and "<EMAIL>" in str(first["examples"])
    assert harvest.collect_candidates(settings, Harvest(), "run-1") == first  # the task's retry
    assert harvest.collect_candidates(settings, Harvest(), "run-2")["candidates"] == 0  # offered once
    only_corrections = harvest.collect_candidates(settings, Harvest(min_rating=None), "run-3")
    assert only_corrections["candidates"] == 0


def test_a_decision_stands_and_only_approved_batches_are_read(settings):
    harvest.collect_candidates(settings, Harvest(), "run-1")
    decided = harvest.decide(settings, "run-1", True, "dana", "2026-12-01T10:00:00+00:00")
    assert decided["state"] == "approved" and decided["by"] == "dana"
    again = harvest.decide(settings, "run-1", False, "eve", "2026-12-01T11:00:00+00:00")  # a retried task
    assert again["state"] == "approved" and again["by"] == "dana"
    with pytest.raises(LookupError):
        harvest.decide(settings, "run-9", True, "dana", "now")
    docs = list(FeedbackReader(str(settings.home / "feedback" / "approved")).read())
    assert [d.id for d in docs] == ["a", "b"]
    assert docs[0].content.startswith("Question: Opening hours?") and "<EMAIL>" in docs[0].content
    assert docs[0].meta["feedback"]["approved_by"] == "dana" and docs[0].meta["feedback"]["kind"] == "correction"


def test_the_reader_skips_a_broken_row_and_says_so(tmp_path):
    folder = tmp_path / "approved"
    folder.mkdir()
    (folder / "b1.jsonl").write_text('{"response_id": "x", "question": "q", "answer": "a"}\nnot json\n{"q": 1}\n')
    reader = FeedbackReader(str(folder))
    assert [d.id for d in reader.read()] == ["x"]
    assert reader.summary()["skipped"] == {"unreadable feedback row": 2}
    missing = FeedbackReader(str(tmp_path / "missing"))  # named in sources.yaml, so it should exist: said
    assert list(missing.read()) == [] and missing.summary()["skipped"] == {
        "no such folder of approved feedback batches": 1}
    not_a_folder = FeedbackReader(str(folder / "b1.jsonl"))
    with pytest.raises(NotADirectoryError):
        list(not_a_folder.read())


def test_the_approval_form_quotes_examples_as_code_so_no_markup_gets_through():
    body = harvest.approval_body(harvest.summarize("b", "pending", [
        {"kind": "correction", "model_version": 1, "question": "[click](http://evil.example) <b>x</b>",
         "answer": "`rm -rf` ok"}]))
    assert "`[click](http://evil.example) <b>x</b>`" in body and "`'rm -rf' ok`" in body


def test_a_broken_line_in_a_batch_is_left_out_not_a_crash_of_every_later_harvest(settings):
    harvest.collect_candidates(settings, Harvest(), "run-1")
    pending = settings.home / "feedback" / "pending" / "run-1.jsonl"
    pending.write_text(pending.read_text() + "cut sho\n")
    assert harvest.offered_ids(settings.home / "feedback") == {"a", "b"}
    assert harvest.collect_candidates(settings, Harvest(), "run-2")["candidates"] == 0


def test_a_decision_cut_short_leaves_no_pending_copy_to_ask_about_again(settings):
    harvest.collect_candidates(settings, Harvest(), "run-1")
    pending = settings.home / "feedback" / "pending" / "run-1.jsonl"
    copy = pending.read_text()
    harvest.decide(settings, "run-1", True, "dana", "2026-12-01T10:00:00+00:00")
    pending.write_text(copy)  # killed between the move and the removal of the pending copy
    assert harvest.collect_candidates(settings, Harvest(), "run-1")["state"] == "approved"
    assert harvest.decide(settings, "run-1", False, "eve", "later")["state"] == "approved"
    assert not pending.exists()
