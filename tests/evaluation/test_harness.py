import math

import numpy as np

from nightshift.evaluation.harness import GoldenItem, evaluate_model, heldout_perplexity, load_golden
from nightshift.settings import GOLDEN_QA


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


def test_evaluate_model_reports_every_metric(tiny_model, tmp_path):
    heldout = tmp_path / "heldout.npy"
    np.save(heldout, np.arange(64, dtype=np.int32).reshape(2, 32))
    report = evaluate_model(tiny_model, "candidate", heldout, [GoldenItem("Q?", "A.")], samples=1)
    assert report.heldout_tokens == 62 and math.isfinite(report.golden_perplexity)
    assert report.samples[0]["question"] == "Q?"
