"""Every per-document preparation step, by the name a recipe gives it: the one table the recipe reader and the
curator both read. A new step is a ``PrepStep`` subclass (nightshift.prep.step_base) and a line here; a recipe
then lists it by name.
"""

from __future__ import annotations

from nightshift.prep.decontaminate import DecontaminateStep
from nightshift.prep.filters import C4QualityStep, FineWebQualityStep, GopherQualityStep, GopherRepetitionStep
from nightshift.prep.language import LanguageStep
from nightshift.prep.pii import PiiStep
from nightshift.prep.step_base import PrepStep

STEPS: dict[str, type[PrepStep]] = {step.name: step for step in (
    LanguageStep, GopherQualityStep, GopherRepetitionStep, C4QualityStep, FineWebQualityStep, PiiStep,
    DecontaminateStep,
)}
"""Recipe name -> step class."""
