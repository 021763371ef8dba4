import re

import pandas as pd
import pytest

from nightshift.quality.suite import DropBudget, QualityPolicy, validate_corpus, validate_frame

POLICY = QualityPolicy(min_documents=2, min_chars=3, max_chars=50)


def test_a_clean_corpus_passes():
    report = validate_frame(pd.DataFrame({"id": ["a", "b"], "text": ["hello", "world"]}), POLICY)
    assert report.success, report.summary()
    assert report.evaluated == 6


@pytest.mark.parametrize(
    ("frame", "failed"),
    [
        ({"id": ["a", "a"], "text": ["hello", "world"]}, "expect_column_values_to_be_unique"),
        ({"id": ["a", "b"], "text": ["hello", "   \n "]}, "'column': 'visible_chars'"),
        ({"id": ["a", "b"], "text": ["hello", None]}, "'column': 'visible_chars'"),
        ({"id": ["a", "b"], "text": ["hello", "x" * 51]}, "'column': 'chars'"),
        ({"id": ["a"], "text": ["hello"]}, "expect_table_row_count_to_be_between"),
        ({"id": ["a", "b"], "text": ["hello", "mail ops@example.org"]}, "'column': 'pii_hits'"),
        ({"id": ["a", "b"], "text": ["hello", "key AKIAIOSFODNN7EXAMPLE"]}, "'column': 'pii_hits'"),
    ],
)
def test_each_violation_fails_and_is_named(frame, failed):
    report = validate_frame(pd.DataFrame(frame), POLICY)
    assert not report.success
    assert any(failed in f for f in report.failures), report.failures


def test_policy_errors_say_what_to_change():
    with pytest.raises(ValueError, match="min_chars <= max_chars"):
        QualityPolicy(min_chars=10, max_chars=5)
    with pytest.raises(ValueError, match="length_quantiles"):
        QualityPolicy(length_quantiles={0.5: [500, 100]})
    with pytest.raises(ValueError, match="length_quantiles"):
        QualityPolicy(length_quantiles={1.5: [1, 2]})
    with pytest.raises(ValueError, match="languages must be a list"):
        QualityPolicy(languages="en")
    with pytest.raises(ValueError, match="max_near_duplicate_share"):
        QualityPolicy(max_near_duplicate_share=1.5)


def test_shipped_policy_loads_with_the_profile_checks():
    policy = QualityPolicy.load()
    assert policy.min_documents >= 1 and policy.languages and policy.length_quantiles
    assert policy.min_documents_per_source >= 1 and policy.max_near_duplicate_share < 1


def test_failures_name_documents_by_id_and_never_quote_their_text():
    secret = "db_password=hunter2 " * 5
    report = validate_frame(pd.DataFrame({"id": ["notes/secret.txt", "b"], "text": [secret, "ok!"]}), POLICY)
    assert not report.success
    assert "hunter2" not in report.summary()
    assert "notes/secret.txt" in report.summary() and "1 unexpected" in report.summary()


def test_second_pii_pass_names_the_document_and_never_the_finding():
    frame = pd.DataFrame({"id": ["ok", "leaky"], "text": ["hello", "reach me at jane.doe@example.com"]})
    report = validate_frame(frame, POLICY)
    assert not report.success
    assert "pii_hits" in report.summary() and "leaky" in report.summary()
    assert "jane.doe" not in report.summary()


TEXT_POLICY = QualityPolicy(min_documents=1, min_chars=3, max_chars=1000, languages=("en",), min_language_share=0.75,
                            length_quantiles={0.5: [20, 400], 0.9: [None, 600]}, min_documents_per_source=2,
                            max_near_duplicate_share=0.3)


def _frame(languages, lengths, ids=None):
    ids = ids or [f"web/{i}" for i in range(len(languages))]
    return pd.DataFrame({"id": ids, "text": ["w" * n for n in lengths], "language": languages})


def test_profile_checks_pass_on_a_corpus_within_them():
    sources = pd.DataFrame({"source": ["web"], "documents": [4]})
    report = validate_frame(_frame(["en", "en", "en", "de"], [100, 120, 130, 500]), TEXT_POLICY, sources)
    assert report.success, report.summary()


def test_a_corpus_without_languages_skips_the_language_share_and_says_why():
    report = validate_frame(_frame(["unknown"] * 4, [100, 120, 130, 140]), TEXT_POLICY)
    assert report.success and report.skipped == [
        "language share: no document has a language (the preparation recipe has no language step)"]
    assert not any("language" in f for f in report.failures)


def test_language_share_below_the_policy_fails_and_names_the_documents():
    report = validate_frame(_frame(["en", "de", "fr", "de"], [100, 120, 130, 140]), TEXT_POLICY)
    assert not report.success
    [failure] = [f for f in report.failures if "language" in f]
    assert "3 unexpected" in failure and "web/1" in failure


@pytest.mark.parametrize(("lengths", "bound"), [([5, 6, 7, 400], "'min_value': 20"),
                                                 ([500, 700, 800, 900], "'max_value': 400")])
def test_length_distribution_outside_its_quantile_bounds_fails(lengths, bound):
    report = validate_frame(_frame(["en"] * 4, lengths), TEXT_POLICY)
    assert not report.success
    assert any("'column': 'chars'" in f and bound in f for f in report.failures), report.failures


def test_a_source_below_its_minimum_and_too_many_near_duplicates_fail(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(f'{{"id": "web/{i}", "text": "{"w" * 100}"}}\n' for i in range(3))
                      + '{"id": "wiki/1", "text": "a wiki page of enough length"}\n')
    report = validate_corpus(corpus, QualityPolicy(min_documents_per_source=2, max_near_duplicate_share=0.3),
                             sources={"web": 3, "wiki": 1, "sql": 0}, near_duplicate_share=0.5)
    assert not report.success
    [sources] = [f for f in report.failures if f.startswith("sources:")]
    assert "2 unexpected" in sources and "wiki" in sources and "sql" in sources
    assert any(f.startswith("preparation:") and "near_duplicate_share" in f for f in report.failures)


def test_data_docs_render_offline_and_show_ids_never_text(tmp_path):
    secret = "the vault code is swordfish " * 3
    frame = _frame(["en", "de", "en"], [100, 120, 130])
    frame.loc[1, "text"] = secret + "x" * 2000
    frame.loc[2, "text"] = "contact ops@example.org please"
    report = validate_frame(frame, TEXT_POLICY, docs_dir=tmp_path / "docs")
    assert not report.success and len(report.data_docs) == 3
    pages = list((tmp_path / "docs").rglob("*.html"))
    html = "\n".join(p.read_text() for p in pages)
    assert (tmp_path / "docs" / report.data_docs[0]).is_file()
    assert "swordfish" not in html and "ops@example.org" not in html
    assert "id=web/1" in html  # the offending document, by id
    # Nothing to fetch from elsewhere: no external scripts, stylesheets or images.
    assert not re.search(r'<(script|link|img)[^>]+(src|href)="https?://', html)
    assert all(p in (tmp_path / "docs" / "index.html").read_text() for p in report.data_docs)


def test_second_pass_counts_what_only_the_independent_detector_finds():
    """An Artifactory key is no shape the scrubber knows; detect-secrets does, so the document fails."""
    from nightshift.prep.pii import Scrubber

    key = "AKCp8" + "".join("kR7mQ2xZ9vB4nL6wT3yH8jF5dS1aG0pE"[i % 32] for i in range(69))
    text = f"artifactory {key} ok"
    assert Scrubber().find(text) == []
    report = validate_frame(pd.DataFrame({"id": ["ok", "keyed"], "text": ["hello", text]}), POLICY)
    assert not report.success
    assert "pii_hits" in report.summary() and "keyed" in report.summary() and key not in report.summary()


def test_placeholders_left_by_scrubbing_are_not_counted():
    from nightshift.quality.suite import text_metrics

    texts = ["password: \"<SECRET>\"\nAuthorization: Bearer <SECRET>", "mail <EMAIL> or call <PHONE>",
             "postgres://a:<SECRET>@db/x?token=<SECRET>&page=2", "Password=<SECRET>;AccountKey=<SECRET>;"]
    assert text_metrics(texts)["pii_hits"] == [0, 0, 0, 0]


def test_drop_budget_is_validated_and_errors_name_the_field(tmp_path):
    assert QualityPolicy.load().drop_budget == DropBudget(max_share=0.3, min_documents=5, block=False)
    assert QualityPolicy().drop_budget.max_share == 1.0  # a policy without a budget judges nothing
    for bad, field_name in [({"max_share": 0}, "drop_budget.max_share"), ({"max_share": 1.5}, "drop_budget.max_share"),
                            ({"max_share": "30%"}, "drop_budget.max_share"),
                            ({"min_documents": 0}, "drop_budget.min_documents"),
                            ({"min_documents": 2.5}, "drop_budget.min_documents"),
                            ({"block": "yes"}, "drop_budget.block"), ({"max_shares": 0.3}, "unknown fields"),
                            ("0.3", "drop_budget must be a mapping")]:
        with pytest.raises(ValueError, match=re.escape(field_name)):
            QualityPolicy(drop_budget=bad)
    path = tmp_path / "quality.yaml"
    path.write_text("min_documents: 1\ndrop_budget: {max_share: 0.5, block: true}\n")
    assert QualityPolicy.load(path).drop_budget == DropBudget(max_share=0.5, min_documents=5, block=True)
    path.write_text("drop_budget: {max_share: 0.5, min_documents: -1}\n")
    with pytest.raises(ValueError, match="drop_budget.min_documents must be an integer >= 1, got -1"):
        QualityPolicy.load(path)
