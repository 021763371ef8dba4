"""A polite, incremental crawler for ``http(s)://`` sources.

Built on the field's libraries: Protego reads robots.txt (Allow, Disallow, Crawl-delay, Sitemap), w3lib
canonicalises URLs, ultimate-sitemap-parser reads sitemaps and sitemap indexes, httpx fetches, lxml finds
links, trafilatura extracts the main text. The crawl loop itself is here: breadth-first from the start URL
and the sitemaps, one host at a time at the pace robots.txt (or the settings) allow, within budgets of
pages, depth, bytes and wall time, so that a crawler trap ends at a budget instead of hanging the task.

Scope is a set of (scheme, host, port, path prefix): the start URL's origin, the ``allow`` entries, and for
a triggered run the allowed roots every URL must also lie under. Another port is another service. Links,
redirects (every hop) and sitemap entries leaving the scope are counted skips and are never requested;
robots.txt governs sitemaps as it governs pages. Every response has a deadline of its own (``timeout_s``
for the whole answer, not per read) and the crawl's wall budget holds during a download; compressed bodies
are decoded piece by piece against the page cap.

Incremental: per URL the crawl state (SQLite under ``$NIGHTSHIFT_HOME/sources/<name>/``) keeps the ETag,
Last-Modified, the hashes of the body and of the extracted text, the text and links. The next crawl sends
conditional requests; a 304 or an identical body reuses the stored text and links without extracting again,
a 404/410 drops the page, and a page that fails for a night (timeout, 5xx) is served from the state rather
than lost. When robots.txt cannot be read (5xx, timeout) the site is not crawled tonight and its pages come
from the state; so do the pages a budget cut off. Every document carries its URL, the HTTP status, the hash
of its text and the time that text was first fetched, so an unchanged text makes an identical document
whatever else (a nonce, a timestamp) the page carried. Every URL not taken is counted with its reason.
"""

from __future__ import annotations

import email.utils
import hashlib
import json
import logging
import re
import sqlite3
import time
import zlib
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urljoin, urlsplit

from nightshift.sources.document_store import RawDocument, Skip

log = logging.getLogger(__name__)

USER_AGENT = "nightshift-crawler/0.1"
TEXT_TYPES = ("text/html", "application/xhtml+xml", "text/plain")
REDIRECTS = (301, 302, 303, 307, 308)
RETRIED = (429, 500, 502, 503, 504)
GONE = (404, 410)
MAX_URL_CHARS = 2048
MAX_SITEMAPS = 50
MAX_SITEMAP_BYTES = 10 * 1024 * 1024
MAX_ROBOTS_BYTES = 512 * 1024
DEFAULT_PORTS = {"http": 80, "https": 443}
CHUNK = 64 * 1024
"""Largest piece a compressed body is decoded into at a time."""
# Only the codings the bounded decoder below undoes are offered; anything else is a skip.
ACCEPT_ENCODING = "gzip, deflate"
# Query parameters that track or identify a visitor, not a page: dropped so variants are fetched once.
TRACKING_PREFIXES = ("utm_",)
TRACKING_PARAMS = frozenset({
    "gclid", "dclid", "fbclid", "msclkid", "mc_cid", "mc_eid", "yclid", "_ga", "_gl", "igshid", "ref_src",
    "sessionid", "session_id", "sid", "phpsessid", "jsessionid", "aspsessionid", "cfid", "cftoken",
})


def canonical_url(url: str) -> str | None:
    """Return the canonical form of an http(s) URL (no fragment, no tracking or session parameters, sorted
    query, lower-case host), or None when it is not a fetchable web URL."""
    from w3lib.url import canonicalize_url, url_query_cleaner

    try:
        parts = urlsplit(url.strip())
    except ValueError:
        return None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return None
    names = {k for k, _ in parse_qsl(parts.query, keep_blank_values=True)}
    noise = [k for k in names if k.lower() in TRACKING_PARAMS or k.lower().startswith(TRACKING_PREFIXES)]
    if noise:
        url = url_query_cleaner(url, noise, remove=True, keep_fragments=False)
    return canonicalize_url(url, keep_fragments=False)


@dataclass(frozen=True)
class WebSettings:
    """A website to crawl (a ``kind: web`` entry of sources.yaml)."""

    url: str
    """Start URL; its origin (scheme, host, port) is the crawl's scope unless ``allow`` says more."""
    allow: tuple[str, ...] = ()
    """Further scope: hosts (``docs.example.com``), host/path prefixes (``example.com/help/``), both with the
    start URL's scheme and that scheme's default port, or URL prefixes (``https://example.com:8443/help/``)."""
    roots: tuple[str, ...] = ()
    """URL prefixes every request must also lie under (a run triggered with a ``source`` gets the allowed
    roots of NIGHTSHIFT_SOURCE_ROOTS); empty: the scope alone decides. robots.txt is always asked."""
    user_agent: str = USER_AGENT
    """The User-Agent sent and matched against robots.txt."""
    max_pages: int = 500
    """Page URLs requested per crawl (robots.txt and sitemaps not counted)."""
    max_depth: int = 6
    """Links followed from the start URL (sitemap entries count as depth 1)."""
    max_page_bytes: int = 2 * 1024 * 1024
    max_total_bytes: int = 256 * 1024 * 1024
    max_seconds: float = 900.0
    """Wall time of one crawl; the crawl ends (and reports it) when it runs out."""
    min_delay_s: float = 0.0
    """Pause between requests to one host when robots.txt sets no Crawl-delay."""
    timeout_s: float = 10.0
    """Deadline of one whole response (headers and body), however slowly it arrives."""
    retries: int = 2
    """Retries of 429, 5xx and timeouts (with back-off, honouring Retry-After) before a URL is skipped."""
    backoff_s: float = 1.0
    max_retry_after_s: float = 60.0
    max_redirects: int = 5
    sitemaps: bool = True
    """Discover pages from robots.txt's Sitemap lines and /sitemap.xml (indexes followed)."""

    def __post_init__(self) -> None:
        if canonical_url(self.url) is None:
            raise ValueError(f"web source url must be an http(s) URL, got {self.url[:200]!r}")
        numbers = {"max_pages": self.max_pages, "max_depth": self.max_depth, "max_page_bytes": self.max_page_bytes,
                   "max_total_bytes": self.max_total_bytes, "max_seconds": self.max_seconds,
                   "timeout_s": self.timeout_s, "max_redirects": self.max_redirects}
        bad = [k for k, v in numbers.items() if not isinstance(v, int | float) or v <= 0]
        if bad or self.min_delay_s < 0 or self.retries < 0 or self.backoff_s < 0:
            raise ValueError(f"web source settings must be positive: {', '.join(bad) or 'delays and retries'}")
        object.__setattr__(self, "allow", tuple(self.allow))
        object.__setattr__(self, "roots", tuple(self.roots))
        scheme = urlsplit(self.url.strip()).scheme.lower()
        if any(_scope_entry(a, scheme) is None for a in self.allow):
            raise ValueError("web source allow entries must be hosts, host/path prefixes or http(s) URL prefixes")
        if any(Scope.of(r) is None for r in self.roots):
            raise ValueError("web source roots must be http(s) URL prefixes")


@dataclass(frozen=True)
class Scope:
    """Where a crawl may go: a scheme, host, port and path prefix (another port is another service)."""

    scheme: str
    host: str
    port: int
    prefix: str = "/"

    @classmethod
    def of(cls, url: str) -> Scope | None:
        """Return the scope a canonical http(s) URL (or URL prefix) names, or None when it names none."""
        canonical = canonical_url(url)
        if canonical is None:
            return None
        parts = urlsplit(canonical)
        try:
            port = parts.port or DEFAULT_PORTS[parts.scheme]
        except ValueError:
            return None
        return cls(parts.scheme, parts.hostname or "", port, parts.path or "/")

    def holds(self, url: str) -> bool:
        """Return whether a URL lies in this scope (a prefix matches whole path segments only)."""
        other = Scope.of(url)
        if other is None or (other.scheme, other.host, other.port) != (self.scheme, self.host, self.port):
            return False
        prefix = self.prefix.rstrip("/")
        return not prefix or other.prefix == prefix or other.prefix.startswith(prefix + "/")


def within(url: str, roots: Iterable[str]) -> bool:
    """Return whether an http(s) URL lies under one of the URL prefixes ``roots`` (others are ignored)."""
    scopes = [Scope.of(root) for root in roots if "://" in root]
    return any(scope is not None and scope.holds(url) for scope in scopes)


@dataclass
class CrawlReport:
    """What one crawl did, for the run's report: counts, never content."""

    requests: int = 0
    fetched: int = 0
    """Pages downloaded and extracted."""
    unchanged: int = 0
    """Pages confirmed unchanged (304, or the same bytes) and reused without extraction."""
    documents: int = 0
    reused_after_error: int = 0
    """Pages that failed this time and were served from the state."""
    reused: int = 0
    """Pages not fetched this time (robots.txt unavailable, or cut off by a budget), served from the state."""
    dropped: int = 0
    """Pages in the state that now answer 404/410."""
    bytes: int = 0
    seconds: float = 0.0
    robots_blocked: int = 0
    skipped: Counter = field(default_factory=Counter)
    budget_hits: Counter = field(default_factory=Counter)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["skipped"] = dict(self.skipped.most_common())
        out["budget_hits"] = dict(self.budget_hits.most_common())
        return out


class CrawlState:
    """What the previous crawls learnt about each URL, in SQLite (written as the crawl goes: every stored
    entry is valid on its own, so a crawl killed half-way leaves a state the next one can use)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(str(path))
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS pages (url TEXT PRIMARY KEY, etag TEXT, last_modified TEXT, "
            "content_hash TEXT, fetched_at TEXT, status INTEGER, text TEXT, links TEXT, indexable INTEGER, "
            "reason TEXT, body_hash TEXT, extractor TEXT)"
        )
        # A state written before bodies had hashes of their own, or before texts recorded their extractor: the
        # next fetch fills the columns in.
        columns = {row[1] for row in self.db.execute("PRAGMA table_info(pages)")}
        for column in ("body_hash", "extractor"):
            if column not in columns:
                self.db.execute(f"ALTER TABLE pages ADD COLUMN {column} TEXT")

    KEYS = ("etag", "last_modified", "content_hash", "fetched_at", "status", "text", "links", "indexable", "reason",
            "body_hash", "extractor")
    """``content_hash``: sha256 of the extracted text; ``body_hash``: sha256 of the bytes it came from;
    ``extractor``: the version of the HTML extraction that made the text (another one re-extracts)."""

    def get(self, url: str) -> dict[str, Any] | None:
        row = self.db.execute(f"SELECT {', '.join(self.KEYS)} FROM pages WHERE url = ?", (url,)).fetchone()
        if row is None:
            return None
        entry = dict(zip(self.KEYS, row, strict=True))
        entry["links"] = json.loads(entry["links"] or "[]")
        return entry

    def urls(self) -> list[str]:
        """Return every stored URL, in order."""
        return [row[0] for row in self.db.execute("SELECT url FROM pages ORDER BY url")]

    def put(self, url: str, entry: dict[str, Any]) -> None:
        self.db.execute(
            f"INSERT OR REPLACE INTO pages (url, {', '.join(self.KEYS)}) VALUES ({', '.join('?' * 12)})",
            (url, entry.get("etag"), entry.get("last_modified"), entry["content_hash"], entry["fetched_at"],
             entry["status"], entry.get("text"), json.dumps(entry.get("links", [])), int(entry["indexable"]),
             entry.get("reason"), entry.get("body_hash"), entry.get("extractor")),
        )
        self.db.commit()

    def delete(self, url: str) -> bool:
        deleted = self.db.execute("DELETE FROM pages WHERE url = ?", (url,)).rowcount
        self.db.commit()
        return bool(deleted)

    def close(self) -> None:
        self.db.close()


_XML_DECLARATION = re.compile(r"^\s*<\?xml[^>]{0,200}\?>")


class Skipped(Exception):
    """A URL not taken, and why (the reason's text before ':' is what reports count)."""


@dataclass
class Fetched:
    url: str
    status: int
    headers: Any
    body: bytes = b""


class _Layer:
    """One content coding (gzip or deflate) undone in pieces of at most CHUNK bytes."""

    def __init__(self, coding: str) -> None:
        self.gzip = coding != "deflate"
        self.first = True
        self.obj = zlib.decompressobj(16 + zlib.MAX_WBITS if self.gzip else zlib.MAX_WBITS)

    def feed(self, data: bytes) -> Iterator[bytes]:
        """Yield the decoded pieces of ``data``; none is longer than CHUNK, whatever the compression ratio."""
        while data:
            if self.obj.eof:
                # gzip members may follow one another; anything else after the end is padding, ignored
                if not (self.gzip and data[:2] == b"\x1f\x8b"):
                    return
                self.obj = zlib.decompressobj(16 + zlib.MAX_WBITS)
            try:
                out = self.obj.decompress(data, CHUNK)
            except zlib.error:
                if not self.gzip and self.first:  # "deflate" is sent raw by some servers, as browsers accept
                    self.first = False
                    self.obj = zlib.decompressobj(-zlib.MAX_WBITS)
                    continue
                raise Skipped("undecodable body: bad compressed data") from None
            self.first = False
            if out:
                yield out
            data = self.obj.unused_data if self.obj.eof else self.obj.unconsumed_tail

    def drain(self) -> Iterator[bytes]:
        """Yield what the decoder still holds once the input has ended, piece by piece."""
        while not self.obj.eof:
            out = self.obj.decompress(b"", CHUNK)
            if not out:
                return
            yield out


class _Decoder:
    """Undoes a response's Content-Encoding (stacked gzip and deflate) piece by piece, so that the page cap
    holds on decoded bytes as they are produced. httpx decodes each received chunk whole: a 1 KB chunk of a
    stacked gzip bomb becomes hundreds of MiB before any cap can be checked."""

    def __init__(self, header: str, limit: int = 1 << 62, check: Callable[[], None] | None = None) -> None:
        codings = [c.strip().lower() for c in header.split(",") if c.strip()]
        codings = [c for c in codings if c != "identity"]
        if len(codings) > 4 or any(c not in ("gzip", "x-gzip", "deflate") for c in codings):
            raise Skipped("content encoding: unsupported")
        self.layers = [_Layer(c) for c in reversed(codings)]
        # Inner layers can make work without output (a gzip of empty deflate blocks decodes to nothing), so the
        # bytes every layer produces are bounded too, and the deadline is checked after each piece.
        self.limit = limit
        self.work = 0
        self.check = check

    def feed(self, data: bytes) -> Iterator[bytes]:
        """Yield the decoded pieces of the next raw bytes."""
        return self._through(0, data)

    def flush(self) -> Iterator[bytes]:
        """Yield what remains once the raw body has ended."""
        for i, layer in enumerate(self.layers):
            for piece in layer.drain():
                yield from self._through(i + 1, piece)

    def _through(self, i: int, data: bytes) -> Iterator[bytes]:
        if i == len(self.layers):
            if data:
                yield data
            return
        for piece in self.layers[i].feed(data):
            self.work += len(piece)
            if self.work > self.limit:
                raise Skipped(f"too large: decoding makes over {self.limit} bytes")
            if self.check is not None:
                self.check()
            yield from self._through(i + 1, piece)


class _DeadlineStream:
    """A connection whose every read and write ends by its backend's deadline."""

    def __init__(self, stream: Any, backend: _DeadlineBackend) -> None:
        self.stream = stream
        self.backend = backend

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        import httpcore

        return self.stream.read(max_bytes, self.backend.left(timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        import httpcore

        self.stream.write(buffer, self.backend.left(timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self.stream.close()

    def start_tls(self, ssl_context: Any, server_hostname: str | None = None, timeout: float | None = None):
        import httpcore

        return _DeadlineStream(self.stream.start_tls(ssl_context, server_hostname,
                                                     self.backend.left(timeout, httpcore.ConnectTimeout)), self.backend)

    def get_extra_info(self, info: str) -> Any:
        return self.stream.get_extra_info(info)


class _DeadlineBackend:
    """An httpcore network backend bounding every socket operation by ``deadline()`` (a monotonic time).

    httpx's timeouts are per read: a server dripping a byte at a time (headers or body) never trips them.
    The network backend is the one place where each read of a response can be given what is left of a
    deadline for the whole response."""

    def __init__(self, inner: Any, deadline: Callable[[], float]) -> None:
        self.inner = inner
        self.deadline = deadline

    def left(self, timeout: float | None, error: type[Exception]) -> float:
        """Return the timeout for the next socket operation, or raise ``error`` once the deadline has passed."""
        left = self.deadline() - time.monotonic()
        if left <= 0:
            raise error("response deadline passed")
        return left if timeout is None else min(timeout, left)

    def connect_tcp(self, host: str, port: int, timeout: float | None = None, local_address: str | None = None,
                    socket_options: Any = None) -> _DeadlineStream:
        import httpcore

        return _DeadlineStream(self.inner.connect_tcp(host, port, self.left(timeout, httpcore.ConnectTimeout),
                                                      local_address, socket_options), self)

    def connect_unix_socket(self, path: str, timeout: float | None = None, socket_options: Any = None):
        import httpcore

        return _DeadlineStream(self.inner.connect_unix_socket(path, self.left(timeout, httpcore.ConnectTimeout),
                                                              socket_options), self)

    def sleep(self, seconds: float) -> None:
        self.inner.sleep(seconds)


def _client(timeout_s: float, deadline: Callable[[], float]):
    """Return an httpx client whose responses end by ``deadline()`` (see _DeadlineBackend)."""
    import httpx

    transport = httpx.HTTPTransport()
    # httpx takes no network backend; its transport's pool does (httpcore's public ConnectionPool argument).
    # Were that attribute to move, the body loop's own deadline check still bounds every download.
    pool = getattr(transport, "_pool", None)
    if pool is not None and hasattr(pool, "_network_backend"):
        pool._network_backend = _DeadlineBackend(pool._network_backend, deadline)
    return httpx.Client(transport=transport, timeout=timeout_s, follow_redirects=False)


class Crawler:
    """One crawl of one website source. Iterate ``crawl()`` for its documents; read ``report`` afterwards."""

    def __init__(self, settings: WebSettings, state_path: Path, client=None) -> None:
        self.settings = settings
        self.state = CrawlState(state_path)
        self.client = client
        self.report = CrawlReport()
        self.skips: list[Skip] = []
        from nightshift.extraction import extractor_version

        self._extractor = extractor_version()
        start = canonical_url(settings.url)
        assert start is not None
        self.start = start
        origin = Scope.of(start)
        assert origin is not None
        scheme = urlsplit(start).scheme
        self.scope = [replace(origin, prefix="/")] + [_scope_entry(a, scheme) for a in settings.allow]
        self.roots = [Scope.of(r) for r in settings.roots]
        self._robots: dict[str, Any] = {}
        self._unavailable: set[str] = set()
        """Origins whose robots.txt could not be read (5xx, timeout): not crawled tonight."""
        self._visited: set[str] = set()
        self._next_at: dict[str, float] = {}
        self._deadline = 0.0
        self._response_deadline = 0.0

    # scope, robots, pace ------------------------------------------------------------------------------------

    def in_scope(self, url: str) -> bool:
        """Return whether a URL is in this crawl's scope and under its allowed roots."""
        return any(s.holds(url) for s in self.scope) and (not self.roots or any(r.holds(url) for r in self.roots))

    def _origin(self, url: str) -> str:
        parts = urlsplit(url)
        return f"{parts.scheme}://{parts.netloc}"

    def robots(self, url: str):
        """Return the parsed robots.txt of the URL's host (fetched once per crawl)."""
        from protego import Protego

        origin = self._origin(url)
        if origin not in self._robots:
            def same_origin(target: str) -> str | None:
                return None if self._origin(target) == origin else "out of scope: robots.txt redirected off the site"

            try:
                answer = self._get(f"{origin}/robots.txt", limit=MAX_ROBOTS_BYTES, follow=same_origin)
                if answer.status >= 500:
                    raise Skipped(f"http {answer.status}")
                text = answer.body.decode("utf-8", "replace") if answer.status == 200 else ""
            except Skipped as exc:
                # As search engines do: a server that cannot say what is allowed is not crawled tonight (its
                # pages come from the state at the end of the crawl).
                self._unavailable.add(origin)
                self.skips.append(Skip(f"{origin}/robots.txt", f"robots.txt unavailable: {exc}"))
                text = "User-agent: *\nDisallow: /"
            self._robots[origin] = Protego.parse(text)
        return self._robots[origin]

    def _why_not(self, url: str) -> str | None:
        """Return why a URL may not be requested (scope, robots.txt), or None when it may."""
        if not self.in_scope(url):
            return "out of scope: leaves the site"
        robots = self.robots(url)
        if self._origin(url) in self._unavailable:
            return "robots.txt unavailable: not crawled tonight"
        if not robots.can_fetch(url, self.settings.user_agent):
            return "blocked by robots.txt"
        return None

    def _delay(self, origin: str) -> float:
        robots = self._robots.get(origin)
        crawl_delay = robots.crawl_delay(self.settings.user_agent) if robots is not None else None
        return max(float(crawl_delay or 0.0), self.settings.min_delay_s)

    def _wait_turn(self, origin: str) -> None:
        wait = self._next_at.get(origin, 0.0) - time.monotonic()
        if wait > 0:
            if time.monotonic() + wait > self._deadline:
                raise Skipped("budget: wall time")
            time.sleep(wait)
        self._next_at[origin] = time.monotonic() + self._delay(origin)

    # HTTP ------------------------------------------------------------------------------------------------

    def _get(self, url: str, limit: int, headers: dict[str, str] | None = None,
             follow: Callable[[str], str | None] | None = None, text_only: bool = False) -> Fetched:
        """GET a URL once its host's turn comes, retrying 429/5xx/timeouts with back-off. With ``follow`` (robots.txt,
        sitemaps) redirects are followed, each hop only where ``follow(target)`` gives no reason not to; pages
        report them, so that scope and loops are checked by the caller."""
        import httpx

        origin = self._origin(url)
        attempt = 0
        chain = [url]
        while True:
            if time.monotonic() > self._deadline:
                raise Skipped("budget: wall time")
            self._wait_turn(origin)
            self.report.requests += 1
            self._response_deadline = min(time.monotonic() + self.settings.timeout_s, self._deadline)
            try:
                with self.client.stream("GET", url, headers={"User-Agent": self.settings.user_agent,
                                                               "Accept-Encoding": ACCEPT_ENCODING,
                                                               **(headers or {})}) as response:
                    status = response.status_code
                    if follow is not None and status in REDIRECTS and response.headers.get("location"):
                        target = canonical_url(urljoin(url, response.headers["location"]))
                        if target is None:
                            raise Skipped("redirect to a non-web URL")
                        if target in chain or len(chain) > self.settings.max_redirects:
                            raise Skipped("redirect loop")
                        why_not = follow(target)
                        if why_not:
                            raise Skipped(why_not)
                        chain.append(target)
                        url, origin, attempt = target, self._origin(target), 0
                        continue
                    if status in RETRIED and attempt < self.settings.retries:
                        attempt += 1
                        self._back_off(origin, attempt, response.headers.get("retry-after"))
                        continue
                    if status in RETRIED:
                        raise Skipped(f"http {status}: gave up after {attempt + 1} tries")
                    if status != 200:
                        return Fetched(url, status, response.headers)
                    if text_only:
                        kind = response.headers.get("content-type", "").split(";")[0].strip().lower()
                        if kind and kind not in TEXT_TYPES:
                            raise Skipped(f"content type: {kind[:60]}")
                    declared = response.headers.get("content-length")
                    if declared and declared.isdigit() and int(declared) > limit:
                        raise Skipped(f"too large: {declared} bytes > {limit}")
                    body = self._read_body(response, limit)
                    self.report.bytes += len(body)
                    return Fetched(url, status, response.headers, body)
            except httpx.TimeoutException:
                if time.monotonic() >= self._deadline:
                    raise Skipped("budget: wall time") from None
                if attempt < self.settings.retries:
                    attempt += 1
                    self._back_off(origin, attempt, None)
                    continue
                raise Skipped(f"timeout: no whole answer within {self.settings.timeout_s:g}s") from None
            except httpx.HTTPError as exc:
                raise Skipped(f"connection error: {type(exc).__name__}") from None

    def _read_body(self, response: Any, limit: int) -> bytes:
        """Return the decoded body, raising Skipped as soon as the raw or the decoded bytes pass ``limit``."""
        import httpx

        def on_time() -> None:
            if time.monotonic() > self._response_deadline:
                raise httpx.ReadTimeout("response deadline passed")

        # Each layer's output counts: a legitimate inner layer is compressed, so it is smaller than the page.
        decoder = _Decoder(response.headers.get("content-encoding", ""), 4 * limit + CHUNK, on_time)
        body = bytearray()
        raw = 0

        def take(pieces: Iterator[bytes]) -> None:
            nonlocal body
            for piece in pieces:
                body += piece
                if len(body) > limit:
                    raise Skipped(f"too large: over {limit} bytes")

        for chunk in response.iter_raw():
            raw += len(chunk)
            if raw > limit:
                raise Skipped(f"too large: over {limit} bytes")
            take(decoder.feed(chunk))
            # The backend bounds each read already; this also holds for a client handed in from outside.
            on_time()
        take(decoder.flush())
        return bytes(body)

    def _back_off(self, origin: str, attempt: int, retry_after: str | None) -> None:
        wait = self.settings.backoff_s * 2 ** (attempt - 1)
        if retry_after:
            wait = max(wait, _retry_after_seconds(retry_after))
        wait = min(wait, self.settings.max_retry_after_s)
        if time.monotonic() + wait > self._deadline:
            raise Skipped("budget: wall time")
        self._next_at[origin] = max(self._next_at.get(origin, 0.0), time.monotonic() + wait)

    # discovery -------------------------------------------------------------------------------------------

    def sitemap_pages(self) -> list[str]:
        """Return the page URLs the start host's sitemaps list (indexes followed); sitemaps out of scope or
        not allowed by robots.txt are not requested, nor any while robots.txt cannot be read."""
        from usp.objects.sitemap import AbstractIndexSitemap, AbstractPagesSitemap
        from usp.tree import sitemap_from_str

        origin = self._origin(self.start)
        robots = self.robots(self.start)
        if origin in self._unavailable:
            return []
        # (URL, listed): sitemaps robots.txt or an index lists are counted when skipped; the /sitemap.xml guess
        # is not.
        queue = deque([*((u, True) for u in robots.sitemaps or []), (f"{origin}/sitemap.xml", False)])
        done: set[str] = set()
        pages: list[str] = []
        while queue and len(done) < MAX_SITEMAPS:
            listed_url, listed = queue.popleft()
            url = canonical_url(listed_url)
            if url is None or url in done:
                continue
            done.add(url)
            why_not = self._why_not(url)
            if why_not:
                if listed:
                    self._skip(url, why_not.replace("leaves the site", "sitemap leaves the site"))
                continue
            try:
                answer = self._get(url, limit=MAX_SITEMAP_BYTES, follow=self._why_not)
            except Skipped as exc:
                self._skip(url, str(exc))
                continue
            if answer.status != 200:
                continue
            parsed = sitemap_from_str(answer.body.decode("utf-8", "replace"))
            if isinstance(parsed, AbstractIndexSitemap):
                # Children of a parsed string are not fetched (InvalidSitemap placeholders): fetch them here,
                # at this crawler's pace and within its budgets.
                queue.extend((sub.url, True) for sub in parsed.sub_sitemaps)
            elif isinstance(parsed, AbstractPagesSitemap):
                pages.extend(page.url for page in parsed.pages)
        return pages

    # the crawl -------------------------------------------------------------------------------------------

    def crawl(self) -> Iterator[RawDocument]:
        """Yield the documents of this crawl; budgets, skips and reuse are counted in ``report``."""
        started = time.monotonic()
        self._deadline = started + self.settings.max_seconds
        own_client = self.client is None
        if own_client:
            self.client = _client(self.settings.timeout_s, lambda: self._response_deadline)
        try:
            yield from self._crawl()
        finally:
            self.report.seconds = round(time.monotonic() - started, 3)
            if own_client:
                self.client.close()
            self.state.close()
            log.info("crawled %s: %s", self.start, json.dumps(self.report.to_dict()))

    def _crawl(self) -> Iterator[RawDocument]:
        if not self.in_scope(self.start):
            self._skip(self.start, "out of scope: the start URL is not under the allowed roots")
            return
        frontier: deque[tuple[str, int]] = deque([(self.start, 0)])
        queued = {self.start}
        if self.settings.sitemaps:
            for page in self.sitemap_pages():
                url = canonical_url(page)
                if not url or url in queued:
                    continue
                queued.add(url)
                if not self.in_scope(url):
                    self._skip(url, "out of scope: sitemap entry leaves the site")
                    continue
                frontier.append((url, 1))
        pages = 0
        cut: str | None = None
        deferred: list[str] = []
        while frontier:
            cut = self._budget_spent(pages)
            if cut:
                break
            url, depth = frontier.popleft()
            if len(url) > MAX_URL_CHARS:
                self._visit(url, "url too long")
                continue
            robots = self.robots(url)
            if self._origin(url) in self._unavailable:
                deferred.append(url)
                continue
            if not robots.can_fetch(url, self.settings.user_agent):
                self.report.robots_blocked += 1
                self._visit(url, "blocked by robots.txt")
                continue
            pages += 1
            try:
                document, links, why_none = self._page(url)
            except Skipped as exc:
                if str(exc).startswith("budget: wall time"):
                    frontier.appendleft((url, depth))
                    cut = "wall time"
                    break
                self._visit(url, str(exc))
                continue
            self._visited.add(url)
            if document is not None:
                self.report.documents += 1
                yield document
            else:
                self._skip(url, why_none)
            for link in links:
                if link in queued:
                    continue
                queued.add(link)
                if not self.in_scope(link):
                    self._skip(link, "out of scope: link leaves the site")
                elif depth + 1 > self.settings.max_depth:
                    self.report.budget_hits["depth"] += 1
                    self._visit(link, "budget: depth")
                else:
                    frontier.append((link, depth + 1))
        if cut:
            self.report.budget_hits[cut] += len(frontier)
        stored = set(self.state.urls())
        for url in [*(u for u, _ in frontier if cut), *deferred]:
            if url not in stored:
                self._visit(url, f"budget: {cut}" if self._origin(url) not in self._unavailable
                            else "robots.txt unavailable: not crawled tonight")
        yield from self._reuse_rest(stored, cut is not None)

    def _budget_spent(self, pages: int) -> str | None:
        """Return the budget the crawl has run out of, or None."""
        if pages >= self.settings.max_pages:
            return "pages"
        if time.monotonic() > self._deadline:
            return "wall time"
        if self.report.bytes > self.settings.max_total_bytes:
            return "total bytes"
        return None

    def _reuse_rest(self, stored: set[str], cut: bool) -> Iterator[RawDocument]:
        """Yield, from the state, the pages this crawl did not reach: those of sites whose robots.txt could not
        be read tonight and, when a budget cut the crawl short, all others (none of them is known to be gone)."""
        for url in sorted(stored - self._visited):
            origin = self._origin(url)
            if not self.in_scope(url) or not (cut or origin in self._unavailable):
                continue
            robots = self._robots.get(origin)
            if origin not in self._unavailable and robots is not None \
                    and not robots.can_fetch(url, self.settings.user_agent):
                continue
            entry = self.state.get(url)
            document = self._stored_document(url, entry) if entry else None
            if document is not None:
                self.report.reused += 1
                self.report.documents += 1
                yield document

    def _visit(self, url: str, reason: str) -> None:
        """Count a URL decided tonight without a document (it is not served from the state)."""
        self._visited.add(url)
        self._skip(url, reason)

    def _skip(self, url: str, reason: str) -> None:
        self.report.skipped[reason.split(":")[0]] += 1
        if len(self.skips) < 10_000:
            self.skips.append(Skip(url, reason))

    def _page(self, url: str) -> tuple[RawDocument | None, list[str], str]:
        """Fetch (or revalidate) one page; return its document (or None and why) and its links."""
        stored = self.state.get(url)
        # A text made by another extraction is not reused: the page is fetched whole and extracted again.
        current = stored is not None and stored.get("extractor") == self._extractor
        headers = {}
        if current:
            if stored.get("etag"):
                headers["If-None-Match"] = stored["etag"]
            if stored.get("last_modified"):
                headers["If-Modified-Since"] = stored["last_modified"]
        try:
            answer = self._fetch_page(url, headers)
        except Skipped as exc:
            transient = str(exc).startswith(("http 5", "http 429", "timeout", "connection error",
                                             "robots.txt unavailable"))
            if stored and transient:
                self.report.reused_after_error += 1
                return self._reuse(url, stored)
            raise
        if answer.status == 304 and current:
            self.report.unchanged += 1
            return self._reuse(url, stored)
        if answer.status in GONE:
            if self.state.delete(url):
                self.report.dropped += 1
            raise Skipped(f"gone: http {answer.status}")
        if answer.status != 200:
            raise Skipped(f"http {answer.status}")
        body_hash = hashlib.sha256(answer.body).hexdigest()
        if current and stored.get("body_hash") == body_hash:
            self.report.unchanged += 1
            return self._reuse(url, stored)
        try:
            entry = self._extract(url, answer)
        except Exception as exc:  # hostile or broken markup costs one page, never the crawl
            raise Skipped(f"extraction failed: {type(exc).__name__}") from None
        entry["body_hash"] = body_hash
        entry["extractor"] = self._extractor
        entry["content_hash"] = hashlib.sha256((entry["text"] or "").encode("utf-8", "replace")).hexdigest()
        if stored and stored["content_hash"] == entry["content_hash"] and bool(stored["indexable"]) == \
                entry["indexable"] and stored.get("fetched_at"):
            # Same text, other bytes (a nonce, a timestamp): the document keeps its first fetch time, so an
            # unchanged text makes an identical corpus row.
            entry["fetched_at"] = stored["fetched_at"]
        self.state.put(url, entry)
        self.report.fetched += 1
        return self._stored_document(url, entry), entry["links"], entry.get("reason") or "noindex"

    def _reuse(self, url: str, stored: dict[str, Any]) -> tuple[RawDocument | None, list[str], str]:
        return self._stored_document(url, stored), stored["links"], stored.get("reason") or "noindex"

    def _fetch_page(self, url: str, headers: dict[str, str]) -> Fetched:
        chain = [url]
        current = url
        while True:
            answer = self._get(current, self.settings.max_page_bytes, headers, text_only=True)
            if answer.status not in REDIRECTS:
                return answer
            target = canonical_url(urljoin(current, answer.headers.get("location", "")))
            if target is None:
                raise Skipped("redirect to a non-web URL")
            if target in chain or len(chain) > self.settings.max_redirects:
                raise Skipped("redirect loop")
            if not self.in_scope(target):
                raise Skipped("out of scope: redirected off the site")
            why_not = self._why_not(target)
            if why_not == "blocked by robots.txt":
                self.report.robots_blocked += 1
            if why_not:
                raise Skipped(why_not)
            chain.append(target)
            current = target
            headers = {}

    def _extract(self, url: str, answer: Fetched) -> dict[str, Any]:
        """Parse a fetched page: robots meta, canonical, links, main text."""
        import lxml.html

        from nightshift.extraction import html_to_text

        charset = _charset(answer.headers.get("content-type", ""))
        text_body = answer.body.decode(charset or "utf-8", "replace")
        kind = answer.headers.get("content-type", "").split(";")[0].strip().lower()
        entry: dict[str, Any] = {
            "etag": answer.headers.get("etag"), "last_modified": answer.headers.get("last-modified"),
            "fetched_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "status": answer.status, "links": [], "indexable": True, "text": None, "reason": None,
        }
        directives = answer.headers.get("x-robots-tag", "").lower()
        if kind == "text/plain":
            entry["text"] = text_body
            return entry
        try:
            # XHTML (DocBook, Sphinx's older builders) starts with an XML declaration naming its encoding, which
            # lxml refuses on text that is already decoded: the declaration is dropped, the decoded text kept.
            tree = lxml.html.fromstring(_XML_DECLARATION.sub("", text_body, count=1), base_url=answer.url)
        except (ValueError, lxml.etree.ParserError):
            entry.update(indexable=False, reason="unparsable html")
            return entry
        for meta in tree.xpath("//meta[@name]"):
            if meta.get("name", "").lower() in ("robots", self.settings.user_agent.split("/")[0].lower()):
                directives += "," + meta.get("content", "").lower()
        follow = "nofollow" not in directives and "none" not in directives
        if follow:
            tree.make_links_absolute(answer.url, resolve_base_href=True)
            # All web links are kept, in scope or not: the crawl decides (and counts) each with tonight's scope.
            links = []
            for href in tree.xpath("//a[@href]/@href"):
                link = canonical_url(href)
                if link and link not in links:
                    links.append(link)
            entry["links"] = links
        if "noindex" in directives or "none" in directives:
            entry.update(indexable=False, reason="noindex")
            return entry
        canonical = tree.xpath("//link[@rel='canonical']/@href")
        if canonical:
            target = canonical_url(urljoin(answer.url, canonical[0]))
            if target and target != url and self.in_scope(target):
                entry["links"] = [target, *[link for link in entry["links"] if link != target]]
                entry.update(indexable=False, reason="not canonical: another URL is")
                return entry
        text = html_to_text(text_body, url=url)
        if not text or not text.strip():
            entry.update(indexable=False, reason="no main text")
            return entry
        entry["text"] = text
        return entry

    def _stored_document(self, url: str, entry: dict[str, Any]) -> RawDocument | None:
        if not entry.get("indexable") or not entry.get("text"):
            return None
        return RawDocument(id=url, source=url, format="text", content=entry["text"], meta={
            "url": url, "fetched_at": entry["fetched_at"], "status": entry["status"],
            "content_hash": entry["content_hash"],
        })


def _scope_entry(entry: str, scheme: str) -> Scope | None:
    """Return the scope an ``allow`` entry names (a bare host or host/path takes the start URL's scheme)."""
    if not isinstance(entry, str) or not entry.strip():
        return None
    entry = entry.strip()
    return Scope.of(entry if "://" in entry else f"{scheme}://{entry}")


def _charset(content_type: str) -> str | None:
    for part in content_type.split(";")[1:]:
        key, _, value = part.strip().partition("=")
        if key.lower() == "charset" and value:
            try:
                "".encode(value.strip('"'))
                return value.strip('"')
            except LookupError:
                return None
    return None


def _retry_after_seconds(value: str) -> float:
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return 0.0
    return max(0.0, (when - datetime.now(UTC)).total_seconds())
