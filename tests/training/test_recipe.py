import pytest

from nightshift.training.recipe import TrainingRecipe


def test_default_recipe_loads_and_overrides_apply():
    recipe = TrainingRecipe.load("default", train_steps=3, learning_rate=None)
    assert recipe.train_steps == 3
    assert recipe.learning_rate == TrainingRecipe.load("default").learning_rate


def test_deepspeed_config_is_zero2_with_the_recipe_schedule():
    ds = TrainingRecipe(train_steps=10, learning_rate=1e-4, warmup_steps=2).deepspeed_config(world_size=2)
    assert ds["zero_optimization"]["stage"] == 2
    assert ds["optimizer"]["params"]["lr"] == 1e-4
    assert ds["optimizer"]["params"]["torch_adam"] and ds["optimizer"]["params"]["fused"]
    assert ds["scheduler"]["params"]["total_num_steps"] == 10


def test_one_rank_trains_without_zero_unless_it_offloads():
    recipe = TrainingRecipe(zero_stage=3)
    assert recipe.deepspeed_config(world_size=1)["zero_optimization"]["stage"] == 0
    assert recipe.deepspeed_config(world_size=4)["zero_optimization"]["stage"] == 3
    offloading = TrainingRecipe(zero_stage=3, offload_param=True, offload_optimizer=True)
    config = offloading.deepspeed_config(world_size=1)  # host memory helps a single GPU too
    assert config["zero_optimization"]["stage"] == 3 and "torch_adam" not in config["optimizer"]["params"]


@pytest.mark.parametrize(("ranks", "message"), [(0, "ranks must be auto or a number"), ("two", "ranks must be auto"),
                                                (True, "ranks must be auto")])
def test_ranks_are_auto_or_a_number(ranks, message):
    with pytest.raises(ValueError, match=message):
        TrainingRecipe(ranks=ranks)


def test_ranks_come_from_the_recipe_then_the_setting_then_the_hardware():
    from nightshift.training.launch import resolve_ranks

    assert resolve_ranks(4, "local", 2, 1) == 4  # a recipe that fixes its global batch keeps it
    assert resolve_ranks("auto", "local", 2, 1) == 2  # NIGHTSHIFT_TRAIN_RANKS
    assert resolve_ranks("auto", "kubernetes", None, 8) == 8  # NIGHTSHIFT_K8S_GPUS: one rank per GPU of the pod
    assert resolve_ranks("auto", "local", None, 8) == 1  # no GPU here: one process on every core
    assert TrainingRecipe.load("default").ranks == "auto"


def test_train_ranks_setting_takes_auto_or_a_positive_number(monkeypatch):
    from nightshift.settings import load_settings

    monkeypatch.setenv("NIGHTSHIFT_TRAIN_RANKS", "auto")
    assert load_settings().train_ranks is None
    monkeypatch.setenv("NIGHTSHIFT_TRAIN_RANKS", "3")
    assert load_settings().train_ranks == 3
    for bad in ("0", "2000"):
        monkeypatch.setenv("NIGHTSHIFT_TRAIN_RANKS", bad)
        with pytest.raises(ValueError, match="NIGHTSHIFT_TRAIN_RANKS must be auto or a number from 1 to 1024"):
            load_settings()
    monkeypatch.delenv("NIGHTSHIFT_TRAIN_RANKS")
    monkeypatch.setenv("NIGHTSHIFT_K8S_GPUS", "2000")
    with pytest.raises(ValueError, match="NIGHTSHIFT_K8S_GPUS must be a number from 1 to 64"):
        load_settings()


def test_invalid_values_are_all_reported():
    with pytest.raises(ValueError, match="train_steps must be an integer from 1 to 1000000; learning_rate must be a "
                       "finite number in \\(0, 1\\]"):
        TrainingRecipe(train_steps=0, learning_rate=0)


@pytest.mark.parametrize(("text", "message"), [
    ("seed: -1", "seed must be an integer from 0 to 4294967295"),
    ("seed: 4294967296", "seed must be an integer from 0"),
    ("learning_rate: .inf", "learning_rate must be a finite number"),
    ("learning_rate: .nan", "learning_rate must be a finite number"),
    ("max_grad_norm: .inf", "max_grad_norm must be a finite number"),
    ("weight_decay: .inf", "weight_decay must be a finite number"),
    ("heldout_fraction: .nan", "heldout_fraction must lie strictly between 0 and 1"),
    ("method: lora\nlora: {alpha: .inf}", "lora.alpha must be a finite positive number"),
    ("micro_batch_size: 100000", "micro_batch_size must be an integer from 1 to 4096"),
])
def test_values_that_validated_and_then_crashed_every_rank_are_refused_at_load(tmp_path, text, message):
    (tmp_path / "bad.yaml").write_text(text + "\n")
    with pytest.raises(ValueError, match=f"bad.yaml: .*{message}"):
        TrainingRecipe.load("bad", extra_dirs=(tmp_path,))


def test_a_recipe_is_checked_against_the_base_models_layers_and_context(tiny_model):
    from nightshift.training.fit import check_recipe_fits

    check_recipe_fits(TrainingRecipe(method="lora"), tiny_model)  # Llama's own projections
    check_recipe_fits(TrainingRecipe(method="lora", lora={"target_modules": ["self_attn.q_proj", "mlp.up_proj"]}),
                      tiny_model)
    gpt2 = TrainingRecipe(method="lora", lora={"target_modules": ["c_attn", "c_proj", "q_proj"]})
    with pytest.raises(ValueError, match=r"recipe lora does not fit the base model tiny-smollm2: lora.target_modules "
                       r"\['c_attn', 'c_proj'\] are not layers of the base model \(llama\); its adaptable layers "
                       r"are \['down_proj', 'embed_tokens', 'gate_proj', 'k_proj', 'lm_head', 'o_proj', 'q_proj', "
                       r"'up_proj', 'v_proj'\]"):
        check_recipe_fits(gpt2, tiny_model, "recipe lora")
    check_recipe_fits(TrainingRecipe(method="lora", lora={"target_modules": ["embed_tokens"]}), tiny_model)
    with pytest.raises(ValueError, match="seq_len 1024 is longer than the base model's context \\(512 tokens\\)"):
        check_recipe_fits(TrainingRecipe(seq_len=1024), tiny_model)
    check_recipe_fits(TrainingRecipe(seq_len=512), tiny_model)


def test_unknown_recipe_and_fields_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="known recipes: .*default"):
        TrainingRecipe.load("nope")
    (tmp_path / "bad.yaml").write_text("seq_len: 64\nepochs: 3\n")
    with pytest.raises(ValueError, match="unknown TrainingRecipe fields \\['epochs'\\]"):
        TrainingRecipe.load("bad", extra_dirs=(tmp_path,))
    (tmp_path / "typed.yaml").write_text("train_steps: lots\n")
    with pytest.raises(ValueError, match="typed.yaml: train_steps must be an integer, got str"):
        TrainingRecipe.load("typed", extra_dirs=(tmp_path,))
    (tmp_path / "broken.yaml").write_text("seq_len: [64\npassword: hunter2\n")
    with pytest.raises(ValueError, match="broken.yaml: not valid YAML \\(line") as refused:
        TrainingRecipe.load("broken", extra_dirs=(tmp_path,))
    assert "hunter2" not in str(refused.value)


@pytest.mark.parametrize("name", ["/etc/passwd", "../../secrets", "default.yaml", "a/b", "", "~root"])
def test_a_recipe_is_a_name_never_a_path(name):
    with pytest.raises(ValueError, match="given by name") as refused:
        TrainingRecipe.load(name)
    assert "root:" not in str(refused.value)


def test_fingerprint_changes_with_any_field():
    assert TrainingRecipe().fingerprint() != TrainingRecipe(seed=1).fingerprint()


def test_gpt2_lora_targets_fit_a_gpt2_base(tmp_path):
    """GPT-2's attention is a Conv1D, not a Linear: its own names must pass the check."""
    from transformers import AutoConfig

    from nightshift.training.fit import check_recipe_fits

    AutoConfig.for_model("gpt2", n_layer=1, n_embd=32, n_head=2, n_positions=128).save_pretrained(tmp_path)
    check_recipe_fits(TrainingRecipe(method="lora", seq_len=128, lora={"target_modules": ["c_attn", "c_proj"]}),
                      tmp_path)
    with pytest.raises(ValueError, match="seq_len 512 is longer than the base model's context \\(128 tokens\\)"):
        check_recipe_fits(TrainingRecipe(seq_len=512), tmp_path)  # GPT-2 keeps it in n_positions
    with pytest.raises(ValueError, match=r"\['q_proj'\] are not layers of the base model \(gpt2\)"):
        check_recipe_fits(TrainingRecipe(method="lora", seq_len=64, lora={"target_modules": ["q_proj"]}), tmp_path)


@pytest.mark.parametrize("config", ['[1, 2]', '{"model_type": "no-such-architecture"}',
                                    '{"model_type": "llama", "hidden_size": "wide"}'])
def test_a_base_whose_config_cannot_be_built_is_a_clear_error(tmp_path, config):
    from nightshift.training.fit import check_recipe_fits

    (tmp_path / "config.json").write_text(config)
    with pytest.raises(ValueError, match=f"the base model {tmp_path.name} (has a config.json that|cannot be built)"):
        check_recipe_fits(TrainingRecipe(method="lora"), tmp_path)
