import pytest

from nightshift.training.recipe import TrainingRecipe


def test_default_recipe_loads_and_overrides_apply():
    recipe = TrainingRecipe.load("default", train_steps=3, learning_rate=None)
    assert recipe.train_steps == 3
    assert recipe.learning_rate == TrainingRecipe.load("default").learning_rate


def test_deepspeed_config_is_zero2_with_the_recipe_schedule():
    ds = TrainingRecipe(train_steps=10, learning_rate=1e-4, warmup_steps=2).deepspeed_config()
    assert ds["zero_optimization"]["stage"] == 2
    assert ds["optimizer"]["params"]["lr"] == 1e-4
    assert ds["scheduler"]["params"]["total_num_steps"] == 10


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
