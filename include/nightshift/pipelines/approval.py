"""What a person reads in an approval form of the Airflow UI (Markdown), and how text goes into it.

The release form (finetune_model's ``approve_release``) shows the evaluation's headline: the gate's metrics with
their intervals, how many golden answers changed with a few of them side by side, and a link to the full report.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

EXAMPLE_CHARS = 300
SHOWN_CHANGES = 3


def code_span(text: str, limit: int = EXAMPLE_CHARS) -> str:
    """Return text shown inside Markdown without it becoming markup (links, HTML, emphasis are inert in a code
    span), on one line and at most ``limit`` characters."""
    text = " ".join(str(text).split())
    if len(text) > limit:
        text = text[:limit - 1] + "…"
    return "`" + re.sub(r"`", "'", text) + "`" if text else "(empty)"


def _number(value: Any) -> str:
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        return "—"
    return f"{value:.4g}"


def release_body(version: dict[str, Any], decision: dict[str, Any], evaluation: dict[str, Any], way: str,
                 report_url: str) -> str:
    """Return the release form's Markdown: what passed, by how much, what changed, where the report is."""
    confidence = evaluation.get("confidence") or 0.95
    lines = [f"**{version['name']} v{version['version']}**, trained on `{version.get('dataset_tag') or '?'}`, passed "
             f"the gate against {code_span(decision.get('baseline') or 'no champion', 80)}. **Approve** releases it "
             f"({way}); **Reject** keeps the champion and records who rejected it and why (the *reason* field).",
             "", f"| metric | candidate | baseline | difference [{confidence:.0%} interval] | gate |",
             "|---|---|---|---|---|"]
    comparisons = {c["metric"]: c for c in evaluation.get("comparisons") or []}
    for check in decision.get("checks") or []:
        c = comparisons.get(check["metric"]) or {}
        interval = (f"{_number(c.get('difference'))} [{_number(c.get('low'))}, {_number(c.get('high'))}]"
                    if c.get("measured", True) and c else "not measured")
        lines.append(f"| {check['metric']} | {_number(c.get('candidate'))} | {_number(c.get('baseline'))} | "
                     f"{interval} | {check['outcome']} |")
    lines += ["", *_changes(evaluation.get("path")), "", f"[The full evaluation report]({report_url})"]
    return "\n".join(lines)


def _changes(path: str | None) -> list[str]:
    from nightshift.reports.evaluation import changed_examples

    try:
        data = json.loads(Path(path).read_text()) if path else {}
    except (OSError, ValueError):
        return ["The per-answer evaluation could not be read: see the report."]
    candidate = (data.get("candidate") or {}).get("examples") or []
    baseline = (data.get("baseline") or {}).get("examples") or []
    changed = changed_examples(candidate, baseline, len(candidate))
    out = [f"**{len(changed)} of {min(len(candidate), len(baseline))} golden answers changed**"
           + (", the largest changes first:" if changed else ".")]
    for i, row in enumerate(changed[:SHOWN_CHANGES], 1):
        out += [f"{i}. question: {code_span(row['question'])}", f"   - candidate: {code_span(row['candidate'])}",
                f"   - champion: {code_span(row['baseline'])}"]
    return out
