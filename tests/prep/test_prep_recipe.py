import pytest
import yaml

from nightshift.prep.recipe import DEFAULT_RECIPE, PrepRecipe, RecipeError


def load(tmp_path, data):
    path = tmp_path / "prep.yaml"
    path.write_text(yaml.safe_dump(data))
    return PrepRecipe.load(path)


def test_shipped_recipe_loads_with_every_step_in_order():
    recipe = PrepRecipe.load(DEFAULT_RECIPE)
    assert [s.name for s in recipe.steps] == ["language", "gopher_quality", "gopher_repetition", "c4_quality",
                                              "fineweb_quality", "decontaminate", "pii"]
    assert recipe.dedup.threshold == 0.8 and recipe.dedup.ngram == 5
    assert recipe.step("decontaminate").ngram == 13


@pytest.mark.parametrize(
    ("data", "says"),
    [
        ({"steps": [{"gopher_quality": {"min_doc_words": "many"}}]},
         r"steps\[0\]\.gopher_quality\.min_doc_words must be an integer"),
        ({"steps": [{"language": {"keep": ["xx"]}}]}, r"steps\[0\]\.language\.keep: unknown language codes \['xx'\]"),
        ({"steps": [{"lang": {}}]}, r"steps\[0\]: unknown step 'lang'"),
        ({"steps": [{"pii": {}}, {"pii": {}}]}, r"steps\[1\]: step 'pii' appears twice"),
        ({"steps": [{"pii": {"types": ["email", "ssn"]}}]}, r"steps\[0\]\.pii\.types must be a non-empty subset"),
        ({"steps": [{"fineweb_quality": {"short_line_thr": 1.5}}]},
         r"steps\[0\]\.fineweb_quality\.short_line_thr must be a fraction"),
        ({"steps": [{"decontaminate": {"sets": {"mmlu": "missing.jsonl"}}}]},
         r"decontaminate\.sets\.mmlu: no file at 'missing.jsonl'"),
        ({"steps": [{"decontaminate": {"action": "delete"}}]}, r"decontaminate\.action must be drop or report"),
        ({"dedup": {"threshold": 1.2}}, r"dedup\.threshold must be in \[0.3, 1\)"),
        ({"dedup": {"num_perm": 8}}, r"dedup\.num_perm must be in 16..1024"),
        ({"dedup": {"thresh": 0.8}}, r"dedup: unknown settings \['thresh'\]"),
        ({"executor": {"kind": "k8s"}}, r"executor\.kind must be local, slurm or ray"),
        ({"limits": {"min_chars": 100, "max_chars": 10}}, r"limits\.max_chars must be >= min_chars"),
        ({"steps": {"pii": {}}}, r"steps must be a list"),
        ({"extra": 1}, r"unknown sections \['extra'\]"),
    ],
)
def test_errors_name_the_field_and_what_it_must_be(tmp_path, data, says):
    with pytest.raises(RecipeError, match=says):
        load(tmp_path, data)


def test_digest_follows_what_decides_verdicts_not_where_steps_run(tmp_path):
    base = {"steps": [{"language": {}}], "dedup": {"threshold": 0.8}}
    a = load(tmp_path, base).digest()
    assert load(tmp_path, {**base, "executor": {"workers": 7}}).digest() == a
    assert load(tmp_path, {**base, "dedup": {"threshold": 0.85}}).digest() != a
    assert load(tmp_path, {**base, "steps": [{"language": {"min_confidence": 0.9}}]}).digest() != a


def test_a_step_may_be_named_without_settings(tmp_path):
    recipe = load(tmp_path, {"steps": ["pii", {"language": None}]})
    assert [s.name for s in recipe.steps] == ["pii", "language"]
