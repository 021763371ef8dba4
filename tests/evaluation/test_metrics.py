import pytest

from nightshift.evaluation.metrics import exact_match, is_refusal, normalize_answer, rouge_l, token_f1


def test_squad_normalisation_and_exact_match():
    assert normalize_answer("The  Ansel Reflector!") == "ansel reflector"
    assert exact_match("the ansel reflector.", "Ansel Reflector") == 1.0
    assert exact_match("Ansel", "Ansel Reflector") == 0.0


def test_token_f1_counts_shared_tokens():
    # prediction: 12 euros adults (3 tokens); reference: evening ticket costs 12 euros for adults (7 tokens)
    assert token_f1("12 euros, adults", "An evening ticket costs 12 euros for adults.") == pytest.approx(
        2 * (3 / 3) * (3 / 7) / (3 / 3 + 3 / 7))
    assert token_f1("", "") == 1.0 and token_f1("x", "") == 0.0 and token_f1("cats", "dogs") == 0.0


def test_rouge_l_is_the_longest_common_subsequence_f_measure():
    assert rouge_l("closed on mondays and tuesdays", "closed on mondays and tuesdays") == pytest.approx(1.0)
    # LCS of "open on mondays" and "closed on mondays" is "on mondays": P = R = 2/3
    assert rouge_l("open on mondays", "closed on mondays") == pytest.approx(2 / 3)


def test_refusal_markers_match_the_start_of_an_answer_only():
    markers = ("i can't", "i'm sorry")
    assert is_refusal("I can\u2019t share that.", markers)
    assert is_refusal("  I'M SORRY, but no.", markers)
    assert not is_refusal("The domes stay closed. " + "x" * 300 + " I can't", markers)
