"""``nightshift prompts``: the prompt templates of include/configs/prompts in MLflow's Prompt Registry."""

from __future__ import annotations

import difflib
import getpass
import json
import sys

from nightshift.environment import configure_environment
from nightshift.settings import Settings


def cmd_prompts(settings: Settings, args) -> int:
    from nightshift.prompts.template import PromptError
    from nightshift.stores import prompt_registry_for

    configure_environment(settings)
    registry = prompt_registry_for(settings)
    try:
        return {"register": _register, "list": _list, "diff": _diff, "history": _history}[args.action](
            settings, registry, args)
    except (PromptError, LookupError) as exc:
        print(f"prompts {args.action}: {exc}", file=sys.stderr)
        return 2


def _register(settings: Settings, registry, args) -> int:
    """Register every template of the source folder (or the one named) whose text changed; print the versions."""
    from nightshift.prompts.template import source_templates

    templates = source_templates(settings.prompts_dir)
    if args.name:
        if args.name not in templates:
            raise LookupError(f"no template named {args.name} in {settings.prompts_dir} "
                              f"(there: {', '.join(sorted(templates)) or 'none'})")
        templates = {args.name: templates[args.name]}
    if not templates:
        print(f"no templates in {settings.prompts_dir}", file=sys.stderr)
        return 1
    by = getpass.getuser()
    out = []
    for template in templates.values():
        version, new = registry.register(template, args.message or f"from {settings.prompts_dir.name}/", by)
        out.append({"name": version.name, "version": version.version, "new": new, "digest": version.digest})
        if not args.json:
            print(f"{version.label} {'registered' if new else 'unchanged (already registered)'}")
    if args.json:
        print(json.dumps(out, indent=2))
    return 0


def _list(settings: Settings, registry, args) -> int:
    names = [args.name] if args.name else registry.names()
    rows = [v.to_dict() for name in names for v in registry.versions(name)]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no prompts are registered: nightshift prompts register")
        return 0
    print(f"{'prompt':<24}{'version':>8}  {'aliases':<22}{'registered':<27}{'by':<14}message")
    for r in rows:
        print(f"{r['name'][:23]:<24}{r['version']:>8}  {','.join(r['aliases'])[:21]:<22}{r['created_at']:<27}"
              f"{r['registered_by'][:13]:<14}{' '.join(r['message'].split())[:60]}")
    return 0


def _diff(settings: Settings, registry, args) -> int:
    from nightshift.registry.prompt_registry import PRODUCTION

    if not args.name or len(args.versions) not in (1, 2):
        print("prompts diff NAME A [B]: two versions, or one against the production version", file=sys.stderr)
        return 2
    if len(args.versions) == 2:
        a, b = (registry.get(args.name, v) for v in args.versions)
    else:
        a = registry.by_alias(args.name, PRODUCTION)
        if a is None:
            raise LookupError(f"prompt {args.name} has no production version to compare with")
        b = registry.get(args.name, args.versions[0])
    lines = list(difflib.unified_diff(a.template.render_text().splitlines(), b.template.render_text().splitlines(),
                                      f"{a.label}", f"{b.label}", lineterm=""))
    print("\n".join(lines) if lines else f"{a.label} and {b.label} render the same messages")
    return 0


def _history(settings: Settings, registry, args) -> int:
    if not args.name:
        print("prompts history NAME", file=sys.stderr)
        return 2
    moves = registry.history(args.name)
    if args.json:
        print(json.dumps([m.to_dict() for m in moves], indent=2))
        return 0
    if not moves:
        print(f"{args.name}: no release recorded")
        return 0
    print(f"{'when (UTC)':<28}{'alias':<12}{'move':<12}{'kind':<11}{'state':<9}{'by':<16}{'DAG run':<40}why")
    for m in moves:
        move = f"{'v' + str(m.from_version) if m.from_version else '-'} -> v{m.to_version}"
        print(f"{(m.at or m.requested_at)[:26]:<28}{m.alias:<12}{move:<12}{m.kind:<11}{m.state:<9}{m.by[:15]:<16}"
              f"{m.dag_run[:38]:<40}{' '.join(m.reason.split())[:80]}")
        if m.evaluation.get("report"):
            print(f"{'':<28}evaluation: {m.evaluation['report']}")
    return 0
