"""An independent check for credentials left in text: detect-secrets' plugins plus generic gitleaks-style rules.

The quality suite runs it over the versioned corpus beside the scrubber's ``find``. Rerunning the scrubber could
only confirm what it caught; this detector is built another way (detect-secrets' provider plugins and filters,
its entropy measures applied to values under secret-ish keys as gitleaks' generic-api-key rule does, and
header, connection-string and URL rules written apart from the scrubber's), so a shape the scrubber's rules
miss is still counted.

Lines are pre-filtered by a cheap regular expression; only lines that could hold a credential go through
detect-secrets, whose ad-hoc scan costs about 0.1 ms a line.
"""

from __future__ import annotations

import base64
import binascii
import functools
import re
import threading
import unicodedata
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from nightshift.prep.pii import PASSWORD_SETTING

# Left out of detect-secrets' plugins: the high-entropy ones report every unquoted word in an ad-hoc scan (they
# are applied below to values under secret-ish keys instead); IPPublicDetector finds addresses, which are
# personal data the scrubber's own rules count, and takes versions for addresses.
_SKIPPED_PLUGINS = {"Base64HighEntropyString", "HexHighEntropyString", "IPPublicDetector"}

# A line that holds none of these cannot match any rule here or any detect-secrets plugin in use.
_CANDIDATE = re.compile(
    r"(?i)pass|pw|secret|token|key|auth|bearer|basic|cred|private|sig|api|cookie|session|csrf|code=|://[^\s/]{0,300}@"
    r"|[a-z0-9+/_=.-]{20,}|\d{8,10}:")
# Generic rules: (detector, pattern with one group, the value).
_RULES: list[tuple[str, re.Pattern[str]]] = [
    ("authorization_header", re.compile(
        r"(?i)\b(?:proxy-)?authori[sz]ation\b[\"']?\s{0,3}[:=]\s{0,3}[\"']?"
        r"(?:bearer|basic|token|digest|negotiate|apikey|sso-key)\s{1,3}([^\s\"',;]{8,2000})")),
    ("bearer_token", re.compile(r"(?i)\bbearer\s{1,3}([a-z0-9._~+/-]{20,2000}={0,3})")),
    ("basic_credentials", re.compile(r"\b[Bb]asic\s{1,3}([A-Za-z0-9+/]{8,2000}={0,2})(?![\w+/=])")),
    ("connection_string", re.compile(
        r"(?i)(?:^|[;\s\"'])(?:password|pwd|account_?key|shared_?access_?key|shared_?access_?signature)\s{0,3}=\s{0,3}"
        r"(\{[^}\n]{0,300}\}|[^;\"'\n]{1,300})")),
    # The scheme starts a token and is bounded: an unbounded one is retried from every letter of a long run.
    ("url_userinfo", re.compile(r"(?<![A-Za-z0-9+.-])[A-Za-z][A-Za-z0-9+.-]{0,31}://[^\s/:@]{1,128}:([^\s/@]{1,256})@")),
    ("url_query", re.compile(
        r"(?i)[?&;](?:[a-z0-9_.-]{0,40}(?:token|key|secret|sig|signature|password|passwd|pwd|credential|code|session"
        r"|sid|auth|otp|nonce|csrf))=([^&#\s\"'<>]{1,2000})")),
    # A long token as random as a key's, whatever names it (detect-secrets' base64 entropy limit); hex is left out:
    # hashes and commit ids are hex.
    ("high_entropy_token", re.compile(r"(?<![\w+/=-])([A-Za-z0-9_-]{32,200})(?![\w+/=-])")),
    # gitleaks' generic-api-key: a keyword, up to 20 more name characters, an assignment, a value in any quoting
    # (JSON-escaped quotes included); the name starts a token, so a long run of letters is not retried at each.
    ("generic_secret", re.compile(
        r"(?i)(?<![a-z0-9_.-])[\w.-]{0,50}?(?:access|auth(?!or)|api|credential|creds|key|passw(?:or)?d|passphrase|secret"
        r"|token|pwd|cookie|session|csrf|xsrf)[\w.-]{0,20}(?:\\?[\s'\"]){0,3}"
        r"(?:=|>|:{1,3}=|\|\||:|=>|\?=|\s{1,3}is\s{1,3})(?:\\?[\x60'\"\s=|>+-]){0,6}?"
        r"(\\\"(?:[^\"\\\n]|\\[^\"]){1,300}\\\"|\"(?:[^\"\\\n]|\\.){1,300}\"|'(?:[^'\\\n]|\\.){1,300}'"
        r"|[^\s\"',;<>]{4,300})")),
    # An HTML attribute pair naming a credential: <input name="api_key" value="...">, <meta name="csrf-token" content>.
    ("html_attribute", re.compile(
        r"(?i)\b(?:name|id|property)\s{0,3}=\s{0,3}[\"']?[\w.:-]{0,40}(?:token|key|secret|passw(?:or)?d|csrf|xsrf"
        r"|session|auth)[\w.:-]{0,20}[\"']?\s{1,3}(?:[\w-]{1,20}\s{0,3}=\s{0,3}[\"'][^\"'<>\n]{0,80}[\"']\s{1,3}){0,4}"
        r"(?:value|content)\s{0,3}=\s{0,3}[\"']([^\"'<>\n]{1,300})[\"']")),
    # Cookie headers: every name=value pair after Cookie:/Set-Cookie:.
    ("cookie", re.compile(r"(?i)(?<![\w-])(?:set-)?cookie\s{0,3}:\s{0,3}[\w.-]{1,64}=([^;\s\"',]{8,2000})")),
    # A UUID under an API-key keyword (Heroku's keys are UUIDs).
    ("uuid_api_key", re.compile(
        r"(?i)(?:api[ _.-]?key|auth[ _.-]?token|secret)[\"']?\s{0,3}[:=]?\s{0,3}[\"']?"
        r"([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})(?![\w-])")),
]
_SCRUBBED = re.compile(r"<(?:EMAIL|PHONE|IP_ADDRESS|CREDIT_CARD|IBAN|SECRET)>(?:-[0-9a-f]{12})?")
_PASSWORD_WORD = re.compile(r"(?i)passw(?:or)?d|passphrase|pwd|secret")
# What the scrubber leaves, templates and references: a value that holds no credential.
_NOT_A_VALUE = re.compile(r"<[^<>\s]{1,40}>|\$\{|\$\(|\{\{|\{%|%\(|^\$[A-Z_][A-Z0-9_]*$|^%\w+%$|^\[[^\]]*\]$"
                          r"|^[A-Za-z_][\w.]*[(\[]|^[a-z][a-z0-9+.-]*://|^\.{0,2}/|^~/|^!\w+$")
_IDENTIFIER = re.compile(r"[^\W\d_]+(?:[_.:/-][^\W\d_]+)*")

_LOCK = threading.Lock()


@dataclass(frozen=True)
class SecretFinding:
    detector: str
    """``detect_secrets:<type>`` for a detect-secrets plugin, else the generic rule's name."""
    start: int
    end: int


def verify(text: str) -> list[SecretFinding]:
    """Return the credentials detect-secrets and the generic rules find in ``text``, in text order."""
    return next(verify_many([text]))


def verify_many(texts: Iterable[str | None]) -> Iterator[list[SecretFinding]]:
    """Yield the findings of each text; detect-secrets' settings are set up once for the whole batch."""
    from detect_secrets.core.plugins.util import get_mapping_from_secret_type_to_class
    from detect_secrets.settings import transient_settings

    plugins = [{"name": cls.__name__} for cls in get_mapping_from_secret_type_to_class().values()
               if cls.__name__ not in _SKIPPED_PLUGINS]
    # detect-secrets keeps its settings in a process-wide object: one batch at a time sets and restores them.
    with _LOCK, transient_settings({"plugins_used": plugins}):
        for text in texts:
            yield _verify(text if isinstance(text, str) else "")


# Armoured blocks that are published on purpose (signatures, public keys, certificates): their base64 looks as
# random as a key's but holds no secret. A PRIVATE KEY block is not among them.
_PUBLIC_BEGIN = re.compile(r"-----BEGIN (PGP SIGNATURE|PGP PUBLIC KEY BLOCK|PGP MESSAGE|CERTIFICATE|PUBLIC KEY"
                           r"|SSH2 PUBLIC KEY|X509 CRL|CERTIFICATE REQUEST|NEW CERTIFICATE REQUEST)-----")
_PUBLIC_END = re.compile(r"-----END [A-Z0-9 ]{1,40}-----")
# An SSH public key line: algorithm, base64 body (and a comment).
_SSH_PUBLIC = re.compile(r"\b(?:ssh-(?:rsa|dss|ed25519)|ecdsa-sha2-nistp\d{3}|sk-ssh-ed25519@openssh\.com)"
                         r" AAAA[A-Za-z0-9+/]{16,8192}={0,3}")


def _verify(text: str) -> list[SecretFinding]:
    found: list[SecretFinding] = []
    offset = 0
    public = False
    for raw in text.split("\n"):
        base, offset = offset, offset + len(raw) + 1
        if public:
            public = not _PUBLIC_END.search(raw)
            continue
        if _PUBLIC_BEGIN.search(raw):
            public = not _PUBLIC_END.search(raw[_PUBLIC_BEGIN.search(raw).end():])
            continue
        if not _CANDIDATE.search(raw):
            continue
        line, where = _visible(raw)
        spans: set[tuple[str, int, int]] = set()
        # A long line is checked in overlapping windows: no rule, here or in detect-secrets, then costs more than
        # linear time in the line's length, whatever its pattern does within one window.
        for at in range(0, max(1, len(line) - _OVERLAP), _WINDOW - _OVERLAP):
            window = line[at:at + _WINDOW]
            if at and not _CANDIDATE.search(window):
                continue
            spans.update((name, at + start, at + end) for name, start, end in _scan(window))
        for name, start, end in _merged(spans):
            found.append(SecretFinding(name, base + where(start), base + where(end - 1) + 1))
    return sorted(found, key=lambda f: (f.start, f.detector))


# Window length and overlap for long lines; the overlap exceeds the longest credential the rules bound.
_WINDOW, _OVERLAP = 4096, 512


def _scan(line: str) -> set[tuple[str, int, int]]:
    """Return (detector, start, end) of each credential detect-secrets and the generic rules find in one line."""
    from detect_secrets.core.scan import scan_line

    spans: set[tuple[str, int, int]] = set()
    for secret in scan_line(line):
        value = secret.secret_value or ""
        if not value or _NOT_A_VALUE.search(value):
            continue
        at = line.find(value)
        if at >= 0 and PASSWORD_SETTING.search(line[max(0, at - 60):at]):
            continue  # password_encryption = 'scram-sha-256': a setting about passwords, not one
        start, end = (at, at + len(value)) if at >= 0 else (0, len(line))
        spans.add((f"detect_secrets:{secret.type}", start, end))
    # The scrubber's placeholders are blanked (same length, so spans hold): "<SECRET>" is no key, and a value
    # it replaced is no credential.
    blanked = _SCRUBBED.sub(lambda m: "_" * len(m.group(0)), line)
    blanked = _SSH_PUBLIC.sub(lambda m: " " * len(m.group(0)), blanked)
    for name, rule in _RULES:
        for match in rule.finditer(blanked):
            start, end = match.span(1)
            if _SCRUBBED.search(line, start, end) is None and _accept(name, match.group(1), match.group(0)):
                spans.add((name, start, end))
    return spans


def _merged(spans: set[tuple[str, int, int]]) -> list[tuple[str, int, int]]:
    """Return the spans with overlapping ones of the same detector (one credential seen by two windows) joined."""
    out: list[tuple[str, int, int]] = []
    for name, start, end in sorted(spans):
        if out and out[-1][0] == name and start < out[-1][2]:
            out[-1] = (name, out[-1][1], max(end, out[-1][2]))
        else:
            out.append((name, start, end))
    return out


def _visible(line: str):
    """Return the line without invisible format characters (U+200B and kin) and a map back to its positions."""
    if line.isascii() or not any(unicodedata.category(ch) == "Cf" for ch in line):
        return line, lambda i: i
    kept = [i for i, ch in enumerate(line) if unicodedata.category(ch) != "Cf"]
    return "".join(line[i] for i in kept), lambda i: kept[i] if kept else 0


def _accept(name: str, value: str, context: str) -> bool:
    """Return whether a generic rule's value is a credential (not a placeholder, a reference or a word)."""
    if value[:1] in "\"'" and value[-1:] == value[:1] and len(value) >= 2:
        value = value[1:-1]
    value = value.strip()
    if len(value) < 4 or len(set(value)) == 1 or _NOT_A_VALUE.search(value):
        return False
    if name == "basic_credentials":
        try:
            decoded = base64.b64decode(value + "=" * (-len(value) % 4), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return False
        return ":" in decoded and decoded.isprintable()
    if name in ("connection_string", "url_userinfo"):
        return True  # the context says it is a password
    if name == "high_entropy_token":
        return (not re.fullmatch(r"[0-9a-fA-F_-]+", value) and _entropy(value) >= 4.5
                and all(any(f(c) for c in value) for f in (str.isupper, str.islower, str.isdigit)))
    name_part = context.split(value)[0]
    if re.search(r"(?i)public|publishable", name_part) or PASSWORD_SETTING.search(name_part):
        return False  # a public key token is published on purpose; password_encryption configures passwords
    if re.search(r"\s+is\s+\W{0,3}$", name_part):
        # prose: "the entered password is correct.", "the password is `MD5`-encrypted"; a leak written as a
        # sentence still has a token's shape ("the password is hunter22").
        bare = value.replace("`", "").strip("'\"").rstrip(".,;:!?)")
        if not re.fullmatch(r"[A-Za-z0-9!@#$%^&*_+=~]{6,}", bare) or bare.isalpha() or bare.isdigit():
            return False
    if re.search(r"\.\w{1,4}>\W{0,3}$", name_part):
        return False  # a header or a tag named like a key (`<pwd.h>` database), not an assignment
    if not _PASSWORD_WORD.search(name_part) and re.fullmatch(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+", value):
        return False  # a dotted name under a key word (Sort Key: t2.unique2) is a column, not a token
    password = name == "generic_secret" and _PASSWORD_WORD.search(name_part) is not None
    if any(ch.isspace() for ch in value):
        return password and not _PASSWORD_WORD.search(value)
    if _IDENTIFIER.fullmatch(value):
        return _entropy(value) >= 4.0 and len(value) >= 20
    if password:
        return any(not ch.isalpha() for ch in value)
    if re.search(r"[()\[\]{}]", value):
        return False  # a call, a grammar or a template (key = 1*(ALPHA | DIGIT)), not a token
    return _entropy(value) >= 3.5 or (len(value) >= 8 and any(c.isdigit() for c in value)
                                      and any(c.isalpha() for c in value))


def _entropy(value: str) -> float:
    """Shannon entropy as detect-secrets' high-entropy plugins measure it (hex values with the hex plugin)."""
    hex_plugin, base64_plugin = _entropy_plugins()
    plugin = hex_plugin if re.fullmatch(r"[0-9a-fA-F]+", value) else base64_plugin
    return plugin.calculate_shannon_entropy(value)


@functools.cache
def _entropy_plugins():
    from detect_secrets.plugins.high_entropy_strings import Base64HighEntropyString, HexHighEntropyString

    return HexHighEntropyString(), Base64HighEntropyString()
