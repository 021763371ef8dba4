import pandas as pd
import pytest

from nightshift.quality.suite import QualityPolicy, validate_frame

POLICY = QualityPolicy(min_documents=2, min_chars=3, max_chars=50)


def test_a_clean_corpus_passes():
    report = validate_frame(pd.DataFrame({"id": ["a", "b"], "text": ["hello", "world"]}), POLICY)
    assert report.success, report.summary()
    assert report.evaluated == 7


@pytest.mark.parametrize(
    ("frame", "failed_expectation"),
    [
        ({"id": ["a", "a"], "text": ["hello", "world"]}, "expect_column_values_to_be_unique"),
        ({"id": ["a", "b"], "text": ["hello", "   "]}, "expect_column_values_to_not_match_regex"),
        ({"id": ["a", "b"], "text": ["hello", "x" * 51]}, "expect_column_value_lengths_to_be_between"),
        ({"id": ["a"], "text": ["hello"]}, "expect_table_row_count_to_be_between"),
        ({"id": ["a", "b"], "text": ["hello", "mail ops@example.org"]}, "expect_column_values_to_be_between"),
        ({"id": ["a", "b"], "text": ["hello", "key AKIAIOSFODNN7EXAMPLE"]}, "expect_column_values_to_be_between"),
    ],
)
def test_each_violation_fails_and_is_named(frame, failed_expectation):
    report = validate_frame(pd.DataFrame(frame), POLICY)
    assert not report.success
    assert any(f.startswith(failed_expectation) for f in report.failures), report.failures


def test_policy_errors_say_what_to_change():
    with pytest.raises(ValueError, match="min_chars <= max_chars"):
        QualityPolicy(min_chars=10, max_chars=5)


def test_shipped_policy_loads():
    assert QualityPolicy.load().min_documents >= 1


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
