"""Run a preparation recipe over a night's raw documents: per-document steps, then deduplication over all.

Documents stream through the steps (read, decide, write); only a signature per kept document stays in memory
for near-duplicate detection. The per-document steps run as datatrove pipeline steps on a datatrove executor
(local processes by default, Slurm or Ray per the recipe), each task on one shard of the night, sorted by id.
The pieces, in the order a night meets them:

- ``shards.py``: the night split into tasks' inputs, and the files each task publishes;
- ``shard_worker.py``: what a task runs (cache lookups, the curator, signatures);
- ``curator.py``: limits, extraction and each profile's steps (``steps.py`` maps recipe names to classes);
- ``executor.py``: where the tasks run, and the watch kept over a local pool;
- ``assembly.py``: counts, exact and near deduplication over all shards, the corpus;
- ``digests.py`` and ``cache.py``: outcomes cached by content, recipe and the steps' code, so an unchanged
  document costs a lookup on the next night and a fixed step redoes every document.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Mapping
from pathlib import Path

from nightshift.prep.assembly import PrepReport, assemble
from nightshift.prep.cache import OutcomeCache
from nightshift.prep.curator import DocumentCurator
from nightshift.prep.digests import outcome_digest
from nightshift.prep.executor import build_executor, check_workers_start, plan_tasks, run_supervised
from nightshift.prep.recipe import PrepRecipe
from nightshift.prep.shard_worker import build_pipeline
from nightshift.prep.shards import shard_files, shard_raw
from nightshift.provenance import file_sha256


def curate(raw: Path, corpus: Path, work: Path, recipe: PrepRecipe, cache_path: Path | None = None,
           log=None, cache_days: float = 7.0, sources: Mapping[str, str] | None = None) -> PrepReport:
    """Prepare raw.jsonl into corpus.jsonl under a recipe; return the report. Re-running resumes finished tasks.

    ``sources`` maps source names (the prefix of document ids) to the profile that judges their documents;
    the others get the recipe's default profile.
    """
    import logging

    log = log or logging.getLogger(__name__)
    started = time.monotonic()
    raw_bytes = raw.stat().st_size
    sources = dict(sorted((sources or {}).items()))
    DocumentCurator(recipe, sources)  # an unknown profile fails here, before any work
    tasks, workers = plan_tasks(recipe, raw_bytes)
    # Outputs are named by what decides them, so a retry resumes finished tasks and a changed input starts anew.
    digest = hashlib.sha256(f"{outcome_digest(recipe)}|{file_sha256(raw)}|{tasks}|{json.dumps(sources)}"
                            .encode()).hexdigest()[:16]
    run = work / digest
    shards = run / "raw"
    if not all((shards / f"raw-{i:05d}.jsonl").is_file() for i in range(tasks)):
        shard_raw(raw, shards, tasks)
    out = run / "out"
    out.mkdir(parents=True, exist_ok=True)
    pipeline = build_pipeline(recipe, shards, out, cache_path, sources)
    log.info("preparing %d bytes of raw documents in %d task(s) on %d worker(s) (%s executor)",
             raw_bytes, tasks, workers, recipe.executor.kind)
    executor = build_executor(recipe, pipeline, tasks, workers, run / "logs")
    if recipe.executor.kind == "local" and executor.workers > 1:  # one worker runs the tasks in this process
        check_workers_start(executor.start_method)
        run_supervised(executor)
    else:
        executor.run()
    if recipe.executor.kind == "slurm":  # the jobs were submitted; wait for them (the task's timeout bounds this)
        while incomplete := executor.get_incomplete_ranks(range(tasks)):
            log.info("waiting for %d of %d preparation tasks on Slurm", len(incomplete), tasks)
            time.sleep(30)
    missing = [r for r in range(tasks) if not shard_files(out, r)["outcomes"].is_file()]
    if missing:
        raise RuntimeError(f"preparation tasks {missing} did not finish; see their logs under {run / 'logs'}")
    report = assemble(out, tasks, corpus, recipe, json.loads((shards / "empty.json").read_text()))
    report.seconds = round(time.monotonic() - started, 2)
    report.executor = {"kind": recipe.executor.kind, "tasks": tasks, "workers": workers}
    if cache_path is not None:
        cache = OutcomeCache(cache_path, outcome_digest(recipe))
        cache.absorb(out, tasks)
        pruned = cache.prune(cache_days * 86400)
        if pruned:
            log.info("outcome cache: removed %d outcomes no night used for %g days", pruned, cache_days)
    # The corpus is published: the shards (a copy of the night each) go; a retry starts over, from the cache.
    shutil.rmtree(run, ignore_errors=True)
    log.info("prepared %d of %d documents in %.1fs (%d from the cache)", report.documents_out, report.documents_in,
             report.seconds, report.cached)
    return report
