"""The whole recipe over a planted night: every planted problem is removed and counted, nothing else changes."""

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
from collections import Counter

import pytest
import yaml

from nightshift.prep.curate import curate
from nightshift.prep.pii import Scrubber
from nightshift.prep.recipe import DEFAULT_RECIPE, PROFILE_DIR, PrepRecipe
from planted import EVAL_ITEMS, planted_night, prose


def write_raw(docs, path):
    path.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs))
    return path


def recipe_for(tmp_path, **executor):
    data = yaml.safe_load(DEFAULT_RECIPE.read_text())
    # The planted night is web prose: its expected drops are the web profile's, run as the recipe's own steps.
    data.pop("default_profile")
    data["steps"] = yaml.safe_load((PROFILE_DIR / "web.yaml").read_text())["steps"]
    eval_path = tmp_path / "heldout.jsonl"
    eval_path.write_text("".join(json.dumps(i) + "\n" for i in EVAL_ITEMS))
    data["limits"]["max_raw_chars"] = 1_000_000
    for step in data["steps"]:
        if "decontaminate" in step:
            step["decontaminate"] = {"sets": {"heldout": str(eval_path)}, "action": "drop"}
    data["executor"].update(executor)
    return PrepRecipe.from_dict(data)


@pytest.fixture(scope="module")
def night(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("night")
    docs, expected, pii, secrets = planted_night()
    raw = write_raw(docs, tmp / "raw.jsonl")
    recipe = recipe_for(tmp, tasks=1, workers=1)
    report = curate(raw, tmp / "corpus.jsonl", tmp / "work", recipe, tmp / "cache.sqlite")
    return {"tmp": tmp, "raw": raw, "docs": docs, "expected": expected, "pii": pii, "secrets": secrets,
            "report": report, "recipe": recipe, "corpus": (tmp / "corpus.jsonl").read_bytes()}


def test_every_planted_problem_is_removed_and_counted_by_step_and_reason(night):
    report = night["report"]
    counted = Counter({(s["step"], reason): n for s in report.steps for reason, n in s["dropped"].items()})
    assert counted == night["expected"]
    assert report.documents_in == len(night["docs"])
    assert report.documents_out == len(night["docs"]) - sum(night["expected"].values())
    assert report.near_duplicates["clusters"] == 4
    assert report.contamination["heldout"]["contaminated"] == 2 and report.contamination["heldout"]["rate"] > 0
    for step in report.steps:  # every step's counts add up and name a few dropped ids
        assert step["in"] - step["out"] == sum(step["dropped"].values())
        assert all(0 < len(ids) <= 5 for ids in step["examples"].values())


def test_pii_is_counted_per_type_and_no_planted_secret_reaches_the_corpus(night):
    corpus = night["corpus"].decode()
    assert night["report"].pii == dict(night["pii"])
    assert night["report"].pii_documents == sum(night["pii"].values())
    assert not [s for s in night["secrets"] if s in corpus]
    docs = [json.loads(line) for line in corpus.splitlines()]
    assert all(Scrubber().find(d["text"]) == [] for d in docs)  # the second pass finds nothing


def test_corpus_is_sorted_by_id_and_untouched_documents_keep_their_text(night):
    docs = [json.loads(line) for line in night["corpus"].decode().splitlines()]
    assert [d["id"] for d in docs] == sorted(d["id"] for d in docs)
    raw = {d["id"]: d["content"] for d in night["docs"]}
    for d in docs:
        if d["id"].startswith("good/"):
            assert d["text"] == raw[d["id"]].strip()  # nothing outside the recipe alters text
            assert d["meta"]["prep"]["language"] == "en"
    dropped = [json.loads(line) for line in (night["tmp"] / "dropped.jsonl").read_text().splitlines()]
    assert len(dropped) == sum(night["expected"].values())
    assert {"id": "copy/1.txt", "step": "exact_dedup", "reason": "exact_duplicate:copy/0.txt"} in dropped


def test_two_workers_and_a_cached_rerun_write_the_same_bytes(night):
    tmp = night["tmp"]
    parallel = recipe_for(tmp, tasks=3, workers=2)
    report = curate(night["raw"], tmp / "parallel.jsonl", tmp / "work2", parallel, None)
    assert (tmp / "parallel.jsonl").read_bytes() == night["corpus"]
    assert report.executor == {"kind": "local", "tasks": 3, "workers": 2}

    again = curate(night["raw"], tmp / "again.jsonl", tmp / "work3", night["recipe"], tmp / "cache.sqlite")
    assert (tmp / "again.jsonl").read_bytes() == night["corpus"]
    assert again.cached == again.documents_in - 1  # all but the empty document, which never reaches a step
    assert again.summary() == night["report"].summary()


def test_a_changed_recipe_misses_the_cache(night):
    tmp = night["tmp"]
    data = night["recipe"].to_dict()
    data["dedup"]["threshold"] = 0.9
    report = curate(night["raw"], tmp / "other.jsonl", tmp / "work4", PrepRecipe.from_dict(data), tmp / "cache.sqlite")
    assert report.cached == 0


def test_a_task_killed_before_publishing_resumes_to_the_same_bytes(night, tmp_path):
    recipe = night["recipe"]
    script = (
        "import sys; from pathlib import Path; from nightshift.prep.curate import curate; "
        "from nightshift.prep.recipe import PrepRecipe; import json; "
        "r = PrepRecipe.from_dict(json.loads(sys.argv[1])); "
        "curate(Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4]), r, None)"
    )
    args = [sys.executable, "-c", script, json.dumps(recipe.to_dict()), str(night["raw"]),
            str(tmp_path / "corpus.jsonl"), str(tmp_path / "work")]
    # Its own session: datatrove's manager process outlives a killed parent, and is reaped with the group.
    killed = subprocess.Popen(args, env={**_env(), "NIGHTSHIFT_FAULT": "prep.before_publish"},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        assert killed.wait(timeout=120) == -9 and not (tmp_path / "corpus.jsonl").exists()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(killed.pid, signal.SIGKILL)
    subprocess.run(args, env=_env(), check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=300)
    assert (tmp_path / "corpus.jsonl").read_bytes() == night["corpus"]


def _env():
    return {k: v for k, v in os.environ.items() if k != "NIGHTSHIFT_FAULT"}


def test_a_document_that_breaks_a_step_is_dropped_with_the_reason_and_the_night_goes_on(tmp_path, monkeypatch):
    from nightshift.prep import curator

    def broken(fmt, content):
        if "BREAK" in content:
            raise UnicodeError("bad")
        return content

    monkeypatch.setattr(curator, "extract_text_of", broken)
    rng = random.Random(2)
    docs = [{"id": f"d{i}", "source": "s", "format": "text", "content": prose(rng), "meta": {}} for i in range(5)]
    docs[2]["content"] += " BREAK"
    report = curate(write_raw(docs, tmp_path / "raw.jsonl"), tmp_path / "c.jsonl", tmp_path / "w",
                    recipe_for(tmp_path, tasks=1, workers=1), None)
    assert report.documents_out == 4
    assert report.steps[0]["dropped"] == {"extraction_failed:UnicodeError": 1}


def test_a_slurm_executor_is_configured_from_the_recipe_and_renders_its_batch_script(tmp_path):
    from nightshift.prep.executor import build_executor
    from nightshift.prep.shard_worker import CurateShard

    recipe = recipe_for(tmp_path, kind="slurm", options={"partition": "cpu", "cpus_per_task": 4, "time": "02:00:00"})
    executor = build_executor(recipe, [CurateShard(recipe.to_dict(), str(tmp_path), None)], 8, 0, tmp_path / "logs")
    script = executor.get_launch_file_contents(executor.get_sbatch_args(max_array=8), "srun python -c 'run()'")
    assert "#SBATCH --partition=cpu" in script and "#SBATCH --cpus-per-task=4" in script
    assert "#SBATCH --array=0-7" in script and "#SBATCH --time=02:00:00" in script


@pytest.mark.parametrize(
    ("executor", "says"),
    [({"kind": "slurm"}, "options.partition is required"),
     ({"kind": "slurm", "options": {"partition": "cpu", "gpus": 1}},
      r"SlurmPipelineExecutor has no options \['gpus'\]"),
     ({"kind": "ray", "options": {"cpus": 2}}, r"RayPipelineExecutor has no options \['cpus'\]")],
)
def test_executor_options_are_checked_against_datatrove(tmp_path, executor, says):
    from nightshift.prep.recipe import RecipeError

    with pytest.raises(RecipeError, match=says):
        recipe_for(tmp_path, **executor)


@pytest.fixture
def step_code(tmp_path, monkeypatch):
    """A copy of the steps' source files that code_digest() reads instead of the installed ones."""
    from nightshift.prep import digests

    folder = tmp_path / "prep"
    folder.mkdir()
    copies = []
    for path in digests.step_sources():
        copies.append(folder / path.name)
        copies[-1].write_bytes(path.read_bytes())
    monkeypatch.setattr(digests, "step_sources", lambda: list(copies))
    digests.code_digest.cache_clear()
    yield folder
    digests.code_digest.cache_clear()


def test_a_changed_step_module_misses_the_cache_and_unchanged_code_hits_it(night, tmp_path, step_code):
    cache = tmp_path / "cache.sqlite"  # its own cache, filled by the first run, under the copied code
    runs = []
    for edit in (None, None, "pii.py", None):
        if edit:  # a scrubber fix: the module's code changes, the documents do not
            with (step_code / edit).open("a") as fh:
                fh.write("\n# a fix to the scrubber\n")
            from nightshift.prep.digests import code_digest

            code_digest.cache_clear()
        out = tmp_path / f"corpus-{len(runs)}.jsonl"
        report = curate(night["raw"], out, tmp_path / "work", night["recipe"], cache)
        assert out.read_bytes() == night["corpus"]
        runs.append(report.cached)
    everything = len(night["docs"]) - 1  # all but the empty document, which never reaches a step
    assert runs == [0, everything, 0, everything]


def test_the_code_digest_covers_every_step_module_and_the_libraries_they_call(monkeypatch):
    import importlib.metadata

    from nightshift.prep import digests

    names = {p.name for p in digests.step_sources()}
    assert {"clean.py", "heuristics.py", "language.py", "pii.py", "near_dup.py", "decontaminate.py",
            "curate.py"} <= names
    # what trafilatura needs at run time shapes extraction too: its dependencies count, transitively
    assert {"trafilatura", "courlan", "htmldate", "charset-normalizer", "lxml", "wcwidth"} <= set(
        digests.step_library_versions())
    before = digests.code_digest()
    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda d: "99.0" if d == "courlan" else real(d))
    digests.code_digest.cache_clear()
    try:
        assert digests.code_digest() != before
    finally:
        monkeypatch.undo()
        digests.code_digest.cache_clear()
    assert digests.code_digest() == before


STDIN_SCRIPT = """
import json, sys
from pathlib import Path
from nightshift.prep.curate import curate
from nightshift.prep.recipe import PrepRecipe
curate(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), PrepRecipe.from_dict(json.loads(sys.argv[4])), None)
"""


def run_bounded(args, tmp_path, env=None, stdin=None, timeout=60):
    """Run a preparation script in its own process group; return (exit code, output lines, seconds)."""
    import time

    started = time.monotonic()
    with (tmp_path / "out.txt").open("w+") as out:
        proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=out, stderr=subprocess.STDOUT, text=True,
                                env=env or _env(), start_new_session=True)
        try:
            proc.communicate(stdin, timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        out.seek(0)
        return proc.returncode, out.read().splitlines(), time.monotonic() - started


def test_workers_that_cannot_start_fail_the_run_at_once_saying_why(night, tmp_path):
    recipe = recipe_for(tmp_path, tasks=2, workers=2)
    args = [sys.executable, "-", str(night["raw"]), str(tmp_path / "c.jsonl"), str(tmp_path / "w"),
            json.dumps(recipe.to_dict())]
    code, lines, seconds = run_bounded(args, tmp_path, stdin=STDIN_SCRIPT)
    assert code == 1 and seconds < 30 and len(lines) < 200, (code, seconds, len(lines), lines[-5:])
    assert "WorkerStartError: preparation workers cannot start" in lines[-1]
    assert "standard input" in lines[-1] and "executor.workers: 1" in lines[-1]
    assert not (tmp_path / "c.jsonl").exists()


def test_a_worker_dying_while_it_starts_fails_the_run_with_its_exit_code(night, tmp_path):
    recipe = recipe_for(tmp_path, tasks=2, workers=2)
    args = [sys.executable, "-c", STDIN_SCRIPT, str(night["raw"]), str(tmp_path / "c.jsonl"), str(tmp_path / "w"),
            json.dumps(recipe.to_dict())]
    code, lines, seconds = run_bounded(args, tmp_path, env={**_env(), "NIGHTSHIFT_FAULT": "prep.worker_start:raise"})
    assert code == 1 and seconds < 30 and len(lines) < 200, (code, seconds, len(lines), lines[-5:])
    assert "worker exited with code 1 while starting" in lines[-1] and "InjectedFault" in "\n".join(lines)


FILE_SCRIPT = """
import json, sys
from pathlib import Path
import multiprocess
from nightshift.prep.curate import curate
from nightshift.prep.recipe import PrepRecipe
if __name__ == "__main__":
    try:
        curate(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), PrepRecipe.from_dict(json.loads(sys.argv[4])))
    finally:
        print("processes left:", len(multiprocess.active_children()), flush=True)
"""


def test_a_worker_killed_mid_task_fails_the_run_at_once_and_a_rerun_resumes_to_the_same_bytes(night, tmp_path):
    script = tmp_path / "prepare.py"
    script.write_text(FILE_SCRIPT)
    recipe = recipe_for(tmp_path, tasks=2, workers=2)
    args = [sys.executable, str(script), str(night["raw"]), str(tmp_path / "c.jsonl"), str(tmp_path / "w"),
            json.dumps(recipe.to_dict())]
    # The first worker to finish its shard dies by SIGKILL before publishing it, as under the out-of-memory killer.
    env = {**_env(), "NIGHTSHIFT_FAULT": "prep.before_publish:kill-once", "NIGHTSHIFT_FAULT_DIR": str(tmp_path)}
    code, lines, seconds = run_bounded(args, tmp_path, env=env, timeout=40)
    assert (tmp_path / "fault-prep.before_publish").exists()
    assert code == 1 and seconds < 25 and len(lines) < 200, (code, seconds, len(lines), lines[-5:])
    assert "WorkerDied" in lines[-1] and "killed by signal 9 (SIGKILL)" in lines[-1], lines[-5:]
    assert "out-of-memory" in lines[-1] and "executor.workers" in lines[-1]
    assert "processes left: 0" in lines  # the pool's other workers and its manager were stopped
    assert not (tmp_path / "c.jsonl").exists()
    assert list((tmp_path / "w").glob("*/out/*.tmp"))  # the killed task's partial files are there for the rerun

    code, lines, _ = run_bounded(args, tmp_path, timeout=60)
    assert code == 0, lines[-5:]
    assert (tmp_path / "c.jsonl").read_bytes() == night["corpus"]
