"""One helper turns errors no retry mends into AirflowFailException; others are left to Airflow's retries."""

import pytest
from airflow.sdk.exceptions import AirflowFailException

from nightshift.airflow.common import fail_fast


def test_listed_errors_fail_the_task_at_once_with_the_message_and_where_it_came_from():
    with pytest.raises(AirflowFailException, match=r"^source web: no such folder \(fix sources.yaml\)$") as caught:
        with fail_fast(FileNotFoundError, prefix="source web: ", suffix=" (fix sources.yaml)"):
            raise FileNotFoundError("no such folder")
    assert isinstance(caught.value.__cause__, FileNotFoundError)


def test_other_errors_stay_as_they_are_so_airflow_retries_them():
    with pytest.raises(ConnectionError), fail_fast(ValueError):
        raise ConnectionError("the registry is down")


def test_as_a_decorator_it_keeps_the_tasks_name_and_signature_and_defaults_to_request_errors():
    import inspect

    @fail_fast()
    def resolve(request: dict, dataset: str = "corpus-v0001") -> str:
        raise LookupError(f"no {dataset}")

    assert resolve.__name__ == "resolve" and list(inspect.signature(resolve).parameters) == ["request", "dataset"]
    with pytest.raises(AirflowFailException, match="no corpus-v0001"):
        resolve({})
    for error in (FileNotFoundError, NotADirectoryError, LookupError, ValueError, TypeError):
        with pytest.raises(AirflowFailException), fail_fast():
            raise error("bad")
