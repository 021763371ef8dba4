"""One lease per registered model, so that moves of its aliases (promotion, rollout, rollback) happen one at a time.

MLflow's registry has no compare-and-set for an alias: a move reads the alias, checks that it still names the
version the move was decided against, and writes it, all while holding this lease. The kind of lease follows
the lease URI (NIGHTSHIFT_LEASE_DB; unset: the tracking URI):

- ``postgresql://...``: a session-level ``pg_advisory_lock`` on a connection of its own, keyed by the model's
  name; PostgreSQL releases it when that connection ends, also when the process dies. The session turns off
  the server's idle timeouts for itself and keeps TCP keepalives on, since a session ended by the server takes
  the lock with it; ``Lease.check()`` (called just before the alias is written) raises LeaseLost if that
  happened anyway. Connect to PostgreSQL itself or through a pooler in session mode: a transaction-mode pooler
  (pgbouncer's ``pool_mode = transaction``) hands each statement a server session of its own, so a
  session-level lock is neither held nor released where it was taken; it is not supported for the lease.
- ``sqlite:///path``: an exclusive ``flock`` on ``<path>.<model>.lease`` beside the database; the kernel
  releases it when the process dies.
- anything else (an MLflow server over HTTP with no NIGHTSHIFT_LEASE_DB): an ``flock`` on
  ``<lease_dir>/<model>.lease``. This serializes the moves made on one machine, from one ``NIGHTSHIFT_HOME``, only
  (the lease directory is ``<home>/locks``): installations that share a tracking server set NIGHTSHIFT_LEASE_DB
  to one PostgreSQL database (the production profile does).

A lease file is a plain file that nightshift creates (mode 660: users who share a group can share it); it is
opened without following a symbolic link, and holds one line saying who holds, or last held, the lease.

Not fasteners: its InterProcessLock takes POSIX record locks (``lockf``), which belong to the process, so two
threads of one worker would both hold it; an ``flock`` belongs to the open file, so they exclude each other.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import logging
import os
import re
import stat
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from nightshift.registry.mlflow_registry import ModelRegistry

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 60.0
POLL_S = 0.05
MAX_NAME_CHARS = 100
"""A model name longer than this is cut and hashed in the lease file's name (a file name holds 255 bytes)."""
# libpq's TCP keepalives (psycopg 2 and 3): a dead network path ends the lease session within about a minute
# instead of leaving a half-open connection whose lock the server may already have dropped.
KEEPALIVES = {"keepalives": 1, "keepalives_idle": 30, "keepalives_interval": 10, "keepalives_count": 3}


class LeaseTimeout(RuntimeError):
    """Another move of the same registered model held its lease for longer than the caller would wait."""


class LeaseLost(RuntimeError):
    """The lease ended while its holder was still moving an alias; nothing was moved since, and a retry is safe."""


class LeaseUnavailable(RuntimeError):
    """The lease cannot be taken where it lives (a file that cannot be opened); the message says what to change."""


class Lease:
    """A held release lease; ``check()`` raises LeaseLost when it is held no longer."""

    def __init__(self, check: Callable[[], None]) -> None:
        self._check = check

    def check(self) -> None:
        """Return None while the lease is still held; raise LeaseLost otherwise."""
        self._check()


def _printable(text: str, limit: int = 120) -> str:
    """Return ``text`` cut to ``limit`` characters with anything but plain printable ASCII replaced."""
    return re.sub(r"[^\x20-\x7e]", "?", text)[:limit]


def advisory_key(model_name: str) -> int:
    """Return the signed 64-bit PostgreSQL advisory lock key of a registered model."""
    digest = hashlib.sha256(f"nightshift.release/{model_name}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def lease_file(registry: ModelRegistry) -> Path | None:
    """Return the lock file of a registered model, or None when PostgreSQL's advisory locks are used."""
    from sqlalchemy.engine import make_url

    uri = registry.lease_uri
    scheme = uri.split(":", 1)[0].lower()
    if scheme.startswith("postgresql"):
        return None
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", registry.model_name)
    # Two names that differ only in replaced characters, or only after the cut, get two files.
    if safe != registry.model_name or len(safe) > MAX_NAME_CHARS:
        safe = safe[:MAX_NAME_CHARS] + "-" + hashlib.sha256(registry.model_name.encode()).hexdigest()[:8]
    if scheme == "sqlite":
        database = make_url(uri).database
        if database and database != ":memory:":
            db = Path(database).expanduser().resolve()
            return db.with_name(f"{db.name}.{safe}.lease")
    folder = registry.lease_dir
    if folder is None:
        from nightshift.settings import load_settings

        folder = load_settings().home / "locks"
    return Path(folder) / f"{safe}.lease"


@contextmanager
def registry_lease(registry: ModelRegistry, holder: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> Iterator[Lease]:
    """Hold the model's release lease for the ``with`` block and yield it; raise LeaseTimeout after ``timeout_s``."""
    path = lease_file(registry)
    lease = _pg_lease(registry, holder, timeout_s) if path is None else _file_lease(path, holder, timeout_s,
                                                                                     registry.model_name)
    with lease as held:
        yield held


def _open_lease_file(path: Path, model_name: str) -> int:
    """Return a descriptor of the plain lease file at ``path``, created if missing; never follows a link."""
    what = f"the release lease of {model_name}'s aliases ({path})"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o660)
    except PermissionError as exc:
        raise LeaseUnavailable(
            f"cannot open {what}: {exc.strerror}. Every user that runs finetune_model, rollout_model or "
            f"rollback_model must be able to read and write it and to create files in {path.parent}: give them a "
            "common group and make the file group-writable (chmod 660)") from None
    except OSError as exc:
        if exc.errno != errno.ELOOP:
            raise
        raise LeaseUnavailable(
            f"{what} is a symbolic link; the lease must be a plain file that nightshift creates itself: remove the "
            "link (nothing is lost, the file holds only who last held the lease)") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise LeaseUnavailable(f"{what} is not a plain file: remove it, nightshift creates the file itself")
    return fd


@contextmanager
def _file_lease(path: Path, holder: str, timeout_s: float, model_name: str) -> Iterator[Lease]:
    fd = _open_lease_file(path, model_name)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    held_by = os.pread(fd, 1000, 0).decode(errors="replace").strip() or "unknown"
                    raise LeaseTimeout(
                        f"another move of {model_name}'s aliases has held its release lease ({path}) for more than "
                        f"{timeout_s:g} s; held by: {_printable(held_by, 300)}. Check that this process is still "
                        "running (a dead one releases the lease by itself), then retry the task") from None
                time.sleep(POLL_S)
        # Who holds it, for the message of whoever has to wait; written only by the holder, into the plain file
        # opened above (never through a link), and left in place on release: "who held it last".
        line = (f"{_printable(holder)} (pid {os.getpid()} on {os.uname().nodename}, since "
                f"{datetime.now(UTC).isoformat(timespec='seconds')})\n").encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, line, 0)
        opened = os.fstat(fd)

        def check() -> None:
            # An flock lasts as long as the open file; it guards nothing once the path names another file.
            try:
                now = os.stat(path, follow_symlinks=False)
            except FileNotFoundError:
                now = None
            if now is None or (now.st_dev, now.st_ino) != (opened.st_dev, opened.st_ino):
                raise LeaseLost(f"the release lease file of {model_name}'s aliases ({path}) was removed or replaced "
                                "while this move held it, so another move may have taken it: nothing was moved; "
                                "the task can be retried. Leave the lease files alone")

        try:
            yield Lease(check)
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


@contextmanager
def _pg_lease(registry: ModelRegistry, holder: str, timeout_s: float) -> Iterator[Lease]:
    import sqlalchemy as sa
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import OperationalError, SQLAlchemyError
    from sqlalchemy.pool import NullPool

    key = advisory_key(registry.model_name)
    # Shown in pg_stat_activity, so that whoever waits can find who holds the lease.
    connect_args: dict[str, object] = {"application_name": f"nightshift lease: {_printable(holder, 40)}"}
    if make_url(registry.lease_uri).get_driver_name() in ("psycopg2", "psycopg"):
        connect_args.update(KEEPALIVES)
    engine = sa.create_engine(registry.lease_uri, poolclass=NullPool, isolation_level="AUTOCOMMIT",
                              connect_args=connect_args)
    lock = {"hi": (key >> 32) & 0xFFFFFFFF, "lo": key & 0xFFFFFFFF}
    try:
        with engine.connect() as conn:
            # A server that ends idle sessions would end this one, and the lock with it, while the move runs.
            # Through pg_settings: PostgreSQL before 14 has no idle_session_timeout.
            conn.execute(sa.text(
                "SELECT set_config(name, '0', false) FROM pg_settings "
                "WHERE name IN ('idle_session_timeout', 'idle_in_transaction_session_timeout')"))
            conn.execute(sa.text(f"SET lock_timeout = '{max(1, int(timeout_s * 1000))}ms'"))
            try:
                conn.execute(sa.text("SELECT pg_advisory_lock(:key)"), {"key": key})
            except OperationalError as exc:
                code = getattr(exc.orig, "sqlstate", None) or getattr(exc.orig, "pgcode", None)  # psycopg 3 or 2
                if code != "55P03":  # lock_not_available
                    raise
                raise LeaseTimeout(
                    f"another move of {registry.model_name}'s aliases has held its release lease (PostgreSQL "
                    f"advisory lock {key}) for more than {timeout_s:g} s; held by: {_pg_holder(conn, key)}. Check "
                    "that this process is still running (PostgreSQL releases the lease when its connection ends), "
                    "then retry the task") from None
            conn.execute(sa.text("SET lock_timeout = 0"))

            def check() -> None:
                try:
                    held = conn.execute(sa.text(
                        "SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid() AND granted "
                        "AND classid = :hi AND objid = :lo AND objsubid = 1"), lock).first() is not None
                except SQLAlchemyError:  # the connection is gone, and the lock with it
                    held = False
                if not held:
                    raise LeaseLost(
                        f"the PostgreSQL session holding the release lease of {registry.model_name}'s aliases "
                        f"(advisory lock {key}) ended while this move ran (a server or pooler timeout, or the "
                        "network), so another move may have taken the lease: nothing was moved; the task can be "
                        "retried. If it happens again, connect to PostgreSQL directly or through a session-mode "
                        "pooler, and check the server's timeouts for idle sessions")

            try:
                yield Lease(check)
            finally:
                _pg_unlock(conn, key)
    finally:
        engine.dispose()


def _pg_unlock(conn, key: int) -> None:
    """Release the advisory lock ``key``; log, never raise, when the session is already gone (and the lock too)."""
    import sqlalchemy as sa
    from sqlalchemy.exc import SQLAlchemyError

    try:
        released = conn.execute(sa.text("SELECT pg_advisory_unlock(:key)"), {"key": key}).scalar()
    except SQLAlchemyError as exc:
        # The server released the lock with the session: raising here would fail a move that is already done.
        log.warning("the release lease session (advisory lock %d) had ended before its unlock (%s): the lock went "
                    "with it", key, type(getattr(exc, "orig", None) or exc).__name__)
        return
    if not released:
        log.warning("advisory lock %d was no longer held by this session at its unlock", key)


def _pg_holder(conn, key: int) -> str:
    """Return the application name and pid of the session holding the advisory lock ``key``."""
    import sqlalchemy as sa

    row = conn.execute(sa.text(
        "SELECT a.application_name, a.pid, a.client_addr FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
        "WHERE l.locktype = 'advisory' AND l.granted AND l.classid = :hi AND l.objid = :lo AND l.objsubid = 1"),
        {"hi": (key >> 32) & 0xFFFFFFFF, "lo": key & 0xFFFFFFFF}).first()
    if row is None:
        return "nobody any more"
    return _printable(f"{row[0] or 'unnamed session'} (server pid {row[1]}, client {row[2] or 'local socket'})", 300)
