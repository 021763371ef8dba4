"""Deliver alerts to people: an alerts file (local default) or a chat webhook (Slack, Teams); mail goes through
Airflow's SMTP provider (nightshift.airflow.mail).

Which channel is used is decided by the Airflow connection the notifier names (see
nightshift.airflow.notifiers); this module knows nothing of Airflow. The webhook is a plain JSON POST: the Slack
provider (apache-airflow-providers-slack, with slack_sdk) would add a dependency for one HTTP request, and Teams
takes the same body.
"""

from __future__ import annotations

import json
import logging
import urllib.request
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Alert:
    """Something a person must look at."""

    title: str
    message: str
    severity: str = "error"
    dag_id: str = ""
    run_id: str = ""
    task_id: str = ""
    link: str = ""
    """The task's log in the Airflow UI."""
    report_url: str = ""
    """The run's report page (collection, preparation, profile and drift, Data Docs; or training and evaluation)."""
    details: dict[str, Any] = field(default_factory=dict)
    created_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))

    def text(self) -> str:
        where = " / ".join(x for x in (self.dag_id, self.task_id, self.run_id) if x)
        lines = [f"[{self.severity.upper()}] {self.title}", f"where: {where}" if where else "", self.message]
        if self.report_url:
            lines.append(f"report: {self.report_url}")
        if self.link:
            lines.append(f"logs: {self.link}")
        return "\n".join(line for line in lines if line)


@dataclass(frozen=True)
class FileChannel:
    path: Path

    def deliver(self, alert: Alert) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(asdict(alert), ensure_ascii=False, default=str) + "\n")


@dataclass(frozen=True)
class WebhookChannel:
    url: str
    payload: str = "slack"
    """``slack``: ``{"text": ...}`` as Slack and Teams incoming webhooks expect; ``json``: the whole alert."""
    timeout: float = 30.0

    def deliver(self, alert: Alert) -> None:
        body = {"text": alert.text()} if self.payload == "slack" else asdict(alert)
        request = urllib.request.Request(
            self.url, data=json.dumps(body, default=str).encode(), headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=self.timeout) as response:  # noqa: S310 (URL from a connection)
            if response.status >= 300:
                raise RuntimeError(f"webhook answered {response.status}")


Channel = FileChannel | WebhookChannel


def channel_for(
    conn_type: str, host: str | None, port: int | None, login: str | None, password: str | None,
    schema: str | None, extra: dict[str, Any], home: Path,
) -> Channel:
    """Return the channel an Airflow connection describes; raise a clear error for an unusable one."""
    kind = (conn_type or "").lower()
    if kind in ("fs", "file"):
        path = Path(extra.get("path") or "alerts/alerts.jsonl").expanduser()
        return FileChannel(path if path.is_absolute() else home / path)
    if kind in ("smtp", "email"):
        raise ValueError("mail goes through Airflow's SMTP provider (nightshift.airflow.mail), not this module")
    if kind in ("http", "https", "slackwebhook", "webhook"):
        url = extra.get("url") or host or ""
        if "://" not in url:
            scheme = schema or ("https" if kind != "http" else "http")
            url = f"{scheme}://{url}{':' + str(port) if port else ''}"
        if "://" not in url or url.endswith("://"):
            raise ValueError("a webhook alert connection needs the webhook URL in host or extra.url")
        return WebhookChannel(url=url, payload=extra.get("payload", "slack"))
    raise ValueError(f"alert connection type {conn_type!r} is not supported: use fs, smtp or http")
