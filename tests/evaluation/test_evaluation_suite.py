import pytest

from nightshift.evaluation.suite import EvaluationSuite, load_golden
from nightshift.settings import CONFIG_DIR, GOLDEN_QA


def test_shipped_suite_and_golden_set_load():
    suite = EvaluationSuite.load(CONFIG_DIR / "evaluation.yaml")
    items = suite.golden()
    assert suite.uses_judge and "golden.token_f1" in suite.metrics
    assert {i.expect for i in items} == {"answer", "refuse"} and len({i.id for i in items}) == len(items)
    assert load_golden(GOLDEN_QA) == items


@pytest.mark.parametrize(("text", "message"), [
    ("metrics: [golden.bleu]\n", "unknown metric 'golden.bleu'"),
    ("metrics: []\n", "metrics must be a non-empty list"),
    ("metrics: [golden.token_f1]\nbootstrap: {resamples: 5}\n", "bootstrap.resamples must be an integer"),
    ("metrics: [golden.token_f1]\nbootstrap: {confidence: 1.5}\n", "bootstrap.confidence must be a number"),
    ("metrics: [golden.token_f1]\njudge: {temperature: 1}\n", "unknown judge fields ['temperature']"),
    ("metrics: [golden.refusal_rate]\n", "needs refusal_markers"),
    ("metrics: [golden.token_f1]\ngolden_set: /nowhere/golden.jsonl\n", "does not exist"),
    ("metrics: [golden.token_f1]\nextra: 1\n", "unknown fields ['extra']"),
])
def test_bad_suites_name_the_file_and_field(tmp_path, text, message):
    path = tmp_path / "suite.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match="suite.yaml") as err:
        EvaluationSuite.load(path)
    assert message in str(err.value)


@pytest.mark.parametrize(("line", "message"), [
    ('{"question": "q"}', "need string fields"),
    ('{"question": "q", "answer": "a", "expect": "maybe"}', "expect must be one of"),
    ("not json", "not a JSON object"),
    ('{"question": "q", "answer": "a", "must_not_contain": "hunter2"}', "must_not_contain must be a list"),
    ('{"question": "q", "answer": "a", "must_not_contain": ["ok", "hunter2"]}', "strings of 4 to 200 characters"),
    ('{"question": "q", "answer": "a", "must_not_contain": [42]}', "must_not_contain must be a list"),
    ('{"question": "q", "answer": "a", "must_not_contain": ["x' + "y" * 300 + '"]}', "4 to 200 characters"),
    # Leaks are found by letters and digits alone: "a b c" would be found in every answer holding "abc".
    ('{"question": "q", "answer": "a", "must_not_contain": ["a b c", "hunter2"]}', "at least 4 of them letters"),
    ('{"question": "q", "answer": "a", "must_not_contain": ["\\u200b-#-\\u200b-#"]}', "at least 4 of them letters"),
])
def test_bad_golden_items_name_the_line(tmp_path, line, message):
    path = tmp_path / "g.jsonl"
    path.write_text('{"question": "ok", "answer": "ok"}\n' + line + "\n")
    with pytest.raises(ValueError, match="g.jsonl:2") as err:
        load_golden(path)
    assert message in str(err.value)


def test_every_shipped_question_to_refuse_plants_a_secret_its_reference_does_not_hold():
    from nightshift.evaluation.metrics import is_refusal, leaks

    suite = EvaluationSuite.load(CONFIG_DIR / "evaluation.yaml")
    refuse = [i for i in suite.golden() if i.expect == "refuse"]
    assert refuse and all(i.must_not_contain for i in refuse)
    # The reference refusals are refusals to the shipped markers, and leak nothing.
    assert all(is_refusal(i.answer, suite.refusal_markers) and not leaks(i.answer, i.must_not_contain)
               for i in refuse)
