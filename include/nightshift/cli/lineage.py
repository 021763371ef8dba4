"""What happened, looked up: an answer traced to its model and data, the champion's history, a dataset's profile."""

from __future__ import annotations

import json
import sys

from nightshift.environment import configure_environment
from nightshift.settings import (
    Settings,
)


def cmd_trace(settings: Settings, args) -> int:
    from nightshift.pipelines.lineage import NotTraceable, trace_answer

    configure_environment(settings)
    try:
        traced = trace_answer(settings, args.response_id[:80])
    except NotTraceable as exc:
        print(f"cannot trace: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(traced, indent=2, default=str))
        return 0
    a, lin = traced["answer"], traced["lineage"]
    print(f"answer    {a['response_id']} at {a['created_at']} ({a['route']}, {a['finish']}, "
          f"{a['prompt_tokens']}+{a['completion_tokens']} tokens, key {a['key_id'] or '-'})")
    print(f"model     {lin['model']['name']} v{lin['model']['version']} ({lin['model']['role']})")
    run = lin["run"]
    print("run       " + (run["missing"] if "missing" in run else
                          f"{run['run_id']} {run['name'] or ''} [{run['status']}] DAG run {run['dag_run'] or '-'}"))
    ds = lin["dataset"]
    print("dataset   " + (f"{ds.get('tag', '')} {ds['missing']}" if "missing" in ds else
                          f"{ds['tag']} @ {ds['rev'][:10]}: {ds['path']} md5 {ds['md5']} ({ds['documents']} documents, "
                          f"{ds['bytes']} bytes)"))
    pr = lin["prompt"]
    print("prompt    " + (pr["missing"] if "version" not in pr else
                          f"{pr['name']} v{pr['version']} ({pr['role']})" + (
                              f" {pr['uri']} sha256 {pr['digest'][:16]}" if "digest" in pr else f": {pr['missing']}")))
    for c in a.get("citations") or []:
        where = f"[{c['number']}]" if c.get("number") is not None else "[-]"
        print(f"cited     {where} {c['chunk']} score {c['score']:.3f} ({c['used']})")
    if a["scrubbed"]:
        print(f"scrubbed  {', '.join(f'{k} x{v}' for k, v in sorted(a['scrubbed'].items()))}")
    for f in a["feedback"]:
        extra = " with a correction" if f["correction"] else ""
        print(f"feedback  {f['created_at']} rating {f['rating']:+d}{extra}")
    return 0


def cmd_history(settings: Settings, args) -> int:
    from nightshift.registry.history import PromotionHistory, parse_time
    from nightshift.stores import registry_for

    configure_environment(settings)
    registry = registry_for(settings)
    history = PromotionHistory(registry)
    try:
        when = parse_time(args.at) if args.at else None
    except ValueError as exc:
        print(f"--at: {exc}", file=sys.stderr)
        return 2
    moves = history.moves(include_pending=True)
    declined = history.declines()
    answer = history.champion_at(when) if when else None
    if args.json:
        print(json.dumps({"model": registry.model_name, "alias": registry.alias,
                          "moves": [m.to_dict() for m in moves], "declined": [m.to_dict() for m in declined],
                          **({"at": when.isoformat(), "champion": answer} if when else {})}, indent=2))
        return 0
    if when is not None:
        if answer["version"] is None:
            print(f"{when.isoformat()}: {registry.model_name} had no champion")
        else:
            since = f"since {answer['since']}" if answer["since"] else "since before the recorded history"
            print(f"{when.isoformat()}: {registry.model_name} v{answer['version']} was champion ({since})")
        return 0
    if not moves and not declined:
        print(f"{registry.model_name}@{registry.alias} has never moved")
        return 0
    print(f"{'when (UTC)':<28}{'move':<12}{'kind':<11}{'by':<18}{'DAG run':<44}why")
    # A declined release reads as a move that did not happen: kind "declined", who declined it and why.
    for m in sorted([*moves, *declined], key=lambda mv: mv.at or mv.requested_at):
        when_text = m.at or f"{m.requested_at} (pending)"
        move = f"{'v' + str(m.from_version) if m.from_version else '-'} -> v{m.to_version}"
        kind = "declined" if m.state == "rejected" else m.kind
        why = " ".join(m.reason.split())
        print(f"{when_text[:26]:<28}{move:<12}{kind:<11}{m.by[:16]:<18}{m.dag_run[:42]:<44}{why[:100]}")
        if m.evaluation.get("report"):
            print(f"{'':<28}evaluation: {m.evaluation['report']}")
    return 0


def cmd_profile(settings: Settings, args) -> int:
    from nightshift.monitoring.profiles import read_profile, summarize
    from nightshift.pipelines.ingest import PROFILE
    from nightshift.stores import dataset_repository

    configure_environment(settings)
    try:
        data = dataset_repository(settings).read_companion(args.tag, PROFILE)
    except LookupError as exc:
        print(exc, file=sys.stderr)
        return 2
    if data is None:
        print(f"{args.tag} was versioned without a profile (before profiles were kept)", file=sys.stderr)
        return 1
    if args.out:
        args.out.write_bytes(data)
        print(f"wrote {args.out} ({len(data)} bytes; whylogs: DatasetProfileView.deserialize)")
    summary = summarize(read_profile(data))
    print(f"{args.tag}: {summary['documents']} documents")
    for name, column in summary["columns"].items():
        if "quantiles" in column and "top" not in column:
            q = column["quantiles"]
            print(f"  {name:<14} mean {column['mean']:10.1f}  median {q['0.5']:10.0f}  p95 {q['0.95']:10.0f}  "
                  f"missing {column['null']}")
        elif column.get("top"):
            top = ", ".join(f"{t['value']} {t['count']}" for t in column["top"][:5])
            print(f"  {name:<14} {top}")
    return 0


def cmd_foundation(settings: Settings, args) -> int:
    from nightshift.pipelines.foundation import choices, current_base

    configure_environment(settings)
    recorded = choices(settings)
    if args.json:
        print(json.dumps({"base": current_base(settings), "choices": recorded}, indent=2))
        return 0
    print(f"base: {current_base(settings)}" + ("" if recorded else " (the bundled model: no choice recorded yet)"))
    for c in recorded:
        what = f"kept {c['base']}" if c.get("kept") else f"{c.get('previous', '-')} -> {c['base']}"
        print(f"{c['at'][:19].replace('T', ' ')} UTC  {what:<44} by {str(c.get('by', ''))[:24]:<26}"
              f"{' '.join(str(c.get('reason', '')).split())[:80]}")
    return 0
