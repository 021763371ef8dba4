"""The tasks of finetune_model as plain functions: each takes the run (nightshift.pipelines.run.Run) and the
records the tasks before it returned, and returns a record small enough for XCom. The DAG file wraps each in
one line; the request a person made is parsed once (``parse_request``) and passed on.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nightshift.pipelines import finetune
from nightshift.pipelines.finetune import FinetuneRequest
from nightshift.pipelines.run import Run
from nightshift.records import DatasetVersion, ModelVersionRecord, PackedDataset
from nightshift.stores import registry_for

PARAMS = ("base_model", "train_steps", "learning_rate", "backend", "recipe", "dataset_version", "nodes")
"""The DAG's Params that make up a request."""


def parse_request(run: Run, params: dict[str, Any]) -> dict[str, Any]:
    """Return the request the Params describe, checked once for every task after: its values, its recipe (with
    the overrides), its base model, and that the base can train under the recipe (LoRA layers, context), so a
    bad request fails here once, not in every rank on every retry (ValueError, LookupError or
    FileNotFoundError say what to change)."""
    from nightshift.pipelines.foundation import current_base
    from nightshift.training.fit import check_recipe_fits

    # No base named: the one a person chose on select_foundation_model's leaderboard, else the bundled model.
    params = {**params, "base_model": params.get("base_model") or current_base(run.settings)}
    request = FinetuneRequest(**{name: params.get(name) for name in PARAMS})
    recipe = request.load_recipe(run.settings.recipe_dirs)
    check_recipe_fits(recipe, run.settings.resolve_base_model(request.base_model), f"recipe {request.recipe}")
    return dataclasses.asdict(request)


def _request(request: dict[str, Any]) -> FinetuneRequest:
    return FinetuneRequest(**request)


def resolve_dataset(run: Run, request: dict[str, Any]) -> dict[str, Any]:
    """Return the dataset version to train on: the request's, else the triggering event's, else the latest."""
    return finetune.resolve_dataset(run.settings, request["dataset_version"], list(run.event_extras)).to_dict()


def check_registry(run: Run, request: dict[str, Any], dataset: dict[str, Any]) -> dict[str, Any]:
    """Return the run's fingerprint and the promoted version that has it already (or None)."""
    req = _request(request)
    recipe, base = req.load_recipe(run.settings.recipe_dirs), run.settings.resolve_base_model(req.base_model)
    digest = finetune.checkpoint_digest(base, run.settings.cache_dir)
    fp = finetune.fingerprint(DatasetVersion.from_dict(dataset), digest, recipe, req.world_size(run.settings, recipe))
    existing = registry_for(run.settings).find_by_fingerprint(fp)
    return {"fingerprint": fp, "existing": existing.to_dict() if existing else None}


def choose_path(check: dict[str, Any]) -> str:
    """Return the next task: reuse the version trained on the same bytes and recipe, else prepare the data."""
    return "reuse_existing" if check["existing"] else "prepare_data"


def reuse_existing(check: dict[str, Any]) -> dict[str, Any]:
    """Return the version already trained on this data with this recipe."""
    version = check["existing"]
    print(f"{version['name']} v{version['version']} was already trained on this data with this recipe")
    return version


def prepare_data(run: Run, request: dict[str, Any], dataset: dict[str, Any]) -> dict[str, Any]:
    """Return the packed dataset: the version's exact bytes, tokenized by the base model's tokenizer."""
    req = _request(request)
    return finetune.pack_dataset(run.settings, DatasetVersion.from_dict(dataset),
                                 run.settings.resolve_base_model(req.base_model),
                                 req.load_recipe(run.settings.recipe_dirs), run.work_dir()).to_dict()


def plan_training(run: Run, request: dict[str, Any], dataset: dict[str, Any], packed: dict[str, Any],
                  check: dict[str, Any]) -> dict[str, Any]:
    """Open the MLflow run and return the training plan (commands, folders, ranks, the MLflow run's id)."""
    req, version, packed_data = _request(request), DatasetVersion.from_dict(dataset), PackedDataset.from_dict(packed)
    recipe = req.load_recipe(run.settings.recipe_dirs)
    ranks = req.ranks_per_node(run.settings, recipe)
    mlflow_run = finetune.open_tracking_run(registry_for(run.settings), run.key, req, recipe, version, packed_data,
                                            check["fingerprint"], ranks)
    planned = finetune.plan_training(run.settings, run.settings.resolve_base_model(req.base_model), packed_data,
                                     recipe, run.work_dir(), ranks=ranks, nodes=req.nodes,
                                     tracking_run_id=mlflow_run)
    return {**planned, "mlflow_run_id": mlflow_run, "dataset_tag": version.tag}


def choose_backend(request: dict[str, Any]) -> str:
    """Return the training task: on this machine, in one GPU pod, or in an Indexed Job of several."""
    if request["backend"] == "kubernetes" and request["nodes"] > 1:
        return "train_kubernetes_nodes"
    return f"train_{request['backend']}"


def train_local(command: list[str], output_dir: str) -> None:
    """Run the training command on this machine (a port of its own for each attempt)."""
    from nightshift.training.launch import free_port, local_env, run_local, with_master_port

    # A killed attempt's ranks may still hold the previous attempt's port.
    run_local(with_master_port(command, free_port()), local_env(), Path(output_dir).parent / "trainer.log")


def verify_candidate(run: Run, plan: dict[str, Any]) -> dict[str, Any]:
    """Return the reload check's result; ReloadCheckFailed when the saved weights do not give the trainer's loss."""
    from nightshift.environment import runtime_env

    return finetune.verify_candidate(registry_for(run.settings), plan, {**os.environ, **runtime_env(run.settings)})


def load_evaluation(run: Run, resolve_judge: Callable[[str, str | None], tuple[Any, str]]) -> tuple[Any, Any, str]:
    """Return the evaluation suite, the judge's endpoint (or None) and why there is none.

    ``resolve_judge(connection, model)`` looks the judge up in the deployment's connections. A broken suite or
    judge connection raises ValueError: a retry does not mend it.
    """
    from nightshift.evaluation.suite import EvaluationSuite

    suite = EvaluationSuite.load(run.settings.evaluation_suite)
    endpoint, note = (resolve_judge(suite.judge.connection, suite.judge.model) if suite.uses_judge
                      else (None, "no judge metric in the suite"))
    return suite, endpoint, note


def evaluate(run: Run, request: dict[str, Any], packed: dict[str, Any], plan: dict[str, Any],
             evaluation: tuple[Any, Any, str]) -> dict[str, Any]:
    """Evaluate candidate and champion in one harness under ``load_evaluation``'s suite and judge; return the
    comparisons (the full record goes to disk and MLflow)."""
    suite, endpoint, note = evaluation
    return finetune.evaluate_candidate(run.settings, registry_for(run.settings), _request(request), plan,
                                       PackedDataset.from_dict(packed), run.report, suite, endpoint, note)


def compare_retrieval(run: Run, request: dict[str, Any], plan: dict[str, Any],
                      evaluation: tuple[Any, Any, str]) -> dict[str, Any]:
    """Base, fine-tuned, base+RAG and fine-tuned+RAG on the golden items that name their sources; the summary is
    logged to the MLflow run (``rag.*``) and published on the run's page."""
    import logging

    from nightshift.pipelines.retrieval import compare_retrieval as compare

    suite, endpoint, note = evaluation
    base = run.settings.resolve_base_model(_request(request).base_model)
    try:
        result = compare(run.settings, base, Path(plan["output_dir"]) / "checkpoint", plan["dataset_tag"], suite,
                         endpoint, note, run.report)
    except Exception as exc:  # a comparison that cannot be made says so; it never holds back the release
        logging.getLogger(__name__).exception("the retrieval comparison failed")
        result = {"skipped": f"the comparison failed ({type(exc).__name__}); this task's log has the traceback"}
        run.report.publish({"retrieval": result})
    if "variants" in result:
        metrics = {"rag.recall_at_k": result["recall_at_k"]}
        for variant in result["variants"]:
            name = variant["name"].replace("+RAG", "_rag").replace("-", "_")
            metrics.update({f"rag.{name}.{m}": v for m, v in variant["metrics"].items() if v is not None})
        registry_for(run.settings).log_metrics(plan["mlflow_run_id"], metrics)
    return {k: v for k, v in result.items() if k not in ("examples", "citations")}


def gate_policy(run: Run):
    """Return the promotion gate's rules (gate.yaml); ValueError names what is wrong in the file."""
    from nightshift.evaluation.gate import GatePolicy

    return GatePolicy.load(run.settings.gate_policy)


def decide_promotion(run: Run, evaluation: dict[str, Any], plan: dict[str, Any], policy) -> dict[str, Any]:
    """Apply the gate's rules to the comparisons, write the evaluation report, return the decision and its path."""
    decision = finetune.gate(evaluation["comparisons"], evaluation["baseline"]["model"], policy)
    html = finetune.write_evaluation_report(
        registry_for(run.settings), plan["mlflow_run_id"], evaluation["path"], decision,
        f"Evaluation of the candidate trained on {plan['dataset_tag']}",
        {"dataset": plan["dataset_tag"], "DAG run": run.run_id, "MLflow run": plan["mlflow_run_id"]}, run.report,
    )
    print(f"evaluation report: {html}")
    run.report.publish({"decision": decision.to_dict()})
    return {**decision.to_dict(), "report": str(html)}


def route(decision: dict[str, Any]) -> str:
    """Return the next task: register a candidate that passed the gate, else reject it."""
    return "register_candidate" if decision["passed"] else "reject_candidate"


def register_candidate(run: Run, dataset: dict[str, Any], check: dict[str, Any], plan: dict[str, Any]) -> dict:
    """Register the checkpoint with its evaluation; return the new model version."""
    return finetune.register_candidate(
        registry_for(run.settings), plan["mlflow_run_id"], Path(plan["output_dir"]) / "checkpoint",
        DatasetVersion.from_dict(dataset), check["fingerprint"],
    ).to_dict()


def rollout_policy(run: Run):
    """Return how a gated version is released (rollout.yaml); ValueError names what is wrong in the file."""
    from nightshift.evaluation.rollout_policy import RolloutPolicy

    return RolloutPolicy.load(run.settings.rollout_policy)


def approval_request(run: Run, version: dict[str, Any], decision: dict[str, Any],
                     evaluation: dict[str, Any]) -> dict[str, str] | None:
    """Return the release form a person answers (subject and Markdown body), or None when gate.yaml does not ask
    for approval. A broken gate.yaml or rollout.yaml raises ValueError."""
    from nightshift.pipelines.approval import release_body
    from nightshift.pipelines.rollout import release_route

    if not gate_policy(run).approval.required:
        print("gate.yaml: approval none, the candidate is released without asking")
        return None
    _, way = release_route(registry_for(run.settings), rollout_policy(run))
    print(f"gate.yaml: approval required; v{version['version']} waits in Required Actions")
    return {"subject": f"Release {version['name']} v{version['version']} (trained on {version.get('dataset_tag')})?",
            "body": release_body(version, decision, evaluation, way, run.report.url)}


def release(run: Run, policy, answer: dict[str, Any] | None) -> str:
    """Return how the registered version goes out under the rollout policy: promoted at once, or rolled out;
    ``decline_release`` when a person (or the approval's timeout) rejected it (``answer``: None when nobody was
    asked, else what ``approve_release`` was answered, as nightshift.airflow.hitl.answer_of reads it)."""
    from nightshift.pipelines.rollout import release_route

    if answer is not None and not answer["approved"]:
        print(f"rejected by {answer['by']}: the champion stays")
        return "decline_release"
    if answer is not None:
        print(f"approved by {answer['by']}")
    way, why = release_route(registry_for(run.settings), policy)
    print(why)
    return "promote_candidate" if way == "promote" else "start_rollout"


def decline_release(run: Run, version: dict[str, Any], decision: dict[str, Any], answer: dict[str, Any],
                    timeout_hours: float):
    """Record in the promotion history that the release was declined (who, why); return the alert that says so.

    The reason a person typed stays in the history (``nightshift history``), out of the alert."""
    from nightshift.alerts.channels import Alert
    from nightshift.registry.history import PromotionHistory

    by = answer["by"]
    reason = answer["reason"] or ("no answer within the approval's "
                                  f"{timeout_hours:g} hours" if by == "timeout" else "no reason given")
    record = PromotionHistory(registry_for(run.settings)).decline(
        ModelVersionRecord.from_dict(version), f"{run.key}/decline", by, run.key, reason,
        {"report": decision.get("report", ""), "gate": "; ".join(decision.get("reasons") or [])})
    who = "the approval timed out" if by == "timeout" else f"rejected by {by}"
    return Alert(
        title=f"{version['name']} v{version['version']} was not released: {who}",
        message=f"It passed the gate, but its release was declined ({who}). The champion stays. Who and why: "
                "`nightshift history`.",
        severity="warning", dag_id=run.dag_id, run_id=run.run_id, task_id="decline_release",
        details={"version": version["version"], "declined_by": record.by, "at": record.at},
        report_url=run.report.url,
    )


def start_rollout(run: Run, version: dict[str, Any]) -> dict[str, Any]:
    """Point the ``candidate`` alias at the version with the policy's first share; return the rollout."""
    from nightshift.pipelines.rollout import start_rollout as start

    rollout = start(registry_for(run.settings), ModelVersionRecord.from_dict(version), rollout_policy(run))
    print(f"v{rollout['version']} is the candidate ({rollout['mode']}); rollout_model takes it from here")
    return rollout


def promote_candidate(run: Run, version: dict[str, Any], decision: dict[str, Any],
                      evaluation: dict[str, Any]) -> dict[str, Any]:
    """Move ``champion`` to the version, only if it still names the version the candidate was evaluated against.

    Raises ChampionConflict otherwise: a retry cannot mend that.
    """
    promoted = finetune.promote_candidate(
        registry_for(run.settings), ModelVersionRecord.from_dict(version), f"{run.key}/promote", run.started_by,
        run.key, "; ".join(decision["reasons"]), champion_before=evaluation.get("champion_before"))
    return promoted.to_dict()


def reject_candidate(run: Run, decision: dict[str, Any], dataset: dict[str, Any]):
    """Return the alert that says the candidate was not promoted, with the gate's reasons."""
    from nightshift.alerts.channels import Alert

    return Alert(
        title=f"candidate trained on {dataset['tag']} was not promoted",
        message="The champion stays. " + "; ".join(decision["reasons"]),
        severity="warning", dag_id=run.dag_id, run_id=run.run_id, task_id="reject_candidate", details=decision,
        report_url=run.report.url,
    )


def gate_incident(run: Run, alert, send) -> str:
    """Record the gate's outcome as an incident (finetune_model, gate, candidate): ``alert`` when it rejected the
    candidate, None when it passed; send what opens, repeats or resolves. Return what was sent."""
    from nightshift.alerts.channels import Alert
    from nightshift.pipelines.incidents import as_incident

    passing = Alert("candidates fail the gate", "", dag_id=run.dag_id, run_id=run.run_id, task_id="decide_promotion",
                    report_url=run.report.url)
    return as_incident(run.settings, "gate", "candidate", alert, passing, f"{run.key}/gate", send)


OUTCOMES = ("evaluate", "decide_promotion", "promote_candidate", "start_rollout", "plan_training", "decline_release")
"""Tasks whose results (None when skipped) the report reads."""


def why_it_ran(run: Run) -> str:
    """Return why the run trained: the reason its corpus version came with (a retrain a check started), a new
    corpus version, or a person's request."""
    from nightshift.provenance import printable_line

    reasons = [printable_line(e["reason"]) for e in run.event_extras if e.get("reason")]
    if reasons:
        return reasons[-1]
    if run.event_extras:
        return "a new corpus version was published"
    return f"started by {run.started_by}"


def report(run: Run, dataset: dict[str, Any], check: dict[str, Any], outcomes: dict[str, Any]) -> dict[str, Any]:
    """Publish the run's outcome on its page and in MLflow, clean the run's bulky outputs; return the summary."""
    from nightshift.pipelines.housekeeping import prune_work_dirs

    registry = registry_for(run.settings)
    plan = outcomes.get("plan_training") if not check["existing"] else None
    champion = registry.champion()
    summary = {
        "dataset": dataset,
        "fingerprint": check["fingerprint"],
        "reused": check["existing"],
        "evaluation": outcomes.get("evaluate"),
        "decision": outcomes.get("decide_promotion"),
        "promoted": outcomes.get("promote_candidate"),
        "rollout": outcomes.get("start_rollout"),
        "declined": outcomes.get("decline_release"),
        "why": why_it_ran(run),
        "champion": champion.to_dict() if champion else None,
        "mlflow_run_id": plan["mlflow_run_id"] if plan else None,
    }
    finetune.publish_outcome(run.report, summary)
    here = run.work_dir()
    if plan:
        registry.log_dict(plan["mlflow_run_id"], summary, "cycle_report.json")
        registry.set_tags(plan["mlflow_run_id"], {"nightshift.why": summary["why"][:4900]})
        registry.end_run(plan["mlflow_run_id"])
        finetune.cleanup(here)
    prune_work_dirs(here.parent, run.settings.retention_days, keep=here)
    return summary
