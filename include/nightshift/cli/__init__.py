"""``nightshift``: set up the local installation, run one cycle, serve the champion, start everything.

    nightshift setup [--model]     metadata DB, airflow_settings.yaml, DVC data repo (and the foundation model)
    nightshift apply-settings      airflow_settings.yaml into the metadata DB (what the Airflow image runs at start)
    nightshift cycle               ingest_corpus, then finetune_model on its dataset version, then a summary
    nightshift serve               the OpenAI-compatible endpoint on http://127.0.0.1:8000/v1
    nightshift up                  Airflow (standalone) and the endpoint together, supervised
    nightshift keys create|list|revoke   API keys of the endpoint
    nightshift trace|history|profile     an answer's lineage, the champion's moves, a dataset's profile
    nightshift prompts register|list|diff|history   prompt templates in MLflow's Prompt Registry
    nightshift env                 the environment variables, as `export` lines for a shell
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nightshift.settings import DEFAULT_FOUNDATION_MODEL, load_settings

SERVE_HOST, SERVE_PORT = "127.0.0.1", 8000
PRIVATE_UMASK = 0o077
"""State files (metadata DB, MLflow store, keys, passwords) are for this user only."""


def arg(*flags: str, **options: Any) -> tuple[tuple[str, ...], dict[str, Any]]:
    """Return one argument of a command, as argparse's ``add_argument`` takes it."""
    return flags, options


@dataclass(frozen=True)
class Command:
    name: str
    run: str
    """``module:function`` under nightshift.cli; the function takes (settings, args) and returns the exit code."""
    help: str
    args: tuple[tuple[tuple[str, ...], dict[str, Any]], ...] = ()


# Every command is a line of this table (its name, the function that runs it, its help and arguments); the
# functions live in modules by concern beside this one and are imported only when their command runs.
COMMANDS: tuple[Command, ...] = (
    Command("env", "install:cmd_env", "print the environment as export lines"),
    Command("setup", "install:cmd_setup", "prepare the local installation (idempotent)",
            (arg("--model", action="store_true", help=f"also import {DEFAULT_FOUNDATION_MODEL}"),)),
    Command("import-model", "install:cmd_import_model", f"import {DEFAULT_FOUNDATION_MODEL}"),
    Command("apply-settings", "install:cmd_apply_settings",
            "apply airflow_settings.yaml (connections, pools, variables)",
            (arg("--file", help="settings file (default: the checkout's, or NIGHTSHIFT_SETTINGS_FILE)"),
             arg("--wait", type=int, default=0, help="seconds to wait for the metadata DB's migrations"))),
    Command("cycle", "cycle:cmd_cycle", "run ingest_corpus then finetune_model and print a summary",
            (arg("--source", help="document store (default: the bundled sample store)"),
             arg("--train-steps", type=int, help="override the recipe's training steps"),
             arg("--recipe", help="training recipe name, include/configs/training/<name>.yaml (default: default)"),
             arg("--base-model", help=f"base model (default {DEFAULT_FOUNDATION_MODEL})"))),
    Command("serve", "serving:cmd_serve", "serve the champion behind an OpenAI-compatible API",
            (arg("--host", default=SERVE_HOST),
             arg("--port", type=int, default=SERVE_PORT),
             arg("--poll-seconds", type=float, default=5.0, help="how often to look for a new champion"))),
    Command("up", "install:cmd_up", "start Airflow standalone and the endpoint",
            (arg("--serve-port", type=int, default=SERVE_PORT),)),
    Command("keys", "keys:cmd_keys", "create, list or revoke API keys of the endpoint",
            (arg("action", choices=["create", "list", "revoke"]),
             arg("id", nargs="?", help="revoke: the key's id or name"),
             arg("--name", default="default", help="create: a name to recognise the key by"))),
    Command("profile", "lineage:cmd_profile", "fetch the whylogs profile of a dataset version and summarise it",
            (arg("tag", help="dataset version, e.g. corpus-v0003"),
             arg("--out", type=Path, help="also write the profile (whylogs protobuf) to this file"))),
    Command("history", "lineage:cmd_history", "list the moves of the champion alias; --at: who was champion then",
            (arg("--at", help="an ISO 8601 time, e.g. 2026-12-01T09:30:00Z (no zone: UTC)"),
             arg("--json", action="store_true", help="print JSON"))),
    Command("trace", "lineage:cmd_trace", "trace an answer of the endpoint to its model, run, dataset and bytes",
            (arg("response_id", help="the answer's id (chatcmpl-... or cmpl-...) or its response's X-Request-Id"),
             arg("--json", action="store_true", help="print JSON (with the scrubbed request and answer)"))),
    Command("foundation", "lineage:cmd_foundation",
            "the base models chosen on select_foundation_model's leaderboard: who, when, why",
            (arg("--json", action="store_true", help="print JSON"),)),
    Command("prompts", "prompts:cmd_prompts",
            "prompt templates: register include/configs/prompts/*.yaml, list, diff two versions, history",
            (arg("action", choices=["register", "list", "diff", "history"]),
             arg("name", nargs="?", help="the prompt (register: only this one; diff and history: required)"),
             arg("versions", nargs="*", type=int, help="diff: two versions (one: against production)"),
             arg("--message", default="", help="register: what changed (kept with the version)"),
             arg("--json", action="store_true", help="print JSON"))),
    Command("fetch-model", "serving:cmd_fetch_model",
            "download the version a registry alias names (an engine pod's init)",
            (arg("--alias", default="champion", help="champion (default) or candidate"),
             arg("--dest", required=True,
                 help="folder: the checkpoint goes to DEST/model, its number to DEST/VERSION"))),
    Command("deploy-manifests", "serving:cmd_deploy_manifests",
            "Kubernetes manifests of the GPU serving path (vLLM + front)",
            (arg("--out", help="write to this file instead of printing"),
             arg("--vllm-image", help="vLLM image (default vllm/vllm-openai:v0.33.0)"),
             arg("--front-image", help="nightshift-serving image (docker/serving/Dockerfile)"),
             arg("--gpus", type=int, help="GPUs per engine (tensor parallel), default 1"))),
)


def parser() -> argparse.ArgumentParser:
    """Return the argument parser of every command in the table."""
    top = argparse.ArgumentParser(prog="nightshift", description=__doc__,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = top.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        one = sub.add_parser(command.name, help=command.help)
        for flags, options in command.args:
            one.add_argument(*flags, **options)
        one.set_defaults(run=command.run)
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    os.umask(PRIVATE_UMASK)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    module, function = args.run.split(":")
    run = getattr(importlib.import_module(f"nightshift.cli.{module}"), function)
    return run(load_settings(), args)

