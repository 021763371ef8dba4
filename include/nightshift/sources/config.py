"""Sources as configuration: ``include/configs/sources.yaml`` (or one URI from the ``source`` Param).

Every kind opens as a reader with the same face (``read()`` yields RawDocuments, ``skips`` lists Skips,
``summary()`` reports counts), so the pipeline never branches on the kind:

| kind | URI for the Param | settings |
|---|---|---|
| ``files`` | a path, ``file://``, or any fsspec URL (``s3://bucket/docs``, ``memory://``) | ``path`` |
| ``web`` | ``http(s)://site/start`` | ``url`` and the crawler's budgets (sources.web.WebSettings) |
| ``sql`` | ``sql://<conn_id>/<table>?text=<col>&id=<col>&updated=<col>`` | sources.sql.SqlSettings |
| ``feedback`` | (none: sources.yaml only) | ``path`` (default: ``$NIGHTSHIFT_HOME/feedback/approved``) |
"""

from __future__ import annotations

import dataclasses
import re
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import yaml

from nightshift.sources.document_store import RawDocument, Skip, resolve_store
from nightshift.sources.sql import SqlSettings
from nightshift.sources.web import WebSettings, within

KINDS = ("files", "web", "sql", "feedback")
NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,47}")


@dataclass(frozen=True)
class SourceSpec:
    """One source of the nightly run."""

    name: str
    """Short name: the mapped task's label in the grid, the prefix of its document ids."""
    kind: str
    settings: dict[str, Any] = field(default_factory=dict)
    prep: str | None = None
    """The preparation profile that judges this source's documents (include/configs/prep/<name>.yaml);
    None: prep.yaml's default_profile. Checked against the recipe's profiles when the night is planned."""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not NAME.fullmatch(self.name):
            raise ValueError(f"source name {str(self.name)[:60]!r}: use lower-case letters, digits, '-' or '_'")
        if self.kind not in KINDS:
            raise ValueError(f"source {self.name}: kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.prep is not None and (not isinstance(self.prep, str) or not NAME.fullmatch(self.prep)):
            raise ValueError(f"source {self.name}: prep must name a preparation profile (lower-case letters, "
                             f"digits, '-' or '_'), got {str(self.prep)[:60]!r}")
        self.typed()  # validate the settings now, with the source's name in the message

    def typed(self):
        """Return the kind's validated settings object."""
        try:
            if self.kind == "web":
                return WebSettings(**self.settings)
            if self.kind == "sql":
                return SqlSettings(**self.settings)
            if self.kind == "feedback":
                unknown = set(self.settings) - {"path"}
                if unknown or not isinstance(self.settings.get("path", ""), str):
                    raise ValueError("a feedback source takes one optional setting, `path` (the folder of approved "
                                     "batches)")
                return self.settings.get("path") or None
            unknown = set(self.settings) - {"path"}
            if unknown or not isinstance(self.settings.get("path"), str):
                raise ValueError(f"a files source takes one setting, `path`{'; unknown: ' if unknown else ''}"
                                 f"{', '.join(sorted(unknown))}")
            return self.settings["path"]
        except TypeError as exc:
            raise ValueError(f"source {self.name}: {exc}") from None
        except ValueError as exc:
            raise ValueError(f"source {self.name}: {exc}") from None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SourceSpec:
        return cls(name=data["name"], kind=data["kind"], settings=dict(data.get("settings") or {}),
                   prep=data.get("prep"))


def load_sources(path: Path) -> list[SourceSpec]:
    """Read sources.yaml; relative ``path`` settings are relative to the file's folder."""
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError:
        raise ValueError(f"{path.name}: not valid YAML") from None
    entries = data.get("sources") if isinstance(data, dict) else None
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{path.name}: expected `sources:` with a list of sources")
    specs = []
    for i, entry in enumerate(entries, start=1):
        if not isinstance(entry, dict) or "name" not in entry or "kind" not in entry:
            raise ValueError(f"{path.name}: source #{i} needs a `name` and a `kind`")
        settings = {k: v for k, v in entry.items() if k not in ("name", "kind", "prep")}
        if entry["kind"] in ("files", "feedback") and isinstance(settings.get("path"), str) \
                and "://" not in settings["path"]:
            local = Path(settings["path"]).expanduser()
            settings["path"] = str(local if local.is_absolute() else (path.parent / local).resolve())
        specs.append(SourceSpec(name=entry["name"], kind=entry["kind"], settings=settings, prep=entry.get("prep")))
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"{path.name}: source names must be unique")
    return specs


def source_from_uri(uri: str, allowed_roots: tuple[str, ...]) -> SourceSpec:
    """Return the one-off source a ``source`` Param names, refusing anything outside ``allowed_roots``."""
    uri = uri.strip()
    parts = urlsplit(uri)
    scheme = parts.scheme.lower() if len(parts.scheme) > 1 else ""
    if scheme in ("", "file"):
        folder = resolve_store(uri, tuple(Path(r) for r in allowed_roots if "://" not in r))
        return SourceSpec(name="one-off", kind="files", settings={"path": str(folder)})
    _check_uri_root(uri, allowed_roots)
    if scheme in ("http", "https"):
        # The allowed roots bound the whole crawl, not only its start: links and redirects stay under them.
        roots = [r for r in allowed_roots if "://" in r and within(uri, [r])]
        return SourceSpec(name="one-off", kind="web", settings={"url": uri, "roots": roots})
    if scheme == "sql":
        query = {k: v[0] for k, v in parse_qs(parts.query).items()}
        settings: dict[str, Any] = {"conn_id": parts.netloc, "table": parts.path.strip("/")}
        for key, setting in (("text", "text_column"), ("id", "id_column"), ("updated", "updated_column"),
                             ("format", "format")):
            if key in query:
                settings[setting] = query[key]
        return SourceSpec(name="one-off", kind="sql", settings=settings)
    return SourceSpec(name="one-off", kind="files", settings={"path": uri})


def _check_uri_root(uri: str, allowed_roots: tuple[str, ...]) -> None:
    from nightshift.sources.document_store import SourceNotAllowed

    normal = uri.rstrip("/") + "/"
    if urlsplit(uri).scheme.lower() in ("http", "https"):
        # Compared as the crawler will fetch it: scheme, host, port and path with dot segments resolved.
        allowed = within(uri, (r for r in allowed_roots if urlsplit(r).scheme.lower() in ("http", "https")))
    else:
        allowed = any(normal.startswith(root.rstrip("/") + "/") for root in allowed_roots if "://" in root)
    if not allowed:
        raise SourceNotAllowed(
            f"source {uri[:200]!r} is not under a location this installation reads from; an administrator can "
            "add its prefix (a URL, sql://<conn_id>, or a folder) to NIGHTSHIFT_SOURCE_ROOTS"
        )


class FilesReader:
    """A folder or an object-store prefix, read one document at a time (a large export never sits in memory)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.skips: list[Skip] = []
        self.formats: Counter[str] = Counter()

    def read(self) -> Iterator[RawDocument]:
        from nightshift.sources.document_store import iter_store
        from nightshift.sources.object_store import iter_object_store

        self.skips, self.formats = [], Counter()
        if "://" in self.path and not self.path.startswith("file://"):
            documents = iter_object_store(self.path, self.skips)
        else:
            documents = iter_store(resolve_store(self.path), self.skips)
        for doc in documents:
            self.formats[doc.format] += 1
            yield doc

    def summary(self) -> dict[str, Any]:
        return {"formats": dict(sorted(self.formats.items())),
                "skipped": dict(Counter(s.reason.split(":")[0] for s in self.skips).most_common())}


class _Adapter:
    """Gives the crawler and the SQL reader the common reader face."""

    def __init__(self, reader, documents: Callable[[], Iterator[RawDocument]]) -> None:
        self.reader = reader
        self._documents = documents

    @property
    def skips(self) -> list[Skip]:
        return self.reader.skips

    def read(self) -> Iterator[RawDocument]:
        return self._documents()

    def summary(self) -> dict[str, Any]:
        return self.reader.report.to_dict()


def open_source(spec: SourceSpec, state_dir: Path, sql_engine: Callable[[str], Any] | None = None):
    """Return the reader of a source; its state (crawl state, SQL snapshot) lives in ``state_dir``."""
    settings = spec.typed()
    if spec.kind == "files":
        return FilesReader(settings)
    if spec.kind == "feedback":
        from nightshift.sources.feedback import FeedbackReader

        return FeedbackReader(settings)
    if spec.kind == "web":
        from nightshift.sources.web import Crawler

        crawler = Crawler(settings, state_dir / "crawl.sqlite")
        return _Adapter(crawler, crawler.crawl)
    from nightshift.sources.sql import SqlReader

    if sql_engine is None:
        raise ValueError(f"source {spec.name}: a sql source needs a database connection")
    reader = SqlReader(settings, sql_engine(settings.conn_id), state_dir / "snapshot.sqlite")
    return _Adapter(reader, reader.read)
