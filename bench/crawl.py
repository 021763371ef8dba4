"""Crawl a local site of 2,000 pages twice; print pages/s, the unchanged recrawl's share of the first crawl's
time (goal: below 25%) and the crawler's peak memory (goal: under 500 MB).

    .venv/bin/python bench/crawl.py [--pages 2000]

The site is served by a separate process on 127.0.0.1 (ETag + 304 like any static host) with no crawl delay;
each crawl runs in a fresh process of its own so that its peak resident memory is its own. The second crawl
is measured against the first in the same run, so the share holds on a noisy machine.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import resource
import socket
import sys
import tempfile
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

WORDS = ("dome refractor dusk planet nebula guide ticket school cafe membership lens mirror comet eclipse "
         "orbit season winter summer parking accessible").split()


def page_html(i: int, pages: int) -> str:
    """A page shaped like a documentation site's: header, a sidebar of 40 links, an article, a footer (~12 KB)."""
    paragraphs = "".join(
        "<p>" + " ".join(f"The {WORDS[(i + k + j) % len(WORDS)]} of page {i} is described in part {k}.{j}, with the "
                         f"{WORDS[(i * 7 + k + j) % len(WORDS)]} shown to visitors at night." for j in range(4))
        + "</p>" for k in range(10))
    children = [c for c in (2 * i + 1, 2 * i + 2) if c < pages]
    sidebar = "".join(f'<li><a href="/p/{c}.html">Section {c}</a></li>' for c in [*children, *range(0, 38)])
    footer = "".join(f'<a href="/p/{c}.html">Link {c}</a> ' for c in range(10))
    return (f"<html><head><title>Page {i} | Observatory docs</title><meta charset='utf-8'>"
            f"<link rel='stylesheet' href='/style.css'></head><body><header><a href='/p/0.html'>Home</a> "
            f"<form><input name='q'></form></header><aside><ul>{sidebar}</ul></aside><main><article>"
            f"<h1>Page {i}</h1>{paragraphs}</article></main><footer>{footer}<p>Copyright the observatory.</p>"
            f"</footer></body></html>")


def serve(pages: int, port_queue) -> None:
    bodies = {f"/p/{i}.html": page_html(i, pages).encode() for i in range(pages)}
    etags = {path: '"' + hashlib.sha256(body).hexdigest()[:16] + '"' for path, body in bodies.items()}

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def setup(self):
            super().setup()
            # Headers and body leave in two writes: without TCP_NODELAY, Nagle's algorithm and delayed ACKs
            # hold every body back ~40 ms, and the bench would measure the kernel, not the crawler.
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def do_GET(self):  # noqa: N802
            path = self.path.split("?")[0]
            if path == "/robots.txt":
                body, status, headers = b"User-agent: *\nAllow: /\n", 200, {"Content-Type": "text/plain"}
            elif path in bodies:
                if self.headers.get("If-None-Match") == etags[path]:
                    body, status, headers = b"", 304, {"ETag": etags[path]}
                else:
                    body, status, headers = bodies[path], 200, {"Content-Type": "text/html", "ETag": etags[path]}
            else:
                body, status, headers = b"not found", 404, {"Content-Type": "text/plain"}
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    port_queue.put(server.server_address[1])
    server.serve_forever()


def crawl_once(url: str, state: str, pages: int, results) -> None:
    from nightshift.sources.web import Crawler, WebSettings

    settings = WebSettings(url=url, max_pages=pages + 10, max_depth=64, sitemaps=False)
    started = time.perf_counter()
    documents = sum(1 for _ in Crawler(settings, Path(state)).crawl())
    seconds = time.perf_counter() - started
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    results.put({"documents": documents, "seconds": seconds, "peak_mb": peak_mb})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pages", type=int, default=2000)
    args = parser.parse_args()
    ctx = multiprocessing.get_context("spawn")
    ports = ctx.Queue()
    site = ctx.Process(target=serve, args=(args.pages, ports), daemon=True)
    site.start()
    url = f"http://127.0.0.1:{ports.get(timeout=60)}/p/0.html"
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        state = str(Path(tmp) / "crawl.sqlite")
        for _ in range(2):
            results = ctx.Queue()
            worker = ctx.Process(target=crawl_once, args=(url, state, args.pages, results))
            worker.start()
            runs.append(results.get(timeout=3600))
            worker.join()
    site.terminate()
    first, second = runs
    share = second["seconds"] / first["seconds"]
    report = {
        "pages": args.pages, "documents": [first["documents"], second["documents"]],
        "first_crawl_s": round(first["seconds"], 2), "pages_per_s": round(first["documents"] / first["seconds"], 1),
        "unchanged_recrawl_s": round(second["seconds"], 2), "recrawl_share": round(share, 3),
        "peak_mb": [round(first["peak_mb"]), round(second["peak_mb"])],
    }
    print(json.dumps(report))
    print(f"first crawl: {report['pages_per_s']} pages/s; unchanged recrawl: {share:.1%} of the first crawl's time "
          f"(goal < 25%); peak memory {max(report['peak_mb'])} MB (goal < 500 MB)")
    ok = first["documents"] == second["documents"] == args.pages and share < 0.25 and max(report["peak_mb"]) < 500
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
