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
    with pytest.raises(ValueError, match="train_steps must be at least 1; learning_rate must be positive"):
        TrainingRecipe(train_steps=0, learning_rate=0)


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
