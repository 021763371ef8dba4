"""What profiling and drift add to ingest_corpus, on the sample store and on 100,000 generated documents.

    .venv/bin/python bench/monitoring.py [--docs 100000] [--skip-large]

Every step of ingest_corpus after planning runs in a process of its own, as an Airflow task does (imports
included): collect (the sample store) or merge (the generated corpus), prepare_corpus, profile_corpus
(per-document metrics, tokens on a sample, the whylogs profile, drift against the references, charts),
validate_corpus (Great Expectations with Data Docs) and version_dataset (DVC). As in the DAG, profile_corpus
and validate_corpus run side by side; validate_corpus also runs alone first, so the night without profiling
is measured in the same run. The generated corpus gets two nights: the first has nothing to compare with; in
the second, 10% of the documents are replaced, and the profile is compared with the first night's version.

Prints each step's seconds, what profiling adds to the night's wall-clock time (the side-by-side pair minus
validation alone), and the profile's own seconds as a share of the night (what it would add run in
series). Goal: profiling and drift add under 15% to the night.

    .venv/bin/python bench/monitoring.py --monitor-answers 100000

measures monitor_model instead: one hour of 100,000 logged answers (two versions, a reference hour of a fifth
as many before it), read and judged in a process of its own as its task would (embedding model included).
Prints its seconds and the peak resident memory of that process, and the same for reading the answers alone,
measured in the same run, as the baseline. Goal: under 2 minutes and 1.5 GB.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))


def step(name: str, run_dir: Path) -> None:
    """Run one ingest step in this process (the child side of ``timed``)."""
    from nightshift.pipelines import ingest
    from nightshift.reports.publish import RunRef
    from nightshift.settings import load_settings

    settings = load_settings()
    run = RunRef(settings, "ingest_corpus", run_dir.name)
    state = run_dir / "bench_state.json"
    data = json.loads(state.read_text()) if state.is_file() else {}
    out = Path(os.environ.get("BENCH_STATE") or state)
    if name == "collect":
        from nightshift.sources.config import load_sources

        specs = [s.to_dict() for s in load_sources(settings.sources_file)]
        for spec in specs:
            ingest.collect_source(spec, run_dir, settings.home / "sources")
        data["collected"] = ingest.merge_sources(run_dir, specs, 0.5, run)
    elif name == "merge":
        specs = [{"name": "generated", "kind": "files", "path": "generated"}]
        data["collected"] = ingest.merge_sources(run_dir, specs, 0.5, run)
    elif name == "prepare":
        from nightshift.prep.recipe import PrepRecipe

        data["stats"] = ingest.prepare_corpus(run_dir, PrepRecipe.load(settings.prep_recipe),
                                              settings.cache_dir / "prep" / "outcomes.sqlite", 7.0, run)
    elif name == "profile":
        from nightshift.monitoring.drift import DriftPolicy

        data["drift"] = ingest.profile_corpus(run_dir, settings, DriftPolicy.load(settings.drift_policy), run)
    elif name == "validate":
        from nightshift.quality.suite import QualityPolicy

        try:
            data["quality"] = ingest.validate(run_dir, QualityPolicy.load(), data["stats"], run)
        except ingest.QualityGateFailed as exc:
            data["quality"] = {"failed": str(exc)[:300]}
    elif name == "version":
        data["version"] = ingest.version(run_dir, settings, data["stats"], data["collected"]["source"],
                                         data.get("drift"), run).to_dict()
    out.write_text(json.dumps(data))


def _command(name: str, run_dir: Path) -> list[str]:
    return [sys.executable, __file__, "--step", name, "--run-dir", str(run_dir)]


def timed(name: str, run_dir: Path, env: dict[str, str]) -> float:
    started = time.perf_counter()
    subprocess.run(_command(name, run_dir), env=env, check=True)
    return time.perf_counter() - started


def side_by_side(run_dir: Path, env: dict[str, str]) -> tuple[float, float]:
    """Run profile and validate at once, as the DAG does; return (wall seconds of the pair, profile's seconds)."""
    state = run_dir / "bench_state.json"
    base = json.loads(state.read_text())
    started = time.perf_counter()
    # Each writes its own copy of the state; they are merged afterwards (the DAG passes results by XCom).
    procs = {}
    for name in ("profile", "validate"):
        procs[name] = subprocess.Popen(_command(name, run_dir),
                                       env={**env, "BENCH_STATE": str(run_dir / f"state-{name}.json")})
    ended: dict[str, float] = {}
    while len(ended) < 2:
        for name, proc in procs.items():
            if name not in ended and proc.poll() is not None:
                if proc.returncode:
                    raise SystemExit(f"{name} failed")
                ended[name] = time.perf_counter() - started
        time.sleep(0.05)
    for name in procs:
        base.update(json.loads((run_dir / f"state-{name}.json").read_text()))
    state.write_text(json.dumps(base))
    return max(ended.values()), ended["profile"]


def night(label: str, first: str, run_dir: Path, env: dict[str, str]) -> dict[str, float]:
    seconds = {first: timed(first, run_dir, env), "prepare": timed("prepare", run_dir, env)}
    seconds["validate alone"] = timed("validate", run_dir, env)
    seconds["profile + validate"], seconds["profile"] = side_by_side(run_dir, env)
    seconds["version"] = timed("version", run_dir, env)
    night_with = seconds[first] + seconds["prepare"] + seconds["profile + validate"] + seconds["version"]
    night_without = night_with - seconds["profile + validate"] + seconds["validate alone"]
    added = night_with - night_without
    state = json.loads((run_dir / "bench_state.json").read_text())
    drift = state.get("drift", {})
    print(f"{label}: " + ", ".join(f"{k} {v:.1f} s" for k, v in seconds.items()) + f"; night {night_with:.1f} s")
    print(f"    profiling and drift add {added:+.1f} s = {added / night_without:+.1%} to the night "
          f"(profile_corpus alone {seconds['profile']:.1f} s = {seconds['profile'] / night_without:.1%} of it in "
          f"series); drift {drift.get('status')} (references {drift.get('references')}); "
          f"{state['stats']['documents']} documents versioned as {state.get('version', {}).get('tag')}; "
          f"quality {state.get('quality')}")
    return {**seconds, "night_without": night_without, "added": added}


def generated_night(run_dir: Path, docs: int, replace_share: float) -> int:
    """Write a generated corpus as the merge step expects a collected source; return its bytes."""
    from prep import generate

    source = run_dir / "sources" / "generated"
    source.mkdir(parents=True)
    raw = source / "raw.jsonl"
    generate(raw, docs)
    lines = [json.loads(line) for line in raw.read_text(encoding="utf-8").splitlines()]
    # Collection prefixes ids with the source's name (the suite counts documents per source by it).
    raw.write_text("".join(json.dumps({**d, "id": f"generated/{d['id']}"}) + "\n" for d in lines),
                   encoding="utf-8")
    if replace_share:
        fresh = run_dir / "fresh.jsonl"
        generate(fresh, int(docs * replace_share), seed=1)
        rng = random.Random(7)
        replaced = {i for i in rng.sample(range(docs), int(docs * replace_share))}
        lines = raw.read_text(encoding="utf-8").splitlines(keepends=True)
        with fresh.open(encoding="utf-8") as new:
            for i in sorted(replaced):
                doc = json.loads(next(new))
                doc["id"] = json.loads(lines[i])["id"]
                lines[i] = json.dumps(doc) + "\n"
        raw.write_text("".join(lines), encoding="utf-8")
        fresh.unlink()
    (source / "skipped_collect.json").write_text("[]")
    (source / "report.json").write_text(json.dumps({
        "name": "generated", "kind": "files", "documents": docs, "formats": {"text": docs}, "skipped": 0,
        "skip_reasons": {}, "details": {}}))
    return raw.stat().st_size


MONITOR_CHILD = r"""
import sys, time
from datetime import datetime
from nightshift.monitoring.policy import MonitoringPolicy
from nightshift.pipelines import monitor
from nightshift.settings import load_settings
settings = load_settings()
policy = MonitoringPolicy.load(settings.monitoring_policy)
start, end = datetime.fromisoformat(sys.argv[2]), datetime.fromisoformat(sys.argv[3])
if sys.argv[1] == "read":
    from nightshift.serving.requestlog import RequestLog
    log = RequestLog(settings.request_log_url)
    log.open()
    rows = log.answers_between(start, end, policy.window.max_answers)
    print(len(rows))
else:
    summary = monitor.measure_hour(settings, policy, start, end, {"champion": 2, "previous": 1})
    checks = monitor.judge(summary, policy, "http://localhost:8080/dags/rollback_model")
    print(summary["answers"], [f"{c.check}:{c.subject}" for c in checks if c.failing])
"""


def fill_request_log(settings, start, answers: int, reference: int) -> None:
    """Write ``answers`` logged answers in the hour from ``start`` and ``reference`` in the hour before it."""
    from datetime import timedelta

    import sqlalchemy as sa

    from nightshift.serving.requestlog import RequestLog, responses

    settings.serving_dir.mkdir(parents=True, exist_ok=True)
    log = RequestLog(settings.request_log_url)
    log.open()
    rng = random.Random(5)
    topics = ["tickets", "opening hours", "parking", "the cafe", "group visits", "the dome", "exhibitions"]
    for first, count, base in ((start - timedelta(hours=1), reference, 0), (start, answers, reference)):
        rows = []
        for i in range(count):
            question = f"Could you tell me about {rng.choice(topics)} for visit {rng.randrange(10_000)}?"
            rows.append({
                "response_id": f"chatcmpl-{base + i}", "created_at": first + timedelta(seconds=3599 * i / count),
                "key_id": f"k{i % 500}", "route": "chat", "model_name": "nightshift-llm",
                "model_version": 2 if i % 10 else 1, "model_role": "champion", "run_id": None,
                "dataset_tag": None, "request": json.dumps([{"role": "user", "content": question}]),
                "answer": json.dumps([f"About {question[24:60]}: the desk in the main hall can help."]),
                "finish": "error" if rng.random() < 0.02 else "stop", "prompt_tokens": 14, "completion_tokens": 16,
                "seconds": 0.2 + (i % 7) / 10, "scrubbed": "{}", "truncated": False})
            if len(rows) == 5000:
                with log.engine.begin() as conn:
                    conn.execute(sa.insert(responses), rows)
                rows = []
        if rows:
            with log.engine.begin() as conn:
                conn.execute(sa.insert(responses), rows)
    log.engine.dispose()


def measured(args: list[str], env: dict) -> tuple[float, float, str]:
    """Run a child; return its seconds, its peak resident memory (GB) and what it printed."""
    import psutil

    started = time.perf_counter()
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    watched, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        try:
            peak = max(peak, watched.memory_info().rss)
        except psutil.NoSuchProcess:
            break
        time.sleep(0.05)
    out, err = proc.communicate()
    if proc.returncode:
        raise RuntimeError(err[-2000:])
    return time.perf_counter() - started, peak / 1e9, out.strip()


def monitor_case(answers: int) -> None:
    """monitor_model's measure and judge steps over ``answers`` logged answers, against reading them alone."""
    from datetime import UTC, datetime, timedelta

    from nightshift.settings import load_settings

    work = Path(tempfile.mkdtemp(prefix="nightshift-monitor-bench-"))
    env = {**os.environ, "NIGHTSHIFT_HOME": str(work / "home"), "WHYLOGS_NO_ANALYTICS": "True",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    try:
        os.environ["NIGHTSHIFT_HOME"] = env["NIGHTSHIFT_HOME"]
        start = datetime(2026, 12, 1, 10, tzinfo=UTC)
        fill_request_log(load_settings(), start, answers, answers // 5)
        end = start + timedelta(hours=1)
        window = [start.isoformat(), end.isoformat()]
        read_s, read_gb, read_out = measured([sys.executable, "-c", MONITOR_CHILD, "read", *window], env)
        run_s, run_gb, run_out = measured([sys.executable, "-c", MONITOR_CHILD, "measure", *window], env)
        print(f"monitor_model over {answers} logged answers (read: {read_out.splitlines()[-1]} rows; "
              f"judged: {run_out.splitlines()[-1]} (answers, failing checks))")
        print(f"    reading the hour alone   {read_s:7.1f} s   peak {read_gb:5.2f} GB")
        print(f"    measure + judge          {run_s:7.1f} s   peak {run_gb:5.2f} GB   "
              f"({run_s / read_s:.1f}x the read; goal < 120 s and < 1.5 GB)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=100_000)
    parser.add_argument("--monitor-answers", type=int, help="measure monitor_model over this many answers instead")
    parser.add_argument("--skip-large", action="store_true", help="only the sample store")
    parser.add_argument("--step")
    parser.add_argument("--run-dir", type=Path)
    args = parser.parse_args()
    if args.step:
        step(args.step, args.run_dir)
        return
    if args.monitor_answers:
        monitor_case(args.monitor_answers)
        return

    from nightshift.settings import DEFAULT_FOUNDATION_MODEL, load_settings

    work = Path(tempfile.mkdtemp(prefix="nightshift-monitoring-bench-"))
    env = {**os.environ, "NIGHTSHIFT_HOME": str(work / "home"), "WHYLOGS_NO_ANALYTICS": "True",
           "GX_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1", "MLFLOW_DISABLE_TELEMETRY": "true"}
    tokenizer = load_settings().models_dir / DEFAULT_FOUNDATION_MODEL / "tokenizer.json"
    try:
        home = work / "home"
        if tokenizer.is_file():  # the profile counts tokens with the base model's tokenizer
            (home / "models" / DEFAULT_FOUNDATION_MODEL).mkdir(parents=True)
            shutil.copy(tokenizer, home / "models" / DEFAULT_FOUNDATION_MODEL / "tokenizer.json")
        else:
            print(f"no {tokenizer}: run `make model` first for token counts; measuring without them")
        # What `make setup` does once: the data repository exists before any night.
        subprocess.run([sys.executable, "-c", "from nightshift.settings import load_settings; "
                        "from nightshift.stores import dataset_repository; "
                        "dataset_repository(load_settings()).ensure()"], env=env, check=True, capture_output=True)
        samples = night("sample store", "collect", work / "samples", env)
        if args.skip_large:
            return
        results = {}
        for label, share in (("first", 0.0), ("second", 0.1)):
            run_dir = work / f"generated-{label}"
            size = generated_night(run_dir, args.docs, share)
            print(f"{args.docs} documents ({size / 1e6:.0f} MB), night {label}")
            results[label] = night(f"{args.docs} documents, {label} night", "merge", run_dir, env)
        print("\nwhat profiling and drift add to ingest_corpus (goal < 15%); profile_corpus's own share in series:")
        for label, r in (("sample store", samples), *((f"{args.docs} documents, {k} night", v)
                                                       for k, v in results.items())):
            print(f"    {label:<34} adds {r['added'] / r['night_without']:+6.1%}   in series "
                  f"{r['profile'] / r['night_without']:5.1%}   ({r['profile']:.1f} s; night without it "
                  f"{r['night_without']:.1f} s)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
