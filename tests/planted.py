"""Generated corpora with planted near-duplicates, personal data, secrets and contamination.

Shared by the tests under tests/prep, tests/e2e and the benchmarks in bench/ (which put tests/ on sys.path).
Everything is built from a seeded random generator, so a failure reproduces.
"""

from __future__ import annotations

import random
import re
import string
from collections import Counter

WORDS = (
    "the of and to in a is that for it as was with be by on not he this are or his from at which but have an they "
    "you were her she there been one all we their has would when if so no what up out can who more time about "
    "other into some could them only its then than also two first new people may way these any like many most over "
    "after well years where through made back just much before good use being same under still world own however "
    "while last might great since both since three another long house each without place small number night sky "
    "star telescope dome planet moon light visitor guide ticket winter summer evening morning school class group "
    "member garden path road station bus train car park door gallery terrace mirror lens camera photo picture "
    "season weather cloud rain wind storm clear dark bright cold warm season hour minute week month museum "
    "history library lecture talk show film music coffee tea cake lunch dinner table chair window wall floor roof "
    "staff volunteer teacher student child parent family friend neighbour village town city valley ridge river "
    "forest field hill mountain lake coast island bridge tower castle church market shop street corner square"
).split()

SENTENCE_END = ".!?"


STOP = ("the", "of", "and", "to", "that", "with", "have", "in", "is", "a")


def sentence(rng: random.Random, lo: int = 8, hi: int = 18) -> str:
    words = [rng.choice(STOP) if rng.random() < 0.3 else rng.choice(WORDS) for _ in range(rng.randint(lo, hi))]
    return " ".join(words).capitalize() + rng.choice(".....!?")


def prose(rng: random.Random, paragraphs: int = 3, sentences: int = 4) -> str:
    """English-like text that passes the default language and quality steps."""
    return "\n\n".join(" ".join(sentence(rng) for _ in range(sentences)) for _ in range(paragraphs))


def shingles(text: str, n: int = 5) -> set[tuple[str, ...]]:
    words = re.findall(r"\w+", text.lower())
    if len(words) < n:
        return {tuple(words)} if words else set()
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def jaccard(a: str, b: str, n: int = 5) -> float:
    sa, sb = shingles(a, n), shingles(b, n)
    return len(sa & sb) / len(sa | sb) if sa | sb else 1.0


def variant(rng: random.Random, text: str, target: float, n: int = 5, above: bool | None = None) -> tuple[str, float]:
    """Return a copy of ``text`` with words replaced until its shingle Jaccard similarity is near ``target``.

    ``above`` True keeps the similarity at or above the target, False at or below it.
    """
    tokens = text.split(" ")
    positions = list(range(len(tokens)))
    rng.shuffle(positions)
    lo, hi = 0, len(tokens)
    best, best_allowed = (text, 1.0), above is not False
    while lo <= hi:  # bisect on how many words to replace
        k = (lo + hi) // 2
        changed = tokens[:]
        for p in positions[:k]:
            changed[p] = _replace_word(rng, changed[p])
        candidate = " ".join(changed)
        j = jaccard(text, candidate, n)
        allowed = above is None or (j >= target if above else j <= target)
        if allowed and (abs(j - target) < abs(best[1] - target) or not best_allowed):
            best, best_allowed = (candidate, j), True
        if j > target:
            lo = k + 1
        else:
            hi = k - 1
    return best


def _replace_word(rng: random.Random, token: str) -> str:
    tail = token[len(token.rstrip(SENTENCE_END + ",")):]
    word = rng.choice(WORDS) + rng.choice(WORDS)  # a compound no generated text holds: new shingles
    return (word.capitalize() if token[:1].isupper() else word) + tail


# ---------------------------------------------------------------------------------------------------------------
# Personal data and credentials, each in several formats. Each generator returns (kind, text).


def _luhn_complete(prefix: str, length: int, rng: random.Random) -> str:
    body = prefix + "".join(rng.choice(string.digits) for _ in range(length - len(prefix) - 1))
    for check in string.digits:
        digits = body + check
        total = 0
        for i, ch in enumerate(reversed(digits)):
            d = int(ch)
            if i % 2:
                d = d * 2 - 9 if d > 4 else d * 2
            total += d
        if total % 10 == 0:
            return digits
    raise AssertionError("unreachable")


def _iban(country: str, length: int, rng: random.Random) -> str:
    bban = "".join(rng.choice(string.digits) for _ in range(length - 4))
    numeric = int("".join(str(int(ch, 36)) for ch in bban + country + "00"))
    return f"{country}{98 - numeric % 97:02d}{bban}"


def _group(s: str, size: int = 4, sep: str = " ") -> str:
    return sep.join(s[i:i + size] for i in range(0, len(s), size))


def _token(rng: random.Random, n: int, alphabet: str = string.ascii_letters + string.digits) -> str:
    return "".join(rng.choice(alphabet) for _ in range(n))


def pii_items(rng: random.Random) -> list[tuple[str, str]]:
    """Return one item of every planted format: (placeholder kind, the text to plant)."""
    name = rng.choice(["jane.doe", "j_smith", "ops+alerts", "Marie.Curie", "x7"])
    card16 = _luhn_complete("4", 16, rng)
    mc = _luhn_complete("51", 16, rng)
    amex = _luhn_complete("37", 15, rng)
    de, gb, fr, nl = _iban("DE", 22, rng), _iban("GB", 22, rng), _iban("FR", 27, rng), _iban("NL", 18, rng)
    octets = [str(rng.randint(1, 254)) for _ in range(4)]
    aws = "AKIA" + _token(rng, 16, string.ascii_uppercase + string.digits)
    jwt = "eyJ" + _token(rng, 20) + ".eyJ" + _token(rng, 30) + "." + _token(rng, 43, string.ascii_letters + "_-")
    key_body = "\n".join(_token(rng, 64, string.ascii_letters + string.digits + "+/") for _ in range(4))
    return [
        ("email", f"{name}@example.com"),
        ("email", f"{name}@mail.sub.example.co.uk"),
        ("email", f"SUPPORT@{rng.choice(['EXAMPLE.ORG', 'tern-valley.net'])}"),
        ("phone", f"+1 415 555 {rng.randint(1000, 9999)}"),
        ("phone", f"(415) 555-{rng.randint(1000, 9999)}"),
        ("phone", f"415-555-{rng.randint(1000, 9999)}"),
        ("phone", f"415.555.{rng.randint(1000, 9999)}"),
        ("phone", f"+44 20 7946 {rng.randint(1000, 9999)}"),
        ("phone", f"+49 30 {rng.randint(100000, 999999)}"),
        ("phone", f"020 7946 {rng.randint(1000, 9999)}"),
        ("phone", f"+33 1 23 45 {rng.randint(10, 99)} {rng.randint(10, 99)}"),
        ("ip_address", ".".join(octets)),
        ("ip_address", f"2001:db8:{rng.randint(1, 9999):x}::{rng.randint(1, 65535):x}"),
        ("ip_address", "fe80::1ff:fe23:4567:890a"),
        ("ip_address", ":".join(f"{rng.randint(0, 65535):x}" for _ in range(8))),
        ("credit_card", card16),
        ("credit_card", _group(card16)),
        ("credit_card", _group(mc, 4, "-")),
        ("credit_card", f"{amex[:4]} {amex[4:10]} {amex[10:]}"),
        ("iban", de),
        ("iban", _group(gb)),
        ("iban", _group(fr)),
        ("iban", nl),
        ("secret", aws),
        ("secret", "ghp_" + _token(rng, 36)),
        ("secret", "github_pat_" + _token(rng, 22) + "_" + _token(rng, 59)),
        ("secret", "xoxb-" + _token(rng, 12, string.digits) + "-" + _token(rng, 24)),
        ("secret", "AIza" + _token(rng, 35, string.ascii_letters + string.digits + "_-")),
        ("secret", "sk-proj-" + _token(rng, 48)),
        ("secret", "sk_live_" + _token(rng, 24)),
        ("secret", "hf_" + _token(rng, 34)),
        ("secret", "ns-" + _token(rng, 43)),
        ("secret", "glpat-" + _token(rng, 20)),
        ("secret", jwt),
        ("secret", f"-----BEGIN RSA PRIVATE KEY-----\n{key_body}\n-----END RSA PRIVATE KEY-----"),
        ("secret", f"-----BEGIN OPENSSH PRIVATE KEY-----\n{key_body}\n-----END OPENSSH PRIVATE KEY-----"),
    ] + [
        # Credentials inside context: the value is the secret, the rest is kept.
        ("secret", f"postgres://admin:{_token(rng, 14)}@db.internal:5432/prod"),
        ("secret", f"password = \"{_token(rng, 12)}\""),
        ("secret", f"aws_secret_access_key: {_token(rng, 40, string.ascii_letters + string.digits + '/+')}"),
        ("secret", f"API_KEY={_token(rng, 32)}"),
        ("secret", f"DB_PASSWORD={_token(rng, 16)}"),
        ("secret", f'"apiKey": "{_token(rng, 24)}"'),
    ]


def secret_value(kind: str, item: str) -> str:
    """Return the part of a planted item that must not survive scrubbing."""
    for pattern in (r"://[^:]+:([^@]+)@", r"password = \"([^\"]+)\"", r"aws_secret_access_key: (\S+)",
                    r"API_KEY=(\S+)", r"DB_PASSWORD=(\S+)", r"\"apiKey\": \"([^\"]+)\""):
        m = re.search(pattern, item)
        if m:
            return m.group(1)
    return item


CLEAN_NUMBERS = [
    "Version 2.13.0 was released on 2024-01-15 at 10:30.",
    "Python 3.11.4 and numpy 2.4.6 are pinned; see release v1.15.0-rc2.",
    "The gallery opens from 19:00 to 23:30, April to October.",
    "An evening ticket costs 12 euros; the season pass costs $149.99 or €1,240.00.",
    "The ridge is 1,240 metres high and 14 kilometres north of Calder.",
    "Dates are written 15/01/2024, 01.02.2025 or Jan 15, 2024 in our notes.",
    "Order #12345678 shipped on 2025-03-02; invoice INV-2025-00042 is paid.",
    "ISBN 978-3-16-148410-0 and ISSN 2049-3630 appear in the bibliography.",
    "Room 101 seats 45 people; the dome is 23.5 m wide and 12.5% brighter.",
    "Between 1998 and 2024 the observatory welcomed 3,500,000 visitors.",
    "The aspect ratio is 3:2 and the exposure was 1/250 s at f/8.",
    "Avogadro's number is 6.02e23; the comet returns every 76 years.",
    "Coordinates 51.5074 N, 0.1278 W mark the old meridian line.",
    "Call the front desk at extension 4021 or press 0 for the operator.",
    "Pages 12-14 and 210-233 cover the history of the 40-inch refractor.",
    "The shuttle leaves at 18:30 and returns at 23:45 on Fridays.",
    "Temperatures drop to -5 degrees; wind gusts reach 80 km/h.",
    "Model SmolLM2-135M has 135,000,000 parameters and a 2048-token window.",
    "Build 20240115.3 passed 1,024 of 1,024 tests in 12.7 seconds.",
    "The mirror was ground in 1931 and re-coated in 1987 and 2019.",
    "Use port 8080 for the UI and 8000 for the API on localhost.",
    "The password reset page explains how to choose a passphrase.",
    "Keys to the dome are kept by the duty manager; the token machine takes coins.",
    "Her secret was a thermos of tea on the terrace at 2 a.m.",
    "Serial numbers run from 100-200-300 to 100-200-399 on batch 7.",
    "Use the key-value store for settings and a token bucket for rate limits.",
]


# ---------------------------------------------------------------------------------------------------------------
# A whole night with every planted problem.


GERMAN = [
    "Das Observatorium liegt auf dem Kamm, vierzehn Kilometer nördlich der Stadt. Die Galerie ist von Mittwoch "
    "bis Sonntag geöffnet, und die Karten kosten zwölf Euro für Erwachsene und sechs Euro für Kinder.",
    "Bringen Sie warme Kleidung mit, auch im Sommer: die Terrasse ist offen und die Temperatur fällt nach "
    "Mitternacht oft unter zehn Grad. Rote Taschenlampen werden am Eingang kostenlos verliehen.",
]
EVAL_ITEMS = [
    {"question": "How many kilometres north of the town does the ridge road climb before the lower car park "
                 "opens for visitors", "answer": "Fourteen"},
    {"question": "Which instrument did the founding astronomer grind by hand in the winter of the great storm "
                 "that closed the valley", "answer": "The mirror"},
]


def planted_night(seed: int = 1):
    """Return raw records and what was planted: {step: {reason: n}}, PII per kind, secrets."""
    rng = random.Random(seed)
    docs, expected, pii, secrets = [], Counter(), Counter(), []

    def add(doc_id, content, fmt="text"):
        docs.append({"id": doc_id, "source": doc_id, "format": fmt, "content": content, "meta": {}})

    good = [prose(rng, 3, 4) for _ in range(30)]
    for i, text in enumerate(good):
        add(f"good/{i:03d}.txt", text)
    for i, text in enumerate(GERMAN):
        add(f"de/{i}.txt", text)
        expected["language", "language_de"] += 1
    add("junk/lorem.txt", prose(rng) + "\n\nLorem ipsum dolor sit amet, consectetur adipiscing elit.")
    expected["c4_quality", "lorem_ipsum"] += 1
    add("junk/repeat.txt", "\n\n".join(["The shop sells the cheap tickets and the maps of the sky."] * 12))
    expected["gopher_repetition", "dup_para_frac"] += 1
    add("junk/short.txt", "Too short.")
    expected["limits", "too_short"] += 1
    add("junk/empty.txt", "")
    expected["limits", "empty"] += 1
    add("junk/huge.txt", prose(rng) * 4000)  # ~1.3 MB, over the test recipe's max_raw_chars
    expected["limits", "raw_too_long"] += 1
    add("junk/markup.html", "<html><body><nav>menu</nav></body></html>", "html")
    expected["limits", "too_short"] += 1
    for i in range(4):
        add(f"near/{i}.txt", variant(rng, good[i], 0.9, above=True)[0])
        expected["near_dedup", "near_duplicate"] += 1
    for i in range(2):
        add(f"copy/{i}.txt", good[10] + "\n")
        expected["exact_dedup", "exact_duplicate"] += 1
    for i, item in enumerate(EVAL_ITEMS):
        add(f"leak/{i}.txt", f"{prose(rng, 1, 3)} {item['question']}? {prose(rng, 1, 3)}")
        expected["decontaminate", "contaminated:heldout"] += 1
    for i, (kind, item) in enumerate(pii_items(rng)):
        add(f"pii/{i:03d}.txt", f"{prose(rng, 1, 3)}\n{item}\n{prose(rng, 1, 3)}")
        pii[kind] += 1
        secrets.append(secret_value(kind, item))
    rng.shuffle(docs)  # collection order is arbitrary; the corpus is sorted by id
    return docs, expected, pii, secrets
