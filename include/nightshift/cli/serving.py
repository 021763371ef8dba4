"""Serving commands: the endpoint itself, a model fetched for an engine pod, the GPU serving manifests."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from nightshift.cli.keys import build_keyring
from nightshift.environment import configure_environment
from nightshift.settings import (
    Settings,
)

log = logging.getLogger("nightshift")


def cmd_serve(settings: Settings, args) -> int:
    import uvicorn

    from nightshift.serving.app import create_app
    from nightshift.stores import registry_for

    configure_environment(settings)
    keyring = build_keyring(settings)
    if settings.require_api_key and not len(keyring):
        log.warning("no API keys are configured: every /v1 request will get 401; create one with "
                    "`nightshift keys create` or run `nightshift setup`")
    from nightshift.airflow.notifiers import alert_sender
    from nightshift.serving.requestlog import RequestLog

    limits = settings.serving
    request_log = None
    if settings.request_log_url:
        settings.serving_dir.mkdir(parents=True, exist_ok=True)
        request_log = RequestLog(settings.request_log_url, settings.request_log_retention_days)
    app = create_app(
        registry_for(settings), settings.cache_dir / "serving", limits=limits, keyring=keyring,
        require_key=settings.require_api_key, poll_seconds=args.poll_seconds, on_alert=alert_sender("serving"),
        request_log=request_log,
        upstreams=({"champion": settings.serve_upstream, "candidate": settings.serve_upstream_candidate or ""}
                   if settings.serve_upstream else None),
        prompts=prompt_watcher(settings, args.poll_seconds), retrieval=serving_retrieval(settings),
    )
    key_note = (f"API key for local use: {settings.local_key_file}" if settings.local_key_file.is_file()
                else "API keys: `nightshift keys create`")
    print(f"serving {settings.registered_model}@{settings.champion_alias} on http://{args.host}:{args.port}/v1 "
          f"({key_note})", flush=True)
    # Requests in flight are bounded in the application (connections.InFlightMiddleware), not sockets: uvicorn's
    # limit_concurrency counts idle connections too, and would refuse the probes. A connection gets
    # header_timeout_s to send its request's headers (connections.HeaderTimeoutProtocol).
    from nightshift.serving.connections import protocol_class

    uvicorn.run(app, host=args.host, port=args.port, log_level="info", http=protocol_class(limits.header_timeout_s),
                timeout_graceful_shutdown=10)
    return 0


def serving_retrieval(settings: Settings):
    """Return the endpoint's embeddings and retrieval (retrieval.yaml, NIGHTSHIFT_VECTOR_STORE)."""
    from nightshift.retrieval.config import RetrievalConfig
    from nightshift.retrieval.store import open_store
    from nightshift.serving.retrieval import ServingRetrieval

    config = RetrievalConfig.load(settings.retrieval_config)
    return ServingRetrieval(config, open_store(settings.vector_store, settings.home, config))


def prompt_watcher(settings: Settings, poll_seconds: float):
    """Return the watcher of the prompt the endpoint applies (NIGHTSHIFT_SERVE_PROMPT), or None when it is off."""
    from nightshift.serving.prompting import PromptWatcher
    from nightshift.stores import prompt_registry_for

    if settings.serve_prompt is None:
        return None
    return PromptWatcher(prompt_registry_for(settings), settings.serve_prompt, poll_seconds)


def cmd_fetch_model(settings: Settings, args) -> int:
    """Download the version an alias names into DEST/model (verified), and its number into DEST/VERSION."""
    import shutil

    from nightshift.stores import registry_for

    configure_environment(settings)
    registry = registry_for(settings)
    from mlflow.exceptions import MlflowException

    try:
        mv = registry.client.get_model_version_by_alias(registry.model_name, args.alias)
    except MlflowException:
        print(f"no version of {registry.model_name} carries the alias {args.alias!r}", file=sys.stderr)
        return 1
    record = registry._record(mv)
    dest = Path(args.dest)
    folder = registry.download(record, dest / ".download")
    target = dest / "model"
    staged = dest / "model.partial"
    shutil.rmtree(staged, ignore_errors=True)
    shutil.copytree(folder, staged)
    shutil.rmtree(target, ignore_errors=True)
    staged.rename(target)
    shutil.rmtree(dest / ".download", ignore_errors=True)
    (dest / "VERSION.partial").write_text(f"{record.version}\n")
    (dest / "VERSION.partial").rename(dest / "VERSION")
    print(f"{record.label} ({args.alias}) is in {target}")
    return 0


def cmd_deploy_manifests(settings: Settings, args) -> int:
    import yaml

    from nightshift.serving.deploy import ServingCluster, manifests

    overrides = {k: v for k, v in (("vllm_image", args.vllm_image), ("front_image", args.front_image),
                                   ("gpus_per_engine", args.gpus)) if v}
    docs = manifests(settings, ServingCluster.from_settings(settings, **overrides))
    text = "---\n".join(yaml.safe_dump(d, sort_keys=False) for d in docs)
    if args.out:
        Path(args.out).write_text(text)
        print(f"{len(docs)} manifests written to {args.out}: kubectl apply -f {args.out}")
    else:
        print(text, end="")
    return 0
