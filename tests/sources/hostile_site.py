"""A hostile website on 127.0.0.1 for the crawler tests: a gzip bomb, a server that drips bytes, links and
redirects to another service on the same host (another port), pages carrying a per-request nonce, a private
area outside the allowed root, and a robots.txt that can answer 503.

Two servers: ``base`` is the site, ``other`` is another service on the same host. Both record every request
(``requests``, with the port), so a test can assert that nothing off-scope was ever asked for.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import threading
import time
import zlib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

from sources.web_site import PROSE, page

DRIP_INTERVAL_S = 0.2


@functools.cache
def gzip_bomb(decoded_mib: int = 512) -> bytes:
    """Return a body that is gzip inside gzip (``Content-Encoding: gzip, gzip``) of ``decoded_mib`` MiB of zeros."""
    def gzip(chunks) -> bytes:
        packer = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
        return b"".join([*(packer.compress(c) for c in chunks), packer.flush()])

    zeros = bytes(1 << 20)
    return gzip([gzip(zeros for _ in range(decoded_mib))])


@functools.cache
def empty_blocks_bomb(inner_mib: int = 64) -> bytes:
    """Return gzip of gzip of a gzip member of ``inner_mib`` MiB of empty stored deflate blocks: it decodes to
    nothing, so only a bound on the work of every layer (and the deadline) stops it, not the page cap."""
    def gzip(chunks) -> bytes:
        packer = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
        return b"".join([*(packer.compress(c) for c in chunks), packer.flush()])

    blocks = b"\x00\x00\x00\xff\xff" * ((1 << 20) // 5)  # BFINAL=0, BTYPE=00, LEN=0, NLEN=0xffff
    header = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"
    inner = (header, *(blocks for _ in range(inner_mib)), b"\x03\x00", b"\x00" * 8)  # final empty block, crc, size
    return gzip([gzip(inner)])


class _Service:
    """One HTTP/1.1 server recording its requests; ``answer(path, query, headers)`` returns (status, headers,
    body), the body bytes, text, or an iterator of byte strings sent as they come (a slow server)."""

    def __init__(self, name: str, answer, log: list[dict], stop: threading.Event) -> None:
        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):  # noqa: N802
                parts = urlsplit(self.path)
                log.append({"service": name, "path": parts.path, "query": parts.query,
                            "if_none_match": self.headers.get("If-None-Match")})
                if parts.path == "/drip-headers":
                    return self.drip_headers()
                status, headers, body = answer(parts.path, parts.query, self.headers)
                try:
                    self.send_response(status)
                    for key, value in headers.items():
                        self.send_header(key, value)
                    if isinstance(body, str | bytes):
                        data = body.encode() if isinstance(body, str) else body
                        self.send_header("Content-Length", str(len(data)))
                        self.end_headers()
                        self.wfile.write(data)
                        return
                    self.send_header("Content-Length", "100000")
                    self.end_headers()
                    for piece in body:
                        if stop.is_set():
                            return
                        self.wfile.write(piece)
                        self.wfile.flush()
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the crawler hung up (a cap, a deadline): that is the point

            def drip_headers(self):
                """Answer with a status line, then header bytes one at a time, never ending the headers."""
                try:
                    self.wfile.write(b"HTTP/1.1 200 OK\r\nX-Pad: ")
                    for _ in range(600):
                        if stop.is_set():
                            return
                        self.wfile.write(b"a")
                        self.wfile.flush()
                        time.sleep(DRIP_INTERVAL_S)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.base = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)


class HostileSite:
    """The site (``base``) and the other service (``other``); switch traps on and off between crawls."""

    def __init__(self, traps: tuple[str, ...] = ("bomb", "drip", "nonce", "other_port"),
                 robots: str | None = None, bomb_mib: int = 512) -> None:
        self.traps = set(traps)
        self.robots_status = 200
        self.robots = robots if robots is not None else (
            "User-agent: *\nAllow: /\nSitemap: {base}/sitemap.xml\nSitemap: {other}/sitemap.xml\n")
        self.bomb_mib = bomb_mib
        if "bomb" in self.traps:
            gzip_bomb(bomb_mib)  # built before serving (a second or so), not while the crawler waits
        self.about = "The observatory's dome turns on rails laid in 1893. " + PROSE * 3
        self.requests: list[dict] = []
        self._stop = threading.Event()
        self._nonce = itertools.count(1)
        self.site = _Service("site", self.answer, self.requests, self._stop)
        self.service = _Service("other", self.other_answer, self.requests, self._stop)
        self.base, self.other = self.site.base, self.service.base

    def __enter__(self) -> HostileSite:
        self.site.thread.start()
        self.service.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for service in (self.site, self.service):
            service.server.shutdown()
            service.server.server_close()

    def requested(self, service: str = "site") -> list[str]:
        """Return the paths (with queries) one of the two servers was asked for, in order."""
        return [r["path"] + (f"?{r['query']}" if r["query"] else "") for r in self.requests
                if r["service"] == service]

    def html(self, body: str, request_headers, etag: bool = True) -> tuple[int, dict, str]:
        headers = {"Content-Type": "text/html; charset=utf-8"}
        if etag:
            headers["ETag"] = '"' + hashlib.sha256(body.encode()).hexdigest()[:16] + '"'
            if request_headers.get("If-None-Match") == headers["ETag"]:
                return 304, {"ETag": headers["ETag"]}, ""
        return 200, headers, body

    def links(self) -> list[str]:
        o = self.other
        links = ["/public/about.html", "/public/guide.html", "/private/secret.html", "/public/../private/secret.html"]
        if "nonce" in self.traps:
            links.append("/public/nonce.html")
        if "other_port" in self.traps:
            links += [f"{o}/public/about.html", f"{o}/private/x.html", "/public/moved"]
        if "bomb" in self.traps:
            links.append("/public/bomb.html")
        if "drip" in self.traps:
            links.append("/public/drip.html")  # last: the pages before it are fetched within the budget
        return links

    def answer(self, path: str, query: str, request_headers) -> tuple[int, dict, str | bytes | Iterator[bytes]]:
        b, o = self.base, self.other
        if path == "/robots.txt":
            if self.robots_status != 200:
                return self.robots_status, {"Content-Type": "text/plain"}, "unavailable"
            return 200, {"Content-Type": "text/plain"}, self.robots.format(base=b, other=o)
        if path == "/sitemap.xml":
            return 200, {"Content-Type": "application/xml"}, (
                '<?xml version="1.0" encoding="UTF-8"?><sitemapindex xmlns="http://www.sitemaps.org/schemas/'
                f'sitemap/0.9"><sitemap><loc>{b}/sitemap-pages.xml</loc></sitemap>'
                f"<sitemap><loc>{b}/sitemap-moved.xml</loc></sitemap>"
                f"<sitemap><loc>{o}/sitemap-other.xml</loc></sitemap></sitemapindex>")
        if path == "/sitemap-pages.xml":
            urls = "".join(f"<url><loc>{u}</loc></url>" for u in (
                f"{b}/public/guide.html", f"{o}/public/from-sitemap.html", f"{b}/private/from-sitemap.html"))
            return 200, {"Content-Type": "application/xml"}, (
                '<?xml version="1.0" encoding="UTF-8"?><urlset xmlns="http://www.sitemaps.org/schemas/sitemap/0.9">'
                f"{urls}</urlset>")
        if path == "/sitemap-moved.xml":
            return 302, {"Location": f"{o}/sitemap-pages.xml"}, ""
        if path in ("/", "/public", "/public/"):
            return self.html(page("Tern Valley Observatory", PROSE * 3, self.links()), request_headers)
        if path == "/public/about.html":
            return self.html(page("About the observatory", self.about), request_headers)
        if path == "/public/guide.html":
            return self.html(page("Visitor guide", "Opening hours: dusk until midnight. " + PROSE * 3),
                             request_headers)
        if path == "/public/nonce.html":
            # Per-request noise outside the main text, and no validators: every answer is other bytes.
            nonce = next(self._nonce)
            head = f'<meta name="csrf-token" content="tok{nonce:08d}"><!-- rendered at {time.time_ns()} -->'
            body = page("Membership", "Members enter free on star-party nights. " + PROSE * 3, head=head)
            body = body.replace("</main>", f'</main><form><input type="hidden" name="csrf" value="tok{nonce:08d}">'
                                           f"</form><script>var rendered = {time.time_ns()};</script>")
            return self.html(body, request_headers, etag=False)
        if path == "/public/moved":
            return 302, {"Location": f"{o}/public/landing.html"}, ""
        if path == "/public/bomb.html":
            return 200, {"Content-Type": "text/html", "Content-Encoding": "gzip, gzip"}, gzip_bomb(self.bomb_mib)
        if path == "/public/empty-bomb.html":
            return 200, {"Content-Type": "text/html", "Content-Encoding": "gzip, gzip, gzip"}, empty_blocks_bomb()
        if path == "/public/drip.html":
            return 200, {"Content-Type": "text/html"}, self._drip()
        if path.startswith("/private/"):
            return self.html(page("Private", "Outside the allowed root. " + PROSE), request_headers)
        return 404, {"Content-Type": "text/html"}, "not found"

    def other_answer(self, path: str, query: str, request_headers) -> tuple[int, dict, str]:
        return 200, {"Content-Type": "text/html"}, page("Another service", "Never to be crawled. " + PROSE)

    def _drip(self) -> Iterator[bytes]:
        yield b"<html><body><p>"
        for _ in range(600):
            time.sleep(DRIP_INTERVAL_S)
            yield b"x"
