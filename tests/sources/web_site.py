"""A small website with every trap a crawler meets, served on 127.0.0.1 for the crawler tests and the bench.

It records every request (path, query and conditional headers) and answers ETag/If-None-Match with 304.
"""

from __future__ import annotations

import hashlib
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit


def page(title: str, body: str, links: list[str] = (), head: str = "") -> str:
    anchors = "".join(f'<li><a href="{href}">{href}</a></li>' for href in links)
    return (f"<html><head><title>{title}</title>{head}</head><body><main><h1>{title}</h1>"
            f"<p>{body}</p><ul>{anchors}</ul></main></body></html>")


PROSE = ("The observatory opens at dusk. Visitors look through the great refractor, a telescope built in "
         "1893, and the guides explain what they see. ")


class TrapSite:
    """The site: ``pages`` maps a path to (status, headers, body); a few paths are computed per request."""

    def __init__(self, robots: str | None = None) -> None:
        self.requests: list[dict] = []
        self.flaky_left = 1
        self.removed: set[str] = set()
        self.robots = robots if robots is not None else (
            "User-agent: *\nDisallow: /private/\nAllow: /private/open.html\n"
            "Sitemap: {base}/sitemap_index.xml\n")
        site = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):  # noqa: N802
                parts = urlsplit(self.path)
                site.requests.append({"path": parts.path, "query": parts.query,
                                      "if_none_match": self.headers.get("If-None-Match")})
                status, headers, body = site.answer(parts.path, parse_qs(parts.query), self.headers)
                data = body.encode() if isinstance(body, str) else body
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                try:
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the crawler stopped reading (an oversized page): that is the point

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> TrapSite:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def requested(self) -> list[str]:
        return [r["path"] + (f"?{r['query']}" if r["query"] else "") for r in self.requests]

    def html(self, body: str, request_headers) -> tuple[int, dict, str]:
        etag = '"' + hashlib.sha256(body.encode()).hexdigest()[:16] + '"'
        if request_headers.get("If-None-Match") == etag:
            return 304, {"ETag": etag}, ""
        return 200, {"Content-Type": "text/html; charset=utf-8", "ETag": etag}, body

    def answer(self, path: str, query: dict, request_headers) -> tuple[int, dict, str | bytes]:
        b = self.base
        if path in self.removed:
            return 404, {"Content-Type": "text/html"}, "gone"
        if path == "/robots.txt":
            return 200, {"Content-Type": "text/plain"}, self.robots.format(base=b)
        if path == "/sitemap_index.xml":
            return 200, {"Content-Type": "application/xml"}, (
                '<?xml version="1.0" encoding="UTF-8"?><sitemapindex xmlns="http://www.sitemaps.org/schemas/'
                f'sitemap/0.9"><sitemap><loc>{b}/sitemap-pages.xml</loc></sitemap></sitemapindex>')
        if path == "/sitemap-pages.xml":
            urls = "".join(f"<url><loc>{b}{p}</loc></url>" for p in ("/guide/a.html", "/orphan.html",
                                                                    "/private/secret.html"))
            return 200, {"Content-Type": "application/xml"}, (
                '<?xml version="1.0" encoding="UTF-8"?><urlset xmlns="http://www.sitemaps.org/schemas/sitemap/0.9">'
                f"{urls}</urlset>")
        if path == "/":
            links = ["/guide/a.html", "/guide/a.html#section", "/guide/a.html?utm_source=newsletter",
                     "/calendar?month=1", "/s/page?sid=123", "/loop1", "/missing", "/error", "/flaky", "/slow",
                     "/big", "/image.png", "/noindex.html", "/dup.html", "http://elsewhere.example/x",
                     "/private/secret.html", "/private/open.html", "/guide/b.html"]
            return self.html(page("Tern Valley Observatory", PROSE * 3, links), request_headers)
        if path == "/guide/a.html":
            return self.html(page("Guide A", "Opening hours: dusk until midnight. " + PROSE * 3), request_headers)
        if path == "/guide/b.html":
            return self.html(page("Guide B", "Tickets cost twelve euros. " + PROSE * 3), request_headers)
        if path == "/orphan.html":
            return self.html(page("Only in the sitemap", "The cafe serves soup. " + PROSE * 3), request_headers)
        if path == "/private/open.html":
            return self.html(page("Open private page", "Allowed by robots. " + PROSE * 3), request_headers)
        if path == "/private/secret.html":
            return self.html(page("Secret", "Must never be fetched."), request_headers)
        if path == "/calendar":  # an infinite calendar: every month links to the next
            month = int(query.get("month", ["1"])[0])
            return self.html(page(f"Events in month {month}", f"Month {month}: star parties. " + PROSE * 2,
                                  [f"/calendar?month={month + 1}"]), request_headers)
        if path == "/s/page":  # session ids in URLs: the same page under ever new addresses
            sid = int(query.get("sid", ["0"])[0])
            return self.html(page("Session page", "Membership gives free entry. " + PROSE * 3,
                                  [f"/s/page?sid={sid + 1}"]), request_headers)
        if path == "/loop1":
            return 302, {"Location": "/loop2"}, ""
        if path == "/loop2":
            return 302, {"Location": "/loop1"}, ""
        if path == "/error":
            return 500, {"Content-Type": "text/plain"}, "boom"
        if path == "/flaky":
            if self.flaky_left > 0:
                self.flaky_left -= 1
                return 503, {"Retry-After": "1", "Content-Type": "text/plain"}, "busy"
            return self.html(page("Flaky but fine", "Came back after a retry. " + PROSE * 3), request_headers)
        if path == "/slow":
            time.sleep(1.5)
            return self.html(page("Slow", PROSE), request_headers)
        if path == "/big":
            return 200, {"Content-Type": "text/html"}, "<html><body>" + "x" * 200_000 + "</body></html>"
        if path == "/image.png":
            return 200, {"Content-Type": "image/png"}, b"\x89PNG\r\n\x1a\n" + b"\0" * 100
        if path == "/noindex.html":
            return self.html(page("Not for the index", PROSE, ["/from-noindex.html"],
                                  head='<meta name="robots" content="noindex">'), request_headers)
        if path == "/from-noindex.html":
            return self.html(page("Reached through a noindex page", "Links are still followed. " + PROSE * 3),
                             request_headers)
        if path == "/dup.html":
            return self.html(page("Guide B (print view)", "Tickets cost twelve euros. " + PROSE * 3,
                                  head=f'<link rel="canonical" href="{b}/guide/b.html">'), request_headers)
        return 404, {"Content-Type": "text/html"}, "not found"
