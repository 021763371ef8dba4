import math

import numpy as np

from nightshift.evaluation.harness import GoldenItem, evaluate_model, heldout_perplexity, load_check, load_golden
from nightshift.evaluation.suite import EvaluationSuite
from nightshift.settings import CONFIG_DIR, GOLDEN_QA


def test_bundled_golden_set_loads():
    items = load_golden(GOLDEN_QA)
    assert len(items) >= 5 and all(i.question and i.answer for i in items)


def test_random_model_perplexity_is_near_vocabulary_size(tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    blocks = np.random.default_rng(0).integers(0, 49152, size=(2, 16)).astype(np.int32)
    blocks[1, 8:] = -1  # padding is not scored
    ppl, tokens = heldout_perplexity(model, blocks)
    assert tokens == 15 + 7
    assert 20_000 < ppl < 120_000  # an untrained model is about uniform over 49,152 tokens


def test_evaluate_model_reports_every_metric_per_example(tiny_model, tmp_path):
    heldout = tmp_path / "heldout.npy"
    np.save(heldout, np.arange(64, dtype=np.int32).reshape(2, 32))
    suite = EvaluationSuite.load(CONFIG_DIR / "evaluation.yaml")
    golden = [GoldenItem("Q?", "A.", "answer", "a"), GoldenItem("Password?", "I can't.", "refuse", "r")]
    report = evaluate_model(tiny_model, "candidate", heldout, suite, golden)
    assert report.heldout_tokens == 62 and len(report.heldout["nll"]) == 2
    assert math.isfinite(report.golden_perplexity) and math.isfinite(report.perplexity)
    answer, refuse = report.examples
    assert {"answer", "nll", "tokens", "exact_match", "token_f1", "rouge_l", "refused"} <= set(answer)
    assert "token_f1" not in refuse and isinstance(refuse["refused"], bool)
    assert report.metrics["golden.refusal_rate"] == float(refuse["refused"])
    assert report.judge == {"enabled": False, "note": "no judge configured"}
    assert not any(k.startswith("judge.") for k in report.metrics)


def test_load_check_answers_with_a_model_and_fails_on_a_broken_one(tiny_model, tmp_path):
    import shutil

    import pytest

    assert math.isfinite(load_check(tiny_model)["loss"])
    broken = shutil.copytree(tiny_model, tmp_path / "broken")
    (broken / "config.json").unlink()
    with pytest.raises(Exception):  # noqa: B017 - transformers raises OSError or ValueError by version
        load_check(broken)
