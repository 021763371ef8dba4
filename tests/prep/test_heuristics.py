import glob
import random

import pytest
from datatrove.data import Document
from datatrove.pipeline.filters import GopherRepetitionFilter
from datatrove.utils.text import split_into_words

from nightshift.prep.filters import C4Quality, FineWebQuality, GopherQuality, GopherRepetition
from nightshift.prep.heuristics import FastGopherRepetitionFilter, tokenizer
from nightshift.prep.language import Language
from nightshift.prep.shards import Outcome
from nightshift.prep.step_base import Candidate
from nightshift.prep.steps import STEPS
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


def test_fast_quality_filter_gives_datatrove_s_verdicts():
    from datatrove.pipeline.filters import GopherQualityFilter

    from nightshift.prep.heuristics import FastGopherQualityFilter

    rng = random.Random(6)
    texts = list(repetitive_documents(200)) + [prose(rng) for _ in range(50)] + [
        "# " * 40 + "title words here " * 20, "... " * 30 + "word " * 60, "\n".join(["- bullet item here"] * 60),
        "12 34 56 78 " * 30 + "the and of", "…\n" * 40 + "words " * 60]
    for kwargs in ({}, {"min_doc_words": 5, "min_stop_words": 0}, {"min_doc_words": 5, "max_avg_word_length": 4}):
        reference = GopherQualityFilter(language=tokenizer(), **kwargs)
        fast = FastGopherQualityFilter(language=tokenizer(), **kwargs)
        verdicts = [(reference.filter(Document(text=t, id="x")), fast.filter(Document(text=t, id="x")))
                    for t in texts]
        assert all(a == b for a, b in verdicts), [v for v in verdicts if v[0] != v[1]][:3]


def test_fast_c4_filter_gives_datatrove_s_verdicts_and_text():
    from datatrove.pipeline.filters import C4QualityFilter

    from nightshift.prep.heuristics import FastC4QualityFilter

    rng = random.Random(12)
    texts = [prose(rng) for _ in range(30)] + [
        "One line without end\n  indented line.\n\nAnother paragraph here.",
        "Please enable JavaScript.\nThe dome opens at dusk.", "We use cookies. Read our privacy policy.\nHi.",
        "x = {1}", "lorem ipsum dolor", "", "   \n  ", "a" * 1200 + " long word.", "No sentence end",
        "First.\nSecond one!\nThird?"]
    for kwargs in ({}, {"min_num_sentences": 1, "filter_no_terminal_punct": False, "min_words_per_line": -1,
                        "remove_citations": False}, {"min_num_sentences": 3, "filter_no_terminal_punct": False,
                                                     "min_words_per_line": -1, "remove_citations": False}):
        reference = C4QualityFilter(language=tokenizer(), **kwargs)
        fast = FastC4QualityFilter(language=tokenizer(), **kwargs)
        for text in texts:
            a, b = Document(text=text, id="x"), Document(text=text, id="x")
            assert (reference.filter(a), a.text) == (fast.filter(b), b.text), (kwargs, text)


def test_tokens_equal_the_pattern_s_on_every_kind_of_text():
    from nightshift.prep.heuristics import _WORDS, _word_tokens

    rng = random.Random(8)
    texts = [prose(rng) for _ in range(20)] + [
        "A shuttle leaves at 18:30, costs $12.50 (or 6 euros); it's Red-light, e-mail a@b.com! http://x.org/a?b=c...",
        "naïve café ½ ² x² under_score __init__ Ωmega — dash… «quotes» 1,240.5m \u3000wide\u00a0space"]
    for text in texts:
        assert _word_tokens.__wrapped__(text) == _WORDS.findall(text)


def test_regex_tokenizer_counts_the_words_spacy_counts_on_the_sample_store():
    for path in sorted(glob.glob(str(SAMPLES_DIR / "store" / "*" / "*.md"))) + sorted(
            glob.glob(str(SAMPLES_DIR / "store" / "*" / "*.txt"))):
        text = open(path, encoding="utf-8").read()
        assert len(tokenizer().word_tokenize(text)) == len(split_into_words(text, "en")), path


def run_step(step: str, config, text: str) -> tuple[str | None, str]:
    """Return (reason to drop or None, text after the step) from the registry's step class."""
    doc = Candidate("doc", text, Outcome())
    (reason,) = STEPS[step](config).decide_many([doc])
    return reason, doc.text


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
    dropped, _ = run_step(step, config, text)
    assert dropped == reason


def test_c4_removes_javascript_warnings_as_the_recipe_asks_and_keeps_the_rest():
    dropped, text = run_step("c4_quality", C4Quality(),
                             "Please enable JavaScript to view this page.\nThe dome opens at dusk.")
    assert dropped is None and text == "The dome opens at dusk."


def test_ordinary_prose_passes_every_quality_step():
    rng = random.Random(4)
    for _ in range(20):
        text = prose(rng)
        for step, config in [("gopher_quality", GopherQuality()), ("gopher_repetition", GopherRepetition()),
                             ("c4_quality", C4Quality()), ("fineweb_quality", FineWebQuality())]:
            assert run_step(step, config, text)[0] is None, step


def test_language_keeps_the_listed_languages_and_names_the_others():
    from nightshift.prep.language import language_verdict

    config = Language(keep=("en",))
    assert language_verdict("The planetarium is closed today while the roof is repaired.", config)[0] is None
    reason, lang, prob = language_verdict("Das Planetarium ist heute geschlossen, weil das Dach repariert wird.",
                                          config)
    assert reason == "language_de" and lang == "de" and prob > 0.5
    assert language_verdict("Die the und and der of", Language(keep=("en", "de"), min_confidence=0.9))[0] == (
        "language_low_confidence")
