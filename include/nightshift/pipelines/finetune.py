"""Steps of the fine-tune cycle (dataset → tokens → DeepSpeed → evaluation → gate → registry), Airflow-free."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nightshift.evaluation.compare import compare
from nightshift.evaluation.gate import GatePolicy, decide
from nightshift.evaluation.harness import evaluate_model
from nightshift.evaluation.judge import Judge, JudgeEndpoint
from nightshift.evaluation.suite import EvaluationSuite
from nightshift.faults import fault_point
from nightshift.provenance import code_revision, file_sha256
from nightshift.records import (
    DatasetVersion,
    EvaluationReport,
    GateDecision,
    MetricComparison,
    ModelVersionRecord,
    PackedDataset,
    json_safe,
)
from nightshift.registry.mlflow_registry import DATASET_TAG, FINGERPRINT_TAG, ModelRegistry
from nightshift.reports.publish import RunRef
from nightshift.settings import Settings
from nightshift.stores import dataset_repository
from nightshift.training.data import tokenize_and_pack
from nightshift.training.launch import launch_command, node_command, resolve_ranks
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
    """Nodes (pods) of a kubernetes run, each with the recipe's ranks as GPUs; the local backend has one."""

    def __post_init__(self) -> None:
        if self.backend not in ("local", "kubernetes"):
            raise ValueError(f"backend must be 'local' or 'kubernetes', got {self.backend!r}")
        if not isinstance(self.nodes, int) or isinstance(self.nodes, bool) or not 1 <= self.nodes <= 256:
            raise ValueError(f"nodes must be an integer from 1 to 256, got {self.nodes!r}")
        if self.backend == "local" and self.nodes != 1:
            raise ValueError("the local backend trains on this machine only: set nodes to 1, or pick the "
                             "kubernetes backend for several nodes")

    def ranks_per_node(self, settings: Settings, recipe: TrainingRecipe) -> int:
        """Return the ranks on each node: the recipe's, else NIGHTSHIFT_TRAIN_RANKS, else one per GPU (or CPU)."""
        return resolve_ranks(recipe.ranks, self.backend, settings.train_ranks, settings.kubernetes.gpus)

    def world_size(self, settings: Settings, recipe: TrainingRecipe) -> int:
        """Return the number of ranks of the whole run (every node's)."""
        return self.nodes * self.ranks_per_node(settings, recipe)

    def load_recipe(self, extra_dirs: tuple[Path, ...] = ()) -> TrainingRecipe:
        return TrainingRecipe.load(self.recipe, extra_dirs, train_steps=self.train_steps,
                                   learning_rate=self.learning_rate)


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
    ranks: int, nodes: int = 1, tracking_run_id: str | None = None,
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
    plan: dict[str, Any] = {
        "command": launch_command(config_path, ranks, settings.master_port), "config_path": str(config_path),
        "output_dir": str(output_dir), "nodes": nodes, "ranks": ranks, "master_port": settings.master_port,
        "node_command": None,
    }
    if nodes > 1:
        plan["node_command"] = node_command(config_path, nodes, ranks, settings.master_port)
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


EVALUATION_FILE = "evaluation.json"
REPORT_ARTIFACT = "evaluation/report.html"
EVALUATION_RUN_TAG = "nightshift.evaluation_run"
EVALUATION_REPORT_TAG = "nightshift.evaluation_report"
GATE_TAG = "nightshift.gate"


def evaluate_pair(
    settings: Settings, registry: ModelRegistry, candidate_dir: Path, base_model: str, base_model_dir: Path,
    packed: PackedDataset, suite: EvaluationSuite, judge_endpoint: JudgeEndpoint | None = None, judge_note: str = "",
) -> tuple[EvaluationReport, EvaluationReport, ModelVersionRecord | None]:
    """Evaluate the candidate and the champion (the base model before the first promotion) in one harness.

    Both read the held-out documents as text with their own tokenizers, so a champion built on another
    base model is scored on the same text rather than on the candidate's token ids.
    """
    golden = suite.golden()
    heldout = Path(packed.heldout_path)
    text = Path(packed.heldout_text_path) if packed.heldout_text_path else None
    champion = registry.champion()
    if champion is not None:
        registry.prune_cache(settings.cache_dir / "registry", keep=[champion])
        baseline_dir = registry.download(champion, settings.cache_dir / "registry")
        baseline_label = f"champion {champion.label}"
    else:
        baseline_dir, baseline_label = base_model_dir, f"base {base_model}"
    judge = None
    if suite.uses_judge and judge_endpoint is not None:
        judge = Judge(judge_endpoint, suite.judge, settings.cache_dir / "judge")
    note = judge_note if suite.uses_judge else "no judge metric in the suite"
    candidate = evaluate_model(candidate_dir, "candidate", heldout, suite, golden, judge, note, heldout_text=text)
    baseline = evaluate_model(baseline_dir, baseline_label, heldout, suite, golden, judge, note, heldout_text=text)
    return candidate, baseline, champion


def comparison_metrics(comparisons: list[MetricComparison]) -> dict[str, float]:
    """Return the MLflow metrics of a comparison: each model's value and the difference with its interval."""
    out: dict[str, float] = {}
    for c in comparisons:
        if c.unmeasured:
            continue
        out.update({f"candidate.{c.metric}": c.candidate, f"champion.{c.metric}": c.baseline,
                    f"diff.{c.metric}": c.difference, f"diff.{c.metric}.low": c.low,
                    f"diff.{c.metric}.high": c.high})
    return out


def evaluate_candidate(
    settings: Settings, registry: ModelRegistry, request: FinetuneRequest, plan: dict[str, Any], packed: PackedDataset,
    run: RunRef | None = None, suite: EvaluationSuite | None = None, judge_endpoint: JudgeEndpoint | None = None,
    judge_note: str = "",
) -> dict[str, Any]:
    """Record the training run in MLflow, evaluate candidate and champion, compare them with intervals.

    The per-example evaluation goes to evaluation.json in the run's folder (and to MLflow); the returned
    summary (both models' metrics and the comparisons) is small enough for XCom.
    """
    run_id, output = plan["mlflow_run_id"], Path(plan["output_dir"])
    suite = suite or EvaluationSuite.load(settings.evaluation_suite)
    fault_point("finetune.evaluate")
    metrics = read_training_metrics(output)
    if not metrics.get("tracked"):  # the trainer streams its curve to the run while training when it can
        registry.log_series(run_id, "train_loss", metrics["losses"])
    registry.log_metrics(run_id, {"train_seconds": metrics["seconds"], "train_tokens": metrics["tokens"]})
    registry.log_file(run_id, loss_curve_png(metrics["losses"], output / "loss.png", plan["dataset_tag"]), "plots")
    candidate, baseline, champion = evaluate_pair(
        settings, registry, output / "checkpoint", request.base_model,
        settings.resolve_base_model(request.base_model), packed, suite, judge_endpoint, judge_note,
    )
    comparisons = compare(candidate, baseline, suite)
    for c in comparisons:
        log.info("%s", c.describe())
    registry.log_metrics(run_id, comparison_metrics(comparisons))
    full = {"candidate": candidate.to_dict(), "baseline": baseline.to_dict(),
            "comparisons": [c.to_dict() for c in comparisons], "losses": metrics["losses"],
            "confidence": suite.bootstrap.confidence, "changed_examples": suite.changed_examples,
            "dataset_tag": plan["dataset_tag"]}
    path = output.parent / EVALUATION_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(full))
    tmp.replace(path)
    registry.log_file(run_id, path, "evaluation")
    if run:
        publish_evaluation(run, metrics, candidate, baseline, comparisons, plan["dataset_tag"])
    return json_safe({"candidate": candidate.summary(), "baseline": baseline.summary(),
            "comparisons": full["comparisons"], "confidence": suite.bootstrap.confidence, "path": str(path),
            "diverged": metrics["diverged"],
            "champion_before": champion.to_dict() if champion else None})


def gate(comparisons: list[dict[str, Any]], baseline: str, policy: GatePolicy) -> GateDecision:
    decision = decide([MetricComparison.from_dict(c) for c in comparisons], baseline, policy)
    log.info("gate: %s", decision.summary)
    return decision


def write_evaluation_report(
    registry: ModelRegistry, run_id: str, evaluation_path: Path, decision: GateDecision, title: str,
    context: dict[str, Any], run: RunRef | None = None,
) -> Path:
    """Render the self-contained HTML report, log it to the MLflow run, and put it in the run's report folder."""
    from nightshift.reports.evaluation import render

    data = json.loads(Path(evaluation_path).read_text())
    html = render(candidate=data["candidate"], baseline=data["baseline"], comparisons=data["comparisons"],
                  decision=decision.to_dict(), losses=data["losses"], title=title, context=context,
                  confidence=data["confidence"], changed=data["changed_examples"])
    path = Path(evaluation_path).with_name("report.html")
    tmp = path.with_suffix(".tmp")
    tmp.write_text(html, encoding="utf-8")
    tmp.replace(path)
    registry.log_file(run_id, path, "evaluation")
    registry.set_tags(run_id, {GATE_TAG: "passed" if decision.passed else "rejected",
                               "nightshift.gate_reasons": decision.summary[:4900],
                               EVALUATION_REPORT_TAG: f"runs:/{run_id}/{REPORT_ARTIFACT}"})
    if run:
        from nightshift.reports.store import write_text

        write_text(run.folder / "evaluation.html", html)
    return path


def register_candidate(
    registry: ModelRegistry, run_id: str, candidate_dir: Path, dataset: DatasetVersion, fp: str
) -> ModelVersionRecord:
    """Upload the candidate checkpoint (manifest last) and register it; reruns return the same version."""
    registry.upload_checkpoint(run_id, candidate_dir)
    fault_point("registry.before_register")
    return registry.register(run_id, tags={
        DATASET_TAG: dataset.tag, "nightshift.dataset_rev": dataset.rev, "nightshift.dataset_md5": dataset.md5,
        FINGERPRINT_TAG: fp, "nightshift.code_revision": code_revision(), GATE_TAG: "passed",
        EVALUATION_RUN_TAG: run_id, EVALUATION_REPORT_TAG: f"runs:/{run_id}/{REPORT_ARTIFACT}",
    })


def promote_candidate(registry: ModelRegistry, version: ModelVersionRecord, move_key: str, by: str, dag_run: str,
                      reason: str, *, champion_before: dict[str, Any] | None) -> ModelVersionRecord:
    """Move the champion alias to a version that passed the gate, recording the move and its evidence; return it.

    ``champion_before`` is the champion the version was evaluated against (evaluate_candidate's
    ``champion_before``; None: the base model, there was no champion). When the alias names another version
    by now, registry/history.py's ChampionConflict is raised and nothing moves.
    """
    from nightshift.registry.history import NO_CHAMPION

    tags = registry.version_tags(version.version)
    evidence = {"run_id": tags.get(EVALUATION_RUN_TAG, version.run_id),
                "report": tags.get(EVALUATION_REPORT_TAG, ""), "gate": reason}
    return registry.promote(version, key=move_key, kind="promotion", by=by, dag_run=dag_run,
                            reason="passed the gate", evaluation=evidence,
                            expected=champion_before["version"] if champion_before else NO_CHAMPION)


def run_params(request: FinetuneRequest, recipe: TrainingRecipe, dataset: DatasetVersion, fp: str,
               ranks: int) -> dict[str, Any]:
    """Return what every MLflow run records: data version, recipe, code revision and request."""
    params = {f"recipe.{k}": v for k, v in recipe.flat().items()}
    params.update({
        "dataset.tag": dataset.tag, "dataset.rev": dataset.rev, "dataset.md5": dataset.md5,
        "dataset.documents": dataset.documents, "dataset.repo": dataset.repo,
        "base_model": request.base_model, "backend": request.backend, "recipe.name": request.recipe,
        "nodes": request.nodes, "ranks_per_node": ranks, "world_size": ranks * request.nodes,
        "code_revision": code_revision(), "fingerprint": fp,
    })
    return params


def open_tracking_run(
    registry: ModelRegistry, run_key: str, request: FinetuneRequest, recipe: TrainingRecipe,
    dataset: DatasetVersion, packed: PackedDataset, fp: str, ranks: int,
) -> str:
    """Open (or, on a retry, reopen) the MLflow run of one DAG run and record its inputs."""
    run_id = registry.open_run(
        EXPERIMENT, run_key, run_name=f"{dataset.tag} {run_key.split('/', 1)[-1]}",
        tags={"nightshift.dataset_tag": dataset.tag, "airflow.run_key": run_key},
    )
    registry.log_params(run_id, run_params(request, recipe, dataset, fp, ranks))
    sizes = {f"data.{k}": v for k, v in packed.to_dict().items() if k.endswith(("blocks", "tokens"))}
    registry.log_params(run_id, sizes)
    return run_id


def publish_evaluation(run: RunRef, metrics: dict[str, Any], candidate: EvaluationReport,
                       baseline: EvaluationReport, comparisons: list[MetricComparison], dataset_tag: str) -> None:
    """Put the loss curve and the candidate-vs-baseline comparison on the run's report page."""
    import math

    from nightshift.reports import charts

    charts.loss_svg(metrics["losses"], f"trained on {dataset_tag}", run.folder / "loss.svg")
    bars = [("held-out bits per byte", candidate.metrics.get("heldout.bits_per_byte", math.nan),
             baseline.metrics.get("heldout.bits_per_byte", math.nan)),
            ("golden bits per byte", candidate.metrics.get("golden.bits_per_byte", math.nan),
             baseline.metrics.get("golden.bits_per_byte", math.nan))]
    if candidate.tokenizer == baseline.tokenizer:  # per-token values of different tokenizers do not compare
        bars = [("held-out perplexity", candidate.perplexity, baseline.perplexity),
                ("golden perplexity", candidate.golden_perplexity, baseline.golden_perplexity), *bars]
    charts.comparison_svg([b for b in bars if not (math.isnan(b[1]) and math.isnan(b[2]))], candidate.model,
                          baseline.model, "lower is better", run.folder / "evaluation.svg")
    run.publish({
        "training": {"steps": len(metrics["losses"]), "losses": metrics["losses"], "tokens": metrics["tokens"],
                     "seconds": metrics["seconds"], "diverged": metrics["diverged"], "dataset_tag": dataset_tag},
        "evaluation": json_safe({"candidate": candidate.summary(), "baseline": baseline.summary(),
                       "comparisons": [c.to_dict() for c in comparisons],
                       "samples": [{"question": c["question"], "candidate": c.get("answer", ""),
                                    "baseline": b.get("answer", "")}
                                   for c, b in zip(candidate.examples[:3], baseline.examples[:3], strict=False)]}),
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
    entry = {"version": version["version"], "dataset_tag": version.get("dataset_tag", "")}
    listed = run.has_catalog("models", str(version["version"]))
    if summary.get("promoted") or not listed:
        # A reused version keeps its own verdict: it passed the gate when it was registered (a run that reuses it
        # decides nothing about it).
        entry["gate"] = "passed"
    if summary.get("promoted") or not listed:
        metrics = candidate.get("metrics") or {}
        entry.update({"run_id": run.run_id, "report": run.path, "perplexity": metrics.get("heldout.perplexity"),
                      "golden_perplexity": metrics.get("golden.perplexity"),
                      "bits_per_byte": metrics.get("heldout.bits_per_byte"),
                      "token_f1": metrics.get("golden.token_f1")})
    run.record("models", str(version["version"]), entry, champion=champion)


def cleanup(run_dir: Path) -> None:
    """Remove the bulky outputs of a finished run; the registry keeps what was promoted."""
    for name in ("candidate", "data", "checkpoints"):
        shutil.rmtree(run_dir / name, ignore_errors=True)
