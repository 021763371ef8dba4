"""Find and scrub personal data and credentials, replacing each by a typed placeholder (``<EMAIL>``).

Patterns are regular expressions with checks that regexes cannot do (Luhn for payment cards, ISO 13616
mod-97 for IBANs, ``ipaddress`` for IP addresses), so ordinary numbers, versions and dates survive.
Credential patterns follow detect-secrets' and gitleaks' rules for the same providers. Presidio would need a
spaCy model that is not on PyPI; detect-secrets scans files line by line and reports, it does not replace.

``find`` is also the second pass: the quality suite runs it over the versioned corpus, where it must find
nothing.
"""

from __future__ import annotations

import ipaddress
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

PLACEHOLDERS = {
    "email": "<EMAIL>", "phone": "<PHONE>", "ip_address": "<IP_ADDRESS>", "credit_card": "<CREDIT_CARD>",
    "iban": "<IBAN>", "secret": "<SECRET>",
}

# Credentials: (detector name, pattern). Group "value", when present, is the part replaced. Tokens whose
# alphabet includes "-" end at a lookahead, not at \b, which fails between a trailing "-" and punctuation.
_SECRETS: list[tuple[str, str]] = [
    ("private_key", r"-----BEGIN[A-Z0-9 ]{0,40}PRIVATE KEY(?: BLOCK)?-----(?:[\s\S]{0,16384}?-----END[A-Z0-9 ]{0,40}"
                    r"PRIVATE KEY(?: BLOCK)?-----|[\s\S]{0,16384}?(?=\n\s*\n)|[\s\S]{0,16384})"),
    ("aws_access_key", r"\b(?:AKIA|ASIA|ABIA|ACCA|AGPA|AIDA|AROA|ANPA|ANVA|AIPA)[0-9A-Z]{16}\b"),
    ("github_token", r"\b(?:gh[pousr]_[A-Za-z0-9]{36,255}|github_pat_[A-Za-z0-9_]{22,255})\b"),
    ("gitlab_token", r"\bglpat-[A-Za-z0-9_-]{20,}(?![A-Za-z0-9_-])"),
    ("slack_token", r"\bxox[abposr]-(?:[A-Za-z0-9]+-){1,4}[A-Za-z0-9]+\b"),
    ("slack_webhook", r"https://hooks\.slack\.com/services/[A-Za-z0-9/_-]{20,}"),
    ("google_api_key", r"\bAIza[0-9A-Za-z_-]{35}(?![A-Za-z0-9_-])"),
    ("openai_key", r"\bsk-(?:proj-|svcacct-|admin-)?[A-Za-z0-9_-]{20,}(?![A-Za-z0-9_-])"),
    ("anthropic_key", r"\bsk-ant-[A-Za-z0-9_-]{20,}(?![A-Za-z0-9_-])"),
    ("stripe_key", r"\b[rsp]k_(?:live|test)_[0-9A-Za-z]{16,}\b"),
    ("huggingface_token", r"\bhf_[A-Za-z0-9]{30,}\b"),
    ("nightshift_key", r"\bns-[0-9A-Za-z]{43}\b"),
    ("jwt", r"\beyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}"),
    ("url_password", r"\b[a-z][a-z0-9+.-]{1,20}://[^\s:/@]{1,64}:(?P<value>[^\s/@]{1,128})@"),
    ("password_assignment",
     # DB_PASSWORD=..., "apiKey": "...", client_secret: ... (a prefix joined by _ or - is allowed)
     r"(?i)\b(?:[a-z0-9]+[_-])*(?:password|passwd|pwd|pass|secret|token|api[_-]?key|apikey|access[_-]?key"
     r"|secret[_-]?key|client[_-]?secret|auth[_-]?token|aws_secret_access_key)\b[\"']?\s*(?:=|:|=>)\s*[\"']?"
     r"(?P<value>[^\s\"',;]{6,200})"),
]

# Numeric patterns start with a character class (the regex engine then skips ahead quickly) and check the
# character before the match with a lookbehind placed after the first character.
_EMAIL = r"[A-Za-z0-9._%+-]{1,64}@(?:[A-Za-z0-9-]{1,63}\.){1,8}[A-Za-z]{2,24}\b"
# International (+CC ...) and national (0.. or NANP) numbers with separators; digits are counted afterwards.
_PHONE = (r"[+(\d](?<![\w.+-][+(\d])(?:(?<=\+)\d{0,2}[\s.-]?(?:\(\d{1,4}\)[\s.-]?)?\d{1,4}(?:[\s.-]?\d{2,4}){1,4}"
          r"|(?<=\()\d{3}\)\s?\d{3}[\s.-]\d{4}"
          r"|(?<=\d)\d{2}[\s.]\d{3}[\s.]\d{4}"
          r"|(?<=\d)\d{2}-\d{3}-\d{4}"
          r"|(?<=0)\d{1,4}[\s.-]\d{3,4}[\s.-]?\d{3,4})(?![\w.-]?\d)")
_IPV4 = r"\d(?<![\w.]\d)\d{0,2}(?:\.\d{1,3}){3}(?![\w]|\.\d)"
_IPV6 = r"[0-9A-Fa-f:](?<![\w:.][0-9A-Fa-f:])[0-9A-Fa-f:]{1,38}(?<=[0-9A-Fa-f:])(?![\w:])"
_CARD = r"\d(?<![\w.-]\d)(?:[ -]?\d){12,18}(?![\w]|[.-]\d)"
_IBAN = r"[A-Z](?<![\w][A-Z])[A-Z]\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,4})?\b"

_KINDS: list[tuple[str, str, str]] = (
    [("secret", name, pattern) for name, pattern in _SECRETS]
    + [("email", "email", _EMAIL), ("iban", "iban", _IBAN), ("credit_card", "credit_card", _CARD),
       ("ip_address", "ipv6", _IPV6), ("ip_address", "ipv4", _IPV4), ("phone", "phone", _PHONE)]
)


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
        taken: list[Finding] = []
        for kind, name, rule in self._rules:
            if not _may_contain(kind, name, text):
                continue
            for match in rule.finditer(text):
                start, end = match.span("value") if "value" in rule.groupindex else match.span()
                if not _valid(name, text[start:end]):
                    continue
                if any(start < f.end and f.start < end for f in taken):
                    continue
                taken.append(Finding(kind, name, start, end))
        return sorted(taken, key=lambda f: f.start)

    def scrub(self, text: str) -> tuple[str, Counter[str]]:
        """Return the text with every finding replaced by its placeholder, and the count per kind."""
        findings = self.find(text)
        if not findings:
            return text, Counter()
        out, pos = [], 0
        for f in findings:
            out.append(text[pos:f.start])
            out.append(PLACEHOLDERS[f.kind])
            pos = f.end
        out.append(text[pos:])
        return "".join(out), Counter(f.kind for f in findings)


def _may_contain(kind: str, name: str, text: str) -> bool:
    """Cheap pre-checks that skip a rule's scan over text that cannot match it."""
    if kind == "email":
        return "@" in text
    if kind == "ip_address" and name == "ipv6":
        return "::" in text or text.count(":") >= 7
    if kind == "secret":
        hints = _SECRET_HINTS.get(name)
        if hints is not None:
            lowered = text.lower() if name == "password_assignment" else text
            return any(h in lowered for h in hints)
    return True


# Literal text every match of a credential rule contains: a rule whose hints are absent is not run.
_SECRET_HINTS: dict[str, tuple[str, ...]] = {
    "private_key": ("PRIVATE KEY",), "aws_access_key": ("AKIA", "ASIA", "ABIA", "ACCA", "AGPA", "AIDA", "AROA",
                                                        "ANPA", "ANVA", "AIPA"),
    "github_token": ("gh", "github_pat_"), "gitlab_token": ("glpat-",), "slack_token": ("xox",),
    "slack_webhook": ("hooks.slack.com",), "google_api_key": ("AIza",), "openai_key": ("sk-",),
    "anthropic_key": ("sk-ant-",), "stripe_key": ("k_live_", "k_test_"), "huggingface_token": ("hf_",),
    "nightshift_key": ("ns-",), "jwt": ("eyJ",), "url_password": ("://",),
    "password_assignment": ("pass", "pwd", "secret", "token", "key"),
}


def _valid(name: str, value: str) -> bool:
    if name == "credit_card":
        digits = re.sub(r"\D", "", value)
        return 13 <= len(digits) <= 19 and digits[0] in "23456" and _luhn(digits) and len(set(digits)) > 1
    if name == "iban":
        return _iban_ok(value.replace(" ", ""))
    if name == "phone":
        digits = re.sub(r"\D", "", value)
        return 9 <= len(digits) <= 15 and len(set(digits)) > 2
    if name == "ipv4":
        try:
            return ipaddress.IPv4Address(value) is not None and not value.startswith("0.")
        except ValueError:
            return False
    if name == "ipv6":
        if value.count(":") < 2 or len(value) < 3 or ("::" not in value and value.count(":") != 7):
            return False
        try:
            return ipaddress.IPv6Address(value) is not None
        except ValueError:
            return False
    if name in ("password_assignment", "url_password"):
        return not (value.startswith("<") and value.endswith(">")) and not value.startswith(("${", "{{", "%("))
    return True


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
