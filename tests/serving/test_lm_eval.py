"""lm-evaluation-harness scores a multiple-choice task through the endpoint (local-completions, loglikelihood).

The task and its data are written by the test; lm-eval sends token-id prompts with ``echo`` and ``logprobs``
and reads the prompt log-probabilities back. Its log-likelihoods must equal the model's own.
"""

import json
import textwrap

import pytest

from helpers import UvicornThread, ready, wait_for
from nightshift.serving.app import create_app
from nightshift.serving.keys import KeyRing, KeyStore

QUESTIONS = [
    {"question": "When does the observatory open?", "choices": ["at dusk", "at noon", "never"], "answer": 0},
    {"question": "What do visitors look through?", "choices": ["a kettle", "a telescope", "a door"], "answer": 1},
    {"question": "Which planet has rings?", "choices": ["Mars", "Venus", "Saturn"], "answer": 2},
    {"question": "What is dark at night?", "choices": ["the sky", "the sun", "the moon"], "answer": 0},
]


def write_task(folder):
    data = folder / "observatory_mc.jsonl"
    data.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    (folder / "observatory_mc.yaml").write_text(textwrap.dedent(f"""\
        task: observatory_mc
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {data}
        test_split: test
        output_type: multiple_choice
        doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
        doc_to_choice: "{{{{choices}}}}"
        doc_to_target: "{{{{answer}}}}"
        metric_list:
          - metric: acc
            aggregation: mean
            higher_is_better: true
        """))


def model_loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    import torch

    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    n_context = len(tokenizer(context, add_special_tokens=False)["input_ids"])
    with torch.no_grad():
        rows = torch.log_softmax(model(torch.tensor([whole])).logits[0].float(), -1)
    return sum(float(rows[i - 1, whole[i]]) for i in range(n_context, len(whole)))


@pytest.mark.e2e
def test_lm_eval_local_completions_scores_a_multiple_choice_task(champion, tiny_model, tmp_path, monkeypatch):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager
    from transformers import AutoModelForCausalLM, AutoTokenizer

    registry = champion
    store = KeyStore(tmp_path / "api_keys.json")
    _record, key = store.create("lm-eval")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    write_task(tasks)
    monkeypatch.setenv("OPENAI_API_KEY", key)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))

    with UvicornThread(create_app(registry, tmp_path / "cache", keyring=KeyRing(store))) as server:
        wait_for(lambda: ready(server.url), what="the model")
        results = simple_evaluate(
            model="local-completions",
            model_args=(f"model=nightshift-llm,base_url={server.url}/v1/completions,tokenizer={tiny_model},"
                        "tokenizer_backend=huggingface,tokenized_requests=True,num_concurrent=1,max_retries=1,"
                        "max_length=512"),
            tasks=["observatory_mc"], task_manager=TaskManager(include_path=str(tasks)), log_samples=True,
        )

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    samples = results["samples"]["observatory_mc"]
    assert len(samples) == len(QUESTIONS)
    correct = 0
    for sample in samples:
        doc = sample["doc"]
        context = f"Question: {doc['question']}\nAnswer:"
        expected = [model_loglikelihood(model, tokenizer, context, f" {c}") for c in doc["choices"]]
        served = [float(resp[0][0]) for resp in sample["resps"]]
        assert served == pytest.approx(expected, abs=1e-3)
        correct += int(max(range(len(expected)), key=expected.__getitem__) == doc["answer"])
    assert results["results"]["observatory_mc"]["acc,none"] == pytest.approx(correct / len(QUESTIONS))
