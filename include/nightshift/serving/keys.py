"""API keys: ``ns-`` followed by 43 random base62 characters, stored only as SHA-256 hashes.

Keys carry a recognisable prefix so that secret scanners can spot a leaked one (``KEY_PATTERN``). They are
created and revoked with ``nightshift keys``, kept in a key file (hashes only, mode 0600), and can also be
given to a deployment as an environment variable or an Airflow connection (plain keys or ``sha256:`` hashes).
A plain SHA-256 is the right hash here: the keys are 256-bit random values, not passwords, so there is
nothing for a slow key-derivation function to protect against.
"""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import json
import logging
import re
import secrets
import string
import time
from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from nightshift.environment import write_private
from nightshift.serving.protocol import send_error

log = logging.getLogger(__name__)

KEY_PREFIX = "ns-"
KEY_LENGTH = 43
KEY_PATTERN = re.compile(r"\bns-[0-9A-Za-z]{43}\b")
_ALPHABET = string.digits + string.ascii_letters
_HASH = re.compile(r"sha256:[0-9a-f]{64}")


def new_key() -> str:
    """Return a fresh API key."""
    return KEY_PREFIX + "".join(secrets.choice(_ALPHABET) for _ in range(KEY_LENGTH))


def key_hash(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def hashes_of(values: Iterable[str], origin: str) -> set[str]:
    """Return the hashes of configured keys (plain ``ns-`` keys or ``sha256:`` hashes); refuse anything else."""
    out: set[str] = set()
    for raw in values:
        value = raw.strip()
        if not value:
            continue
        if _HASH.fullmatch(value):
            out.add(value)
        elif KEY_PATTERN.fullmatch(value):
            out.add(key_hash(value))
        else:
            raise ValueError(
                f"{origin}: an entry is neither an ns- API key nor a sha256:<64 hex> hash "
                "(create keys with `nightshift keys create`)"
            )
    return out


@dataclass(frozen=True)
class KeyRecord:
    id: str
    name: str
    hash: str
    hint: str
    """The first and last characters of the key, to recognise it by; never enough to use it."""
    created_at: str
    revoked_at: str | None = None


class KeyStore:
    """The key file: hashes and names of keys created with ``nightshift keys``; writes are atomic and locked."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def records(self) -> list[KeyRecord]:
        if not self.path.is_file():
            return []
        data = json.loads(self.path.read_text())
        return [KeyRecord(**item) for item in data.get("keys", [])]

    def active_hashes(self) -> dict[str, str]:
        """Return ``{hash: key id}`` of the keys that are not revoked."""
        return {r.hash: r.id for r in self.records() if r.revoked_at is None}

    def create(self, name: str) -> tuple[KeyRecord, str]:
        """Create a key; return its record and the key itself (shown once, never stored)."""
        if not re.fullmatch(r"[A-Za-z0-9_.@-]{1,64}", name):
            raise ValueError("a key name is 1-64 letters, digits, '_', '.', '@' or '-'")
        key = new_key()
        record = KeyRecord(
            id=secrets.token_hex(4), name=name, hash=key_hash(key), hint=f"{key[:6]}...{key[-4:]}",
            created_at=_now(),
        )
        with self._locked() as records:
            records.append(record)
        return record, key

    def revoke(self, id_or_name: str) -> list[KeyRecord]:
        """Revoke the active keys with this id or name; return them."""
        revoked: list[KeyRecord] = []
        with self._locked() as records:
            for i, r in enumerate(records):
                if r.revoked_at is None and id_or_name in (r.id, r.name):
                    records[i] = KeyRecord(**{**asdict(r), "revoked_at": _now()})
                    revoked.append(records[i])
        return revoked

    @contextmanager
    def _locked(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock_path = self.path.with_name(self.path.name + ".lock")
        with open(lock_path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            records = self.records()
            yield records
            write_private(self.path, json.dumps({"keys": [asdict(r) for r in records]}, indent=2))


def ensure_local_key(store: KeyStore, key_file: Path) -> tuple[Path, bool]:
    """Return the local key file, creating a key named ``local`` when there is none (or it was revoked)."""
    if key_file.is_file():
        key = key_file.read_text().strip()
        if key_hash(key) in store.active_hashes():
            return key_file, False
    _record, key = store.create("local")
    write_private(key_file, key + "\n")
    return key_file, True


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class KeyRing:
    """The keys the endpoint accepts: the key file (re-read when it changes) plus fixed ones from the deployment."""

    def __init__(self, store: KeyStore | None = None, fixed: dict[str, str] | None = None,
                 recheck_seconds: float = 1.0) -> None:
        self.store = store
        self.fixed = dict(fixed or {})
        """``{hash: label}`` of keys from the environment or an Airflow connection."""
        self.recheck_seconds = recheck_seconds
        self._stored: dict[str, str] = {}
        self._stamp: tuple[int, int] | None = None
        self._checked = 0.0

    def _refresh(self) -> None:
        now = time.monotonic()
        if self.store is None or now - self._checked < self.recheck_seconds:
            return
        self._checked = now
        try:
            st = self.store.path.stat()
            stamp = (st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            self._stored, self._stamp = {}, None
            return
        if stamp != self._stamp:
            try:
                self._stored = self.store.active_hashes()
                self._stamp = stamp
            except (OSError, ValueError, TypeError) as exc:
                log.error("could not read the key file %s (%s); keeping the keys read before", self.store.path, exc)

    def __len__(self) -> int:
        self._refresh()
        return len(self._stored) + len(self.fixed)

    def identify(self, presented: str) -> str | None:
        """Return the id of the key presented, or None when it is not an accepted key."""
        self._refresh()
        digest = key_hash(presented)
        for table in (self._stored, self.fixed):
            for known, label in table.items():
                if hmac.compare_digest(known, digest):
                    return label
        return None


class ApiKeyMiddleware:
    """Require ``Authorization: Bearer <key>`` on the protected paths; answer 401 in the OpenAI shape otherwise."""

    def __init__(self, app, keyring: KeyRing, protected: tuple[str, ...] = ("/v1", "/metrics"),
                 required: bool = True) -> None:
        self.app = app
        self.keyring = keyring
        self.protected = protected
        self.required = required

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or not self.required or not scope["path"].startswith(self.protected):
            await self.app(scope, receive, send)
            return
        presented = _bearer(scope)
        if presented is None:
            await self._refuse(send, "Missing API key: send it as `Authorization: Bearer ns-...`. "
                               "Create one with `nightshift keys create`.")
            return
        key_id = self.keyring.identify(presented)
        if key_id is None:
            message = ("Incorrect API key provided." if len(self.keyring) else
                       "Incorrect API key provided: this endpoint has no keys configured; create one with "
                       "`nightshift keys create`.")
            await self._refuse(send, message)
            return
        scope.setdefault("state", {})["key_id"] = key_id
        await self.app(scope, receive, send)

    async def _refuse(self, send, message: str) -> None:
        await send_error(send, 401, message, "invalid_api_key", {"WWW-Authenticate": "Bearer"})


def _bearer(scope) -> str | None:
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            token = token.strip()
            return token if scheme.lower() == "bearer" and token else None
    return None
