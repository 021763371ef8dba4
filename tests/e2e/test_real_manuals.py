"""Real documentation nobody here wrote, crawled from 127.0.0.1 by ingest_corpus: git's and PostgreSQL's HTML
manuals as Debian packages them (tests/manuals.py), and planted boilerplate, spam, gibberish and filler pages.

Night one prepares both sites (git's manual with the junk beside it, then PostgreSQL's) with the shipped default
profile (docs): it keeps at least 95% of each manual's pages, with their code blocks fenced, drops at least 95% of
the junk, and stays within the drop budget. Night two prepares git's manual with the web-prose profile: the
drop-budget warning fires once, for it.
"""

import json
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import pytest
import yaml

from cli_helpers import fresh, run
from manuals import ManualUnavailable, junk_pages, manual

pytestmark = pytest.mark.e2e

GIT_PAGES = 300
PG_PAGES = 1300


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


class _DocsSite(_Quiet):
    """git's manual under /manual/ and the planted junk under /junk/, both linked from the start page: one
    source, as a help centre mixing real pages with rubbish would be."""

    junk: dict[str, str] = {}

    def do_GET(self):  # noqa: N802 (http.server's name)
        path = self.path.split("?")[0]
        if path.startswith("/manual/"):
            self.path = path.removeprefix("/manual")
            return super().do_GET()
        if path == "/":
            body = ("<html><body><a href='/manual/index.html'>Manual</a> "
                    "<a href='/junk/index.html'>More</a></body></html>")
        else:
            body = self.junk.get(path.removeprefix("/junk/"))
        if body is None:
            self.send_error(404)
            return None
        data = body.encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        return None


def serve(handler):
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


@pytest.fixture(scope="module")
def sites():
    try:
        roots = {name: manual(name) for name in ("git", "postgresql")}
    except ManualUnavailable as exc:
        pytest.skip(f"Debian's HTML manuals are not available here: {exc}")
    _DocsSite.junk = junk_pages()
    servers = {"git": serve(partial(_DocsSite, directory=str(roots["git"]))),
               "postgresql": serve(partial(_Quiet, directory=str(roots["postgresql"])))}
    yield {name: base for name, (_, base) in servers.items()}
    for server, _ in servers.values():
        server.shutdown()


def web(name, url, pages, prep=None):
    entry = {"name": name, "kind": "web", "url": url, "max_pages": pages, "max_depth": 8, "sitemaps": False,
             "timeout_s": 10, "retries": 0}
    return {**entry, "prep": prep} if prep else entry


def night(tmp_path, monkeypatch, sources):
    (tmp_path / "sources.yaml").write_text(yaml.safe_dump({"sources": sources}))
    monkeypatch.setenv("NIGHTSHIFT_SOURCES_FILE", str(tmp_path / "sources.yaml"))
    # What is tested here is collection and preparation: the manuals' ten thousand chunks are not embedded.
    (tmp_path / "retrieval.yaml").write_text("enabled: false\n")
    monkeypatch.setenv("NIGHTSHIFT_RETRIEVAL_CONFIG", str(tmp_path / "retrieval.yaml"))
    dag_run, tasks = run(fresh("ingest_corpus"), {})
    assert dag_run.state == "success", {t: r.state for t, r in tasks.items()}
    return tasks


def test_the_docs_profile_keeps_real_manuals_and_drops_junk_and_web_prose_alerts_once(tmp_path, monkeypatch,
                                                                                       sites, airflow_db):
    from nightshift.settings import load_settings

    monkeypatch.setenv("NIGHTSHIFT_HOME", str(tmp_path / "home"))
    settings = load_settings()
    alerts = settings.home / "alerts" / "alerts.jsonl"

    tasks = night(tmp_path, monkeypatch, [
        web("git", sites["git"] + "/", GIT_PAGES),
        web("postgresql", sites["postgresql"] + "/index.html", PG_PAGES),
    ])
    assert tasks["index_corpus"].value["skipped"] == "retrieval.yaml says enabled: false"
    folder = next((settings.work_dir / "ingest_corpus").glob("*/prep.json")).parent
    per_source = json.loads((folder / "prep.json").read_text())["sources"]
    collected = [json.loads(line)["id"] for line in (folder / "raw.jsonl").read_text().splitlines()]
    corpus = [json.loads(line) for line in (folder / "corpus.jsonl").read_text().splitlines()]
    kept = {d["id"] for d in corpus}

    def part(prefix):
        ids = [i for i in collected if i.startswith(prefix)]
        return len(ids), sum(i in kept for i in ids)

    parts = {"git manual": part(f"git/{sites['git']}/manual/"), "junk": part(f"git/{sites['git']}/junk/"),
             "postgresql manual": part(f"postgresql/{sites['postgresql']}/")}
    print("night one (docs profile): " + ", ".join(f"{name} kept {k} of {n}" for name, (n, k) in parts.items())
          + "; dropped by step " + json.dumps({name: s["dropped"] for name, s in per_source.items()}))
    (git_in, git_kept), (junk_in, junk_kept), (pg_in, pg_kept) = parts.values()
    assert git_in >= 200 and pg_in >= 1100 and junk_in >= 40
    assert git_kept >= 0.95 * git_in and pg_kept >= 0.95 * pg_in, parts
    assert junk_kept <= 0.05 * junk_in, parts
    manual_pages = [d for d in corpus if "/junk/" not in d["id"]]
    fenced = [d for d in manual_pages if "\n```" in d["text"]]
    assert len(fenced) >= 0.5 * len(manual_pages)  # code blocks kept, fenced, in the text trained on
    assert tasks["prepare_corpus"].value["documents"] == len(corpus)
    assert tasks["check_drop_budget"].value["exceeded"] == []
    first_alerts = alerts.read_text().splitlines() if alerts.is_file() else []
    assert first_alerts == []

    # Night two: git's manual through the web-prose profile (the steps tuned for web crawls).
    tasks = night(tmp_path, monkeypatch, [web("git", sites["git"] + "/manual/index.html", GIT_PAGES, prep="web")])
    folder = max((settings.work_dir / "ingest_corpus").glob("*/prep.json"), key=lambda p: p.stat().st_mtime).parent
    git = json.loads((folder / "prep.json").read_text())["sources"]["git"]
    print(f"night two (web profile): git kept {git['out']} of {git['in']}, dropped {git['dropped']}")
    assert git["profile"] == "web" and git["out"] / git["in"] < 0.5
    new_alerts = [json.loads(a) for a in alerts.read_text().splitlines()[len(first_alerts):]]
    assert [a["title"].removeprefix("[local] ") for a in new_alerts] == ["drop budget exceeded in git"]
    assert "gopher_quality" in new_alerts[0]["message"] and new_alerts[0]["severity"] == "warning"
    assert new_alerts[0]["report_url"]
