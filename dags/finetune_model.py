"""
# finetune_model

Fine-tune the foundation model on a versioned corpus, evaluate it against the champion in the same
harness, and promote it in the MLflow registry only if it passes the gate.

Runs when `ingest_corpus` publishes a new corpus version, or from **Trigger** with the Params below.

| task | does |
|---|---|
| `resolve_dataset` | claims the DAG's lease; `dataset_version`, else the triggering event's, else the latest |
| `check_registry` | the recipe fits the base (LoRA layers, context); skips training if a promoted version |
|  | has its fingerprint: corpus, base bytes, recipe, ranks, code |
| `prepare_data` | fetches the exact bytes from DVC, tokenizes with the base model's tokenizer, packs blocks |
| `plan_training` | opens the MLflow run, writes the trainer config, builds the `torchrun` command |
| `train_local` | the command on this machine: one rank per GPU, or one CPU rank on every core (`backend: local`) |
| `train_kubernetes` | the same command in one GPU pod (`backend: kubernetes`, `nodes: 1`) |
| `train_kubernetes_nodes` | an Indexed Job of `nodes` GPU pods, one per node, rendezvous via a headless Service |
| `verify_candidate` | the checkpoint, reloaded by transformers in a new process, gives the trainer's loss |
| `evaluate` | `include/configs/evaluation.yaml` on candidate and champion: perplexities, greedy answers |
|  | (exact match, token F1, ROUGE-L, refusals), the LLM judge; a paired bootstrap interval per difference |
| `decide_promotion` | applies `include/configs/gate.yaml` to the intervals; writes the HTML report |
| `register_candidate` → `release` | registers the checkpoint with its report; `rollout.yaml` says how it goes out |
| `promote_candidate` | (`mode: off`, or no champion yet) moves `champion`, only if it still names the version |
|  | the candidate was evaluated against, and records the move (who, why, which evaluation); else fails and alerts |
| `start_rollout` | (`mode: canary` or `shadow`, a champion exists) points `candidate` at it; `rollout_model` goes on |
| `reject_candidate` | keeps the champion and alerts with the gate's reasons |
| `report` | the cycle summary, also logged to the MLflow run |

**Training** follows the recipe (`include/configs/training/<name>.yaml`: full or LoRA, ranks, ZeRO 1-3,
offload, precision, gradient checkpointing). `ranks: auto` trains one rank per GPU, or one process using
every core on a machine without GPUs; `NIGHTSHIFT_TRAIN_RANKS` sets another number for `auto`. Loss,
learning rate, gradient norm and tokens/s reach the MLflow run while training runs; the task log shows the ETA.
Every `checkpoint_interval` steps a checkpoint is saved in the run's folder: a retried training task resumes
from the newest complete one, with the same losses as an uninterrupted run. A LoRA candidate is merged into
full weights before evaluation.

**Reports**: the run's **Reports** tab shows the training loss curve, candidate against champion, the gate's
checks and the sample answers; **nightshift** in the navigation lists every model version and the champion.
"""

from __future__ import annotations

import os
from datetime import datetime, timedelta

from airflow.sdk import Param, dag, get_current_context, task
from airflow.sdk.exceptions import AirflowFailException

from nightshift.airflow.common import CANDIDATE_ASSET, CHAMPION_ASSET, CORPUS_ASSET, DEFAULT_ARGS, run_dir, run_report
from nightshift.airflow.kubernetes import trainer_job_operator, trainer_pod_operator
from nightshift.airflow.notifiers import AlertNotifier
from nightshift.airflow.tracking import FailTrackingRun
from nightshift.settings import DEFAULT_FOUNDATION_MODEL, load_settings
from nightshift.training.recipe import available as available_recipes

SETTINGS = load_settings()
TRAIN_TIMEOUT = timedelta(seconds=SETTINGS.train_timeout_s)
# Deterministic problems with what a person asked for: fail at once with the message, no retries.
REQUEST_ERRORS = (FileNotFoundError, LookupError, ValueError, TypeError)


def _request():
    from nightshift.pipelines.finetune import FinetuneRequest

    p = get_current_context()["params"]
    try:
        return FinetuneRequest(
            base_model=p["base_model"], train_steps=p["train_steps"], learning_rate=p["learning_rate"],
            backend=p["backend"], recipe=p["recipe"], dataset_version=p["dataset_version"], nodes=p["nodes"],
        )
    except REQUEST_ERRORS as exc:
        raise AirflowFailException(str(exc)) from exc


def _recipe(request):
    try:
        return request.load_recipe(SETTINGS.recipe_dirs)
    except REQUEST_ERRORS as exc:
        raise AirflowFailException(str(exc)) from exc


def _base_model(request):
    try:
        return SETTINGS.resolve_base_model(request.base_model)
    except REQUEST_ERRORS as exc:
        raise AirflowFailException(str(exc)) from exc


@dag(
    schedule=[CORPUS_ASSET],
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    default_args={**DEFAULT_ARGS, "on_failure_callback": [AlertNotifier(), FailTrackingRun("finetune_model")]},
    tags=["nightshift", "training"],
    doc_md=__doc__,
    params={
        "base_model": Param(
            DEFAULT_FOUNDATION_MODEL, type="string", minLength=1, maxLength=255, title="Base model",
            description="Name of a model imported under $NIGHTSHIFT_HOME/models (a Hugging Face checkpoint "
            "folder); other folders are refused.",
        ),
        "dataset_version": Param(
            None, type=["null", "string"], pattern=r"^[a-z0-9_-]+-v[0-9]+$", title="Dataset version",
            description="DVC tag such as corpus-v0003. Empty: the version in the triggering asset event, "
            "else the latest.",
        ),
        "train_steps": Param(
            None, type=["null", "integer"], minimum=1, maximum=1_000_000, title="Training steps",
            description="Optimizer steps. Empty: the recipe's value.",
        ),
        "learning_rate": Param(
            None, type=["null", "number"], exclusiveMinimum=0, maximum=1, title="Learning rate",
            description="Peak learning rate. Empty: the recipe's value.",
        ),
        "backend": Param(
            "local", type="string", enum=["local", "kubernetes"], title="Training backend",
            values_display={"local": "Local process (CPU ranks)", "kubernetes": "Kubernetes GPU pod"},
            description="Where the trainer's launcher runs; both run the same torchrun command.",
        ),
        "recipe": Param(
            "default", type="string", pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$", title="Recipe",
            description="Name of a training recipe, include/configs/training/<name>.yaml (a name, not a path): "
            f"{', '.join(available_recipes(SETTINGS.recipe_dirs))}.",
        ),
        "nodes": Param(
            1, type="integer", minimum=1, maximum=256, title="Nodes",
            description="Kubernetes backend: GPU pods to train on, each with the recipe's ranks as GPUs (ranks: "
            "auto takes NIGHTSHIFT_TRAIN_RANKS, else NIGHTSHIFT_K8S_GPUS). Several nodes run as an Indexed Job. "
            "The local backend takes 1.",
        ),
    },
)
def finetune_model():
    @task
    def resolve_dataset() -> dict:
        from nightshift.airflow.run_lock import claim_run
        from nightshift.pipelines.finetune import resolve_dataset as resolve

        context = get_current_context()
        claim_run(SETTINGS, context)
        extras = [e.extra for events in context["triggering_asset_events"].values() for e in events]
        try:
            return resolve(SETTINGS, context["params"]["dataset_version"], extras).to_dict()
        except REQUEST_ERRORS as exc:
            raise AirflowFailException(str(exc)) from exc

    @task
    def check_registry(dataset: dict) -> dict:
        from nightshift.pipelines.finetune import checkpoint_digest, fingerprint
        from nightshift.records import DatasetVersion
        from nightshift.stores import registry_for
        from nightshift.training.fit import check_recipe_fits

        request = _request()
        recipe, base = _recipe(request), _base_model(request)
        try:  # a recipe the base cannot train fails here once, not in every rank on every retry
            check_recipe_fits(recipe, base, f"recipe {request.recipe}")
        except ValueError as exc:
            raise AirflowFailException(str(exc)) from exc
        fp = fingerprint(DatasetVersion.from_dict(dataset), checkpoint_digest(base, SETTINGS.cache_dir), recipe,
                         request.world_size(SETTINGS, recipe))
        existing = registry_for(SETTINGS).find_by_fingerprint(fp)
        return {"fingerprint": fp, "existing": existing.to_dict() if existing else None}

    @task.branch
    def choose_path(check: dict) -> str:
        return "reuse_existing" if check["existing"] else "prepare_data"

    @task
    def reuse_existing(check: dict) -> dict:
        version = check["existing"]
        print(f"{version['name']} v{version['version']} was already trained on this data with this recipe")
        return version

    @task
    def prepare_data(dataset: dict) -> dict:
        from nightshift.pipelines.finetune import pack_dataset
        from nightshift.records import DatasetVersion

        request = _request()
        return pack_dataset(
            SETTINGS, DatasetVersion.from_dict(dataset), _base_model(request), _recipe(request),
            run_dir(SETTINGS, get_current_context()),
        ).to_dict()

    @task(multiple_outputs=True)
    def plan_training(dataset: dict, packed: dict, check: dict) -> dict:
        from nightshift.pipelines.finetune import open_tracking_run
        from nightshift.pipelines.finetune import plan_training as plan
        from nightshift.records import DatasetVersion, PackedDataset
        from nightshift.stores import registry_for

        context = get_current_context()
        request, version, packed_data = _request(), DatasetVersion.from_dict(dataset), PackedDataset.from_dict(packed)
        recipe = _recipe(request)
        run_key = f"{context['dag_run'].dag_id}/{context['dag_run'].run_id}"
        ranks = request.ranks_per_node(SETTINGS, recipe)
        mlflow_run = open_tracking_run(registry_for(SETTINGS), run_key, request, recipe, version, packed_data,
                                       check["fingerprint"], ranks)
        planned = plan(SETTINGS, _base_model(request), packed_data, recipe, run_dir(SETTINGS, context),
                       ranks=ranks, nodes=request.nodes, tracking_run_id=mlflow_run)
        return {**planned, "mlflow_run_id": mlflow_run, "dataset_tag": version.tag}

    @task.branch
    def choose_backend() -> str:
        request = _request()
        if request.backend == "kubernetes" and request.nodes > 1:
            return "train_kubernetes_nodes"
        return f"train_{request.backend}"

    @task(pool="training", execution_timeout=TRAIN_TIMEOUT)
    def train_local(command: list[str], output_dir: str) -> None:
        from pathlib import Path

        from nightshift.training.launch import free_port, local_env, run_local, with_master_port

        # A port of its own for each attempt: a killed attempt's ranks may still hold the previous one.
        run_local(with_master_port(command, free_port()), local_env(), Path(output_dir).parent / "trainer.log")

    @task(trigger_rule="none_failed_min_one_success")
    def verify_candidate(plan: dict) -> dict:
        from nightshift.pipelines.finetune import verify_candidate as verify
        from nightshift.settings import runtime_env
        from nightshift.stores import registry_for
        from nightshift.training.verify import ReloadCheckFailed

        try:
            return verify(registry_for(SETTINGS), plan, {**os.environ, **runtime_env(SETTINGS)})
        except ReloadCheckFailed as exc:  # the saved weights are wrong: nothing to promote, a person must look
            raise AirflowFailException(f"reload check failed: {exc}") from exc

    @task
    def evaluate(packed: dict, plan: dict) -> dict:
        from nightshift.airflow.connections import judge_endpoint
        from nightshift.evaluation.suite import EvaluationSuite
        from nightshift.pipelines.finetune import evaluate_candidate
        from nightshift.records import PackedDataset
        from nightshift.stores import registry_for

        try:  # a broken suite or judge connection does not mend itself on retry
            suite = EvaluationSuite.load(SETTINGS.evaluation_suite)
            endpoint, note = judge_endpoint(suite.judge.connection, suite.judge.model) if suite.uses_judge \
                else (None, "no judge metric in the suite")
        except ValueError as exc:
            raise AirflowFailException(str(exc)) from exc
        return evaluate_candidate(SETTINGS, registry_for(SETTINGS), _request(), plan, PackedDataset.from_dict(packed),
                                  run_report(SETTINGS, get_current_context()), suite, endpoint, note)

    @task
    def decide_promotion(evaluation: dict, plan: dict) -> dict:
        from nightshift.evaluation.gate import GatePolicy
        from nightshift.pipelines.finetune import gate, write_evaluation_report
        from nightshift.stores import registry_for

        context = get_current_context()
        try:
            policy = GatePolicy.load(SETTINGS.gate_policy)
        except ValueError as exc:  # a broken gate.yaml does not mend itself on retry
            raise AirflowFailException(str(exc)) from exc
        decision = gate(evaluation["comparisons"], evaluation["baseline"]["model"], policy)
        report = run_report(SETTINGS, context)
        html = write_evaluation_report(
            registry_for(SETTINGS), plan["mlflow_run_id"], evaluation["path"], decision,
            f"Evaluation of the candidate trained on {plan['dataset_tag']}",
            {"dataset": plan["dataset_tag"], "DAG run": context["dag_run"].run_id,
             "MLflow run": plan["mlflow_run_id"]}, report,
        )
        print(f"evaluation report: {html}")
        report.publish({"decision": decision.to_dict()})
        return {**decision.to_dict(), "report": str(html)}

    @task.branch
    def route(decision: dict) -> str:
        return "register_candidate" if decision["passed"] else "reject_candidate"

    @task
    def register_candidate(dataset: dict, check: dict, plan: dict) -> dict:
        from pathlib import Path

        from nightshift.pipelines.finetune import register_candidate as register
        from nightshift.records import DatasetVersion
        from nightshift.stores import registry_for

        version = register(
            registry_for(SETTINGS), plan["mlflow_run_id"], Path(plan["output_dir"]) / "checkpoint",
            DatasetVersion.from_dict(dataset), check["fingerprint"],
        )
        return version.to_dict()

    @task.branch
    def release(_version: dict) -> str:
        from nightshift.evaluation.rollout_policy import RolloutPolicy
        from nightshift.pipelines.rollout import release_route
        from nightshift.stores import registry_for

        try:
            policy = RolloutPolicy.load(SETTINGS.rollout_policy)
        except ValueError as exc:  # a broken rollout.yaml does not mend itself on retry
            raise AirflowFailException(str(exc)) from exc
        route, why = release_route(registry_for(SETTINGS), policy)
        print(why)
        return "promote_candidate" if route == "promote" else "start_rollout"

    @task(outlets=[CANDIDATE_ASSET])
    def start_rollout(version: dict) -> dict:
        from nightshift.evaluation.rollout_policy import RolloutPolicy
        from nightshift.pipelines.rollout import start_rollout as start
        from nightshift.records import ModelVersionRecord
        from nightshift.stores import registry_for

        policy = RolloutPolicy.load(SETTINGS.rollout_policy)
        rollout = start(registry_for(SETTINGS), ModelVersionRecord.from_dict(version), policy)
        print(f"v{rollout['version']} is the candidate ({rollout['mode']}); rollout_model takes it from here")
        get_current_context()["outlet_events"][CANDIDATE_ASSET].extra = {"model_version": rollout["version"],
                                                                         "mode": rollout["mode"]}
        return rollout

    @task(outlets=[CHAMPION_ASSET])
    def promote_candidate(version: dict, decision: dict) -> dict:
        from nightshift.airflow.common import triggered_by
        from nightshift.pipelines.finetune import promote_candidate as promote
        from nightshift.records import ModelVersionRecord
        from nightshift.registry.history import ChampionConflict
        from nightshift.stores import registry_for

        context = get_current_context()
        run = f"{context['dag_run'].dag_id}/{context['dag_run'].run_id}"
        evaluation = context["ti"].xcom_pull(task_ids="evaluate") or {}
        try:
            promoted = promote(registry_for(SETTINGS), ModelVersionRecord.from_dict(version), f"{run}/promote",
                               triggered_by(context), run, "; ".join(decision["reasons"]),
                               champion_before=evaluation.get("champion_before"))
        except ChampionConflict as exc:  # evaluated against a champion that is gone: a retry cannot mend that
            raise AirflowFailException(str(exc)) from exc
        # ingest_corpus compares each new corpus with the champion's data: this event tells it which that is.
        context["outlet_events"][CHAMPION_ASSET].extra = {
            "model_version": promoted.version, "dataset_version": promoted.dataset_tag,
        }
        return promoted.to_dict()

    @task
    def reject_candidate(decision: dict, dataset: dict) -> None:
        from nightshift.airflow.notifiers import send_alert
        from nightshift.alerts.channels import Alert

        context = get_current_context()
        send_alert(Alert(
            title=f"candidate trained on {dataset['tag']} was not promoted",
            message="The champion stays. " + "; ".join(decision["reasons"]),
            severity="warning", dag_id=context["dag_run"].dag_id, run_id=context["dag_run"].run_id,
            task_id=context["ti"].task_id, details=decision, report_url=run_report(SETTINGS, context).url,
        ))

    @task(trigger_rule="none_failed_min_one_success")
    def report(dataset: dict, check: dict) -> dict:
        from nightshift.pipelines.finetune import cleanup, publish_outcome
        from nightshift.stores import registry_for

        context = get_current_context()
        ti = context["ti"]
        plan = ti.xcom_pull(task_ids="plan_training") if not check["existing"] else None
        summary = {
            "dataset": dataset,
            "fingerprint": check["fingerprint"],
            "reused": check["existing"],
            "evaluation": ti.xcom_pull(task_ids="evaluate"),
            "decision": ti.xcom_pull(task_ids="decide_promotion"),
            "promoted": ti.xcom_pull(task_ids="promote_candidate"),
            "rollout": ti.xcom_pull(task_ids="start_rollout"),
            "champion": (c.to_dict() if (c := registry_for(SETTINGS).champion()) else None),
            "mlflow_run_id": plan["mlflow_run_id"] if plan else None,
        }
        publish_outcome(run_report(SETTINGS, context), summary)
        if plan:
            registry = registry_for(SETTINGS)
            registry.log_dict(plan["mlflow_run_id"], summary, "cycle_report.json")
            registry.end_run(plan["mlflow_run_id"])
            cleanup(run_dir(SETTINGS, context))
        from nightshift.pipelines.housekeeping import prune_work_dirs

        here = run_dir(SETTINGS, context)
        prune_work_dirs(here.parent, SETTINGS.retention_days, keep=here)
        return summary

    dataset = resolve_dataset()
    check = check_registry(dataset)
    path = choose_path(check)
    reused = reuse_existing(check)
    packed = prepare_data(dataset)
    path >> [reused, packed]
    plan = plan_training(dataset, packed, check)
    backend = choose_backend()
    local = train_local(plan["command"], plan["output_dir"])
    pod = trainer_pod_operator("train_kubernetes", plan, SETTINGS, execution_timeout=TRAIN_TIMEOUT)
    job = trainer_job_operator("train_kubernetes_nodes", plan, SETTINGS, execution_timeout=TRAIN_TIMEOUT)
    plan >> backend >> [local, pod, job]
    verified = verify_candidate(plan)
    [local, pod, job] >> verified
    evaluation = evaluate(packed, plan)
    verified >> evaluation
    decision = decide_promotion(evaluation, plan)
    routed = route(decision)
    registered = register_candidate(dataset, check, plan)
    released = release(registered)
    promoted = promote_candidate(registered, decision)
    rolling = start_rollout(registered)
    released >> [promoted, rolling]
    rejected = reject_candidate(decision, dataset)
    routed >> [registered, rejected]
    [reused, promoted, rolling, rejected] >> report(dataset, check)


finetune_model()
