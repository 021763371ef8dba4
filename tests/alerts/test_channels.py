import json
import urllib.error

import pytest

from helpers import WebhookSink
from nightshift.alerts.channels import Alert, FileChannel, WebhookChannel, channel_for

ALERT = Alert(title="ingest_corpus.validate_corpus failed", message="2 of 6 expectations failed",
              dag_id="ingest_corpus", task_id="validate_corpus", details={"failed": 2})


def test_file_channel_appends_one_json_line_per_alert(tmp_path):
    channel = channel_for("fs", None, None, None, None, None, {"path": "alerts/a.jsonl"}, tmp_path)
    assert channel == FileChannel(tmp_path / "alerts" / "a.jsonl")
    channel.deliver(ALERT)
    channel.deliver(ALERT)
    lines = (tmp_path / "alerts" / "a.jsonl").read_text().splitlines()
    assert len(lines) == 2 and json.loads(lines[0])["title"] == ALERT.title


def test_webhook_channel_posts_slack_style_text(tmp_path):
    with WebhookSink() as sink:
        channel = channel_for("http", sink.url, None, None, None, None, {}, tmp_path)
        assert isinstance(channel, WebhookChannel)
        channel.deliver(ALERT)
    assert sink.bodies[0]["text"].startswith("[ERROR] ingest_corpus.validate_corpus failed")


def test_webhook_errors_surface(tmp_path):
    with WebhookSink(status=500) as sink, pytest.raises(urllib.error.HTTPError):
        WebhookChannel(sink.url).deliver(ALERT)


@pytest.mark.parametrize(("conn_type", "host", "extra", "says"), [
    ("smtp", "mail", {}, "Airflow's SMTP provider"),
    ("http", "", {}, "webhook URL"),
    ("postgres", "db", {}, "not supported"),
])
def test_unusable_connections_say_what_to_fix(tmp_path, conn_type, host, extra, says):
    with pytest.raises(ValueError, match=says):
        channel_for(conn_type, host, None, None, None, None, extra, tmp_path)
