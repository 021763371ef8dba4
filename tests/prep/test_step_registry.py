"""A new preparation step is a class and a line in the registry; the recipe reader and the night both use it."""

import json
import random
from dataclasses import dataclass

import pytest
import yaml

from nightshift.prep.curate import curate
from nightshift.prep.recipe import PrepRecipe, RecipeError
from nightshift.prep.step_base import Candidate, Measured, PrepStep, positive
from nightshift.prep.steps import STEPS
from planted import prose


@dataclass(frozen=True)
class MaxExclamations(Measured):
    """Drop shouting documents."""

    most: int = 2
    """Runs of three exclamation marks a document may hold."""

    def check(self, where: str) -> None:
        super().check(where)
        positive(where, "most", self.most)


class ExclamationStep(PrepStep):
    name = "max_exclamations"
    Config = MaxExclamations

    def decide(self, doc: Candidate) -> str | None:
        if "BOOM" in doc.text:
            raise ZeroDivisionError("a step's own bug")
        if "ERASE" in doc.text:
            doc.text = "   "
            return None
        return "shouting" if doc.text.count("!!!") > self.config.most else None


@pytest.fixture
def registered(monkeypatch):
    monkeypatch.setitem(STEPS, ExclamationStep.name, ExclamationStep)


def night(tmp_path, steps):
    rng = random.Random(3)
    texts = [prose(rng) for _ in range(6)]
    texts[1] += " Wow!!! Great!!! Now!!!"
    texts[2] += " BOOM"
    texts[3] += " ERASE"
    raw = tmp_path / "raw.jsonl"
    raw.write_text("".join(json.dumps({"id": f"s/d{i}", "source": "s", "format": "text", "content": t, "meta": {}})
                           + "\n" for i, t in enumerate(texts)))
    recipe_path = tmp_path / "prep.yaml"
    recipe_path.write_text(yaml.safe_dump({"steps": steps, "executor": {"workers": 1}}))
    return raw, PrepRecipe.load(recipe_path)


def test_every_registered_step_has_a_name_and_checked_settings():
    for name, step in STEPS.items():
        assert step.name == name and issubclass(step, PrepStep)
        step.Config().check(f"steps[0].{name}")  # the defaults are valid settings


def test_a_new_step_is_a_class_and_a_registry_line(tmp_path, registered):
    raw, recipe = night(tmp_path, [{"max_exclamations": {"most": 1}}])
    report = curate(raw, tmp_path / "corpus.jsonl", tmp_path / "work", recipe)
    step = next(s for s in report.steps if s["step"] == "max_exclamations")
    assert step["in"] == 6 and step["out"] == 3
    assert step["dropped"] == {"shouting": 1, "step_failed:ZeroDivisionError": 1, "empty_after_step": 1}
    kept = [json.loads(line)["id"] for line in (tmp_path / "corpus.jsonl").read_text().splitlines()]
    assert kept == ["s/d0", "s/d4", "s/d5"]
    dropped = [json.loads(line) for line in (tmp_path / "dropped.jsonl").read_text().splitlines()]
    assert {d["id"]: d["reason"] for d in dropped} == {
        "s/d1": "shouting", "s/d2": "step_failed:ZeroDivisionError", "s/d3": "empty_after_step"}


def test_the_base_class_counts_each_steps_drops_by_reason(tmp_path, registered):
    from nightshift.prep.curator import DocumentCurator

    _, recipe = night(tmp_path, [{"max_exclamations": {"most": 1}}])
    curator = DocumentCurator(recipe)
    texts = ["A calm line of prose that says enough to keep.", "Loud!!! Louder!!! Loudest!!!",
             "It goes BOOM right here, in the middle of a sentence."]
    outcomes = curator.process_batch([(f"s/d{i}", "text", text) for i, text in enumerate(texts)])
    assert [o.reason for o in outcomes] == [None, "shouting", "step_failed:ZeroDivisionError"]
    (step,) = curator.steps_of(recipe.default_profile).steps
    assert step.dropped == {"shouting": 1, "step_failed:ZeroDivisionError": 1}
    assert curator.dropped() == {"max_exclamations": 2}


def test_the_recipe_reader_checks_a_new_steps_settings_by_its_config(tmp_path, registered):
    with pytest.raises(RecipeError, match=r"steps\[0\]\.max_exclamations\.most must be a positive integer"):
        night(tmp_path, [{"max_exclamations": {"most": 0}}])
    with pytest.raises(RecipeError, match=r"max_exclamations: unknown settings \['least'\]"):
        night(tmp_path, [{"max_exclamations": {"least": 1}}])
    with pytest.raises(RecipeError, match=r"max_exclamations\.measure must be all or prose"):
        night(tmp_path, [{"max_exclamations": {"measure": "some"}}])


def test_an_unregistered_step_is_named_with_the_known_ones(tmp_path):
    with pytest.raises(RecipeError, match=r"unknown step 'max_exclamations'; known steps: \['c4_quality'"):
        night(tmp_path, [{"max_exclamations": {}}])
