import random

import pytest

from nightshift.prep.pii import PLACEHOLDERS, Scrubber
from planted import CLEAN_NUMBERS, pii_items, prose, secret_value

SCRUBBER = Scrubber()


def planted_documents(seed: int, rounds: int):
    """Yield (text, [(kind, item)]) with every planted format inside ordinary prose, in several rounds."""
    rng = random.Random(seed)
    for _ in range(rounds):
        for kind, item in pii_items(rng):
            before, after = prose(rng, 1, 2), prose(rng, 1, 2)
            joiner = rng.choice([" ", ": ", " (", "\n", " <"])
            closer = {" (": ")", " <": ">"}.get(joiner, rng.choice([" ", ".", ", ", "\n"]))
            yield f"{before}{joiner}{item}{closer}{after}", [(kind, item)]


def test_every_planted_format_is_scrubbed_with_recall_of_at_least_99_percent():
    found = total = 0
    missed = []
    for text, planted in planted_documents(seed=7, rounds=25):
        scrubbed, counts = SCRUBBER.scrub(text)
        for kind, item in planted:
            total += 1
            value = secret_value(kind, item)
            if value not in scrubbed and PLACEHOLDERS[kind] in scrubbed and counts[kind] >= 1:
                found += 1
            else:
                missed.append((kind, item))
    assert total >= 1000
    assert found / total >= 0.99, missed[:10]


def test_precision_on_clean_prose_with_numbers_versions_and_dates_is_at_least_95_percent():
    rng = random.Random(3)
    true_positives = false_positives = 0
    for text, planted in planted_documents(seed=11, rounds=5):
        true_positives += len(planted) if SCRUBBER.find(text) else 0
    for _ in range(20):
        for line in CLEAN_NUMBERS:
            false_positives += len(SCRUBBER.find(f"{prose(rng, 1, 2)} {line} {prose(rng, 1, 2)}"))
    precision = true_positives / (true_positives + false_positives)
    assert precision >= 0.95, false_positives


@pytest.mark.parametrize("line", CLEAN_NUMBERS)
def test_ordinary_numbers_versions_dates_and_words_survive(line):
    assert SCRUBBER.scrub(line) == (line, {})


def test_scrubbing_counts_per_type_and_leaves_the_rest_of_the_text_alone():
    text = "Mail ops@example.org or call +44 20 7946 0958 from 10.0.0.12 today."
    scrubbed, counts = SCRUBBER.scrub(text)
    assert scrubbed == "Mail <EMAIL> or call <PHONE> from <IP_ADDRESS> today."
    assert counts == {"email": 1, "phone": 1, "ip_address": 1}


def test_checksums_separate_payment_cards_and_ibans_from_other_long_numbers():
    assert SCRUBBER.find("card 4111 1111 1111 1111")[0].kind == "credit_card"
    assert not SCRUBBER.find("card 4111 1111 1111 1112")  # fails Luhn
    assert SCRUBBER.find("IBAN GB82 WEST 1234 5698 7654 32")[0].kind == "iban"
    assert not SCRUBBER.find("IBAN GB83 WEST 1234 5698 7654 32")  # fails mod-97


def test_a_recipe_can_scrub_only_some_kinds():
    scrubbed, counts = Scrubber(["email"]).scrub("ops@example.org, 10.0.0.12")
    assert scrubbed == "<EMAIL>, 10.0.0.12" and counts == {"email": 1}


def test_placeholders_themselves_are_never_found_again():
    scrubbed, _ = SCRUBBER.scrub(" ".join(item for _, item in pii_items(random.Random(1))))
    assert SCRUBBER.find(scrubbed) == []


@pytest.mark.parametrize(("line", "found"), [
    ("server at 8.8.8.8:53", True), ("dns 1.1.1.1", True), ("reach 10.0.0.1 today", True),
    ("route 9.9.9.9/32", True), ("ping 4.2.2.2", True),
    ("Version=4.0.0.0", False), ("2.4.1.3", False), ("OID 1.3.6.1", False), ("release 2.4.1.3", False),
    ("v10.0.0.1 is out", False), ("see section 12.3.4.5 below", False), ("§ 10.2.3.4", False),
    ("build 10.0.19041.1", False), ("2.5.4.33 is an attribute type", False),
])
def test_an_ipv4_address_is_told_from_a_version_by_its_context(line, found):
    assert bool([f for f in SCRUBBER.find(line) if f.kind == "ip_address"]) is found


@pytest.mark.parametrize("text, kept", [
    ("Authorization: Bearer shorttok", False), ("authorization: basic abc123", False),
    ('curl -H "Proxy-Authorization: Bearer hunter22" https://example.org', False),
    ("Authorization: Bearer $TOKEN", True), ("Authorization: Bearer <token>", True),
    ("Authorization: Bearer YOUR_API_KEY", True), ("Authorization: Bearer {token}", True),
    ("Authorization: Bearer q8Zr/7TpXw9Ld", False), ("Authorization: Basic a1b2/c3d4e5f6", False),
    ("Authorization: Bearer EwB4A%2Fl6BAAU/j7eRxyz123456", False), ("Authorization: Bearer $API_TOKEN", True),
    ("Authorization: Bearer /9j4AAQSkZJRgABAQ", False), ("Authorization: Bearer //8Ab3dEf9Qz", False),
    ("Authorization: Token ./x9Kq2Lm7Pz", False), ("Authorization: Basic ABCD1234EFGH5678", False),
    ("Authorization: Bearer ~/token.txt", True), ("Authorization: Bearer /run/secrets/api_token", True),
    ("Authorization: Bearer https://vault.example.com/v1/token", True), ("Authorization: Bearer ${API_TOKEN}", True),
    ("Authorization: Bearer YOUR_API_KEY_2", True),
])
def test_an_authorization_header_value_is_a_credential_by_its_place_unless_a_placeholder(text, kept):
    from nightshift.prep.pii import Scrubber

    clean, found = Scrubber().scrub(text)
    assert (clean == text) is kept and (not found) is kept, clean
