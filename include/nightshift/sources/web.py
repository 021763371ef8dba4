"""A polite, incremental crawler for ``http(s)://`` sources.

Built on the field's libraries: Protego reads robots.txt (Allow, Disallow, Crawl-delay, Sitemap), w3lib
canonicalises URLs, ultimate-sitemap-parser reads sitemaps and sitemap indexes, httpx fetches, lxml finds
links, trafilatura extracts the main text. The crawl loop itself is here: breadth-first from the start URL
and the sitemaps, one host at a time at the pace robots.txt (or the settings) allow, within budgets of
pages, depth, bytes and wall time, so that a crawler trap ends at a budget instead of hanging the task.

Incremental: per URL the crawl state (SQLite under ``$NIGHTSHIFT_HOME/sources/<name>/``) keeps the ETag,
Last-Modified, content hash, extracted text and links. The next crawl sends conditional requests; a 304 or
an identical body reuses the stored text and links without extracting again, a 404/410 drops the page, and
a page that fails for a night (timeout, 5xx) is served from the state rather than lost. Every document
carries its URL, the time its bytes were fetched, the HTTP status and the content hash; every URL not
taken is counted with its reason in the crawl report.
"""

from __future__ import annotations

import email.utils
import hashlib
import json
import logging
import sqlite3
import time
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
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
    """Start URL; its host is the crawl's scope unless ``allow`` says more."""
    allow: tuple[str, ...] = ()
    """Further scope: hosts (``docs.example.com``) or host/path prefixes (``example.com/help/``)."""
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
            "content_hash TEXT, fetched_at TEXT, status INTEGER, text TEXT, links TEXT, indexable INTEGER, reason TEXT)"
        )

    def get(self, url: str) -> dict[str, Any] | None:
        row = self.db.execute("SELECT etag, last_modified, content_hash, fetched_at, status, text, links, indexable, "
                              "reason FROM pages WHERE url = ?", (url,)).fetchone()
        if row is None:
            return None
        keys = ("etag", "last_modified", "content_hash", "fetched_at", "status", "text", "links", "indexable",
                "reason")
        entry = dict(zip(keys, row, strict=True))
        entry["links"] = json.loads(entry["links"] or "[]")
        return entry

    def put(self, url: str, entry: dict[str, Any]) -> None:
        self.db.execute(
            "INSERT OR REPLACE INTO pages VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (url, entry.get("etag"), entry.get("last_modified"), entry["content_hash"], entry["fetched_at"],
             entry["status"], entry.get("text"), json.dumps(entry.get("links", [])), int(entry["indexable"]),
             entry.get("reason")),
        )
        self.db.commit()

    def delete(self, url: str) -> bool:
        deleted = self.db.execute("DELETE FROM pages WHERE url = ?", (url,)).rowcount
        self.db.commit()
        return bool(deleted)

    def close(self) -> None:
        self.db.close()


class Skipped(Exception):
    """A URL not taken, and why (the reason's text before ':' is what reports count)."""


@dataclass
class Fetched:
    url: str
    status: int
    headers: Any
    body: bytes = b""


class Crawler:
    """One crawl of one website source. Iterate ``crawl()`` for its documents; read ``report`` afterwards."""

    def __init__(self, settings: WebSettings, state_path: Path, client=None) -> None:
        self.settings = settings
        self.state = CrawlState(state_path)
        self.client = client
        self.report = CrawlReport()
        self.skips: list[Skip] = []
        start = canonical_url(settings.url)
        assert start is not None
        self.start = start
        self.scope = [(urlsplit(start).hostname or "", "/")] + [_scope_entry(a) for a in settings.allow]
        self._robots: dict[str, Any] = {}
        self._next_at: dict[str, float] = {}
        self._deadline = 0.0

    # scope, robots, pace ------------------------------------------------------------------------------------

    def in_scope(self, url: str) -> bool:
        parts = urlsplit(url)
        return any(parts.hostname == host and (parts.path or "/").startswith(prefix) for host, prefix in self.scope)

    def _origin(self, url: str) -> str:
        parts = urlsplit(url)
        return f"{parts.scheme}://{parts.netloc}"

    def robots(self, url: str):
        """Return the parsed robots.txt of the URL's host (fetched once per crawl)."""
        from protego import Protego

        origin = self._origin(url)
        if origin not in self._robots:
            try:
                answer = self._get(f"{origin}/robots.txt", limit=512 * 1024, follow=True)
                if answer.status >= 500:
                    # As search engines do: a server that cannot say what is allowed is not crawled tonight.
                    parsed = Protego.parse("User-agent: *\nDisallow: /")
                    self._robots[origin] = parsed
                    self.skips.append(Skip(f"{origin}/robots.txt", f"robots.txt unavailable: http {answer.status}"))
                    return parsed
                text = answer.body.decode("utf-8", "replace") if answer.status == 200 else ""
            except Skipped as exc:
                self.skips.append(Skip(f"{origin}/robots.txt", f"robots.txt unavailable: {exc}"))
                text = "User-agent: *\nDisallow: /"
            self._robots[origin] = Protego.parse(text)
        return self._robots[origin]

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

    def _get(self, url: str, limit: int, headers: dict[str, str] | None = None, follow: bool = False,
             text_only: bool = False) -> Fetched:
        """GET a URL once its host's turn comes, retrying 429/5xx/timeouts with back-off; follow redirects only
        for robots.txt and sitemaps (pages report them, so that scope and loops are checked by the caller)."""
        import httpx

        origin = self._origin(url)
        attempt = 0
        seen: list[str] = []
        while True:
            if time.monotonic() > self._deadline:
                raise Skipped("budget: wall time")
            self._wait_turn(origin)
            self.report.requests += 1
            try:
                with self.client.stream("GET", url, headers={"User-Agent": self.settings.user_agent,
                                                               **(headers or {})}) as response:
                    status = response.status_code
                    if follow and status in REDIRECTS and response.headers.get("location"):
                        seen.append(url)
                        url = urljoin(url, response.headers["location"])
                        if url in seen or len(seen) > self.settings.max_redirects:
                            raise Skipped("redirect loop")
                        origin = self._origin(url)
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
                    body = bytearray()
                    for chunk in response.iter_bytes():
                        body += chunk
                        if len(body) > limit:
                            raise Skipped(f"too large: over {limit} bytes")
                    self.report.bytes += len(body)
                    return Fetched(url, status, response.headers, bytes(body))
            except httpx.TimeoutException:
                if attempt < self.settings.retries:
                    attempt += 1
                    self._back_off(origin, attempt, None)
                    continue
                raise Skipped(f"timeout: no answer within {self.settings.timeout_s:g}s") from None
            except httpx.HTTPError as exc:
                raise Skipped(f"connection error: {type(exc).__name__}") from None

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
        """Return the in-scope page URLs the start host's sitemaps list (indexes followed)."""
        from usp.objects.sitemap import AbstractIndexSitemap, AbstractPagesSitemap
        from usp.tree import sitemap_from_str

        origin = self._origin(self.start)
        robots = self.robots(self.start)
        queue = deque([*(robots.sitemaps or []), f"{origin}/sitemap.xml"])
        done: set[str] = set()
        pages: list[str] = []
        while queue and len(done) < MAX_SITEMAPS:
            url = queue.popleft()
            if url in done or not self.in_scope(canonical_url(url) or ""):
                continue
            done.add(url)
            try:
                answer = self._get(url, limit=MAX_SITEMAP_BYTES, follow=True)
            except Skipped as exc:
                self.skips.append(Skip(url, f"sitemap: {exc}"))
                continue
            if answer.status != 200:
                continue
            parsed = sitemap_from_str(answer.body.decode("utf-8", "replace"))
            if isinstance(parsed, AbstractIndexSitemap):
                # Children of a parsed string are not fetched (InvalidSitemap placeholders): fetch them here,
                # at this crawler's pace and within its budgets.
                queue.extend(sub.url for sub in parsed.sub_sitemaps)
            elif isinstance(parsed, AbstractPagesSitemap):
                pages.extend(page.url for page in parsed.pages)
        return pages

    # the crawl -------------------------------------------------------------------------------------------

    def crawl(self) -> Iterator[RawDocument]:
        """Yield the documents of this crawl; budgets, skips and reuse are counted in ``report``."""
        import httpx

        started = time.monotonic()
        self._deadline = started + self.settings.max_seconds
        own_client = self.client is None
        if own_client:
            self.client = httpx.Client(timeout=self.settings.timeout_s, follow_redirects=False)
        try:
            yield from self._crawl()
        finally:
            self.report.seconds = round(time.monotonic() - started, 3)
            if own_client:
                self.client.close()
            self.state.close()
            log.info("crawled %s: %s", self.start, json.dumps(self.report.to_dict()))

    def _crawl(self) -> Iterator[RawDocument]:
        frontier: deque[tuple[str, int]] = deque([(self.start, 0)])
        queued = {self.start}
        if self.settings.sitemaps:
            for page in self.sitemap_pages():
                url = canonical_url(page)
                if url and url not in queued and self.in_scope(url):
                    queued.add(url)
                    frontier.append((url, 1))
        pages = 0
        too_deep: set[str] = set()
        while frontier:
            if pages >= self.settings.max_pages:
                self.report.budget_hits["pages"] += len(frontier)
                self._skip_rest(frontier, "budget: pages")
                break
            if time.monotonic() > self._deadline:
                self.report.budget_hits["wall time"] += len(frontier)
                self._skip_rest(frontier, "budget: wall time")
                break
            if self.report.bytes > self.settings.max_total_bytes:
                self.report.budget_hits["total bytes"] += len(frontier)
                self._skip_rest(frontier, "budget: total bytes")
                break
            url, depth = frontier.popleft()
            if len(url) > MAX_URL_CHARS:
                self._skip(url, "url too long")
                continue
            if not self.robots(url).can_fetch(url, self.settings.user_agent):
                self.report.robots_blocked += 1
                self._skip(url, "blocked by robots.txt")
                continue
            pages += 1
            try:
                document, links, why_none = self._page(url)
            except Skipped as exc:
                if str(exc).startswith("budget: wall time"):
                    self.report.budget_hits["wall time"] += len(frontier) + 1
                    self._skip(url, str(exc))
                    self._skip_rest(frontier, "budget: wall time")
                    break
                self._skip(url, str(exc))
                continue
            if document is not None:
                self.report.documents += 1
                yield document
            else:
                self._skip(url, why_none)
            for link in links:
                if link in queued:
                    continue
                if depth + 1 > self.settings.max_depth:
                    if link not in too_deep:
                        too_deep.add(link)
                        self.report.budget_hits["depth"] += 1
                        self._skip(link, "budget: depth")
                    continue
                queued.add(link)
                frontier.append((link, depth + 1))

    def _skip(self, url: str, reason: str) -> None:
        self.report.skipped[reason.split(":")[0]] += 1
        if len(self.skips) < 10_000:
            self.skips.append(Skip(url, reason))

    def _skip_rest(self, frontier: deque, reason: str) -> None:
        while frontier:
            self._skip(frontier.popleft()[0], reason)

    def _page(self, url: str) -> tuple[RawDocument | None, list[str], str]:
        """Fetch (or revalidate) one page; return its document (or None and why) and its in-scope links."""
        stored = self.state.get(url)
        headers = {}
        if stored:
            if stored.get("etag"):
                headers["If-None-Match"] = stored["etag"]
            if stored.get("last_modified"):
                headers["If-Modified-Since"] = stored["last_modified"]
        try:
            answer = self._fetch_page(url, headers)
        except Skipped as exc:
            transient = str(exc).startswith(("http 5", "http 429", "timeout", "connection error"))
            if stored and transient:
                self.report.reused_after_error += 1
                return self._reuse(url, stored)
            raise
        if answer.status == 304 and stored:
            self.report.unchanged += 1
            return self._reuse(url, stored)
        if answer.status in GONE:
            if self.state.delete(url):
                self.report.dropped += 1
            raise Skipped(f"gone: http {answer.status}")
        if answer.status != 200:
            raise Skipped(f"http {answer.status}")
        digest = hashlib.sha256(answer.body).hexdigest()
        if stored and stored["content_hash"] == digest:
            self.report.unchanged += 1
            return self._reuse(url, stored)
        try:
            entry = self._extract(url, answer, digest)
        except Exception as exc:  # hostile or broken markup costs one page, never the crawl
            raise Skipped(f"extraction failed: {type(exc).__name__}") from None
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
            if not self.robots(target).can_fetch(target, self.settings.user_agent):
                self.report.robots_blocked += 1
                raise Skipped("blocked by robots.txt")
            chain.append(target)
            current = target
            headers = {}

    def _extract(self, url: str, answer: Fetched, digest: str) -> dict[str, Any]:
        """Parse a fetched page: robots meta, canonical, links, main text."""
        import lxml.html
        import trafilatura

        charset = _charset(answer.headers.get("content-type", ""))
        text_body = answer.body.decode(charset or "utf-8", "replace")
        kind = answer.headers.get("content-type", "").split(";")[0].strip().lower()
        entry: dict[str, Any] = {
            "etag": answer.headers.get("etag"), "last_modified": answer.headers.get("last-modified"),
            "content_hash": digest, "fetched_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "status": answer.status, "links": [], "indexable": True, "text": None, "reason": None,
        }
        directives = answer.headers.get("x-robots-tag", "").lower()
        if kind == "text/plain":
            entry["text"] = text_body
            return entry
        try:
            tree = lxml.html.fromstring(text_body, base_url=answer.url)
        except (ValueError, lxml.etree.ParserError):
            entry.update(indexable=False, reason="unparsable html")
            return entry
        for meta in tree.xpath("//meta[@name]"):
            if meta.get("name", "").lower() in ("robots", self.settings.user_agent.split("/")[0].lower()):
                directives += "," + meta.get("content", "").lower()
        follow = "nofollow" not in directives and "none" not in directives
        if follow:
            tree.make_links_absolute(answer.url, resolve_base_href=True)
            links = []
            for href in tree.xpath("//a[@href]/@href"):
                link = canonical_url(href)
                if link and self.in_scope(link) and link not in links:
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
        text = trafilatura.extract(text_body, url=url, include_comments=False, include_tables=True,
                                   favor_recall=True) or trafilatura.html2txt(text_body)
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


def _scope_entry(entry: str) -> tuple[str, str]:
    parts = urlsplit(entry if "://" in entry else f"http://{entry}")
    return (parts.hostname or "", parts.path or "/")


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
