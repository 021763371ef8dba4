"""golden.format_rate: answers in the expected language and format, the golden items' ``format`` validated, the
metric computed over the items that have a format and compared like any other."""

import json

import pytest

from nightshift.evaluation.harness import aggregate, per_example, score_answer
from nightshift.evaluation.metrics import follows_format
from nightshift.evaluation.suite import EvaluationSuite, GoldenItem, load_golden

ENGLISH = "The observatory is closed on Mondays and Tuesdays."
FRENCH = "L'observatoire est fermé le lundi et le mardi."


def test_language_length_and_pattern():
    assert follows_format(ENGLISH, {"language": "en"}) == (True, "")
    assert follows_format(FRENCH, {"language": "en"}) == (False, "language")
    assert follows_format(FRENCH, {"language": "fr"}) == (True, "")
    assert follows_format("Oui, merci", {"language": "en"}) == (True, "")  # 9 letters: too short to tell
    # Letters, not words: Chinese and Japanese are written without spaces.
    assert follows_format("观测站周一和周二关闭。", {"language": "en"}) == (False, "language")
    assert follows_format("天文台は月曜日と火曜日は休館です。", {"language": "en"}) == (False, "language")
    # An answer that opens in English and goes on in German fails on its German sentence.
    assert follows_format(ENGLISH + " Das Observatorium ist montags und dienstags geschlossen, leider.",
                          {"language": "en"}) == (False, "language")
    assert follows_format("48", {"max_words": 4}) == (True, "")
    assert follows_format("The planetarium has 48 seats.", {"max_words": 4}) == (False, "max_words")
    assert follows_format("No, it is closed.", {"pattern": r"^\W*(yes|no)\b"}) == (True, "")
    assert follows_format("It is closed.", {"pattern": r"^\W*(yes|no)\b"}) == (False, "pattern")


def test_a_pattern_that_backtracks_for_ever_counts_as_not_matched():
    assert follows_format("a" * 40 + "!", {"pattern": r"^(a+)+$"}) == (False, "pattern")


def test_the_format_of_an_item_is_validated(tmp_path):
    def golden(fmt):
        path = tmp_path / "g.jsonl"
        path.write_text(json.dumps({"question": "q", "answer": "a", "format": fmt}) + "\n")
        return path

    assert load_golden(golden({"max_words": 3, "language": "de"}))[0].format == {"max_words": 3, "language": "de"}
    for fmt, message in [({"colour": 1}, "unknown fields"), ({"language": "klingon"}, "ISO 639-1"),
                         ({"max_words": 0}, "from 1 to 1000"), ({"pattern": "("}, "not a valid regular"),
                         ({"pattern": "x" * 301}, "1 to 300"), ("short", "must be a mapping")]:
        with pytest.raises(ValueError, match=message):
            load_golden(golden(fmt))


def test_the_suites_language_applies_to_every_item_and_an_item_overrides_it(tmp_path):
    path = tmp_path / "evaluation.yaml"
    path.write_text("golden_set: golden_qa.jsonl\nmetrics: [golden.format_rate]\nanswer_language: en\n")
    suite = EvaluationSuite.load(path)
    assert suite.format_of(GoldenItem("q", "a")) == {"language": "en"}
    assert suite.format_of(GoldenItem("q", "a", format={"language": None, "max_words": 2})) == {"max_words": 2}
    path.write_text("golden_set: golden_qa.jsonl\nmetrics: [golden.format_rate]\nanswer_language: xx\n")
    with pytest.raises(ValueError, match="answer_language must be an ISO 639-1 code"):
        EvaluationSuite.load(path)


def test_format_rate_counts_the_items_with_a_format():
    items = [GoldenItem("q1", "a", id="a"), GoldenItem("q2", "b", id="b"), GoldenItem("q3", "c", id="c")]
    answers = [ENGLISH, FRENCH, "Yes"]
    forms = [{"language": "en"}, {"language": "en"}, {}]
    examples = [{"id": i.id, "expect": i.expect, **score_answer(i, a, (), (), f)}
                for i, a, f in zip(items, answers, forms, strict=True)]
    assert [e.get("format_ok") for e in examples] == [True, False, None]
    assert examples[1]["format_broken"] == "language"
    assert per_example(examples, "golden.format_rate") == (["a", "b"], [1.0, 0.0])
    assert aggregate(examples, {"golden.format_rate"}) == {"golden.format_rate": 0.5}
