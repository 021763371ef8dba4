"""Environment settings: where state lives and how the platform reaches its engines.

Every value has a safe local default, so one machine runs with no configuration at all; each can be
overridden with a ``NIGHTSHIFT_*`` environment variable where a deployment differs.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
INCLUDE_DIR = PACKAGE_DIR.parent
# A checkout reads include/configs and include/samples; an installed wheel carries them as package data.
_IN_CHECKOUT = (INCLUDE_DIR / "configs").is_dir()
CONFIG_DIR = INCLUDE_DIR / "configs" if _IN_CHECKOUT else PACKAGE_DIR / "resources" / "configs"
SAMPLES_DIR = INCLUDE_DIR / "samples" if _IN_CHECKOUT else PACKAGE_DIR / "resources" / "samples"
SAMPLE_STORE = SAMPLES_DIR / "store"
GOLDEN_QA = SAMPLES_DIR / "golden_qa.jsonl"
DEFAULT_FOUNDATION_MODEL = "SmolLM2-135M-Instruct"
PROFILES = ("embedded", "production", "production-local")
"""Deployment profiles (docs/deploy.md)."""
MAX_TRAIN_RANKS = 1024
"""Most ranks per node a recipe or NIGHTSHIFT_TRAIN_RANKS may ask for."""
MAX_POD_GPUS = 64
"""Most GPUs one trainer pod may request (NIGHTSHIFT_K8S_GPUS); today's nodes hold 8 or 16."""


def repo_root() -> Path | None:
    """Return the checkout that holds this package, or None when installed elsewhere."""
    root = INCLUDE_DIR.parent
    return root if (root / "dags").is_dir() else None


def _default_home() -> Path:
    root = repo_root()
    return root / "var" if root else Path.home() / ".nightshift"


def _env_json(name: str, default):
    raw = os.environ.get(name)
    if not raw:
        return default
    try:
        return json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{name} must be JSON, got {raw!r}: {exc}") from exc


def _env_number(name: str, default, parse=int):
    raw = os.environ.get(name)
    if not raw:
        return default
    try:
        return parse(raw)
    except ValueError as exc:
        kind = "an integer" if parse is int else "a number"
        raise ValueError(f"{name} must be {kind}, got {raw!r}") from exc


def _env_int(name: str, default: int) -> int:
    return _env_number(name, default, int)


def _env_float(name: str, default: float) -> float:
    return _env_number(name, default, float)


def _env_bool(name: str, default: bool) -> bool:
    raw = os.environ.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{name} must be true or false, got {raw!r}")


def default_parallelism() -> int:
    """Return how many tasks Airflow runs at once here: one per core, at least two."""
    return max(2, os.cpu_count() or 2)


@dataclass(frozen=True)
class KubernetesSettings:
    """Where and how the trainer pod runs when the backend is ``kubernetes``."""

    namespace: str = "nightshift"
    """Namespace of the trainer pods."""
    image: str = "nightshift-trainer:latest"
    """Image built from docker/trainer/."""
    conn_id: str = "kubernetes_default"
    """Airflow connection holding the cluster credentials."""
    cpu: str = "8"
    """CPU request and limit of each trainer pod (NIGHTSHIFT_K8S_CPU): data loading and the optimizer's offload."""
    memory: str = "64Gi"
    """Memory request and limit of each trainer pod (NIGHTSHIFT_K8S_MEMORY); ZeRO offload keeps states here."""
    gpus: int = 1
    """GPUs of each trainer pod when the recipe says ``ranks: auto`` (NIGHTSHIFT_K8S_GPUS): one rank per GPU."""
    shm_size: str = "16Gi"
    """Size of the memory-backed /dev/shm (NCCL and data loaders need more than the 64 MiB default)."""
    state_pvc: str = "nightshift-state"
    """PersistentVolumeClaim holding NIGHTSHIFT_HOME, shared with the Airflow workers and mounted at the same path."""
    node_selector: dict = field(default_factory=lambda: {"nvidia.com/gpu.present": "true"})
    """Labels a node must carry to run a trainer pod: GPU nodes (NIGHTSHIFT_K8S_NODE_SELECTOR, JSON)."""
    tolerations: list = field(
        default_factory=lambda: [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    )
    """Taints of GPU nodes the trainer pods tolerate (NIGHTSHIFT_K8S_TOLERATIONS, JSON)."""



@dataclass(frozen=True)
class ServingLimits:
    """Bounds of the endpoint (``serving/``); each field is set by a ``NIGHTSHIFT_SERVE_*`` variable."""

    max_body_bytes: int = 1024 * 1024
    """Largest request body accepted (413 above it). 1 MiB holds about 250,000 tokens of text."""
    max_concurrent: int = 8
    """Requests generating at once, decoded together in one continuous batch; more wait in the queue."""
    max_queue: int = 32
    """Requests waiting for a slot; more get 429 with Retry-After."""
    request_timeout_s: float = 120.0
    """Wall time a request may take, waiting and generating; generation stops when it runs out."""
    memory_budget_mb: int = 4096
    """Resident memory the process may use: runtime, the model (twice, during a swap) and in-flight requests."""
    max_model_len: int | None = None
    """Upper bound on the context window (prompt + completion tokens); default: the model's own window."""
    default_max_tokens: int = 256
    """Completion length when a request sets no max_tokens (bounded by what remains of the window)."""
    prefill_chunk: int = 256
    """Prompt tokens run per scheduler step (a scoring prompt's count four times); bounds the attention memory of
    long prompts and how long a running stream waits while one is read (0.52 s for SmolLM2 on 2 CPU cores while a
    4,000-token scoring request was read: bench/serve.py)."""
    batch_wait_ms: float = 5.0
    """How long an idle engine waits after a request arrives for others to batch with it."""
    header_timeout_s: float = 10.0
    """Time a connection has to send a request's headers, then its body, and the longest a client may leave its
    answer unread: idle, dripping or never-reading sockets are closed after it and cannot pile up."""
    max_in_flight: int = 0
    """Requests being handled at once, probes (/livez, /healthz, /metrics) not counted; more get 503 with
    Retry-After. 0: four times (max_concurrent + max_queue), at least 64."""

    @property
    def in_flight_bound(self) -> int:
        return self.max_in_flight or max(64, 4 * (self.max_concurrent + self.max_queue))

    def __post_init__(self) -> None:
        checks = {
            "NIGHTSHIFT_SERVE_MAX_BODY_BYTES": self.max_body_bytes >= 1024,
            "NIGHTSHIFT_SERVE_MAX_CONCURRENT": self.max_concurrent >= 1,
            "NIGHTSHIFT_SERVE_MAX_QUEUE": self.max_queue >= 0,
            "NIGHTSHIFT_SERVE_TIMEOUT_S": self.request_timeout_s > 0,
            "NIGHTSHIFT_SERVE_MEMORY_MB": self.memory_budget_mb >= 256,
            "NIGHTSHIFT_SERVE_MAX_MODEL_LEN": self.max_model_len is None or self.max_model_len >= 16,
            "NIGHTSHIFT_SERVE_DEFAULT_MAX_TOKENS": self.default_max_tokens >= 1,
            "NIGHTSHIFT_SERVE_PREFILL_CHUNK": self.prefill_chunk >= 16,
            "NIGHTSHIFT_SERVE_BATCH_WAIT_MS": 0 <= self.batch_wait_ms <= 1000,
            "NIGHTSHIFT_SERVE_HEADER_TIMEOUT_S": 0 < self.header_timeout_s <= 300,
            "NIGHTSHIFT_SERVE_MAX_IN_FLIGHT": self.max_in_flight >= 0,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"serving limits out of range: {', '.join(bad)} (see the limits table in docs/serving.md)")

@dataclass(frozen=True)
class Settings:
    """Paths and endpoints of one nightshift installation."""

    home: Path
    """Root of all local state (Airflow home, DVC data repo and remote, MLflow store, models, work)."""
    registered_model: str = "nightshift-llm"
    """Name of the model in the MLflow registry."""
    champion_alias: str = "champion"
    """Registry alias of the version in production: the endpoint serves it, promotions move it."""
    train_ranks: int | None = None
    """Ranks per node for recipes that say ``ranks: auto`` (NIGHTSHIFT_TRAIN_RANKS); unset or ``auto``: one per
    GPU, or one CPU process using every core (nightshift.training.launch.resolve_ranks)."""
    master_port: int = 29500
    """Rendezvous port of the trainer's ranks (a local attempt picks a free one of its own)."""
    alert_conn_id: str = "nightshift_alerts"
    """Airflow connection of the alert channel: SMTP, Slack, webhook (NIGHTSHIFT_ALERT_CONN_ID)."""
    tracking_uri_override: str | None = None
    """MLflow tracking URI (NIGHTSHIFT_MLFLOW_TRACKING_URI); unset: the SQLite store under NIGHTSHIFT_HOME. An
    ``http(s)://`` tracking server keeps the artifacts where it says (``--artifacts-destination``, proxied)."""
    profile: str = "embedded"
    """``embedded`` (one machine, SQLite and folders), ``production`` (the engines the settings below name) or
    ``production-local`` (nightshift starts stand-ins for them on 127.0.0.1: nightshift.engines); NIGHTSHIFT_PROFILE."""
    dvc_remote_url: str | None = None
    """The DVC remote (NIGHTSHIFT_DVC_REMOTE), e.g. ``s3://bucket/dvc``, its credentials and endpoint from the
    ``s3_conn_id`` connection; unset: the folder dvc-remote under NIGHTSHIFT_HOME."""
    data_git_remote: str | None = None
    """A git remote the data repository's commits and version tags are pushed to and fetched from
    (NIGHTSHIFT_DATA_GIT_REMOTE): installations that share it, and the DVC remote, share their dataset versions."""
    s3_conn_id: str = "nightshift_s3"
    """Airflow connection of the object storage (type aws: login, password, extra endpoint_url and region_name)."""
    train_executor: str | None = None
    """Executor of the local training task (NIGHTSHIFT_TRAIN_EXECUTOR), one of ``[core] executor``'s: with
    ``KubernetesExecutor`` beside ``CeleryExecutor`` it runs in a GPU pod of its own; unset: the default executor."""
    lease_db_override: str | None = None
    """Database whose advisory locks serialize moves of the registry's aliases (NIGHTSHIFT_LEASE_DB, PostgreSQL);
    unset: the tracking store itself when it is a database, else a lock file under NIGHTSHIFT_HOME."""
    kubernetes: KubernetesSettings = field(default_factory=KubernetesSettings)
    """Where trainer pods run on the kubernetes backend."""
    serving: ServingLimits = field(default_factory=ServingLimits)
    """Limits of the OpenAI-compatible endpoint."""
    require_api_key: bool = True
    """Whether /v1 and /metrics need an API key (NIGHTSHIFT_SERVE_REQUIRE_KEY)."""
    serving_conn_id: str = "nightshift_serving"
    """Airflow connection whose password (or extra ``api_keys``) holds keys the endpoint accepts."""
    request_log_override: str | None = None
    """Database URL of the endpoint's request log and feedback (NIGHTSHIFT_SERVE_REQUEST_LOG); ``off`` disables."""
    request_log_retention_days: float = 30.0
    """Days answers and their feedback are kept (NIGHTSHIFT_SERVE_LOG_RETENTION_DAYS)."""
    serve_upstream: str | None = None
    """Base URL (``.../v1``) of an OpenAI-compatible engine (vLLM) serving the champion (NIGHTSHIFT_SERVE_UPSTREAM);
    unset: the built-in engine generates."""
    serve_upstream_candidate: str | None = None
    """The engine serving the rollout candidate (NIGHTSHIFT_SERVE_UPSTREAM_CANDIDATE)."""
    serve_prompt: str | None = "assistant"
    """The prompt template (MLflow Prompt Registry name) the endpoint applies to chat requests, its ``production``
    version (NIGHTSHIFT_SERVE_PROMPT); ``off``: none, the chat template alone."""
    prompts_dir: Path = CONFIG_DIR / "prompts"
    """The source of the prompt templates, ``<name>.yaml`` (NIGHTSHIFT_PROMPTS_DIR)."""
    foundation_config: Path = CONFIG_DIR / "foundation.yaml"
    """The foundation-model candidates of select_foundation_model (NIGHTSHIFT_FOUNDATION_CONFIG)."""
    retrieval_config: Path = CONFIG_DIR / "retrieval.yaml"
    """Chunking, the index and retrieval-augmented answers (NIGHTSHIFT_RETRIEVAL_CONFIG)."""
    vector_store: str | None = None
    """Where the corpus indexes live (NIGHTSHIFT_VECTOR_STORE): unset, the files under ``indexes/`` of the home
    (Faiss files); a ``postgresql://`` URL, pgvector tables with an HNSW index. ingest_corpus writes and the endpoint
    reads the same store."""
    airflow_parallelism: int = field(default_factory=default_parallelism)
    """Task slots of the local Airflow (and LocalExecutor worker processes)."""
    airflow_host: str = "127.0.0.1"
    """Address the local Airflow UI and API listen on; 0.0.0.0 exposes them to the network."""
    ui_url: str = "http://localhost:8080"
    """Where people reach the Airflow UI (NIGHTSHIFT_UI_URL): the base of the report links in alerts."""
    source_roots: tuple[str, ...] = (str(SAMPLE_STORE),)
    """What the ``source`` Param may name: folders (and everything below them) and URL prefixes
    (``https://docs.example.com/``, ``sql://docs_db``, ``s3://bucket/docs``); nothing else is readable."""
    sources_file: Path = CONFIG_DIR / "sources.yaml"
    """The sources ingest_corpus collects every night (NIGHTSHIFT_SOURCES_FILE)."""
    prep_recipe: Path = CONFIG_DIR / "prep.yaml"
    """The preparation recipe prepare_corpus runs (NIGHTSHIFT_PREP_RECIPE)."""
    drift_policy: Path = CONFIG_DIR / "drift.yaml"
    """The drift policy profile_corpus applies (NIGHTSHIFT_DRIFT_POLICY)."""
    evaluation_suite: Path = CONFIG_DIR / "evaluation.yaml"
    """The evaluation suite candidate and champion run through (NIGHTSHIFT_EVALUATION_SUITE)."""
    gate_policy: Path = CONFIG_DIR / "gate.yaml"
    """The promotion gate's rules (NIGHTSHIFT_GATE_POLICY)."""
    rollout_policy: Path = CONFIG_DIR / "rollout.yaml"
    """How a candidate that passed the gate is released (NIGHTSHIFT_ROLLOUT_POLICY)."""
    monitoring_policy: Path = CONFIG_DIR / "monitoring.yaml"
    """What monitor_model watches and when it opens an incident (NIGHTSHIFT_MONITORING_POLICY)."""
    incidents_override: str | None = None
    """Database URL of the incident table (NIGHTSHIFT_INCIDENTS_DB); unset: SQLite under NIGHTSHIFT_HOME/alerts."""
    recipe_dirs: tuple[Path, ...] = ()
    """Further folders with training recipes, besides include/configs/training (the Param takes names only)."""
    task_timeout_s: int = 3600
    """execution_timeout of every task but training."""
    train_timeout_s: int = 6 * 3600
    """execution_timeout of the training tasks; the trainer's ranks are stopped with the task."""
    retry_delay_s: int = 120
    """Wait before Airflow retries a failed task."""
    retention_days: float = 7.0
    """Work folders of runs older than this are removed, and the preparation outcomes no night used for as long; the
    serving and evaluation caches keep what is in use (NIGHTSHIFT_RETENTION_DAYS)."""

    def __post_init__(self) -> None:
        if self.train_ranks is not None and not 1 <= self.train_ranks <= MAX_TRAIN_RANKS:
            raise ValueError(f"NIGHTSHIFT_TRAIN_RANKS must be auto or a number from 1 to {MAX_TRAIN_RANKS}, "
                             f"got {self.train_ranks}")
        if not 1 <= self.kubernetes.gpus <= MAX_POD_GPUS:
            raise ValueError(f"NIGHTSHIFT_K8S_GPUS must be a number from 1 to {MAX_POD_GPUS}, "
                             f"got {self.kubernetes.gpus}")
        if self.airflow_parallelism < 1:
            raise ValueError(f"NIGHTSHIFT_AIRFLOW_PARALLELISM must be at least 1, got {self.airflow_parallelism}")
        if self.task_timeout_s < 60 or self.train_timeout_s < 60:
            raise ValueError("NIGHTSHIFT_TASK_TIMEOUT_S and NIGHTSHIFT_TRAIN_TIMEOUT_S must be at least 60 seconds")
        if self.retention_days <= 0:
            raise ValueError(f"NIGHTSHIFT_RETENTION_DAYS must be positive, got {self.retention_days}")
        if self.profile not in PROFILES:
            raise ValueError(f"NIGHTSHIFT_PROFILE must be one of {', '.join(PROFILES)}, got {self.profile!r}")
        folder = self.dvc_remote_url and ":" not in self.dvc_remote_url and Path(self.dvc_remote_url).is_absolute()
        if self.dvc_remote_url and not (self.dvc_remote_url.startswith("s3://") or folder):
            raise ValueError("NIGHTSHIFT_DVC_REMOTE must be an s3://bucket/prefix URL or an absolute folder, got "
                             f"{self.dvc_remote_url.split(':', 1)[0][:20]!r}...")
        remote = self.data_git_remote
        if remote and not ("://" in remote or re.match(r"^([\w.-]+@)?[\w.-]+:", remote) or Path(remote).is_absolute()):
            raise ValueError("NIGHTSHIFT_DATA_GIT_REMOTE must be a git URL (https://, ssh://, git@host:path) or an "
                             "absolute path; a relative path would name another folder in every process")
        if self.lease_db_override and not self.lease_db_override.startswith("postgresql"):
            raise ValueError("NIGHTSHIFT_LEASE_DB must be a PostgreSQL URL (postgresql://... or postgresql+psycopg2://...;"
                             " SQLAlchemy does not read postgres://)")
        if (self.profile == "production" and self.tracking_uri.startswith(("http://", "https://"))
                and not self.lease_db_override):
            raise ValueError("NIGHTSHIFT_LEASE_DB must name a PostgreSQL database on the production profile: with a "
                             "tracking server over HTTP, moves of the champion from several workers are otherwise "
                             "serialized per home only (docs/deploy.md)")

    @cached_property
    def airflow_home(self) -> Path:
        return self.home / "airflow"

    @cached_property
    def data_repo(self) -> Path:
        return self.home / "data-repo"

    @cached_property
    def dvc_remote(self) -> str:
        """The DVC remote: an ``s3://`` URL (NIGHTSHIFT_DVC_REMOTE) or a folder (default: dvc-remote in the home)."""
        return self.dvc_remote_url or str(self.home / "dvc-remote")

    @property
    def lease_uri(self) -> str:
        """The database (or SQLite file) whose locks serialize the registry's alias moves."""
        return self.lease_db_override or self.tracking_uri

    @cached_property
    def mlflow_dir(self) -> Path:
        return self.home / "mlflow"

    @property
    def tracking_uri(self) -> str:
        return self.tracking_uri_override or f"sqlite:///{self.mlflow_dir / 'mlflow.db'}"

    @property
    def artifact_root(self) -> str | None:
        """Where new experiments keep artifacts: a folder under the home, or None for a tracking server (its own)."""
        if self.tracking_uri.startswith(("http://", "https://")):
            return None
        return (self.mlflow_dir / "artifacts").as_uri()

    @cached_property
    def models_dir(self) -> Path:
        return self.home / "models"

    @cached_property
    def work_dir(self) -> Path:
        return self.home / "work"

    @cached_property
    def cache_dir(self) -> Path:
        return self.home / "cache"

    @cached_property
    def reports_dir(self) -> Path:
        """Report pages, charts and Data Docs of every run: the only folder the UI plugin serves."""
        return self.home / "reports"

    def report_url(self, path: str = "index.html") -> str:
        """Return the URL of a page in the report folder, as served by the Airflow UI's nightshift plugin."""
        return f"{self.ui_url.rstrip('/')}/nightshift/reports/{path.lstrip('/')}"

    @cached_property
    def serving_dir(self) -> Path:
        return self.home / "serving"

    @property
    def key_file(self) -> Path:
        """Hashes of the API keys created with ``nightshift keys``."""
        return self.serving_dir / "api_keys.json"

    @property
    def incidents_url(self) -> str:
        """Where incidents are kept: NIGHTSHIFT_INCIDENTS_DB, else a SQLite file beside the alerts."""
        if self.incidents_override:
            return self.incidents_override
        return f"sqlite:///{self.home / 'alerts' / 'incidents.db'}"

    @property
    def request_log_url(self) -> str | None:
        """The request log's database: SQLite under the home unless NIGHTSHIFT_SERVE_REQUEST_LOG names one."""
        if self.request_log_override and self.request_log_override.lower() == "off":
            return None
        return self.request_log_override or f"sqlite:///{self.serving_dir / 'requests.db'}"

    @property
    def local_key_file(self) -> Path:
        """The key ``make setup`` creates for local use (mode 0600)."""
        return self.serving_dir / "local.key"

    def resolve_base_model(self, name_or_path: str) -> Path:
        """Return the checkpoint folder of a model imported under models/ (by name, or by its path there).

        Other folders are refused: the name comes from a Param, and the worker must not load (or hash, or
        hand to the trainer) whatever folder a person names.
        """
        models = self.models_dir.resolve()
        given = Path(name_or_path).expanduser()
        path = (given if given.is_absolute() else models / given).resolve()
        if not name_or_path or not path.is_relative_to(models) or path == models:
            raise ValueError(
                f"base model {name_or_path!r} is not a model under {models}: import it there (make model does for "
                f"{DEFAULT_FOUNDATION_MODEL}) and pass its folder name"
            )
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"base model {name_or_path!r} not found under {models}: run `make model` to import "
                f"{DEFAULT_FOUNDATION_MODEL}, or copy a Hugging Face checkpoint folder there"
            )
        return path


def load_settings() -> Settings:
    """Return the settings of this environment, read from NIGHTSHIFT_* variables."""
    home = Path(os.environ.get("NIGHTSHIFT_HOME") or _default_home()).expanduser().resolve()
    k8s_defaults = KubernetesSettings()
    kubernetes = KubernetesSettings(
        namespace=os.environ.get("NIGHTSHIFT_K8S_NAMESPACE", k8s_defaults.namespace),
        image=os.environ.get("NIGHTSHIFT_K8S_IMAGE", k8s_defaults.image),
        conn_id=os.environ.get("NIGHTSHIFT_K8S_CONN_ID", k8s_defaults.conn_id),
        cpu=os.environ.get("NIGHTSHIFT_K8S_CPU", k8s_defaults.cpu),
        memory=os.environ.get("NIGHTSHIFT_K8S_MEMORY", k8s_defaults.memory),
        gpus=_env_int("NIGHTSHIFT_K8S_GPUS", k8s_defaults.gpus),
        shm_size=os.environ.get("NIGHTSHIFT_K8S_SHM_SIZE", k8s_defaults.shm_size),
        state_pvc=os.environ.get("NIGHTSHIFT_K8S_STATE_PVC", k8s_defaults.state_pvc),
        node_selector=_env_json("NIGHTSHIFT_K8S_NODE_SELECTOR", k8s_defaults.node_selector),
        tolerations=_env_json("NIGHTSHIFT_K8S_TOLERATIONS", k8s_defaults.tolerations),
    )
    return Settings(
        home=home,
        registered_model=os.environ.get("NIGHTSHIFT_REGISTERED_MODEL", "nightshift-llm"),
        train_ranks=None if os.environ.get("NIGHTSHIFT_TRAIN_RANKS", "").strip().lower() == "auto"
        else _env_int("NIGHTSHIFT_TRAIN_RANKS", None),
        master_port=_env_int("NIGHTSHIFT_MASTER_PORT", 29500),
        alert_conn_id=os.environ.get("NIGHTSHIFT_ALERT_CONN_ID", "nightshift_alerts"),
        tracking_uri_override=os.environ.get("NIGHTSHIFT_MLFLOW_TRACKING_URI") or None,
        profile=(os.environ.get("NIGHTSHIFT_PROFILE") or "embedded").strip().lower(),
        dvc_remote_url=os.environ.get("NIGHTSHIFT_DVC_REMOTE") or None,
        data_git_remote=os.environ.get("NIGHTSHIFT_DATA_GIT_REMOTE") or None,
        s3_conn_id=os.environ.get("NIGHTSHIFT_S3_CONN_ID", "nightshift_s3"),
        lease_db_override=os.environ.get("NIGHTSHIFT_LEASE_DB") or None,
        train_executor=os.environ.get("NIGHTSHIFT_TRAIN_EXECUTOR") or None,
        kubernetes=kubernetes,
        serving=load_serving_limits(),
        require_api_key=_env_bool("NIGHTSHIFT_SERVE_REQUIRE_KEY", True),
        serving_conn_id=os.environ.get("NIGHTSHIFT_SERVE_CONN_ID", "nightshift_serving"),
        request_log_override=os.environ.get("NIGHTSHIFT_SERVE_REQUEST_LOG") or None,
        request_log_retention_days=_env_float("NIGHTSHIFT_SERVE_LOG_RETENTION_DAYS", 30.0),
        serve_upstream=os.environ.get("NIGHTSHIFT_SERVE_UPSTREAM") or None,
        serve_upstream_candidate=os.environ.get("NIGHTSHIFT_SERVE_UPSTREAM_CANDIDATE") or None,
        serve_prompt=_serve_prompt(os.environ.get("NIGHTSHIFT_SERVE_PROMPT")),
        prompts_dir=Path(os.environ.get("NIGHTSHIFT_PROMPTS_DIR") or CONFIG_DIR / "prompts"),
        foundation_config=Path(os.environ.get("NIGHTSHIFT_FOUNDATION_CONFIG") or CONFIG_DIR / "foundation.yaml"),
        retrieval_config=Path(os.environ.get("NIGHTSHIFT_RETRIEVAL_CONFIG") or CONFIG_DIR / "retrieval.yaml"),
        vector_store=os.environ.get("NIGHTSHIFT_VECTOR_STORE") or None,
        airflow_parallelism=_env_int("NIGHTSHIFT_AIRFLOW_PARALLELISM", default_parallelism()),
        airflow_host=os.environ.get("NIGHTSHIFT_AIRFLOW_HOST", "127.0.0.1"),
        ui_url=os.environ.get("NIGHTSHIFT_UI_URL") or os.environ.get("AIRFLOW__API__BASE_URL")
        or f"http://localhost:{os.environ.get('AIRFLOW__API__PORT', '8080')}",
        source_roots=_env_roots("NIGHTSHIFT_SOURCE_ROOTS") or (str(SAMPLE_STORE),),
        sources_file=Path(os.environ.get("NIGHTSHIFT_SOURCES_FILE") or CONFIG_DIR / "sources.yaml"),
        prep_recipe=Path(os.environ.get("NIGHTSHIFT_PREP_RECIPE") or CONFIG_DIR / "prep.yaml"),
        drift_policy=Path(os.environ.get("NIGHTSHIFT_DRIFT_POLICY") or CONFIG_DIR / "drift.yaml"),
        evaluation_suite=Path(os.environ.get("NIGHTSHIFT_EVALUATION_SUITE") or CONFIG_DIR / "evaluation.yaml"),
        gate_policy=Path(os.environ.get("NIGHTSHIFT_GATE_POLICY") or CONFIG_DIR / "gate.yaml"),
        rollout_policy=Path(os.environ.get("NIGHTSHIFT_ROLLOUT_POLICY") or CONFIG_DIR / "rollout.yaml"),
        monitoring_policy=Path(os.environ.get("NIGHTSHIFT_MONITORING_POLICY") or CONFIG_DIR / "monitoring.yaml"),
        incidents_override=os.environ.get("NIGHTSHIFT_INCIDENTS_DB") or None,
        recipe_dirs=_env_paths("NIGHTSHIFT_RECIPE_DIRS"),
        task_timeout_s=_env_int("NIGHTSHIFT_TASK_TIMEOUT_S", 3600),
        train_timeout_s=_env_int("NIGHTSHIFT_TRAIN_TIMEOUT_S", 6 * 3600),
        retention_days=_env_float("NIGHTSHIFT_RETENTION_DAYS", 7.0),
        retry_delay_s=_env_int("NIGHTSHIFT_RETRY_DELAY_S", 120),
    )


def _serve_prompt(raw: str | None) -> str | None:
    """Return the served prompt's name (default ``assistant``), or None for ``off``."""
    import re

    value = (raw or "assistant").strip()
    if value.lower() == "off":
        return None
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}", value):
        raise ValueError("NIGHTSHIFT_SERVE_PROMPT must be a prompt's name (letters, digits, '_' or '-', at most 64) "
                         "or off")
    return value


def _env_roots(name: str) -> tuple[str, ...]:
    """Return the entries of a comma-separated variable: URL prefixes as given, folders made absolute."""
    entries = []
    for raw in os.environ.get(name, "").split(","):
        raw = raw.strip()
        if raw and "://" in raw and not raw.startswith("file://"):
            entries.append(raw)
        elif raw:
            entries.append(str(Path(raw.removeprefix("file://")).expanduser().resolve()))
    return tuple(entries)


def _env_paths(name: str) -> tuple[Path, ...]:
    """Return the absolute folders of an os.pathsep-separated variable (empty entries ignored)."""
    raw = os.environ.get(name, "")
    return tuple(Path(p).expanduser().resolve() for p in raw.split(os.pathsep) if p.strip())


def load_serving_limits() -> ServingLimits:
    """Return the endpoint's limits, read from NIGHTSHIFT_SERVE_* variables."""
    d = ServingLimits()
    max_model_len = _env_int("NIGHTSHIFT_SERVE_MAX_MODEL_LEN", 0)
    return ServingLimits(
        max_body_bytes=_env_int("NIGHTSHIFT_SERVE_MAX_BODY_BYTES", d.max_body_bytes),
        max_concurrent=_env_int("NIGHTSHIFT_SERVE_MAX_CONCURRENT", d.max_concurrent),
        max_queue=_env_int("NIGHTSHIFT_SERVE_MAX_QUEUE", d.max_queue),
        request_timeout_s=_env_float("NIGHTSHIFT_SERVE_TIMEOUT_S", d.request_timeout_s),
        memory_budget_mb=_env_int("NIGHTSHIFT_SERVE_MEMORY_MB", d.memory_budget_mb),
        max_model_len=max_model_len or None,
        default_max_tokens=_env_int("NIGHTSHIFT_SERVE_DEFAULT_MAX_TOKENS", d.default_max_tokens),
        prefill_chunk=_env_int("NIGHTSHIFT_SERVE_PREFILL_CHUNK", d.prefill_chunk),
        batch_wait_ms=_env_float("NIGHTSHIFT_SERVE_BATCH_WAIT_MS", d.batch_wait_ms),
        header_timeout_s=_env_float("NIGHTSHIFT_SERVE_HEADER_TIMEOUT_S", d.header_timeout_s),
        max_in_flight=_env_int("NIGHTSHIFT_SERVE_MAX_IN_FLIGHT", d.max_in_flight),
    )
