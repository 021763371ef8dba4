"""
# finetune_model

Fine-tune the foundation model on a versioned corpus, evaluate it against the champion in the same
harness, and promote it in the MLflow registry only if it passes the gate.

Runs when `ingest_corpus` publishes a new corpus version, or from **Trigger** with the Params below.

| task | does |
|---|---|
| `parse_request` | claims the DAG's lease; checks the Params, the recipe and that the base can train under it |
| `resolve_dataset` | `dataset_version`, else the triggering event's, else the latest |
| `check_registry` | skips training if a promoted version has its fingerprint: corpus, base bytes, recipe, |
|  | ranks, code |
| `prepare_data` | fetches the exact bytes from DVC, tokenizes with the base model's tokenizer, packs blocks |
| `plan_training` | opens the MLflow run, writes the trainer config, builds the `torchrun` command |
| `train_local` | the command on this worker: one rank per GPU, or one CPU rank on every core (`backend: local`); |
|  | in a GPU pod of its own with `NIGHTSHIFT_TRAIN_EXECUTOR=KubernetesExecutor` (docs/deploy.md) |
| `train_kubernetes` | the same command in one GPU pod (`backend: kubernetes`, `nodes: 1`) |
| `train_kubernetes_nodes` | an Indexed Job of `nodes` GPU pods, one per node, rendezvous via a headless Service |
| `verify_candidate` | the checkpoint, reloaded by transformers in a new process, gives the trainer's loss |
| `evaluate` | `include/configs/evaluation.yaml` on candidate and champion: perplexities, greedy answers |
|  | (exact match, token F1, ROUGE-L, refusals), the LLM judge; a paired bootstrap interval per difference |
| `decide_promotion` | applies `include/configs/gate.yaml` to the intervals; writes the HTML report |
| `compare_retrieval` | after the gate: base, fine-tuned, base+RAG and fine-tuned+RAG answer the golden items |
|  | that name their source documents (retrieval recall@k, intervals against fine-tuned; `retrieval.yaml`) |
| `register_candidate` | registers the checkpoint with its report |
| `approve_release` | (`approval: required` in gate.yaml) waits in **Required Actions** for a person: the gate's |
|  | metrics with intervals, the changed answers, the report's link; **Reject** (with a reason) or no answer |
|  | within `approval_timeout_hours` keeps the champion. Skipped when no approval is asked for |
| `release` | `rollout.yaml` says how an approved (or unasked) candidate goes out |
| `decline_release` | records who declined the release and why in the promotion history (`nightshift history`), alerts |
| `promote_candidate` | (`mode: off`, or no champion yet) moves `champion`, only if it still names the version |
|  | the candidate was evaluated against, and records the move (who, why, which evaluation); else fails and alerts |
| `start_rollout` | (`mode: canary` or `shadow`, a champion exists) points `candidate` at it; `rollout_model` goes on |
| `reject_candidate` | keeps the champion and alerts with the gate's reasons (an incident: once while candidates |
|  | keep failing the gate, reminded after `incidents.repeat_hours`, resolved by the next that passes) |
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

from datetime import datetime, timedelta

from airflow.sdk import Param, dag, get_current_context, task

from nightshift.airflow.common import (
    CANDIDATE_ASSET,
    CHAMPION_ASSET,
    CORPUS_ASSET,
    DEFAULT_ARGS,
    current_run,
    fail_fast,
)
from nightshift.airflow.hitl import AskedApproval, answer_of
from nightshift.airflow.kubernetes import train_executor_args, trainer_job_operator, trainer_pod_operator
from nightshift.airflow.notifiers import AlertNotifier
from nightshift.airflow.tracking import FailTrackingRun
from nightshift.evaluation.approval import ReleaseApproval
from nightshift.settings import DEFAULT_FOUNDATION_MODEL, load_settings
from nightshift.training.recipe import available as available_recipes

SETTINGS = load_settings()
TRAIN_TIMEOUT = timedelta(seconds=SETTINGS.train_timeout_s)
try:  # how long a release waits for a person; a broken gate.yaml fails decide_promotion with its message
    APPROVAL_TIMEOUT = timedelta(hours=ReleaseApproval.load(SETTINGS.gate_policy).timeout_hours)
except (ValueError, OSError):
    APPROVAL_TIMEOUT = timedelta(hours=ReleaseApproval().timeout_hours)


def _steps():
    # Each task is one call of a function of this module; it is imported when a task runs, not at parse time
    # (it pulls numpy and the evaluation stack: about 0.18 s that every parse of this file would pay).
    from nightshift.pipelines import finetune_tasks

    return finetune_tasks


def _run():
    return current_run(SETTINGS)


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
            None, type=["null", "string"], minLength=1, maxLength=255, title="Base model",
            description="Name of a model imported under $NIGHTSHIFT_HOME/models (a Hugging Face checkpoint "
            "folder); other folders are refused. Empty: the base chosen on select_foundation_model's leaderboard, "
            f"else {DEFAULT_FOUNDATION_MODEL}.",
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
    def parse_request() -> dict:
        from nightshift.airflow.run_lock import claim_run

        context = get_current_context()
        claim_run(SETTINGS, context)
        with fail_fast():  # what a person asked for does not change on retry
            return _steps().parse_request(_run(), context["params"])

    @task
    @fail_fast()
    def resolve_dataset(request: dict) -> dict:
        return _steps().resolve_dataset(_run(), request)

    @task
    def check_registry(request: dict, dataset: dict) -> dict:
        return _steps().check_registry(_run(), request, dataset)

    @task.branch
    def choose_path(check: dict) -> str:
        return _steps().choose_path(check)

    @task
    def reuse_existing(check: dict) -> dict:
        return _steps().reuse_existing(check)

    @task
    def prepare_data(request: dict, dataset: dict) -> dict:
        return _steps().prepare_data(_run(), request, dataset)

    @task(multiple_outputs=True)
    def plan_training(request: dict, dataset: dict, packed: dict, check: dict) -> dict:
        return _steps().plan_training(_run(), request, dataset, packed, check)

    @task.branch
    def choose_backend(request: dict) -> str:
        return _steps().choose_backend(request)

    @task(pool="training", execution_timeout=TRAIN_TIMEOUT, **train_executor_args(SETTINGS))
    def train_local(command: list[str], output_dir: str) -> None:
        _steps().train_local(command, output_dir)

    @task(trigger_rule="none_failed_min_one_success")
    def verify_candidate(plan: dict) -> dict:
        from nightshift.training.verify import ReloadCheckFailed

        # The saved weights are wrong: nothing to promote, a person must look.
        with fail_fast(ReloadCheckFailed, prefix="reload check failed: "):
            return _steps().verify_candidate(_run(), plan)

    @task
    def evaluate(request: dict, packed: dict, plan: dict) -> dict:
        from nightshift.airflow.connections import judge_endpoint

        with fail_fast(ValueError):  # a broken suite or judge connection does not mend itself on retry
            evaluation = _steps().load_evaluation(_run(), judge_endpoint)
        return _steps().evaluate(_run(), request, packed, plan, evaluation)

    @task
    def compare_retrieval(request: dict, plan: dict) -> dict:
        from nightshift.airflow.connections import judge_endpoint

        with fail_fast(ValueError):  # a broken suite does not mend itself on retry
            evaluation = _steps().load_evaluation(_run(), judge_endpoint)
        return _steps().compare_retrieval(_run(), request, plan, evaluation)

    @task
    def decide_promotion(evaluation: dict, plan: dict) -> dict:
        from nightshift.airflow.notifiers import send_alert

        with fail_fast(ValueError):  # nor does a broken gate.yaml
            policy = _steps().gate_policy(_run())
        decision = _steps().decide_promotion(_run(), evaluation, plan, policy)
        if decision["passed"]:  # an open "not promoted" incident resolves
            _steps().gate_incident(_run(), None, send_alert)
        return decision

    @task.branch
    def route(decision: dict) -> str:
        return _steps().route(decision)

    @task
    def register_candidate(dataset: dict, check: dict, plan: dict) -> dict:
        return _steps().register_candidate(_run(), dataset, check, plan)

    def ask_for_approval(context) -> dict | None:
        ti = context["ti"]
        with fail_fast(ValueError):  # nor a broken gate.yaml or rollout.yaml
            return _steps().approval_request(_run(), ti.xcom_pull(task_ids="register_candidate"),
                                             ti.xcom_pull(task_ids="decide_promotion"),
                                             ti.xcom_pull(task_ids="evaluate"))

    @task.branch(trigger_rule="none_failed_min_one_success")  # approve_release is skipped when nobody is asked
    def release(_version: dict, answer: dict | None) -> str:
        with fail_fast(ValueError):  # nor a broken rollout.yaml
            policy = _steps().rollout_policy(_run())
        return _steps().release(_run(), policy, answer_of(answer) if answer else None)

    @task
    def decline_release(version: dict, decision: dict, answer: dict) -> dict:
        from nightshift.airflow.notifiers import send_alert

        hours = APPROVAL_TIMEOUT.total_seconds() / 3600
        alert = _steps().decline_release(_run(), version, decision, answer_of(answer), hours)
        send_alert(alert)
        return alert.details

    @task(outlets=[CANDIDATE_ASSET])
    def start_rollout(version: dict) -> dict:
        rollout = _steps().start_rollout(_run(), version)
        get_current_context()["outlet_events"][CANDIDATE_ASSET].extra = {"model_version": rollout["version"],
                                                                         "mode": rollout["mode"]}
        return rollout

    @task(outlets=[CHAMPION_ASSET])
    def promote_candidate(version: dict, decision: dict, evaluation: dict) -> dict:
        from nightshift.registry.history import ChampionConflict

        # Evaluated against a champion that is gone: a retry cannot mend that.
        with fail_fast(ChampionConflict):
            promoted = _steps().promote_candidate(_run(), version, decision, evaluation)
        # ingest_corpus compares each new corpus with the champion's data: this event tells it which that is.
        get_current_context()["outlet_events"][CHAMPION_ASSET].extra = {
            "model_version": promoted["version"], "dataset_version": promoted["dataset_tag"],
        }
        return promoted

    @task
    def reject_candidate(decision: dict, dataset: dict) -> None:
        from nightshift.airflow.notifiers import send_alert

        # An incident: alerted when candidates start failing the gate, reminded while they keep failing.
        _steps().gate_incident(_run(), _steps().reject_candidate(_run(), decision, dataset), send_alert)

    @task(trigger_rule="none_failed_min_one_success")
    def report(dataset: dict, check: dict) -> dict:
        ti = get_current_context()["ti"]  # results of branches not taken are None
        outcomes = {task_id: ti.xcom_pull(task_ids=task_id) for task_id in _steps().OUTCOMES}
        return _steps().report(_run(), dataset, check, outcomes)

    request = parse_request()
    dataset = resolve_dataset(request)
    check = check_registry(request, dataset)
    path = choose_path(check)
    reused = reuse_existing(check)
    packed = prepare_data(request, dataset)
    path >> [reused, packed]
    plan = plan_training(request, dataset, packed, check)
    backend = choose_backend(request)
    local = train_local(plan["command"], plan["output_dir"])
    pod = trainer_pod_operator("train_kubernetes", plan, SETTINGS, execution_timeout=TRAIN_TIMEOUT)
    job = trainer_job_operator("train_kubernetes_nodes", plan, SETTINGS, execution_timeout=TRAIN_TIMEOUT)
    plan >> backend >> [local, pod, job]
    verified = verify_candidate(plan)
    [local, pod, job] >> verified
    evaluation = evaluate(request, packed, plan)
    verified >> evaluation
    decision = decide_promotion(evaluation, plan)
    routed = route(decision)
    # After the gate, before the release: base, fine-tuned, base+RAG, fine-tuned+RAG on the page and in MLflow. Not
    # beside the release: its model runs would take the CPU from the registration and the approval's wait.
    decision >> compare_retrieval(request, plan) >> routed
    registered = register_candidate(dataset, check, plan)
    approval = AskedApproval(
        task_id="approve_release", ask=ask_for_approval, options=["Approve", "Reject"], defaults=["Reject"],
        response_timeout=APPROVAL_TIMEOUT,
        params={"reason": Param(None, type=["null", "string"], maxLength=1000, title="Reason",
                                description="Why, above all for a rejection (kept in the promotion history, "
                                "`nightshift history`).")},
    )
    registered >> approval
    released = release(registered, approval.output)
    promoted = promote_candidate(registered, decision, evaluation)
    rolling = start_rollout(registered)
    declined = decline_release(registered, decision, approval.output)
    released >> [promoted, rolling, declined]
    rejected = reject_candidate(decision, dataset)
    routed >> [registered, rejected]
    [reused, promoted, rolling, rejected, declined] >> report(dataset, check)


finetune_model()
