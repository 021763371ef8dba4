"""The tasks of evaluate_prompt as plain functions: a prompt template is released like a model.

The champion answers the evaluation suite twice through the one harness (evaluation/harness.py): under the
candidate prompt and under the production prompt (none before the first release). The paired bootstrap compares
the two, the gate policy of models (gate.yaml) decides, rules on the held-out text skipped (a prompt does not
change how the model reads it). A passing candidate moves the prompt's ``production`` alias (a compare-and-set
with history, registry/prompt_registry.py), or, with ``mode: canary``, becomes the ``candidate`` for a share of
the traffic; a rejected one is recorded as declined. An evaluation of one model version under one prompt with one
suite is kept in the cache, so the production prompt's side is measured once, not at every candidate.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path
from typing import Any

from nightshift.evaluation.compare import compare
from nightshift.evaluation.gate import GatePolicy, decide
from nightshift.evaluation.harness import evaluate_model
from nightshift.evaluation.judge import Judge
from nightshift.evaluation.metrics import CATALOG
from nightshift.evaluation.suite import EvaluationSuite
from nightshift.pipelines.run import Run
from nightshift.prompts.template import PromptTemplate
from nightshift.records import EvaluationReport, MetricComparison, json_safe
from nightshift.registry.mlflow_registry import MANIFEST_TAG
from nightshift.registry.prompt_registry import CANDIDATE, PRODUCTION, PromptRegistry, PromptVersion
from nightshift.stores import prompt_registry_for, registry_for

log = logging.getLogger(__name__)

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
PROMPT_INDEPENDENT = {m: "a prompt does not change how the model reads the held-out text"
                      for m, spec in CATALOG.items() if spec.items == "heldout"}
"""Metrics a prompt release cannot move: their gate rules are skipped, and the report says why."""
MODES = ("promote", "canary")


def parse_request(run: Run, params: dict[str, Any]) -> dict[str, Any]:
    """Return the release to evaluate: the prompt, its candidate version (the newest when none is named), the
    production version now (None before the first release) and the champion it is evaluated with.

    ValueError or LookupError say what to change: a run that cannot start does not mend on retry.
    """
    name = params.get("prompt")
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise ValueError("prompt must be the name of a registered prompt (letters, digits, '_' or '-')")
    wanted = params.get("version")
    if wanted is not None and (not isinstance(wanted, int) or isinstance(wanted, bool) or wanted < 1):
        raise ValueError("version must be a positive integer, or empty for the newest version")
    mode = params.get("mode") or "promote"
    if mode not in MODES:
        raise ValueError(f"mode must be one of {list(MODES)}")
    prompts = prompt_registry_for(run.settings)
    versions = prompts.versions(name)
    if not versions:
        raise LookupError(f"no prompt named {name} is registered: nightshift prompts register (from "
                          "include/configs/prompts/)")
    candidate = prompts.get(name, wanted) if wanted else versions[-1]
    production = prompts.by_alias(name, PRODUCTION)
    if production is not None and production.version == candidate.version:
        raise ValueError(f"{candidate.label} is already the production version: register a changed template, or "
                         "name another version")
    champion = registry_for(run.settings).champion()
    if champion is None:
        raise LookupError("no champion model yet: a prompt is evaluated with the champion (run finetune_model "
                          "first)")
    return {"prompt": name, "candidate": candidate.version, "production": production.version if production else None,
            "champion": champion.to_dict(), "mode": mode, "reason": str(params.get("reason") or "")[:500]}


def _suite_digest(suite: EvaluationSuite, path: Path) -> str:
    """Return a hash of what decides an evaluation's numbers: the suite file, its golden set and the harness."""
    import nightshift.evaluation as evaluation

    digest = hashlib.sha256(Path(path).read_bytes() + b"\0" + suite.golden_set.read_bytes())
    for code in sorted(Path(evaluation.__file__).parent.glob("*.py")):
        digest.update(code.name.encode() + b"\0" + code.read_bytes())
    return digest.hexdigest()[:24]


def _evaluate(run: Run, model_dir: Path, measured_by: list[Any], label: str, template: PromptTemplate | None,
              suite: EvaluationSuite, judge: Judge | None, note: str) -> EvaluationReport:
    """Return the champion's report under ``template``, from the cache when it was measured before with the same
    ``measured_by`` (the model's manifest, the suite and harness, the judge: another judge gives other scores)."""
    key = hashlib.sha256(json.dumps([*measured_by, template.digest() if template else None]).encode())
    path = run.settings.cache_dir / "prompt-evaluations" / f"{key.hexdigest()[:32]}.json"
    if path.is_file():
        try:
            report = EvaluationReport.from_dict({**json.loads(path.read_text()), "model": label})
            log.info("%s: measured before, read from the cache", label)
            return report
        except (ValueError, TypeError):
            log.warning("%s: the cached evaluation is unreadable; measuring again", label)
    golden = suite.golden()
    report = evaluate_model(model_dir, label, None, suite, golden, judge, note, prompt=template)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{run.run_id[-8:]}.tmp")
    tmp.write_text(json.dumps(report.to_dict()))
    tmp.replace(path)
    return report


def evaluate(run: Run, request: dict[str, Any], evaluation: tuple[Any, Any, str]) -> dict[str, Any]:
    """Evaluate the champion under the candidate prompt and under the production prompt; return the comparisons
    (the whole record goes to the run's folder)."""
    from nightshift.records import ModelVersionRecord

    suite, endpoint, note = evaluation
    settings = run.settings
    registry, prompts = registry_for(settings), prompt_registry_for(settings)
    champion = ModelVersionRecord.from_dict(request["champion"])
    model_dir = registry.download(registry.get(champion.version), settings.cache_dir / "registry")
    model_key = registry.version_tags(champion.version).get(MANIFEST_TAG) or f"{champion.name}/v{champion.version}"
    judge = Judge(endpoint, suite.judge, settings.cache_dir / "judge") if suite.uses_judge and endpoint else None
    note = note if suite.uses_judge else "no judge metric in the suite"
    candidate = prompts.get(request["prompt"], request["candidate"])
    production = prompts.get(request["prompt"], request["production"]) if request["production"] else None
    measured_by = [model_key, _suite_digest(suite, settings.evaluation_suite),
                   [judge.endpoint.base_url, judge.model] if judge else None]
    cand = _evaluate(run, model_dir, measured_by, f"{champion.label} + {candidate.label}", candidate.template, suite,
                     judge, note)
    base_label = f"{champion.label} + {production.label}" if production else f"{champion.label}, no prompt"
    base = _evaluate(run, model_dir, measured_by, base_label, production.template if production else None, suite,
                     judge, note)
    comparisons = compare(cand, base, suite)
    for c in comparisons:
        log.info("%s", c.describe())
    full = {"candidate": cand.to_dict(), "baseline": base.to_dict(), "comparisons": [c.to_dict() for c in comparisons],
            "confidence": suite.bootstrap.confidence, "changed_examples": suite.changed_examples}
    path = run.work_dir() / "evaluation.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(full))
    tmp.replace(path)
    return json_safe({"candidate": cand.summary(), "baseline": base.summary(), "path": str(path),
                      "comparisons": full["comparisons"], "confidence": suite.bootstrap.confidence})


def decide_release(run: Run, request: dict[str, Any], evaluation: dict[str, Any], policy: GatePolicy) -> dict[str, Any]:
    """Apply the gate's rules (those on held-out text skipped); write the report; return the decision."""
    from nightshift.reports.evaluation import render
    from nightshift.reports.store import write_text

    comparisons = [MetricComparison.from_dict(c) for c in evaluation["comparisons"]]
    decision = decide(comparisons, evaluation["baseline"]["model"], policy, PROMPT_INDEPENDENT)
    log.info("gate: %s", decision.summary)
    data = json.loads(Path(evaluation["path"]).read_text())
    title = f"Prompt {request['prompt']} v{request['candidate']} against " + (
        f"v{request['production']}" if request["production"] else "no prompt")
    html = render(candidate=data["candidate"], baseline=data["baseline"], comparisons=data["comparisons"],
                  decision=decision.to_dict(), losses=[], title=title,
                  context={"prompt": request["prompt"], "candidate": f"v{request['candidate']}",
                           "production": f"v{request['production']}" if request["production"] else "none",
                           "model": f"{request['champion']['name']} v{request['champion']['version']}",
                           "DAG run": run.run_id},
                  confidence=data["confidence"], changed=data["changed_examples"])
    write_text(run.report.folder / "evaluation.html", html)
    run.report.publish({"decision": decision.to_dict(), "prompt": {k: request[k] for k in
                                                                   ("prompt", "candidate", "production", "mode")}})
    return {**decision.to_dict(), "report": run.report.path + "/evaluation.html"}


def route(decision: dict[str, Any], request: dict[str, Any]) -> str:
    """Return the next task: promote (or canary) a candidate that passed the gate, else decline it."""
    if not decision["passed"]:
        return "decline_prompt"
    # A canary compares the candidate with the production prompt on live traffic: with none, it could never end.
    return "canary_prompt" if request["mode"] == "canary" and request["production"] else "promote_prompt"


def _evidence(decision: dict[str, Any]) -> dict[str, Any]:
    return {"report": decision.get("report", ""), "gate": "; ".join(decision.get("reasons") or [])[:1500]}


def _candidate(prompts: PromptRegistry, request: dict[str, Any]) -> PromptVersion:
    return prompts.get(request["prompt"], request["candidate"])


def promote(run: Run, request: dict[str, Any], decision: dict[str, Any]) -> dict[str, Any]:
    """Move ``production`` to the candidate, only if it still names the version it was evaluated against
    (PromptConflict otherwise: a retry cannot mend that); return the move."""
    prompts = prompt_registry_for(run.settings)
    why = request["reason"] or "passed the gate"
    move = prompts.move(_candidate(prompts, request), key=f"{run.key}/promote", expected=request["production"],
                        kind="promotion", by=run.started_by, dag_run=run.key, reason=why,
                        evaluation=_evidence(decision))
    print(f"{request['prompt']}@{PRODUCTION} is v{move.to_version}; the endpoint applies it at its next poll")
    return move.to_dict()


def canary(run: Run, request: dict[str, Any], decision: dict[str, Any], share: float) -> dict[str, Any]:
    """Record that the version passed the gate for a canary, and point the prompt's ``candidate`` alias at it for
    ``share`` of the traffic; return the rollout."""
    prompts = prompt_registry_for(run.settings)
    version = _candidate(prompts, request)
    prompts.note(version, "canary", key=f"{run.key}/canary", by=run.started_by, dag_run=run.key,
                 reason=request.get("reason") or "passed the gate", evaluation=_evidence(decision))
    prompts.start_rollout(version, share)
    print(f"{version.label} is the {CANDIDATE} prompt for {share:.0%} of the traffic; rollout_model takes it from here")
    return {"prompt": version.name, "version": version.version, "share": share}


def decline(run: Run, request: dict[str, Any], decision: dict[str, Any]):
    """Record the rejected candidate in the prompt's history; return the alert that says so."""
    from nightshift.alerts.channels import Alert

    prompts = prompt_registry_for(run.settings)
    prompts.decline(_candidate(prompts, request), key=f"{run.key}/decline", by="gate", dag_run=run.key,
                    reason="failed the gate", evaluation=_evidence(decision))
    failed = [c["metric"] for c in decision["checks"] if c["outcome"] == "failed"]
    return Alert(
        title=f"prompt {request['prompt']} v{request['candidate']} was not released",
        message=f"It failed the gate on {', '.join(failed) or 'its rules'}; the production prompt stays. "
                "Its history: `nightshift prompts history " + request["prompt"] + "`.",
        severity="warning", dag_id=run.dag_id, run_id=run.run_id, task_id="decline_prompt",
        details={"prompt": request["prompt"], "version": request["candidate"], "failed": failed},
        report_url=run.report.url,
    )
