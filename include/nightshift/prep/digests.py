"""What decides a document's outcome besides its content, as hashes: the recipe, the steps' code (every module
of nightshift.prep and the libraries they call), Python and Unicode. Equal keys get equal outcomes, so the
outcome cache (nightshift.prep.cache) may answer for them; a fixed step changes the hash and redoes every
document.
"""

from __future__ import annotations

import functools
import hashlib
import sys
from pathlib import Path

from nightshift.prep.recipe import PrepRecipe

STEP_LIBRARIES = ("trafilatura", "lxml", "justext", "ftfy", "datatrove", "py3langid", "detect-secrets", "rensa",
                  "numpy", "regex")
"""Distributions whose code decides outcomes (extraction, normalisation, filters, language, secrets, hashing);
what they depend on at run time counts too."""
STEP_MODULES: tuple[str, ...] = ("nightshift.extraction",)
"""Modules outside nightshift.prep that decide outcomes; every module of nightshift.prep is included anyway."""


def step_sources() -> list[Path]:
    """Return the source files of the code that decides a document's outcome: every module of nightshift.prep."""
    import importlib.util

    here = Path(__file__).resolve().parent
    files = sorted(here.glob("*.py"))
    for name in STEP_MODULES:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.origin:
            raise RuntimeError(f"step module {name} not found; fix STEP_MODULES in {__name__}")
        files.append(Path(spec.origin))
    return files


@functools.cache
def code_digest() -> str:
    """Return a hash of the steps' code (source files, library versions, Python and Unicode), once a process."""
    import unicodedata

    h = hashlib.sha256(f"python {sys.version_info[:2]} unicode {unicodedata.unidata_version}\n".encode())
    for path in step_sources():
        # The name, not the folder: the same code installed elsewhere keeps its cache.
        h.update(f"{path.parent.name}/{path.name}\0".encode())
        h.update(hashlib.sha256(path.read_bytes()).digest())
    for dist, version in step_library_versions().items():
        h.update(f"{dist}=={version}\0".encode())
    return h.hexdigest()


def step_library_versions() -> dict[str, str]:
    """Return the installed version of every step library and of what each needs at run time, transitively
    (trafilatura's extraction is shaped by courlan, htmldate and charset-normalizer too); "absent" if missing."""
    import importlib.metadata
    import re

    seen: dict[str, str] = {}
    todo = list(STEP_LIBRARIES)
    while todo:
        dist = re.sub(r"[-_.]+", "-", todo.pop()).lower()
        if dist in seen:
            continue
        try:
            seen[dist] = importlib.metadata.version(dist)
            requires = importlib.metadata.requires(dist) or []
        except importlib.metadata.PackageNotFoundError:
            seen[dist] = "absent"
            continue
        for requirement in requires:
            if "extra ==" in requirement or "extra==" in requirement:
                continue
            name = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement)
            if name:
                todo.append(name.group(0))
    return dict(sorted(seen.items()))


def outcome_digest(recipe: PrepRecipe) -> str:
    """Return what, besides a document's content, decides its outcome: the recipe and the steps' code."""
    return hashlib.sha256(f"{recipe.digest()}|{code_digest()}".encode()).hexdigest()


def content_key(fmt: str, content: str, recipe_digest: str) -> str:
    """Return the cache key of a raw document under ``outcome_digest(recipe)``: equal keys get equal outcomes."""
    h = hashlib.sha256(recipe_digest.encode())
    h.update(fmt.encode())
    h.update(b"\0")
    h.update(content.encode("utf-8", "surrogatepass"))
    return h.hexdigest()
