"""The reload check passes a faithful checkpoint and fails, saying why, on a missing shard, a missing weight or
weights that are not the trained ones."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from nightshift.pipelines.finetune import verify_candidate
from nightshift.training.launch import local_env
from nightshift.training.verify import ReloadCheckFailed, verify_output

BLOCKS = [0, 1, 2, 3]


@pytest.fixture
def output(tmp_path, tiny_model, train_blocks):
    """A trainer output folder: the tiny model as the checkpoint, and its own loss as the trainer's reference."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "candidate"
    shutil.copytree(tiny_model, out / "checkpoint")
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    batch = torch.as_tensor(np.load(train_blocks)[BLOCKS].astype(np.int64))
    with torch.no_grad():
        loss = model(input_ids=batch, labels=batch).loss.item()
    write_metrics(out, loss, train_blocks)
    return out


def write_metrics(out, loss, data, tolerance=1e-4):
    (out / "metrics.json").write_text(json.dumps({"reload_check": {
        "blocks": BLOCKS, "loss": loss, "tolerance": tolerance, "data": str(data)}}))


def test_a_faithful_checkpoint_passes_in_a_fresh_process(output):
    result = verify_candidate(None, {"output_dir": str(output)}, local_env())
    assert result["passed"] and result["difference"] <= 1e-4 and result["blocks"] == 4


def test_a_missing_shard_fails_the_check_and_names_it(output, tiny_model):
    from transformers import AutoModelForCausalLM

    checkpoint = output / "checkpoint"
    (checkpoint / "model.safetensors").unlink()
    AutoModelForCausalLM.from_pretrained(tiny_model).save_pretrained(checkpoint, max_shard_size="1MB")
    shards = sorted(checkpoint.glob("model-*.safetensors"))
    assert len(shards) >= 2
    shards[-1].unlink()
    with pytest.raises(ReloadCheckFailed, match=f"missing 1 of {len(shards)} weight shards .*{shards[-1].name}"):
        verify_output(output)
    with pytest.raises(ReloadCheckFailed, match="missing 1 of"):  # and so does the task, in its own process
        verify_candidate(None, {"output_dir": str(output)}, local_env())


def test_a_weight_missing_from_the_file_fails_the_check_instead_of_loading_random_values(output):
    weights = output / "checkpoint" / "model.safetensors"
    tensors = load_file(weights)
    dropped = "model.layers.1.mlp.down_proj.weight"
    del tensors[dropped]
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(ReloadCheckFailed, match=f"does not hold the whole model \\(missing weights: {dropped}"):
        verify_output(output)


def test_weights_that_are_not_the_trained_ones_fail_the_check(output, train_blocks):
    expected = json.loads((output / "metrics.json").read_text())["reload_check"]["loss"]
    write_metrics(output, expected + 0.01, train_blocks)
    with pytest.raises(ReloadCheckFailed, match="not the trained ones"):
        verify_output(output)


def test_an_unfinished_trainer_output_fails_clearly(tmp_path):
    with pytest.raises(ReloadCheckFailed, match="no reload_check entry"):
        verify_output(tmp_path)
    (tmp_path / "checkpoint").mkdir()
    write_metrics(tmp_path, 1.0, tmp_path / "x.npy")
    with pytest.raises(ReloadCheckFailed, match="no config.json"):
        verify_output(tmp_path)
