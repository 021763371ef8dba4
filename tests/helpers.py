"""Small real servers for tests: the app under uvicorn, an SMTP sink, an HTTP webhook sink, all on 127.0.0.1."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from fastapi import Request  # at module level: the scripted app's handlers name it in their (string) annotations

from conftest import free_port


class UvicornThread:
    """Run an ASGI app on a free loopback port for the duration of a with-block."""

    def __init__(self, app) -> None:
        import uvicorn

        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> UvicornThread:
        self.thread.start()
        deadline = time.monotonic() + 120
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("server did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


class SmtpSink:
    """A real SMTP server (aiosmtpd) that keeps every message it receives."""

    def __init__(self) -> None:
        from aiosmtpd.controller import Controller

        self.messages: list = []
        sink = self

        class Handler:
            async def handle_DATA(self, server, session, envelope):  # noqa: N802 (aiosmtpd hook name)
                from email import message_from_bytes

                sink.messages.append(message_from_bytes(envelope.content))
                return "250 OK"

        self.port = free_port()
        self.controller = Controller(Handler(), hostname="127.0.0.1", port=self.port)

    def __enter__(self) -> SmtpSink:
        self.controller.start()
        return self

    def connection(self, to: str = "data-oncall@example.com") -> str:
        """The ``nightshift_alerts`` connection (JSON, as AIRFLOW_CONN_...) for this plain SMTP server."""
        import json

        return json.dumps({"conn_type": "smtp", "host": "127.0.0.1", "port": self.port,
                           "extra": {"to": [to], "from_email": "nightshift@example.com", "disable_ssl": True,
                                     "disable_tls": True, "retry_limit": 1, "timeout": 10}})

    @staticmethod
    def text(message) -> str:
        """The readable text of a message (Airflow's SMTP provider sends HTML in a multipart message)."""
        import html

        part = next(p for p in message.walk() if p.get_content_type() in ("text/html", "text/plain"))
        return html.unescape(part.get_payload(decode=True).decode())

    def __exit__(self, *exc) -> None:
        self.controller.stop()


class WebhookSink:
    """An HTTP server that records the JSON bodies posted to it."""

    def __init__(self, status: int = 200) -> None:
        self.bodies: list = []
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                length = int(self.headers.get("Content-Length", 0))
                sink.bodies.append(json.loads(self.rfile.read(length)))
                self.send_response(status)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> WebhookSink:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()


def wait_for(predicate: Callable[[], object], timeout: float = 60.0, what: str = "condition", every: float = 0.1):
    """Poll ``predicate`` until it returns something truthy; return that, or fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = predicate()
        except Exception:  # a server that is not up yet refuses connections
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(every)


_MLFLOW_TEMPLATE: Path | None = None


def mlflow_store(db: Path) -> str:
    """Return the SQLite URL of an empty MLflow store at ``db``, copied from one that was migrated once per session.

    MLflow migrates a new store to its schema on first use, about 2 s each time; a copy of a migrated, empty
    store is the very same database.
    """
    global _MLFLOW_TEMPLATE
    import shutil

    if _MLFLOW_TEMPLATE is None:
        from mlflow import MlflowClient

        from conftest import SESSION_HOME

        template = SESSION_HOME / "mlflow-template" / "mlflow.db"
        template.parent.mkdir(parents=True, exist_ok=True)
        url = f"sqlite:///{template}"
        MlflowClient(tracking_uri=url, registry_uri=url).search_registered_models()  # creates every table
        _MLFLOW_TEMPLATE = template
    if not db.exists():
        db.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(_MLFLOW_TEMPLATE, db)
    return f"sqlite:///{db}"


def local_registry(folder: Path, model_name: str = "nightshift-llm"):
    """Return a registry with its own new MLflow store and artifact folder under ``folder``."""
    from nightshift.registry.mlflow_registry import ModelRegistry

    return ModelRegistry(mlflow_store(folder / "mlflow.db"), model_name, (folder / "art").as_uri())


def home_registry(settings):
    """Return the registry of a NIGHTSHIFT_HOME, its MLflow store created the fast way (see ``mlflow_store``)."""
    from nightshift.stores import registry_for

    mlflow_store(settings.mlflow_dir / "mlflow.db")
    return registry_for(settings)


def publish(registry, checkpoint: Path, key: str, promote: bool = True):
    """Log a checkpoint folder as a run artifact, register it and (by default) make it the champion."""
    run_id = registry.open_run("serving", key, key, {})
    registry.upload_checkpoint(run_id, checkpoint)
    version = registry.register(run_id, tags={"nightshift.dataset_tag": f"ds-{key}"})
    return registry.promote(version) if promote else version


def ready(url: str) -> dict | None:
    """Return the endpoint's /healthz body when it is ready to serve, else None."""
    import httpx

    response = httpx.get(f"{url}/healthz", timeout=5)
    return response.json() if response.status_code == 200 else None


class ServeProcess:
    """``nightshift serve`` as a real process on a free loopback port, with its log in a file."""

    def __init__(self, home: Path, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.home = home
        self.log_path = home / "serve.log"
        self.env = {**os.environ, "NIGHTSHIFT_HOME": str(home), **(env or {})}
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> ServeProcess:
        self.home.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "nightshift.cli", "serve", "--port", str(self.port), "--poll-seconds", "0.5"],
            env=self.env, stdout=log, stderr=subprocess.STDOUT,
        )
        wait_for(lambda: self.process.poll() is not None or ready(self.url), 180, "the endpoint to be ready")
        assert self.process.poll() is None, self.log_path.read_text()[-3000:]
        return self

    def __exit__(self, *exc) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()

    def peak_rss_mb(self) -> float:
        """Return the server's peak resident memory so far (VmHWM), in MiB."""
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        return int(status.split("VmHWM:")[1].split()[0]) / 1024

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def stop_supervisor(proc, marker: str) -> None:
    """Stop a `nightshift up` the way an operator would (SIGTERM), then kill whatever it left behind."""
    import os
    import signal
    import subprocess

    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
    for pid in marked(marker):
        os.kill(pid, signal.SIGKILL)


def marked(marker: str) -> list[int]:
    """Return the pids of live processes whose environment has ``NS_TEST_MARKER=<marker>``."""
    needle = f"NS_TEST_MARKER={marker}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "environ").read_bytes() and "State:\tZ" not in (entry / "status").read_text():
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def port_is_free(port: int) -> bool:
    """Return whether a server could listen on ``port`` now, as one restarting does (SO_REUSEADDR: connections
    the old server closed may still linger in TIME_WAIT, which holds no port)."""
    import socket

    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def perturbed_copy(source: Path, dest: Path, seed: int = 1) -> Path:
    """Save ``source`` with every weight moved by seeded noise: another version whose greedy answers differ."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(source))
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    model.save_pretrained(dest)
    for item in source.iterdir():
        if not item.name.startswith(("model", "config")):
            shutil.copy2(item, dest / item.name)
    return dest


def greedy_answers(folder: Path, prompts: list[str], max_tokens: int) -> dict[str, str]:
    """What each completion prompt gets from this checkpoint alone, greedy (batching gives the same)."""
    import threading

    from nightshift.records import ModelVersionRecord
    from nightshift.serving.decoding import SamplingParams, generate
    from nightshift.serving.loading import load_model
    from nightshift.settings import ServingLimits

    loaded = load_model(ModelVersionRecord(name="m", version=0, run_id="", source=""), folder, ServingLimits(), 0)
    out = {}
    for prompt in prompts:
        ids = loaded.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        out[prompt] = generate(loaded, ids, SamplingParams(max_tokens=max_tokens, temperature=0), threading.Event(),
                               float("inf")).text
    return out


def own_home(tmp_path_factory, name: str):
    """Yield the settings of a NIGHTSHIFT_HOME of a module's own (for a module-scoped fixture): the session's
    metadata DB is shared, its home is not, whatever ran before on this worker."""
    import pytest

    from nightshift.settings import load_settings

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("NIGHTSHIFT_HOME", str(tmp_path_factory.mktemp(name)))
        yield load_settings()


def scripted_openai_app(answers: dict[str, str], model: str = "scripted", delay_s: float = 0.0):
    """A scripted OpenAI-compatible API (FastAPI): chat answers from ``answers`` (question -> answer, else a fixed
    line), and ``/v1/completions`` that echoes the prompt with a logprob per whitespace-separated piece (-0.25 within
    a text that ends with a scripted answer, else -2.0), as an API with prompt logprobs does. ``calls`` counts
    requests by route."""
    import re

    from fastapi import FastAPI

    app = FastAPI()
    app.state.calls = {"chat": 0, "completions": 0}
    known = set(answers.values())

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        app.state.calls["chat"] += 1
        if delay_s:
            time.sleep(delay_s)
        question = body["messages"][-1]["content"]
        text = answers.get(question, "I do not know.")
        words = len(text.split())
        return {"id": "chatcmpl-scripted", "object": "chat.completion", "created": 0, "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": len(question.split()) + 8, "completion_tokens": words,
                          "total_tokens": len(question.split()) + 8 + words}}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await request.json()
        app.state.calls["completions"] += 1
        prompt = body["prompt"]
        pieces = [(m.start(), m.group()) for m in re.finditer(r"\s*\S+", prompt)]
        good = any(prompt.endswith(a) for a in known)
        logprobs = [None] + [-0.25 if good else -2.0] * (len(pieces) - 1)
        return {"id": "cmpl-scripted", "object": "text_completion", "created": 0, "model": model,
                "choices": [{"index": 0, "text": prompt, "finish_reason": "length", "logprobs": {
                    "tokens": [p for _, p in pieces], "token_logprobs": logprobs,
                    "top_logprobs": None, "text_offset": [s for s, _ in pieces]}}],
                "usage": {"prompt_tokens": len(pieces), "completion_tokens": 0, "total_tokens": len(pieces)}}

    return app
