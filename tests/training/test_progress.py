"""Per-step metrics reach a real MLflow run while training runs, and the log carries an ETA."""

from __future__ import annotations

import logging

from mlflow.tracking import MlflowClient

from nightshift.training.progress import ProgressReporter, format_duration


def test_each_step_reaches_mlflow_before_the_next_one(tmp_path, caplog):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    run_id = client.create_run(client.create_experiment("t", artifact_location=str(tmp_path / "a"))).info.run_id
    reporter = ProgressReporter(3, tokens_per_step=1024, tracking={"uri": uri, "run_id": run_id}, flush_every_s=0,
                                log_every_s=0)
    with caplog.at_level(logging.INFO, logger="nightshift.trainer"):
        reporter.step(1, 2.5, 1e-4, 0.9)
        reporter.flush(wait=True)  # sent in the background; wait for it here
        history = client.get_metric_history(run_id, "train_loss")
        assert [(m.step, m.value) for m in history] == [(1, 2.5)]
        reporter.step(2, 2.25, 2e-4, float("nan"))
        reporter.step(3, 2.0, 1e-4, 0.5)
    assert [m.value for m in client.get_metric_history(run_id, "train_loss")] == [2.5, 2.25, 2.0]
    assert [m.step for m in client.get_metric_history(run_id, "grad_norm")] == [1, 3]  # NaN is not sent
    assert len(client.get_metric_history(run_id, "learning_rate")) == 3
    assert all(m.value > 0 for m in client.get_metric_history(run_id, "tokens_per_s"))
    lines = [r.getMessage() for r in caplog.records if r.name == "nightshift.trainer"]
    assert lines[0].startswith("step 1/3 loss 2.5000 lr 1.00e-04 grad-norm 0.900") and " eta " in lines[0]


def test_an_unreachable_tracking_server_costs_a_warning_not_the_run(caplog, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    reporter = ProgressReporter(2, 10, tracking={"uri": "http://127.0.0.1:9", "run_id": "x"}, flush_every_s=0)
    with caplog.at_level(logging.WARNING):
        reporter.step(1, 1.0, 0.1, 1.0)
        reporter.step(2, 1.0, 0.1, 1.0)  # the last step waits for what is in flight
    assert reporter.client is None
    assert "could not send progress to MLflow" in caplog.text


def test_durations_read_like_durations():
    assert [format_duration(s) for s in (5, 75, 3725, float("nan"))] == ["5s", "1m15s", "1h02m05s", "?"]
