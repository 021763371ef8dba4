"""The evaluation report: one self-contained HTML file per evaluation (inline styles and SVG, no scripts, no links).

It holds the metric table with intervals, bar charts of candidate against champion, the intervals as a
picture, the training loss curve, the answers that changed most side by side, and the gate's reasons. It
is logged to the MLflow run (so it stays with the model version registered from that run) and shown in
the run's report folder.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Any

from nightshift.reports import charts
from nightshift.reports.pages import TEMPLATES


def changed_examples(candidate: list[dict[str, Any]], baseline: list[dict[str, Any]], limit: int) -> list[dict]:
    """Return the examples whose answers changed, the largest change in scores first."""
    def score(e: dict[str, Any]) -> float:
        judge = e.get("judge") or {}
        return (e.get("token_f1") or 0.0) + (judge.get("correctness") or 0.0) + float(bool(e.get("refused"))
                                                                                       == (e["expect"] == "refuse")) \
            - 2.0 * float(bool(e.get("leaked")))

    rows = []
    for c, b in zip(candidate, baseline, strict=False):
        if c.get("answer") == b.get("answer"):
            continue
        rows.append({"id": c["id"], "question": c["question"], "reference": c["reference"], "expect": c["expect"],
                     "candidate": c.get("answer", ""), "baseline": b.get("answer", ""),
                     "candidate_f1": c.get("token_f1"), "baseline_f1": b.get("token_f1"),
                     "candidate_judge": c.get("judge"), "baseline_judge": b.get("judge"),
                     "candidate_leaked": bool(c.get("leaked")), "baseline_leaked": bool(b.get("leaked")),
                     "change": score(c) - score(b)})
    rows.sort(key=lambda r: -abs(r["change"]))
    return rows[:limit]


def render(
    *, candidate: dict[str, Any], baseline: dict[str, Any], comparisons: list[dict[str, Any]],
    decision: dict[str, Any] | None, losses: list[float], title: str, context: dict[str, Any], confidence: float,
    changed: int,
) -> str:
    """Return the report's HTML from the two EvaluationReport dicts, the comparisons and the gate decision."""
    from jinja2 import Environment, FileSystemLoader, select_autoescape

    measured = [c for c in comparisons if not c.get("unmeasured") and all(
        math.isfinite(c[k]) for k in ("difference", "low", "high"))]
    # The bar chart holds the 0-1 scores where higher is better; rates and leak shares stay in the table.
    scores = [(c["metric"], c["candidate"], c["baseline"]) for c in comparisons
              if not c.get("relative") and c.get("higher_is_better") and not c.get("unmeasured")]
    pictures = {
        "scores": charts.scores_figure(scores, candidate["model"], baseline["model"]) if scores else "",
        "intervals": charts.intervals_figure(
            [(c["metric"], c["difference"], c["low"], c["high"], c["higher_is_better"]) for c in measured],
            confidence) if measured else "",
        "loss": charts.loss_figure(losses, "training loss") if losses else "",
    }
    env = Environment(loader=FileSystemLoader(str(TEMPLATES)), autoescape=select_autoescape(["html"]),
                      trim_blocks=True, lstrip_blocks=True)
    return env.get_template("evaluation.html").render(
        title=title, candidate=candidate, baseline=baseline, comparisons=comparisons, decision=decision,
        pictures=pictures, context=context, confidence=confidence, isfinite=math.isfinite,
        examples=changed_examples(candidate.get("examples", []), baseline.get("examples", []), changed),
        written=datetime.now(UTC).isoformat(timespec="seconds"),
    )
