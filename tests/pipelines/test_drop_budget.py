"""The drop budget: a preparation step that drops too much of one source is named, with its reasons and example
ids, in drop_budget.json and first on the run's page; a blocking budget stops the night."""

import dataclasses
import json
import random
import re

import pytest
import yaml

from nightshift.pipelines.ingest import CORPUS, RAW, DropBudgetExceeded, drop_budget
from nightshift.prep.curate import curate
from nightshift.prep.recipe import DEFAULT_RECIPE, PrepRecipe
from nightshift.quality.suite import DropBudget
from nightshift.reports.publish import RunRef
from nightshift.settings import load_settings
from planted import prose

BUDGET = DropBudget(max_share=0.3, min_documents=5)


def run_folder(tmp_path, sources, dropped):
    """A run folder as merge_sources and preparation leave it: collection.json counts, dropped.jsonl rows."""
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "collection.json").write_text(json.dumps(
        {"documents": sum(sources.values()), "sources": {n: {"kind": "files", "documents": d, "skipped": 0,
                                                              "skip_reasons": {}} for n, d in sources.items()}}))
    (folder / "dropped.jsonl").write_text("".join(
        json.dumps({"id": doc_id, "step": step, "reason": reason}) + "\n" for doc_id, step, reason in dropped))
    return folder


def drops(source, step, reason, n, start=0):
    return [(f"{source}/page{i:03d}.html", step, reason) for i in range(start, start + n)]


def test_a_step_over_budget_is_named_with_its_share_reasons_and_example_ids(tmp_path):
    folder = run_folder(tmp_path, {"manual": 20, "blog": 10}, [
        *drops("manual", "gopher_quality", "gopher_below_alpha_threshold", 6),
        *drops("manual", "gopher_quality", "gopher_too_few_words", 1, start=6),
        *drops("manual", "language", "language_la", 2, start=7),
        *drops("blog", "gopher_quality", "gopher_below_alpha_threshold", 3),  # 30%: at the budget, not over it
    ])
    verdict = drop_budget(folder, BUDGET)
    [over] = verdict["exceeded"]
    assert over == {"source": "manual", "step": "gopher_quality", "dropped": 7, "documents": 20, "share": 0.35,
                    "reasons": {"gopher_below_alpha_threshold": 6, "gopher_too_few_words": 1},
                    "examples": [f"manual/page{i:03d}.html" for i in range(5)]}
    assert verdict["checked"]["blog"] == {"documents": 10, "judged": True, "dropped": {"gopher_quality": 3}}
    assert verdict["checked"]["manual"]["dropped"] == {"gopher_quality": 7, "language": 2}
    assert json.loads((folder / "drop_budget.json").read_text()) == verdict
    summary = verdict["summary"]
    assert summary.startswith("manual: gopher_quality dropped 7 of 20 documents (35%, budget 30%)")
    assert "gopher_below_alpha_threshold 6, gopher_too_few_words 1" in summary and "manual/page000.html" in summary


def test_nothing_over_budget_and_small_sources_are_not_judged(tmp_path):
    folder = run_folder(tmp_path, {"manual": 20, "notes": 4}, [
        *drops("manual", "limits", "too_short", 6),
        *drops("notes", "limits", "too_short", 4),  # every one of 4: too few to judge
    ])
    verdict = drop_budget(folder, BUDGET)
    assert verdict["exceeded"] == [] and verdict["summary"] == "" and not verdict["blocked"]
    assert verdict["checked"]["notes"] == {"documents": 4, "judged": False, "dropped": {"limits": 4}}
    # The same night with a lower bar on size judges the small source and finds it eaten.
    verdict = drop_budget(folder, dataclasses.replace(BUDGET, min_documents=4))
    assert [(e["source"], e["step"], e["share"]) for e in verdict["exceeded"]] == [("notes", "limits", 1.0)]


def test_a_blocking_budget_raises_after_writing_the_verdict(tmp_path):
    folder = run_folder(tmp_path, {"manual": 10}, drops("manual", "language", "language_low_confidence", 8))
    with pytest.raises(DropBudgetExceeded, match=r"manual: language dropped 8 of 10 documents \(80%") as caught:
        drop_budget(folder, dataclasses.replace(BUDGET, block=True))
    assert "drop_budget blocks" in str(caught.value)
    written = json.loads((folder / "drop_budget.json").read_text())
    assert written["blocked"] and written["exceeded"][0]["reasons"] == {"language_low_confidence": 8}


def test_real_preparation_output_is_judged_per_source(tmp_path):
    """Drops written by the real recipe: a source of copies loses most of itself to exact deduplication."""
    rng = random.Random(7)
    copy = prose(rng, 3, 4)
    docs = [{"id": f"manual/p{i:02d}.md", "source": "manual", "format": "text", "content": prose(rng, 3, 4),
             "meta": {}} for i in range(10)]
    docs += [{"id": f"mirror/p{i:02d}.md", "source": "mirror", "format": "text", "content": copy, "meta": {}}
             for i in range(8)]
    docs += [{"id": f"notes/n{i}.md", "source": "notes", "format": "text", "content": "tiny", "meta": {}}
             for i in range(3)]
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / RAW).write_text("".join(json.dumps(d) + "\n" for d in docs))
    (folder / "collection.json").write_text(json.dumps({"sources": {
        "manual": {"documents": 10}, "mirror": {"documents": 8}, "notes": {"documents": 3}}}))
    recipe = PrepRecipe.from_dict({**yaml.safe_load(DEFAULT_RECIPE.read_text()),
                                   "executor": {"kind": "local", "tasks": 1, "workers": 1}})
    curate(folder / RAW, folder / CORPUS, folder / "prep", recipe)

    verdict = drop_budget(folder, BUDGET)
    [over] = verdict["exceeded"]
    # The reason is counted without the kept copy's id that preparation records beside it.
    assert (over["source"], over["step"], over["dropped"], over["documents"]) == ("mirror", "exact_dedup", 7, 8)
    assert over["reasons"] == {"exact_duplicate": 7} and all(i.startswith("mirror/") for i in over["examples"])
    assert verdict["checked"]["notes"]["judged"] is False and verdict["checked"]["notes"]["dropped"] == {"limits": 3}
    assert verdict["checked"]["manual"]["dropped"] == {}


def test_the_report_page_shows_an_exceeded_budget_first(tmp_path):
    settings = dataclasses.replace(load_settings(), home=tmp_path / "home")
    run = RunRef(settings, "ingest_corpus", "manual__2026-12-01T01:00:00+00:00")
    run.publish({"collection": {"documents": 20, "skipped": 0, "failed": [], "sources": {
        "manual": {"kind": "web", "documents": 20, "skipped": 0, "skip_reasons": {}}}},
        "prep": {"documents_in": 20, "documents_out": 11, "steps": []},
        "version": {"tag": "corpus-v0001", "documents": 11, "md5": "0" * 32, "created": True}})
    folder = run_folder(tmp_path, {"manual": 20}, drops("manual", "gopher_quality", "gopher_below_alpha_threshold", 9))
    drop_budget(folder, BUDGET, run)
    html = (run.folder / "index.html").read_text()
    budget = html.index('id="drop-budget"')
    assert budget < html.index("Dataset version") < html.index('id="collection"') < html.index('id="preparation"')
    section = html[budget:html.index("</section>", budget)]
    assert 'class="callout warning"' in html[budget - 40:budget + 40]
    assert "gopher_below_alpha_threshold: 9" in section and "45%" in section and "manual/page000.html" in section

    # Under budget the page has no such section, only a line under Preparation.
    (tmp_path / "second").mkdir()
    drop_budget(run_folder(tmp_path / "second", {"manual": 20}, drops("manual", "limits", "too_short", 2)), BUDGET, run)
    html = (run.folder / "index.html").read_text()
    assert 'id="drop-budget"' not in html
    assert re.search(r"Drop budget: no step dropped more than 30% of any source \(1 source\(s\)", html)
