"""Find and scrub personal data and credentials, replacing each by a typed placeholder (``<EMAIL>``).

Patterns are regular expressions with checks that regexes cannot do (Luhn for payment cards, ISO 13616
mod-97 for IBANs, ``ipaddress`` for IP addresses), so ordinary numbers, versions and dates survive.
Credential patterns follow detect-secrets' and gitleaks' rules for the same providers; a value assigned to a
secret-ish key (``token: ...``) counts only when it looks like a credential, not like a word or a reference.
Presidio would need a spaCy model that is not on PyPI; detect-secrets scans and reports, it does not replace
(``prep.secrets`` uses it as the independent second detector of the quality suite).

Text is matched with zero-width characters (U+200B and kin) folded out, so an address split by one is still
one address; the replaced span covers the original characters.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import functools
import hashlib
import hmac
import ipaddress
import os
import re
import secrets
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from nightshift.prep.step_base import Candidate, PrepStep, RecipeError

PLACEHOLDERS = {
    "email": "<EMAIL>", "phone": "<PHONE>", "ip_address": "<IP_ADDRESS>", "credit_card": "<CREDIT_CARD>",
    "iban": "<IBAN>", "secret": "<SECRET>",
}

# Keys that name a credential. Long words may follow any prefix (PGPASSWORD, _authToken, client_secret), short
# ones only a separator (db_pwd, --pass), so that bypass or compass stay words.
_LONG_KEYS = (r"pass(?:word|wd|phrase)|secret|token|api[_.-]?key|apikey|credentials?"
              r"|(?:access|secret|private|account|signing|encryption|master|client|app|auth|storage|subscription"
              r"|shared[_.-]?access)[_.-]?key")
_SHORT_KEYS = r"pass|pwd|pw|auth|sig"
_KEY = (rf"(?<![\w])(?P<key>[\w.-]{{0,40}}?(?:{_LONG_KEYS})|(?:[\w.-]{{0,40}}?[_.-])?(?:{_SHORT_KEYS}))"
        r"(?:[_.-]?\d{1,2})?(?![\w])")
_ASSIGN = r"\\?[\"'\x60]?\]?\s{0,3}(?:=>|:=|\?=|==?|:|\s+is\s+)\s{0,3}"
# A quoted value is taken whole (commas, semicolons, quotes of the other kind and spaces included).
_VALUE = (r"(?:\\\"(?P<value_jq>(?:[^\"\\\n]|\\[^\"]){1,300})\\\""  # JSON-escaped quotes: {\"password\": \"...\"}
          r"|\"(?P<value_dq>(?:[^\"\\\n]|\\.){1,300})\"|'(?P<value_sq>(?:[^'\\\n]|\\.){1,300})'"
          r"|\x60(?P<value_bq>[^\x60\n]{1,300})\x60|(?P<value>[^\s\"'\x60<>;,(){}\[\]][^\s\"\x60<]{3,299})"
          # a quote left open (text cut short) still has a value after it
          r"|[\"'](?P<value_open>[^\s\"'\x60<>;,(){}\[\]][^\s\"\x60<]{3,299}))")
_CONN_KEYS = r"(?:password|pwd|account[ _]?key|shared[ _]?access[ _]?key|client[ _]?secret)"

# Credentials: (detector name, pattern). Groups named ``value...``, when present, are the part replaced (the
# first that matched). Tokens whose alphabet includes "-" end at a lookahead, not at \b, which fails between a
# trailing "-" and punctuation. Earlier rules win overlaps.
_SECRETS: list[tuple[str, str]] = [
    ("private_key", r"-----BEGIN[A-Z0-9 ]{0,40}PRIVATE KEY(?: BLOCK)?-----(?:[\s\S]{0,16384}?-----END[A-Z0-9 ]{0,40}"
                    r"PRIVATE KEY(?: BLOCK)?-----|[\s\S]{0,16384}?(?=\n\s*\n)|[\s\S]{0,16384})"),
    ("aws_access_key", r"(?:AKIA|ASIA|ABIA|ACCA|AGPA|AIDA|AROA|ANPA|ANVA|AIPA)(?<!\w....)[0-9A-Z]{16}\b"),
    ("github_token",
     r"g(?:h[pousr]_(?<!\w....)[A-Za-z0-9]{36,255}|ithub_pat_(?<!\wgithub_pat_)[A-Za-z0-9_]{22,255})\b"),
    ("gitlab_token", r"gl(?<!\wgl)(?:pat|dt|rt|ptt|soat|cbt|imt|ft|agent)-[A-Za-z0-9_-]{20,}(?![A-Za-z0-9_-])"),
    ("slack_token", r"x(?<!\wx)(?:ox[abposre]|app)-(?:[A-Za-z0-9]+-){1,4}[A-Za-z0-9]+\b"),
    ("slack_webhook", r"https://hooks\.slack\.com/(?:services|workflows|triggers)/[A-Za-z0-9/_-]{20,}"),
    ("google_api_key", r"AIza(?<!\w....)[0-9A-Za-z_-]{35}(?![A-Za-z0-9_-])"),
    ("anthropic_key", r"sk-ant-(?<!\w.......)[A-Za-z0-9_-]{20,}(?![A-Za-z0-9_-])"),
    ("openai_key", r"sk-(?<!\w...)(?:proj-|svcacct-|admin-)?[A-Za-z0-9_-]{20,}(?![A-Za-z0-9_-])"),
    ("stripe_key", r"(?:[rsp]k_(?<!\w...)(?:live|test)_[0-9A-Za-z]{16,}|whsec_(?<!\w......)[0-9A-Za-z]{24,})\b"),
    ("huggingface_token", r"hf_(?<!\w...)[A-Za-z0-9]{30,}\b"),
    ("nightshift_key", r"ns-(?<!\w...)[0-9A-Za-z]{43}\b"),
    ("npm_token", r"npm_(?<!\w....)[A-Za-z0-9]{36}\b"),
    ("pypi_token", r"pypi-AgEIcHlwaS5vcmc(?<!\wpypi-AgEIcHlwaS5vcmc)[A-Za-z0-9_-]{50,}(?![A-Za-z0-9_-])"),
    ("sendgrid_key", r"SG\.(?<!\w...)[A-Za-z0-9_-]{22}\.[A-Za-z0-9_-]{43}(?![A-Za-z0-9_-])"),
    ("telegram_bot_token", r"\d(?:(?<![\w:]\d)|(?<=bot\d))\d{7,9}:[A-Za-z0-9_-]{35}(?![A-Za-z0-9_-])"),
    ("discord_bot_token",
     r"[MNO](?<!\w[MNO])[A-Za-z0-9_-]{23,25}\.[A-Za-z0-9_-]{6}\.[A-Za-z0-9_-]{27,38}(?![A-Za-z0-9_-])"),
    ("shopify_token", r"shp(?<!\wshp)(?:at|ca|pa|ss)_[a-fA-F0-9]{32}\b"),
    ("digitalocean_token", r"do(?<!\wdo)[opr]_v1_[a-f0-9]{64}\b"),
    ("square_token", r"sq0(?<!\wsq0)(?:atp|csp)-[0-9A-Za-z_-]{22,43}(?![A-Za-z0-9_-])"),
    ("twilio_key", r"(?:SK|AC)(?<!\w..)[0-9a-f]{32}\b"),
    ("mailchimp_key", r"\b[0-9a-f]{32}-us\d{1,2}\b"),
    ("databricks_token", r"dapi(?<!\wdapi)[a-f0-9]{32}(?:-\d)?\b"),
    ("age_secret_key", r"AGE-SECRET-KEY-1(?<!\wAGE-SECRET-KEY-1)[QPZRY9X8GF2TVDW0S3JN54KHCE6MUA7L]{58}\b"),
    ("jwt", r"eyJ(?<!\weyJ)[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}"),
    ("url_password", r"\b[a-z][a-z0-9+.-]{1,20}://[^\s:/@]{0,64}:(?P<value>[^\s/@]{1,128})@"),
    ("auth_header",
     r"(?i)\b(?:proxy-)?authorization[\"']?\s{0,3}[:=]\s{0,3}[\"']?(?:bearer|basic|token|digest|negotiate|apikey"
     r"|sso-key)\s+(?P<value>[^\s\"',;]{6,2000})"),
    ("bearer_token", r"[Bb](?<!\w[Bb])earer\s+(?P<value>[A-Za-z0-9._~+/-]{16,}=*)"),
    ("basic_auth", r"B(?<!\wB)asic\s+(?P<value>[A-Za-z0-9+/]{6,}={0,2})(?![A-Za-z0-9+/=])"),
    ("cli_password",
     r"\b(?:mysql|mysqldump|mysqladmin|mariadb)\b[^\n]{0,200}?\s-p(?P<value>[^\s\"'-][^\s\"']{2,127})"
     r"|\b(?:sshpass|docker\s+login|podman\s+login|helm\s+repo\s+add|htpasswd\s+-b)\b[^\n]{0,200}?\s(?:-p|--password)"
     r"(?:\s+|=)[\"']?(?P<value_cli>[^\s\"']{1,128})"
     r"|\bcurl\b[^\n]{0,300}?\s(?:-u|--user)\s+[\"']?[^\s:\"']{1,64}:(?P<value_curl>[^\s\"']{1,128})"),
    ("netrc_password", r"(?i)\bmachine\s+\S+\s+login\s+\S+\s+password\s+(?P<value>\S{1,128})"),
    ("xml_secret",
     r"(?i)<(?P<tag>[\w:.-]{0,40}(?:password|passwd|passphrase|secret|token|api_?key|access_?key)[\w.-]{0,20})\s*>"
     r"(?P<value>[^<\n]{1,300})</(?P=tag)\s*>"
     r"|\bkey\s*=\s*\"[^\"\n]{0,40}(?:password|secret|token|api_?key|connectionstring)[^\"\n]{0,20}\"\s+value\s*=\s*"
     r"\"(?P<value_attr>[^\"\n]{1,300})\""),
    ("connection_string",
     # A value runs to the next ";" in a connection string: after a ";", to a ";", a quote or the line's end;
     # elsewhere only when a ";" closes it. ODBC braces quote a value holding ";".
     rf"(?im)(?<=;)\s*{_CONN_KEYS}\s*=\s*(?:\{{(?P<value_br>[^}}\n]{{1,300}})\}}|(?P<value>[^;\n\"']{{1,300}}?))"
     rf"\s*(?=;|[\"']|$)"
     rf"|(?<![\w.-]){_CONN_KEYS}\s*=\s*(?:\{{(?P<value_br2>[^}}\n]{{1,300}})\}}|(?P<value2>[^;\n\"']{{1,300}}?))"
     r"\s*(?=;)"),
    ("url_query_secret",
     r"(?i)[?&;](?:[\w.-]{0,30}[_.-])?(?:sig|signature|token|access_token|id_token|refresh_token|api_?key|key|secret"
     r"|client_secret|password|passwd|pwd|auth|code|session|sessionid|sid|otp|nonce|csrf|reset|x-amz-signature|x-amz-credential|x-amz-security-token"
     r"|x-goog-signature|x-goog-credential)=(?P<value>[^&\s#\"'<>]{6,2000})"),
    ("yaml_block_password",
     # A YAML block scalar (password: |, >-) under a password key: the value is the indented lines below it.
     r"(?im)^[ \t]*[\w.-]{0,40}?(?:pass(?:word|wd|phrase)|pwd|secret|token)[\"']?[ \t]{0,3}:[ \t]{0,3}"
     r"[|>][+-]?\d?[ \t]*\r?\n"
     r"[ \t]{1,40}(?P<value>\S[^\n]{0,300}(?:\n[ \t]{1,40}\S[^\n]{0,300}){0,19})"),
    ("html_attribute",
     # <input name="api_key" value="...">, <meta name="csrf-token" content="...">: the value of a named secret.
     rf"(?i)<[a-z][\w-]{{0,20}}\s[^<>]{{0,200}}?\b(?:name|id|property)\s{{0,3}}=\s{{0,3}}[\"']?(?P<key>[\w.:-]{{0,40}}?"
     rf"(?:{_LONG_KEYS}|csrf|xsrf|session)[\w.:-]{{0,20}})[\"']?[^<>]{{0,200}}?\b(?:value|content)\s{{0,3}}=\s{{0,3}}"
     r"[\"'](?P<value>[^\"'<>\n]{1,300})[\"']"),
    ("cookie",
     # The first pair of a Cookie or Set-Cookie header is a session; later ones are found by url_query_secret.
     r"(?i)(?<![\w-])(?:set-)?cookie\s{0,3}:\s{0,3}[^\s=;]{1,64}=(?P<value>[^;\s\"',]{1,4096})"),
    ("uuid_api_key",
     # Heroku's API keys are UUIDs: one under an API-key or token keyword, whatever the separator.
     r"(?i)\b(?:api|auth|access|secret)[ _.-]?(?:key|token)[\"']?\s{0,3}[:=]\s{0,3}[\"']?"
     r"(?P<value>[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})(?![\w-])"),
    ("config_password",
     # A YAML or INI line under a password key: the unquoted value is the rest of the line (a passphrase).
     r"(?im)^[ \t]*[\w.-]{0,40}?(?P<key>pass(?:word|wd|phrase)|pwd)[\"']?[ \t]*[:=][ \t]*"
     r"(?P<value>[^\s\"'#|>][^\n#]{0,200}?)[ \t]*(?:#.*)?$"),
    # SQL: CREATE/ALTER ROLE ... PASSWORD 'x', CREATE USER ... IDENTIFIED BY 'x'.
    ("sql_password", r"(?i)\b(?:PASSWORD|IDENTIFIED\s+BY)\s+(?P<q>['\"])(?P<value>[^'\"\n]{1,200})(?P=q)"),
    ("password_assignment", rf"(?i){_KEY}{_ASSIGN}{_VALUE}"),
]

_AT = r"(?:@|%40|\\u0040|&#0*64;|&#[xX]0*40;|&commat;|\s?[\[({](?i:at)[\])}]\s?)"
_DOT = r"(?:\.|%2[eE]|&#0*46;|&#[xX]0*2[eE];|&period;|\s?[\[({](?i:dot)[\])}]\s?)"
# Local parts and domains may hold any letters (jürgen.müller@bücher.de); the @ may be URL- or HTML-encoded.
# The local part starts a token (lookbehind): a long run of name characters is not retried from each of them.
_EMAIL = (rf"[\w%+-](?<![\w.%+-][\w%+-])(?:(?:[\w.%+'-]|&#0*46;){{0,62}}[\w%+-])?{_AT}"
          rf"(?:[^\W_](?:[\w-]{{0,61}}[^\W_])?{_DOT}){{1,8}}"
          r"(?:[^\W\d_]{2,24}|xn--[a-z0-9-]{1,59})(?![\w-])")
# Numeric patterns start with a character class (the regex engine then skips ahead quickly) and check the
# character before the match with a lookbehind placed after the first character.
# International (+CC ...) and national (0.. or NANP) numbers with separators; digits are counted afterwards.
_PHONE = (r"[+(\d](?<![\w.+-][+(\d])(?:(?<=\+)\d{0,2}[\s.-]?(?:\(\d{1,4}\)[\s.-]?)?\d{1,4}(?:[\s.-]?\d{2,4}){1,4}"
          r"|(?<=\()\d{3}\)\s?\d{3}[\s.-]\d{4}"
          r"|(?<=\d)\d{2}[\s.]\d{3}[\s.]\d{4}"
          r"|(?<=\d)\d{2}-\d{3}-\d{4}"
          r"|(?<=0)\d{1,4}[\s.-]\d{3,4}[\s.-]?\d{3,4})(?![\w.-]?\d)")
# Exactly four octets: neither preceded nor followed by ".digit" (OIDs, five-part versions).
_IPV4 = r"\d(?<![\w.]\d)\d{0,2}(?:\.\d{1,3}){3}(?![\w]|\.\d)"
_IPV6 = r"[0-9A-Fa-f:](?<![\w:.][0-9A-Fa-f:])[0-9A-Fa-f:]{1,38}(?<=[0-9A-Fa-f:])(?![\w:])"
_CARD = r"\d(?<![\w.-]\d)(?:[ -]?\d){12,18}(?![\w]|[.-]\d)"
_IBAN = r"[A-Z](?<![\w][A-Z])[A-Z]\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,4})?\b"

_KINDS: list[tuple[str, str, str]] = (
    [("secret", name, pattern) for name, pattern in _SECRETS]
    + [("email", "email", _EMAIL), ("iban", "iban", _IBAN), ("credit_card", "credit_card", _CARD),
       ("ip_address", "ipv6", _IPV6), ("ip_address", "ipv4", _IPV4), ("phone", "phone", _PHONE)]
)

# Invisible characters that split a word without showing: matched as if absent.
_ZERO_WIDTH = re.compile("[\u200b\u200c\u200d\u2060\ufeff\u00ad\u180e]")
# What scrubbing leaves behind (a placeholder, in identifiers with a keyed hash): never a finding again.
_PLACEHOLDER = re.compile(r"<(?:EMAIL|PHONE|IP_ADDRESS|CREDIT_CARD|IBAN|SECRET)>(?:-[0-9a-f]{12})?")


@dataclass(frozen=True)
class Finding:
    kind: str
    """The placeholder type: email, phone, ip_address, credit_card, iban or secret."""
    detector: str
    """Which rule matched (``aws_access_key``, ``ipv4``...)."""
    start: int
    end: int


class Scrubber:
    """Finds and replaces the kinds of personal data a recipe names."""

    def __init__(self, kinds: Iterable[str] = tuple(PLACEHOLDERS)) -> None:
        self.kinds = tuple(kinds)
        self._rules = [(kind, name, re.compile(pattern)) for kind, name, pattern in _KINDS if kind in self.kinds]

    def find(self, text: str) -> list[Finding]:
        """Return non-overlapping findings in text order; earlier rules (credentials first) win overlaps."""
        folded, start_of, end_of = _fold(text)
        if folded is text:
            return self._find(text)
        # Match on the folded text, then map each span back onto the original characters.
        return [Finding(f.kind, f.detector, start_of(f.start), end_of(f.end)) for f in self._find(folded)]

    def _find(self, text: str) -> list[Finding]:
        taken: list[Finding] = []
        starts: list[int] = []  # of taken, sorted: an overlap test is a bisection, not a scan of every finding
        lowered = text.lower()
        for kind, name, rule in self._rules:
            if not _may_contain(kind, name, text, lowered):
                continue
            anchor = _ANCHORS.get(name)
            for match in rule.finditer(text) if anchor is None else _windows(rule, anchor, text):
                start, end = _value_span(match, name in _TRIMMED)
                if not _valid(name, match, text, start, end):
                    continue
                at = bisect.bisect_left(starts, end)
                if at and taken[at - 1].end > start:
                    continue
                starts.insert(at, start)
                taken.insert(at, Finding(kind, name, start, end))
        return taken

    def replace(self, text: str, replacement: Callable[[Finding, str], str]) -> tuple[str, Counter[str]]:
        """Return the text with each finding replaced by ``replacement(finding, original)``, and the count per kind."""
        findings = self.find(text)
        if not findings:
            return text, Counter()
        out, pos = [], 0
        for f in findings:
            out.append(text[pos:f.start])
            out.append(replacement(f, text[f.start:f.end]))
            pos = f.end
        out.append(text[pos:])
        return "".join(out), Counter(f.kind for f in findings)

    def scrub(self, text: str) -> tuple[str, Counter[str]]:
        """Return the text with every finding replaced by its placeholder, and the count per kind."""
        return self.replace(text, lambda f, _: PLACEHOLDERS[f.kind])


def scrub_identifier(value: str, key: bytes, scrubber: Scrubber | None = None) -> str:
    """Return ``value`` with each finding replaced by its placeholder and a keyed hash of what it replaced.

    ``crm/export.jsonl#jane@example.org`` becomes ``crm/export.jsonl#<EMAIL>-1f0c...``: stable from night to
    night and distinct per address, but not reversible by hashing a list of guesses without the key.
    """
    def keyed(finding: Finding, original: str) -> str:
        digest = hmac.new(key, original.encode("utf-8", "surrogatepass"), hashlib.sha256).hexdigest()[:12]
        return f"{PLACEHOLDERS[finding.kind]}-{digest}"

    return (scrubber or _FULL).replace(value, keyed)[0]


def identifier_key(path: Path) -> bytes:
    """Return this installation's key for identifier hashes, creating it once (0600) when absent."""
    try:
        return bytes.fromhex(path.read_text().strip())
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(secrets.token_hex(32))
    try:
        os.link(tmp, path)  # never replaces a key another process created first: both then read the same one
    except FileExistsError:
        pass
    finally:
        tmp.unlink()
    return bytes.fromhex(path.read_text().strip())


def _fold(text: str) -> tuple[str, Callable[[int], int], Callable[[int], int]]:
    """Return the text as matched, and maps of a match's start and end back onto ``text``.

    Compatibility forms (fullwidth ｐａｓｓｗｏｒｄ＝, ＠, ．) are matched as the ASCII they fold to under NFKC; only
    one-character folds are used, so positions hold. Zero-width characters are matched as if absent. Look-alike
    letters of other scripts (Cyrillic а for a) are not folded: that needs a confusables table.
    """
    if text.isascii():
        return text, _same, _same
    table = {ord(ch): folded for ch in set(text) if not ch.isascii() and (folded := _compat(ch)) is not None}
    folded = text.translate(table) if table else text
    if _ZERO_WIDTH.search(folded) is None:
        return folded, _same, _same
    kept = [i for i, ch in enumerate(folded) if not _ZERO_WIDTH.match(ch)]
    return "".join(folded[i] for i in kept), kept.__getitem__, lambda end: kept[end - 1] + 1


def _same(position: int) -> int:
    return position


@functools.lru_cache(maxsize=4096)
def _compat(ch: str) -> str | None:
    """Return the one ASCII character a wide, narrow or styled compatibility form folds to, else None."""
    if not unicodedata.decomposition(ch).startswith(("<wide>", "<narrow>", "<font>", "<small>")):
        return None
    folded = unicodedata.normalize("NFKC", ch)
    return folded if len(folded) == 1 and folded.isascii() else None


def _value_span(match: re.Match[str], trim: bool = False) -> tuple[int, int]:
    """Return the span of the first ``value`` group that matched (else the whole match); an unquoted value of a
    free-text rule loses trailing punctuation ("the password is hunter2.")."""
    for name, value in match.groupdict().items():
        if value is not None and name.startswith("value"):
            start, end = match.span(name)
            if trim and name == "value":
                end = start + len(value.rstrip(_TRAILING))
            return start, end
    return match.span()


def _windows(rule: re.Pattern[str], anchor: tuple[re.Pattern[str], int, int], text: str) -> Iterator[re.Match[str]]:
    """Yield the rule's matches within windows around the anchor's hits, merged where they overlap.

    Rules that may start at almost any word (an e-mail's local part, a key's prefix) cost a backtracking attempt
    at each; their anchor (the @, the key word) is rare, and a window is wider than the longest match.
    """
    pattern, back, ahead = anchor
    if ahead == 0:
        yield from _at_names(rule, pattern, back, text)
        return
    lo = hi = -1
    for hit in pattern.finditer(text):
        start, end = max(0, hit.start() - back), min(len(text), hit.end() + ahead)
        if start <= hi:
            hi = max(hi, end)
            continue
        if hi >= 0:
            yield from rule.finditer(text, lo, hi)
        lo, hi = start, end
    if hi >= 0:
        yield from rule.finditer(text, lo, hi)


def _may_contain(kind: str, name: str, text: str, lowered: str) -> bool:
    """Cheap pre-checks that skip a rule's scan over text that cannot match it."""
    if kind == "email":
        return _EMAIL_HINT.search(text) is not None
    if kind == "ip_address" and name == "ipv6":
        return "::" in text or text.count(":") >= 7
    if kind == "secret":
        hints = _SECRET_HINTS.get(name)
        if hints is not None:
            haystack = lowered if name in _CASELESS_HINTS else text
            return any(h in haystack for h in hints)
    return True


_EMAIL_HINT = re.compile(r"@|%40|\\u0040|&commat;|&#[xX]?0*(?:64|40);|(?i:[\[({]at[\])}])")
_KEY_HINT = re.compile(r"(?i)pass|pwd|pw|secret|token|key|auth|sig|credential")
# (anchor, characters before its hit, characters after) for rules scanned in windows; the windows exceed the
# longest match a rule can make, so the result is the same as a scan of the whole text. With 0 after, the rule
# is tried once at the start of the name that holds each hit.
_ANCHORS: dict[str, tuple[re.Pattern[str], int, int]] = {
    "email": (_EMAIL_HINT, 72, 720), "password_assignment": (_KEY_HINT, 48, 0),
    "config_password": (re.compile(r"(?i)pass|pwd"), 120, 260),
    "connection_string": (re.compile(r"(?i)password|pwd|key|secret"), 64, 360),
    "url_password": (re.compile("://"), 24, 200), "auth_header": (re.compile("(?i)authori"), 8, 2100),
    "discord_bot_token": (re.compile(r"\.[A-Za-z0-9_-]{6}\."), 27, 40), "mailchimp_key": (re.compile(r"-us\d"), 34, 4),
}
def _at_names(rule: re.Pattern[str], pattern: re.Pattern[str], back: int, text: str) -> Iterator[re.Match[str]]:
    """Yield the rule's match at the start of each name (a run of word characters, "." and "-") holding a hit."""
    tried = set()
    for hit in pattern.finditer(text):
        start = hit.start()
        while start > 0 and hit.start() - start < back and (text[start - 1].isalnum() or text[start - 1] in "_.-"):
            start -= 1
        if start not in tried:
            tried.add(start)
            match = rule.match(text, start)
            if match:
                yield match


_TRIMMED = {"password_assignment", "config_password", "url_query_secret"}
# Trailing characters of an unquoted value that end a sentence or a bracket, not a password ("Winter2024!" keeps "!").
_TRAILING = ".,;:'\")]}"
# Literal text every match of a credential rule contains: a rule whose hints are absent is not run.
_SECRET_HINTS: dict[str, tuple[str, ...]] = {
    "private_key": ("PRIVATE KEY",), "aws_access_key": ("AKIA", "ASIA", "ABIA", "ACCA", "AGPA", "AIDA", "AROA",
                                                        "ANPA", "ANVA", "AIPA"),
    "github_token": ("ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_"), "gitlab_token": ("gl",),
    "slack_token": ("xox", "xapp-"),
    "slack_webhook": ("hooks.slack.com",), "google_api_key": ("AIza",), "openai_key": ("sk-",),
    "anthropic_key": ("sk-ant-",), "stripe_key": ("k_live_", "k_test_", "whsec_"), "huggingface_token": ("hf_",),
    "nightshift_key": ("ns-",), "npm_token": ("npm_",), "pypi_token": ("pypi-",), "sendgrid_key": ("SG.",),
    "telegram_bot_token": (":",), "discord_bot_token": (".",), "shopify_token": ("shp",),
    "digitalocean_token": ("_v1_",), "square_token": ("sq0",), "twilio_key": ("SK", "AC"),
    "mailchimp_key": ("-us",), "databricks_token": ("dapi",), "age_secret_key": ("AGE-SECRET-KEY-",),
    "jwt": ("eyJ",), "url_password": ("://",), "auth_header": ("authorization",), "bearer_token": ("earer",),
    "basic_auth": ("Basic",), "cli_password": ("mysql", "mariadb", "sshpass", "login", "helm", "htpasswd", "curl"),
    "netrc_password": ("machine",), "sql_password": ("password", "identified"), "xml_secret": ("</", "value"),
    "connection_string": ("=",),
    "url_query_secret": ("=",), "config_password": ("pass", "pwd"),
    "yaml_block_password": ("pass", "pwd", "secret", "token"), "html_attribute": ("value", "content"),
    "cookie": ("cookie",), "uuid_api_key": ("key", "token"),
    "password_assignment": ("pass", "pwd", "pw", "secret", "token", "key", "auth", "sig", "credential"),
}
_CASELESS_HINTS = {"sql_password", "yaml_block_password", "html_attribute", "cookie", "uuid_api_key", "auth_header",
                   "netrc_password", "xml_secret", "password_assignment", "config_password"}

_IMAGE_SUFFIXES = {"png", "jpg", "jpeg", "gif", "svg", "webp", "ico", "bmp", "tif", "tiff", "avif"}
# Words a few words before four dotted numbers that make them a version, an OID or a section; words and suffixes
# that make them an address.
_VERSION_CONTEXT = re.compile(
    r"(?i)(?:\bv|(?:\b(?:versions?|ver|releases?|released|build|rev|revision|firmware|fw|oid|section|sect|sec|chapter|ch"
    r"|clause|rule|step|table|figure|fig|patch|tag)\b|§)(?:[^\w\n]{1,3}\w{1,15}){0,2}[^\w\n]{0,3})$")
_ADDRESS_CONTEXT = re.compile(
    r"(?i)\b(?:ip|ipv4|ips|addr|address|addresses|host|hostname|server|servers|at|from|to|ping|dns|nameserver|resolver"
    r"|connect|connecting|connected|gateway|gw|client|remote|peer|via|proxy|route|src|dst|source|destination|inet"
    r"|listen|listening|bind|upstream|endpoint|node|router)\b[^\w\n]{0,3}$")
_ADDRESS_AFTER = re.compile(r":\d|/\d")
_PASSWORD_KEY = re.compile(r"(?i)pass|pwd|pw(?![a-z])|secret")


def _valid(name: str, match: re.Match[str], text: str, start: int, end: int) -> bool:
    value = text[start:end]
    if name == "credit_card":
        digits = re.sub(r"\D", "", value)
        return 13 <= len(digits) <= 19 and digits[0] in "23456" and _luhn(digits) and len(set(digits)) > 1
    if name == "iban":
        return _iban_ok(value.replace(" ", ""))
    if name == "phone":
        digits = re.sub(r"\D", "", value)
        return 9 <= len(digits) <= 15 and len(set(digits)) > 2
    if name == "ipv4":
        return _ipv4_ok(value, text[max(0, start - 40):start], text[end:end + 3])
    if name == "ipv6":
        if value.count(":") < 2 or len(value) < 3 or ("::" not in value and value.count(":") != 7):
            return False
        try:
            address = ipaddress.IPv6Address(value)
        except ValueError:
            return False
        return not (address.is_loopback or address.is_unspecified)
    if name == "email":
        return _PLACEHOLDER.search(value) is None and value.rsplit(".", 1)[-1].lower() not in _IMAGE_SUFFIXES
    if name in ("password_assignment", "config_password", "html_attribute"):
        key = match.group("key")
        if re.search(r"(?i)public|publishable", key) or PASSWORD_SETTING.search(key):
            return False  # PublicKeyToken=b77a5c561934e089 is published on purpose; password_encryption is a setting
        password = bool(_PASSWORD_KEY.search(key))
        plain = value.strip().strip("\"'")
        if (password and re.search(r"[=:]", match.group(0)[len(key):]) and _WORDS.fullmatch(plain)
                and len(plain) >= 4 and plain.lower() not in _NOT_PASSWORDS):
            return True  # password=foopass, passwd = "secret": under a password key a word is a password
        return _credential_like(value, password)
    if name == "auth_header":
        # After "Authorization: Bearer" (or Basic, Token, ...) the value is a credential by its place, however
        # plain it looks ("shorttok"); only a reference or a placeholder is left: $TOKEN, <token>, YOUR_API_KEY.
        # A reference reads as one whole ($TOKEN, ~/token.txt, /run/secrets/api, https://...): a "/" in or at the
        # start of a token (base64 has them: /9j4AAQ...) does not make it one, nor capitals with digits a name.
        return not (_PLACEHOLDER.search(value) or _TEMPLATE.search(value) or _AUTH_REFERENCE.fullmatch(value)
                    or len(set(value)) == 1 or re.fullmatch(r"[A-Z]+(?:_[A-Z0-9]+)*|(?i:token|secret|key|apikey"
                                                              r"|api_key|password|redacted|x+|\.+)", value))
    if name in ("bearer_token", "url_query_secret", "xml_secret"):
        return _credential_like(value, name == "xml_secret" and bool(_PASSWORD_KEY.search(match.group(0)[:60])))
    if name == "basic_auth":
        return _basic_credentials(value)
    if name in ("url_password", "connection_string", "cli_password", "netrc_password", "yaml_block_password", "cookie",
                "sql_password"):
        # The context alone says it is a password: only what is clearly not one (a placeholder) is left alone.
        return not (_PLACEHOLDER.search(value) or _TEMPLATE.search(value) or len(set(value)) == 1)
    return True


def _ipv4_ok(value: str, before: str, after: str) -> bool:
    """Return whether four dotted numbers are an address, by their context: not a version (2.4.1.3, v10.0.0.1,
    ``Version=4.0.0.0``), an OID or a section number, nor loopback, reserved or multicast."""
    if _VERSION_CONTEXT.search(before):
        return False
    if not (_ADDRESS_AFTER.match(after) or _ADDRESS_CONTEXT.search(before)):
        # Without context, four one-digit parts (2.4.1.3) read as a version, and 1.x or 2.x with a one-digit x as
        # an OID (2.5.4.33, X.500's arcs); a longer part (10.0.0.1) as an address.
        octets = value.split(".")
        if all(len(octet) == 1 for octet in octets) or (octets[0] in ("1", "2") and len(octets[1]) == 1):
            return False
    try:
        address = ipaddress.IPv4Address(value)
    except ValueError:
        return False
    return not (value.startswith("0.") or address.is_loopback or address.is_reserved or address.is_multicast)


# A value that names a credential instead of holding it: templates, environment variables, calls, YAML tags and
# anchors, URLs and paths.
_TEMPLATE = re.compile(r"\$\{|\$\(|\{\{|\{%|%\(|<[^<>\s]{1,40}>")
_REFERENCE = re.compile(r"\$[A-Z_][A-Z0-9_]*$|%\w+%$|\[[^\]\s]{1,40}\]$|\{[\w.-]{1,40}\}$|![A-Za-z]+$"
                        r"|[&*][A-Za-z_][\w-]*$|[A-Za-z_][\w.]*[(\[]|[a-z][a-z0-9+.-]*://|\.{0,2}/|~/")
# A value after "Authorization: Bearer" that names where the credential is rather than holding it: a variable,
# a call, a URL, or a path that reads as one (two parts or more, or a file name with an extension).
_AUTH_REFERENCE = re.compile(r"\$[A-Za-z_]\w*|\$\{[^}]{1,60}\}|%\w+%|\{[\w.-]{1,40}\}|\[[^\]\s]{1,40}\]|![A-Za-z]+"
                             r"|[&*][A-Za-z_][\w-]*|[A-Za-z_][\w.]*\(.{0,80}\)|[a-z][a-z0-9+.-]*://\S+"
                             r"|(?:~|\.{1,2})?/(?:[\w.-]+/)+[\w.-]+|(?:~|\.{1,2})?/[\w-]+\.[A-Za-z]{1,5}|~/[\w.-]+")
_WORDS = re.compile(r"[^\W\d_]+(?:[_.:/-][^\W\d_]+)*")
_VERSION = re.compile(r"[vV]?\d+(?:\.\d+)+(?:[-+][\w.]+)?")


# Keys that configure passwords rather than hold one (password_encryption = 'scram-sha-256').
PASSWORD_SETTING = re.compile(
    r"(?i)(?:passw(?:or)?d|pwd|passphrase)[_.-]?(?:encryption|required|policy|file|length|expir\w*|method|type|hash\w*"
    r"|algorithm|reset|prompt|check|min\w*|max\w*|format|auth\w*|change\w*|history|strength|complexity|rules?|hint"
    r"|field|label|placeholder|command|cmd|store|manager|less|protected|enabled|disabled|set)\b")
# Words that say something of a password field rather than being one.
_NOT_PASSWORDS = frozenset({"true", "false", "null", "none", "nil", "yes", "no", "required", "optional", "empty",
                            "unset", "enabled", "disabled", "hidden", "text", "string", "password"})


def _credential_like(value: str, password: bool) -> bool:
    """Return whether an assigned value looks like a credential, not a word, an identifier or a reference.

    As gitleaks' generic-api-key rule: words and identifiers (``budget``, ``accessToken``, ``db-credentials``)
    are not credentials; a value with digits or symbols, or letters as random as a key's, is. A quoted phrase
    is a passphrase under a password key, unless it names the field (``"Enter your password"``).
    """
    v = value.strip()
    if len(v) < 4 or len(set(v)) == 1 or _PLACEHOLDER.search(v) or _TEMPLATE.search(v) or _REFERENCE.match(v):
        return False
    if any(ch.isspace() for ch in v):
        return password and re.search(r"(?i)pass(?:word|phrase)", v) is None
    if not any(ch.isalpha() for ch in v):
        return password
    if _VERSION.fullmatch(v):
        return False
    if _WORDS.fullmatch(v):
        letters = [ch for ch in v if ch.isalpha()]
        switches = sum(a.isupper() != b.isupper() for a, b in zip(letters, letters[1:], strict=False))
        return len(letters) >= 16 and switches >= len(letters) / 4
    return True


def _basic_credentials(value: str) -> bool:
    """Return whether a Basic token decodes to ``user:password`` (so "Basic training" stays prose)."""
    try:
        decoded = base64.b64decode(value + "=" * (-len(value) % 4), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return False
    return ":" in decoded and decoded.isprintable()


def _luhn(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


_IBAN_LENGTHS = {
    "AD": 24, "AE": 23, "AT": 20, "BA": 20, "BE": 16, "BG": 22, "BH": 22, "BR": 29, "CH": 21, "CY": 28, "CZ": 24,
    "DE": 22, "DK": 18, "EE": 20, "ES": 24, "FI": 18, "FO": 18, "FR": 27, "GB": 22, "GI": 23, "GL": 18, "GR": 27,
    "HR": 21, "HU": 28, "IE": 22, "IL": 23, "IS": 26, "IT": 27, "KW": 30, "KZ": 20, "LB": 28, "LI": 21, "LT": 20,
    "LU": 20, "LV": 21, "MC": 27, "ME": 22, "MK": 19, "MT": 31, "MU": 30, "NL": 18, "NO": 15, "PL": 28, "PT": 25,
    "RO": 24, "RS": 22, "SA": 24, "SE": 24, "SI": 19, "SK": 24, "SM": 27, "TN": 24, "TR": 26, "UA": 29,
}


def _iban_ok(iban: str) -> bool:
    if _IBAN_LENGTHS.get(iban[:2]) != len(iban):
        return False
    moved = iban[4:] + iban[:4]
    return int("".join(str(int(ch, 36)) for ch in moved)) % 97 == 1


_FULL = Scrubber()


# ---------------------------------------------------------------------------------------------------------------
# The recipe step.

PII_TYPES = ("email", "phone", "ip_address", "credit_card", "iban", "secret")


@dataclass(frozen=True)
class Pii:
    """Scrub personal data and credentials, replacing each find by a typed placeholder such as ``<EMAIL>``."""

    types: tuple[str, ...] = PII_TYPES
    """Kinds to scrub: email, phone, ip_address, credit_card (Luhn-checked), iban (mod-97), secret (credentials)."""

    def check(self, where: str) -> None:
        unknown = sorted(set(self.types) - set(PII_TYPES))
        if unknown or not self.types:
            raise RecipeError(f"{where}.types must be a non-empty subset of {list(PII_TYPES)}; unknown {unknown}")


class PiiStep(PrepStep):
    """Replace every find of the configured kinds by its placeholder; count the finds per kind, never keep them."""

    name = "pii"
    Config = Pii

    def __init__(self, config: Pii) -> None:
        super().__init__(config)
        self.scrubber = Scrubber(config.types)

    def decide(self, doc: Candidate) -> str | None:
        doc.text, counts = self.scrubber.scrub(doc.text)
        doc.outcome.pii = dict(sorted(counts.items()))
        return None
