"""Steps of the fine-tune cycle (dataset → tokens → DeepSpeed → evaluation → gate → registry), Airflow-free."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nightshift.evaluation.gate import GatePolicy, decide
from nightshift.evaluation.harness import evaluate_model, load_golden
from nightshift.faults import fault_point
from nightshift.pipelines.ingest import dataset_repository
from nightshift.pipelines.reports import RunRef
from nightshift.provenance import code_revision, file_sha256
from nightshift.records import DatasetVersion, EvaluationReport, GateDecision, ModelVersionRecord, PackedDataset
from nightshift.registry.mlflow_registry import DATASET_TAG, FINGERPRINT_TAG, ModelRegistry
from nightshift.settings import GOLDEN_QA, Settings
from nightshift.training.data import tokenize_and_pack
from nightshift.training.launch import launch_command, node_command, write_hostfile
from nightshift.training.recipe import TrainingRecipe
from nightshift.training.trainer import TrainerConfig
from nightshift.training.verify import ReloadCheckFailed

log = logging.getLogger(__name__)

EXPERIMENT = "finetune_model"


@dataclass(frozen=True)
class FinetuneRequest:
    """What a person (or the schedule) asked for: the typed Params of the DAG."""

    base_model: str
    train_steps: int
    learning_rate: float
    backend: str
    recipe: str = "default"
    dataset_version: str | None = None
    nodes: int = 1
    """Nodes (pods) of a kubernetes run, each with NIGHTSHIFT_TRAIN_RANKS GPUs; the local backend has one."""

    def __post_init__(self) -> None:
        if self.backend not in ("local", "kubernetes"):
            raise ValueError(f"backend must be 'local' or 'kubernetes', got {self.backend!r}")
        if not isinstance(self.nodes, int) or isinstance(self.nodes, bool) or not 1 <= self.nodes <= 256:
            raise ValueError(f"nodes must be an integer from 1 to 256, got {self.nodes!r}")
        if self.backend == "local" and self.nodes != 1:
            raise ValueError("the local backend trains on this machine only: set nodes to 1, or pick the "
                             "kubernetes backend for several nodes")

    def world_size(self, settings: Settings) -> int:
        """Return the number of ranks: NIGHTSHIFT_TRAIN_RANKS per node (CPU processes or GPUs)."""
        return self.nodes * settings.train_ranks

    def load_recipe(self, extra_dirs: tuple[Path, ...] = ()) -> TrainingRecipe:
        return TrainingRecipe.load(self.recipe, extra_dirs, train_steps=self.train_steps,
                                   learning_rate=self.learning_rate)


def registry_for(settings: Settings) -> ModelRegistry:
    return ModelRegistry(settings.tracking_uri, settings.registered_model, settings.artifact_root,
                         settings.champion_alias)


def resolve_dataset(settings: Settings, requested: str | None, event_extras: list[dict[str, Any]]) -> DatasetVersion:
    """Return the dataset version to train on: the requested tag, else the triggering event's, else the latest."""
    repo = dataset_repository(settings)
    if requested:
        return repo.get(requested)
    for extra in reversed(event_extras):
        if extra.get("dataset_version"):
            log.info("training on %s from the triggering asset event", extra["dataset_version"])
            return repo.get(extra["dataset_version"])
    latest = repo.latest() if (settings.data_repo / ".dvc").is_dir() else None
    if latest is None:
        raise LookupError("no dataset version exists yet: run the ingest_corpus DAG first")
    return latest


def fingerprint(dataset: DatasetVersion, base_model_digest: str, recipe: TrainingRecipe, world_size: int) -> str:
    """Return a key that is equal exactly when everything that decides the trained weights is equal.

    That is the corpus bytes, the base checkpoint's bytes, the recipe, the number of ranks (it sets the
    global batch) and the trainer's own code.
    """
    raw = json.dumps({"data": dataset.md5, "base": base_model_digest, "recipe": recipe.to_dict(),
                      "world_size": world_size, "trainer": trainer_code_digest()}, sort_keys=True)
    return hashlib.sha256(raw.encode()).hexdigest()[:20]


def trainer_code_digest() -> str:
    """Return a hash of the training package's source (the code that turns data into weights)."""
    import nightshift.training as training

    digest = hashlib.sha256()
    for path in sorted(Path(training.__file__).parent.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def checkpoint_digest(folder: Path, cache_dir: Path) -> str:
    """Return a hash of a checkpoint folder's files, cached by their sizes and modification times."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
    stamp = [(p.relative_to(folder).as_posix(), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    key = hashlib.sha256(json.dumps([str(folder.resolve()), stamp]).encode()).hexdigest()[:24]
    cached = cache_dir / "digests" / f"{key}.txt"
    if cached.is_file():
        return cached.read_text().strip()
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0" + file_sha256(path).encode())
    value = digest.hexdigest()[:24]
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_suffix(".tmp")
    tmp.write_text(value)
    tmp.replace(cached)
    return value


def pack_dataset(
    settings: Settings, dataset: DatasetVersion, base_model_dir: Path, recipe: TrainingRecipe, run_dir: Path
) -> PackedDataset:
    """Fetch the exact bytes of a dataset version from DVC and pack them with the base model's tokenizer."""
    corpus = dataset_repository(settings).fetch(dataset, run_dir / "data" / "corpus.jsonl")
    return tokenize_and_pack(corpus, base_model_dir, run_dir / "data", recipe.seq_len, recipe.heldout_fraction)


def plan_training(
    settings: Settings, base_model_dir: Path, packed: PackedDataset, recipe: TrainingRecipe, run_dir: Path,
    nodes: int = 1, tracking_run_id: str | None = None,
) -> dict[str, Any]:
    """Write the trainer config and return the launcher commands: one node's, and every node's of a multi-node run.

    Checkpoints go to the run's folder on the state volume, so a retried attempt (on any node) finds them.
    """
    output_dir = run_dir / "candidate"
    config = TrainerConfig(
        base_model=str(base_model_dir), train_path=packed.train_path, output_dir=str(output_dir),
        recipe=recipe.to_dict(), checkpoint_dir=str(run_dir / "checkpoints"),
        tracking={"uri": settings.tracking_uri, "run_id": tracking_run_id} if tracking_run_id else {},
    )
    config_path = config.write(run_dir / "trainer.json")
    ranks = settings.train_ranks
    plan: dict[str, Any] = {
        "command": launch_command(config_path, ranks, settings.master_port), "config_path": str(config_path),
        "output_dir": str(output_dir), "nodes": nodes, "master_port": settings.master_port, "node_command": None,
    }
    if nodes > 1:
        hostfile = write_hostfile(run_dir / "hostfile", nodes, ranks)
        plan["node_command"] = node_command(config_path, hostfile, nodes, ranks, settings.master_port)
    return plan


def verify_candidate(registry: ModelRegistry | None, plan: dict[str, Any], env: dict[str, str]) -> dict[str, Any]:
    """Run the reload check in a fresh process (transformers alone); raise ReloadCheckFailed with its reason."""
    import subprocess
    import sys

    output = Path(plan["output_dir"])
    proc = subprocess.run([sys.executable, "-m", "nightshift.training.verify", "--output-dir", str(output)],
                          env=env, capture_output=True, text=True, timeout=3600)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    try:
        result = json.loads(lines[-1])
    except (IndexError, ValueError):
        raise ReloadCheckFailed(f"the reload check crashed (exit {proc.returncode}): "
                                + "\n".join(proc.stderr.splitlines()[-15:])) from None
    if not result.get("passed"):
        raise ReloadCheckFailed(result.get("error", "reload check failed"))
    log.info("reload check passed: loss %.6f reloaded, %.6f in the trainer (difference %.1e, tolerance %.0e)",
             result["reloaded_loss"], result["expected_loss"], result["difference"], result["tolerance"])
    if registry is not None and plan.get("mlflow_run_id"):
        registry.log_metrics(plan["mlflow_run_id"], {"reload_check_loss": result["reloaded_loss"],
                                                     "reload_check_difference": result["difference"]})
    return result


def read_training_metrics(output_dir: Path) -> dict[str, Any]:
    """Return metrics.json of a finished training run; raise if the trainer left no checkpoint."""
    metrics_path = output_dir / "metrics.json"
    if not metrics_path.is_file() or not (output_dir / "checkpoint" / "config.json").is_file():
        raise FileNotFoundError(f"trainer left no checkpoint in {output_dir}; see the training log")
    return json.loads(metrics_path.read_text())


def loss_curve_png(losses: list[float], path: Path, title: str) -> Path:
    """Draw the training loss per step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(range(1, len(losses) + 1), losses, marker="o", markersize=3)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def evaluate_pair(
    settings: Settings, registry: ModelRegistry, candidate_dir: Path, base_model: str, base_model_dir: Path,
    packed: PackedDataset, golden_path: Path = GOLDEN_QA,
) -> tuple[EvaluationReport, EvaluationReport, ModelVersionRecord | None]:
    """Evaluate the candidate and the champion (the base model before the first promotion) in one harness."""
    golden = load_golden(golden_path)
    heldout = Path(packed.heldout_path)
    champion = registry.champion()
    if champion is not None:
        registry.prune_cache(settings.cache_dir / "registry", keep=[champion])
        baseline_dir = registry.download(champion, settings.cache_dir / "registry")
        baseline_label = f"champion {champion.label}"
    else:
        baseline_dir, baseline_label = base_model_dir, f"base {base_model}"
    candidate = evaluate_model(candidate_dir, "candidate", heldout, golden)
    baseline = evaluate_model(baseline_dir, baseline_label, heldout, golden)
    return candidate, baseline, champion


def gate(candidate: EvaluationReport, baseline: EvaluationReport, policy: GatePolicy) -> GateDecision:
    decision = decide(candidate, baseline, policy)
    log.info("gate: %s", decision.summary)
    return decision


def register_candidate(
    registry: ModelRegistry, run_id: str, candidate_dir: Path, dataset: DatasetVersion, fp: str
) -> ModelVersionRecord:
    """Upload the candidate checkpoint (manifest last) and register it; reruns return the same version."""
    registry.upload_checkpoint(run_id, candidate_dir)
    fault_point("registry.before_register")
    return registry.register(run_id, tags={
        DATASET_TAG: dataset.tag, "nightshift.dataset_rev": dataset.rev, "nightshift.dataset_md5": dataset.md5,
        FINGERPRINT_TAG: fp, "nightshift.code_revision": code_revision(),
    })


def run_params(request: FinetuneRequest, recipe: TrainingRecipe, dataset: DatasetVersion, fp: str) -> dict[str, Any]:
    """Return what every MLflow run records: data version, recipe, code revision and request."""
    params = {f"recipe.{k}": v for k, v in recipe.flat().items()}
    params.update({
        "dataset.tag": dataset.tag, "dataset.rev": dataset.rev, "dataset.md5": dataset.md5,
        "dataset.documents": dataset.documents, "dataset.repo": dataset.repo,
        "base_model": request.base_model, "backend": request.backend, "recipe.name": request.recipe,
        "nodes": request.nodes,
        "code_revision": code_revision(), "fingerprint": fp,
    })
    return params


def open_tracking_run(
    registry: ModelRegistry, run_key: str, request: FinetuneRequest, recipe: TrainingRecipe,
    dataset: DatasetVersion, packed: PackedDataset, fp: str,
) -> str:
    """Open (or, on a retry, reopen) the MLflow run of one DAG run and record its inputs."""
    run_id = registry.open_run(
        EXPERIMENT, run_key, run_name=f"{dataset.tag} {run_key.split('/', 1)[-1]}",
        tags={"nightshift.dataset_tag": dataset.tag, "airflow.run_key": run_key},
    )
    registry.log_params(run_id, run_params(request, recipe, dataset, fp))
    sizes = {f"data.{k}": v for k, v in packed.to_dict().items() if k.endswith(("blocks", "tokens"))}
    registry.log_params(run_id, sizes)
    return run_id


def evaluate_candidate(
    settings: Settings, registry: ModelRegistry, request: FinetuneRequest, plan: dict[str, Any], packed: PackedDataset,
    run: RunRef | None = None,
) -> dict[str, Any]:
    """Record the training run in MLflow, then evaluate candidate and champion; return both reports."""
    run_id, output = plan["mlflow_run_id"], Path(plan["output_dir"])
    fault_point("finetune.evaluate")
    metrics = read_training_metrics(output)
    if not metrics.get("tracked"):  # the trainer streams its curve to the run while training when it can
        registry.log_series(run_id, "train_loss", metrics["losses"])
    registry.log_metrics(run_id, {"train_seconds": metrics["seconds"], "train_tokens": metrics["tokens"]})
    registry.log_file(run_id, loss_curve_png(metrics["losses"], output / "loss.png", plan["dataset_tag"]), "plots")
    candidate, baseline, champion = evaluate_pair(
        settings, registry, output / "checkpoint", request.base_model,
        settings.resolve_base_model(request.base_model), packed,
    )
    registry.log_metrics(run_id, {**candidate.metrics("candidate"), **baseline.metrics("baseline")})
    registry.log_dict(run_id, {"candidate": candidate.to_dict(), "baseline": baseline.to_dict()}, "evaluation.json")
    if run:
        publish_evaluation(run, metrics, candidate, baseline, plan["dataset_tag"])
    return {"candidate": candidate.to_dict(), "baseline": baseline.to_dict(), "diverged": metrics["diverged"],
            "champion_before": champion.to_dict() if champion else None}


def publish_evaluation(run: RunRef, metrics: dict[str, Any], candidate: EvaluationReport,
                       baseline: EvaluationReport, dataset_tag: str) -> None:
    """Put the loss curve and the candidate-vs-baseline comparison on the run's report page."""
    from nightshift.reports import charts

    charts.loss_svg(metrics["losses"], f"trained on {dataset_tag}", run.folder / "loss.svg")
    charts.comparison_svg([("held-out perplexity", candidate.perplexity, baseline.perplexity),
                           ("golden perplexity", candidate.golden_perplexity, baseline.golden_perplexity)],
                          candidate.model, baseline.model, "lower is better", run.folder / "evaluation.svg")
    run.publish({
        "training": {"steps": len(metrics["losses"]), "losses": metrics["losses"], "tokens": metrics["tokens"],
                     "seconds": metrics["seconds"], "diverged": metrics["diverged"], "dataset_tag": dataset_tag},
        "evaluation": {"candidate": candidate.to_dict(), "baseline": baseline.to_dict()},
    })


def publish_outcome(run: RunRef, summary: dict[str, Any]) -> None:
    """Put the gate decision and the registry outcome on the run's page; list a registered version in the catalog."""
    run.publish({"decision": summary.get("decision"), "summary": summary})
    champion = (summary.get("champion") or {}).get("version")
    version = summary.get("promoted") or summary.get("reused")
    if not version:
        if champion is not None:
            run.record("models", str(champion), {"version": champion}, champion=champion)
        return
    candidate = ((summary.get("evaluation") or {}).get("candidate")) or {}
    entry = {"version": version["version"], "dataset_tag": version.get("dataset_tag", ""),
             "gate": "passed" if summary.get("promoted") else "reused"}
    if summary.get("promoted") or not run.has_catalog("models", str(version["version"])):
        entry.update({"run_id": run.run_id, "report": run.path, "perplexity": candidate.get("perplexity"),
                      "golden_perplexity": candidate.get("golden_perplexity")})
    run.record("models", str(version["version"]), entry, champion=champion)


def cleanup(run_dir: Path) -> None:
    """Remove the bulky outputs of a finished run; the registry keeps what was promoted."""
    for name in ("candidate", "data", "checkpoints"):
        shutil.rmtree(run_dir / name, ignore_errors=True)
