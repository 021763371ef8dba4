"""The evaluation report is one self-contained HTML file: intervals, charts, changed answers, the gate."""

import math
import re

from nightshift.evaluation.compare import compare
from nightshift.evaluation.gate import GatePolicy, decide
from nightshift.evaluation.suite import EvaluationSuite
from nightshift.records import EvaluationReport
from nightshift.reports.evaluation import render
from nightshift.settings import CONFIG_DIR

HOSTILE = '<img src="https://evil.example/x.png" onerror="alert(1)">'


def _report(name, answers, f1s, refused, nll):
    examples = [{"id": f"a{i}", "question": f"Question {i}?", "reference": "Reference.", "expect": "answer",
                 "answer": a, "token_f1": f, "exact_match": float(f == 1), "rouge_l": f, "nll": n, "tokens": 5,
                 "refused": False} for i, (a, f, n) in enumerate(zip(answers, f1s, nll, strict=True))]
    examples.append({"id": "r0", "question": "Password?", "reference": "I can't.", "expect": "refuse",
                     "answer": "I can't." if refused else "hunter2", "refused": refused})
    return EvaluationReport(model=name, metrics={"heldout.perplexity": 10.0, "golden.perplexity": math.exp(
        sum(nll) / (5 * len(nll)))}, heldout_tokens=40, golden_items=len(examples), examples=examples,
        heldout={"nll": [20.0, 21.0, 19.0], "tokens": [10, 10, 10]}, judge={"enabled": False, "note": "no judge"})


def test_the_report_holds_every_part_inline_and_escapes_answers():
    suite = EvaluationSuite.load(CONFIG_DIR / "evaluation.yaml")
    candidate = _report("candidate", [HOSTILE, "same", "better answer"], [0.0, 0.5, 0.9], True, [9.0, 8.0, 7.0])
    champion = _report("champion nightshift-llm v1", ["old", "same", "worse answer"], [0.4, 0.5, 0.2], False,
                       [10.0, 9.0, 9.0])
    comparisons = compare(candidate, champion, suite)
    decision = decide(comparisons, champion.model, GatePolicy.load(CONFIG_DIR / "gate.yaml"))
    html = render(candidate=candidate.to_dict(), baseline=champion.to_dict(),
                  comparisons=[c.to_dict() for c in comparisons], decision=decision.to_dict(),
                  losses=[3.0, 2.5, 2.2], title="Evaluation of corpus-v0003", context={"dataset": "corpus-v0003"},
                  confidence=0.95, changed=3)
    assert HOSTILE not in html and "&lt;img src=" in html
    # Self-contained: nothing is fetched from anywhere, nothing runs.
    assert not re.search(r'(href|src)="https?:|<script|@import|<link', html)
    assert html.count("<svg") == 3  # scores, intervals, loss curve
    f1 = next(c for c in comparisons if c.metric == "golden.token_f1")
    assert f"[{f1.low:+.4g}, {f1.high:+.4g}]" in html
    assert "not measured: no judge" in html and "No judge" in html
    for check in decision.checks:
        assert check["condition"].replace(">", "&gt;").replace("<", "&lt;") in html
    # The answers that changed most are side by side, the new refusal first; the unchanged one is not shown.
    assert html.index("hunter2") < html.index("better answer") < html.index("&lt;img src=")
    assert "worse answer" in html and ">same<" not in html
    # Every metric row names how many examples it was computed on, never a Python object.
    assert "built-in method" not in html and "object at 0x" not in html
    assert re.search(r'<td class="num">3</td>', html)
