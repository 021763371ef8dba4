"""A champion built on another base model: per-token perplexities are not compared, bits per byte decide.

The candidate is the tiny SmolLM2-shaped model (49,152 tokens); the champion is a tiny model with a byte-level
BPE of a few hundred tokens trained here. Both are untrained, so each predicts nearly uniformly over its own
vocabulary: its bits per byte must be about log2(vocabulary) x tokens / bytes of its own tokenization of the
held-out text, which only holds when each model read the text with its own tokenizer.
"""

import math

import pytest

from helpers import local_registry
from nightshift.evaluation.compare import DIFFERENT_TOKENIZERS, compare
from nightshift.evaluation.gate import GatePolicy, decide
from nightshift.evaluation.suite import EvaluationSuite
from nightshift.pipelines.finetune import evaluate_pair, gate
from nightshift.prep.clean import Document, write_corpus
from nightshift.training.data import read_heldout_text, tokenize_and_pack

TOPICS = ["telescopes", "the planetarium", "dark skies", "membership", "the Perseid night", "the solar afternoon"]


@pytest.fixture(scope="module")
def byte_bpe_model(tmp_path_factory, tiny_model):
    """A tiny Llama with a 300-token byte-level BPE of its own; its context (128 tokens) is shorter than a window."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    text = [f"Visitors ask about {t} at Tern Valley Observatory, open from 19:00 on Fridays." for t in TOPICS]
    bpe.train_from_iterator(text * 20, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<eos>", bos_token="<eos>")
    config = AutoConfig.for_model(
        "llama", vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128, tie_word_embeddings=True,
        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(1)
    dest = tmp_path_factory.mktemp("byte-bpe") / "model"
    AutoModelForCausalLM.from_config(config).save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    return dest


@pytest.fixture(scope="module")
def packed(tmp_path_factory, tiny_model):
    """A dataset packed with the candidate's tokenizer, its held-out documents also kept as text."""
    folder = tmp_path_factory.mktemp("switch")
    docs = [Document(f"d{i}", "file:///x", "text", " ".join(
        f"Document {i} is about {TOPICS[(i + k) % len(TOPICS)]}; the dome opens at {19 + k % 3}:00."
        for k in range(12)), "h") for i in range(12)]
    return tokenize_and_pack(write_corpus(docs, folder / "corpus.jsonl"), tiny_model, folder / "out", seq_len=32,
                             heldout_fraction=0.3)


@pytest.fixture(scope="module")
def unk_model(tmp_path_factory):
    """A tiny untrained Llama whose word-level tokenizer knows three tokens: nearly every word reads as [UNK]."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    words = Tokenizer(models.WordLevel({"[UNK]": 0, "<eos>": 1, "the": 2}, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=words, eos_token="<eos>", bos_token="<eos>",
                                        unk_token="[UNK]")
    config = AutoConfig.for_model("llama", vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                  max_position_embeddings=512, bos_token_id=1, eos_token_id=1, pad_token_id=1)
    torch.manual_seed(0)
    dest = tmp_path_factory.mktemp("unk") / "model"
    AutoModelForCausalLM.from_config(config).save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    return dest


def test_a_tokenizer_that_reads_text_as_unknown_tokens_gets_no_bits_per_byte(tmp_path, tiny_model, unk_model,
                                                                              packed):
    from nightshift.evaluation.harness import evaluate_model

    golden = tmp_path / "golden.jsonl"
    golden.write_text('{"question": "When does the dome open?", "answer": "At 19:00 on Fridays."}\n'
                      '{"question": "Where is the observatory?", "answer": "In Tern Valley."}\n')
    suite_file = tmp_path / "evaluation.yaml"
    suite_file.write_text(f"golden_set: {golden}\nmetrics: [heldout.bits_per_byte, golden.bits_per_byte]\n"
                          "bootstrap: {resamples: 200}\n")
    suite = EvaluationSuite.load(suite_file)
    texts = read_heldout_text(packed.heldout_text_path)
    # Each [UNK] costs about log2(3) bits for a whole word: the untrained model would "win" by a wide margin.
    candidate = evaluate_model(unk_model, "candidate", None, suite, suite.golden(),
                               heldout_text=packed.heldout_text_path)
    champion = evaluate_model(tiny_model, "champion v1", None, suite, suite.golden(),
                              heldout_text=packed.heldout_text_path)
    assert candidate.unmeasured == {
        "heldout.bits_per_byte": f"the candidate's tokenizer does not round-trip the text ({len(texts)} of "
                                 f"{len(texts)} pieces): bits per byte would count bytes it never predicted",
        "golden.bits_per_byte": "the candidate's tokenizer does not round-trip the text (2 of 2 pieces): bits per "
                                "byte would count bytes it never predicted"}
    assert all(math.isnan(candidate.metrics[m]) for m in candidate.unmeasured)
    assert not champion.unmeasured and math.isfinite(champion.metrics["heldout.bits_per_byte"])
    # Every byte still counts for the candidate: none is dropped because its tokenizer made nothing of it.
    assert candidate.heldout["bytes"] == champion.heldout["bytes"]
    for first, second in ((candidate, champion), (champion, candidate)):
        by_metric = {c.metric: c for c in compare(first, second, suite)}
        assert {m: c.unmeasured for m, c in by_metric.items()} == candidate.unmeasured
    policy_file = tmp_path / "gate.yaml"
    policy_file.write_text("rules:\n  - {metric: heldout.bits_per_byte, max_loss: 0.01}\n"
                           "  - {metric: golden.bits_per_byte, max_loss: 0.05}\n")
    decision = decide(compare(candidate, champion, suite), champion.model, GatePolicy.load(policy_file))
    assert not decision.passed and {c["outcome"] for c in decision.checks} == {"failed"}


def _expected_bpb(model_dir, texts):
    """log2(vocabulary) x tokens / bytes: an untrained model's bits per byte on its own tokenization."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    tokens = sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts)
    return math.log2(len(tokenizer)) * tokens / sum(len(t.encode()) for t in texts)


def test_perplexities_of_different_tokenizers_are_unmeasured_and_bits_per_byte_decide(
        settings, tmp_path, tiny_model, byte_bpe_model, packed):
    golden = tmp_path / "golden.jsonl"
    golden.write_text('{"question": "When does the dome open?", "answer": "At 19:00 on Fridays."}\n'
                      '{"question": "What is the main telescope?", "answer": "The Ansel Reflector."}\n'
                      '{"question": "Where is the observatory?", "answer": "In Tern Valley."}\n')
    suite_file = tmp_path / "evaluation.yaml"
    suite_file.write_text(f"golden_set: {golden}\nmetrics: [heldout.perplexity, heldout.bits_per_byte, "
                          "golden.perplexity, golden.bits_per_byte]\nbootstrap: {resamples: 500}\n")
    suite = EvaluationSuite.load(suite_file)
    texts = read_heldout_text(packed.heldout_text_path)
    assert packed.heldout_bytes == sum(len(t.encode()) for t in texts) > 1000

    # No champion yet: the candidate is compared with the base model, here one with another tokenizer.
    candidate, baseline, champion = evaluate_pair(settings, local_registry(tmp_path), tiny_model, "byte-bpe",
                                                  byte_bpe_model, packed, suite)
    assert champion is None and candidate.tokenizer != baseline.tokenizer
    assert candidate.tokenizer == packed.tokenizer_fingerprint
    by_metric = {c.metric: c for c in compare(candidate, baseline, suite)}
    for metric in ("heldout.perplexity", "golden.perplexity"):
        assert by_metric[metric].unmeasured == DIFFERENT_TOKENIZERS
    for metric in ("heldout.bits_per_byte", "golden.bits_per_byte"):
        c = by_metric[metric]
        assert c.measured and c.finite and c.n >= 3 and c.low <= c.difference <= c.high, c
    # Each model read the text itself: its bits per byte are those of its own tokenization.
    assert candidate.metrics["heldout.bits_per_byte"] == pytest.approx(_expected_bpb(tiny_model, texts), rel=0.1)
    assert baseline.metrics["heldout.bits_per_byte"] == pytest.approx(_expected_bpb(byte_bpe_model, texts), rel=0.1)
    # Both scored every byte of the same pieces of text, the champion in parts that fit its context.
    assert baseline.heldout["bytes"] == candidate.heldout["bytes"] and sum(candidate.heldout["bytes"]) == \
        packed.heldout_bytes
    assert sum(baseline.heldout["tokens"]) > 127 * len(texts)

    policy_file = tmp_path / "gate.yaml"
    policy_file.write_text("rules:\n  - {metric: heldout.perplexity, max_loss: 0.02, if_unmeasured: skip}\n"
                           "  - {metric: golden.perplexity, max_loss: 0.10, if_unmeasured: skip}\n"
                           "  - {metric: heldout.bits_per_byte, max_loss: 0.01}\n"
                           "  - {metric: golden.bits_per_byte, max_loss: 0.05}\n")
    policy = GatePolicy.load(policy_file)
    held_out = by_metric["heldout.bits_per_byte"]
    better = held_out.high < 0  # which random model wins is a matter of vocabularies; the gate follows it
    decision = gate([c.to_dict() for c in by_metric.values()], baseline.model, policy)
    outcomes = {c["metric"]: c["outcome"] for c in decision.checks}
    assert outcomes["heldout.perplexity"] == outcomes["golden.perplexity"] == "skipped"
    assert outcomes["heldout.bits_per_byte"] == ("passed" if better else "failed")
    assert "different tokenizers" in decision.reasons[0]
    # The other way round, the same intervals mirror and the verdict on held-out bits per byte turns.
    mirrored = {c.metric: c for c in compare(baseline, candidate, suite)}
    reverse = decide(list(mirrored.values()), candidate.model, policy)
    assert {c["metric"]: c["outcome"] for c in reverse.checks}["heldout.bits_per_byte"] == (
        "failed" if better else "passed")



def test_the_tokenizer_fingerprint_follows_the_vocabulary_not_the_call_settings(tmp_path, tiny_model, byte_bpe_model):
    from transformers import AutoTokenizer

    from nightshift.training.data import tokenizer_fingerprint

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model))
    first = tokenizer_fingerprint(tokenizer)
    tokenizer.save_pretrained(tmp_path / "copy")
    assert tokenizer_fingerprint(AutoTokenizer.from_pretrained(str(tmp_path / "copy"))) == first
    tokenizer.backend_tokenizer.enable_truncation(max_length=64)
    assert tokenizer_fingerprint(tokenizer) == first
    assert tokenizer_fingerprint(AutoTokenizer.from_pretrained(str(byte_bpe_model))) != first
