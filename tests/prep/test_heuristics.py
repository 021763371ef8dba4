import glob
import random

import pytest
from datatrove.data import Document
from datatrove.pipeline.filters import GopherRepetitionFilter
from datatrove.utils.text import split_into_words

from nightshift.prep.heuristics import FastGopherRepetitionFilter, build_filter, run_filter, tokenizer
from nightshift.prep.recipe import C4Quality, FineWebQuality, GopherQuality, GopherRepetition, Language
from nightshift.settings import SAMPLES_DIR
from planted import prose


def repetitive_documents(n: int = 400):
    rng = random.Random(1)
    words = ["".join(rng.choice("abcdefghij") for _ in range(rng.randint(1, 6))) for _ in range(300)]
    for _ in range(n):
        k = rng.randint(3, 400)
        w = [rng.choice(words[: rng.randint(5, 300)]) for _ in range(k)]
        if rng.random() < 0.3:
            w = w + w[: rng.randint(1, k)]
        text = " ".join(w)
        if rng.random() < 0.5:
            text = text.replace(" a ", "\n").replace(" b ", ".\n\n")
        yield text


def test_fast_repetition_filter_gives_datatrove_s_verdicts():
    reference = GopherRepetitionFilter(language=tokenizer())
    fast = FastGopherRepetitionFilter(language=tokenizer())
    verdicts = [(reference.filter(Document(text=t, id="x")), fast.filter(Document(text=t, id="x")))
                for t in repetitive_documents()]
    assert all(a == b for a, b in verdicts)
    assert len({str(a) for a, _ in verdicts}) >= 6  # the corpus exercises many of the rules


def test_regex_tokenizer_counts_the_words_spacy_counts_on_the_sample_store():
    for path in sorted(glob.glob(str(SAMPLES_DIR / "store" / "*" / "*.md"))) + sorted(
            glob.glob(str(SAMPLES_DIR / "store" / "*" / "*.txt"))):
        text = open(path, encoding="utf-8").read()
        assert len(tokenizer().word_tokenize(text)) == len(split_into_words(text, "en")), path


@pytest.mark.parametrize(
    ("step", "config", "text", "reason"),
    [
        ("gopher_quality", GopherQuality(min_doc_words=20), "too short to learn from.", "gopher_short_doc"),
        ("gopher_quality", GopherQuality(min_doc_words=5),
         "\n".join(f"- visiting the observatory and telescope number {i}" for i in range(30)),
         "gopher_too_many_bullets"),
        ("gopher_repetition", GopherRepetition(), "\n\n".join(["Buy cheap tickets now."] * 20), "dup_para_frac"),
        ("gopher_repetition", GopherRepetition(), "\n".join(["Buy cheap tickets now."] * 20), "dup_line_frac"),
        ("c4_quality", C4Quality(), "Lorem ipsum dolor sit amet, consectetur adipiscing elit. " * 5, "lorem_ipsum"),
        ("c4_quality", C4Quality(), "Set x = {a: 1} in the settings file.", "curly_bracket"),
        ("fineweb_quality", FineWebQuality(), "\n".join(f"menu {i}" for i in range(40)), "line_punct_ratio"),
    ],
)
def test_each_quality_step_drops_what_it_is_for(step, config, text, reason):
    dropped, _ = run_filter(build_filter(step, config), text, "doc")
    assert dropped == reason


def test_c4_removes_javascript_warnings_as_the_recipe_asks_and_keeps_the_rest():
    dropped, text = run_filter(build_filter("c4_quality", C4Quality()),
                               "Please enable JavaScript to view this page.\nThe dome opens at dusk.", "doc")
    assert dropped is None and text == "The dome opens at dusk."


def test_ordinary_prose_passes_every_quality_step():
    rng = random.Random(4)
    for _ in range(20):
        text = prose(rng)
        for step, config in [("gopher_quality", GopherQuality()), ("gopher_repetition", GopherRepetition()),
                             ("c4_quality", C4Quality()), ("fineweb_quality", FineWebQuality())]:
            assert run_filter(build_filter(step, config), text, "doc")[0] is None, step


def test_language_keeps_the_listed_languages_and_names_the_others():
    from nightshift.prep.language import language_verdict

    config = Language(keep=("en",))
    assert language_verdict("The planetarium is closed today while the roof is repaired.", config)[0] is None
    reason, lang, prob = language_verdict("Das Planetarium ist heute geschlossen, weil das Dach repariert wird.",
                                          config)
    assert reason == "language_de" and lang == "de" and prob > 0.5
    assert language_verdict("Die the und and der of", Language(keep=("en", "de"), min_confidence=0.9))[0] == (
        "language_low_confidence")
