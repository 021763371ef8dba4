import json

import pytest

from nightshift.training.foundation import import_foundation_model


@pytest.mark.e2e
def test_bundled_smollm2_imports_to_a_plain_checkpoint_that_answers(smollm2):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dest = smollm2
    config = json.loads((dest / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and "quantization_config" not in config
    stamp = (dest / "model.safetensors").stat().st_mtime_ns
    assert import_foundation_model(dest) == dest
    assert (dest / "model.safetensors").stat().st_mtime_ns == stamp  # imported once

    tokenizer = AutoTokenizer.from_pretrained(dest)
    model = AutoModelForCausalLM.from_pretrained(dest).eval()
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, prompt["input_ids"].shape[1]:])
