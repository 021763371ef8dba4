"""Decide documents: the recipe's limits and extraction, then each document's profile of steps, in order.

Every document ends with one outcome: kept (with its final text) or dropped at one step with a reason. The
steps are the classes of nightshift.prep.steps, built once per profile from the recipe's settings.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Mapping

from nightshift.prep.clean import extract_text, normalize_text
from nightshift.prep.recipe import PrepRecipe
from nightshift.prep.shards import Outcome, source_of
from nightshift.prep.step_base import Candidate, PrepStep


class DocumentCurator:
    """Applies the recipe's limits and each document's profile of per-document steps, in order.

    A document's profile is its source's: document ids start with the source's name (``<source>/...``) and
    ``sources`` maps source names to profile names; a source it does not name gets the default profile. A step
    with ``measure: prose`` judges the prose part of the text (nightshift.prep.step_base.Measured).
    """

    def __init__(self, recipe: PrepRecipe, sources: Mapping[str, str] | None = None) -> None:
        self.recipe = recipe
        self.sources = dict(sources or {})
        """source name -> profile name."""
        unknown = sorted({p for p in self.sources.values() if p not in recipe.profiles})
        if unknown:
            raise ValueError(f"no preparation profile {unknown}; known profiles: {sorted(recipe.profiles)}")
        self.seconds: Counter[str] = Counter()
        """Time spent per step in this process, for the task log."""
        self._profiles: dict[str, ProfileSteps] = {}

    def profile_of(self, doc_id: str) -> str:
        """Return the name of the profile that judges the document: its source's, else the default."""
        return self.sources.get(source_of(doc_id), self.recipe.default_profile)

    def steps_of(self, profile: str) -> ProfileSteps:
        """Return one profile's steps, built on first use (a profile no document uses costs nothing)."""
        if profile not in self._profiles:
            self._profiles[profile] = ProfileSteps(self.recipe.profile(profile), self.seconds)
        return self._profiles[profile]

    def dropped(self) -> dict[str, int]:
        """Return the documents each step dropped in this process, over every profile (for the task log)."""
        counts: Counter[str] = Counter()
        for profile in self._profiles.values():
            for step in profile.steps:
                counts[step.name] += sum(step.dropped.values())
        return dict(counts.most_common())

    def process(self, doc_id: str, fmt: str, content: str) -> Outcome:
        """Return the outcome of one raw document; a step that raises drops the document with its reason."""
        return self.process_batch([(doc_id, fmt, content)])[0]

    def process_batch(self, docs: list[tuple[str, str, str]]) -> list[Outcome]:
        """Return the outcomes of a few raw documents (id, format, content), each decided by its profile."""
        groups: dict[str, list[int]] = {}
        for i, (doc_id, _, _) in enumerate(docs):
            groups.setdefault(self.profile_of(doc_id), []).append(i)
        outcomes: list[Outcome] = [Outcome()] * len(docs)
        for profile, members in groups.items():
            decided = self.steps_of(profile).process_batch([docs[i] for i in members])
            for i, outcome in zip(members, decided, strict=True):
                outcomes[i] = outcome
        return outcomes


class ProfileSteps:
    """One profile's per-document steps, built from the recipe by the registry's classes."""

    def __init__(self, recipe: PrepRecipe, seconds: Counter[str]) -> None:
        from nightshift.prep.steps import STEPS

        self.recipe = recipe
        self.seconds = seconds
        self.steps: list[PrepStep] = [STEPS[s.name](s.config) for s in recipe.steps]

    def process_batch(self, docs: list[tuple[str, str, str]]) -> list[Outcome]:
        """Return the outcomes of a few raw documents (id, format, content), each decided on its own.

        Steps run over the batch in recipe order, each on the documents still kept; steps that work on many
        texts at once (decontamination) see them in one call.
        """
        outcomes = [Outcome() for _ in docs]
        alive: list[Candidate] = []
        limits = self.recipe.limits
        started = time.perf_counter()
        for (doc_id, fmt, content), outcome in zip(docs, outcomes, strict=True):
            reason, text = None, ""
            if len(content) > limits.max_raw_chars:
                reason = "raw_too_long"
            else:
                try:
                    text = normalize_text(extract_text_of(fmt, content))
                except Exception as exc:  # noqa: BLE001 - a document that breaks extraction is dropped, not the night
                    reason = f"extraction_failed:{type(exc).__name__}"
                if reason is None:
                    reason = ("empty_after_extraction" if not text else "too_short" if len(text) < limits.min_chars
                              else "too_long" if len(text) > limits.max_chars else None)
            if reason is None:
                alive.append(Candidate(doc_id, text, outcome))
            else:
                outcome.step, outcome.reason = "limits", reason
        self.seconds["extract"] += time.perf_counter() - started
        for step in self.steps:
            spent = step.seconds
            if alive:
                alive = step.run(alive)
            self.seconds[step.name] += step.seconds - spent
        for doc in alive:
            doc.outcome.text = doc.text
        return outcomes


def extract_text_of(fmt: str, content: str) -> str:
    """Return the plain text of a raw document's content in its format (HTML, markdown, text...)."""
    from nightshift.sources.document_store import RawDocument

    return extract_text(RawDocument(id="", source="", format=fmt, content=content))
