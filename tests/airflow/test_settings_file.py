import pytest

from conftest import REPO
from nightshift.airflow.settings_file import apply_settings_file, read_settings_file


def test_repo_settings_file_applies_and_reapplying_changes_nothing(airflow_db):
    from airflow.models import Connection, Pool, Variable
    from airflow.utils.session import create_session

    first = apply_settings_file(REPO / "airflow_settings.yaml")  # the fixture applied it once already
    again = apply_settings_file(REPO / "airflow_settings.yaml")
    assert first.changed == again.changed == 0
    with create_session() as session:
        conns = session.query(Connection).filter(Connection.conn_id == "nightshift_alerts").all()
        assert len(conns) == 1 and conns[0].conn_type == "fs"
        assert conns[0].extra_dejson == {"path": "alerts/alerts.jsonl"}
        assert session.query(Pool).filter(Pool.pool == "training").one().slots == 1
        assert session.query(Variable).filter(Variable.key == "nightshift_environment").count() == 1


def test_changed_values_are_updated_in_place(airflow_db, tmp_path):
    from airflow.models import Connection, Pool
    from airflow.utils.session import create_session

    path = tmp_path / "settings.yaml"
    path.write_text(
        "airflow:\n"
        "  connections:\n"
        "    - {conn_id: t_conn, conn_type: http, conn_host: a.example, conn_password: s1, conn_extra: {k: 1}}\n"
        "  pools:\n"
        "    - {pool_name: t_pool, pool_slot: 2, pool_description: d}\n"
    )
    assert apply_settings_file(path).changed == 2
    path.write_text(path.read_text().replace("a.example", "b.example").replace("s1", "s2")
                    .replace("{k: 1}", "{k: 2}").replace("pool_slot: 2", "pool_slot: 3"))
    assert apply_settings_file(path).changed == 4
    assert apply_settings_file(path).changed == 0
    with create_session() as session:
        conn = session.query(Connection).filter(Connection.conn_id == "t_conn").one()
        assert (conn.host, conn.password, conn.extra_dejson) == ("b.example", "s2", {"k": 2})
        assert conn.is_encrypted and conn.is_extra_encrypted  # the installation's Fernet key is in use
        assert session.query(Pool).filter(Pool.pool == "t_pool").one().slots == 3


def test_malformed_entries_are_rejected(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("airflow:\n  pools:\n    - {pool_name: p, pool_slot: many}\n")
    with pytest.raises(ValueError, match="integer pool_slot"):
        read_settings_file(path)
