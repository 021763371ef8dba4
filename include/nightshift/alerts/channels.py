"""Deliver alerts to people: an alerts file (local default), email over SMTP, or a chat webhook (Slack, Teams).

Which channel is used is decided by the Airflow connection the notifier names (see
nightshift.airflow.notifiers); this module knows nothing of Airflow.
"""

from __future__ import annotations

import json
import logging
import smtplib
import ssl
import urllib.request
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from email.message import EmailMessage
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
class SmtpChannel:
    host: str
    port: int
    to: list[str]
    sender: str
    login: str | None = None
    password: str | None = None
    use_ssl: bool = False
    starttls: bool = False
    timeout: float = 30.0

    def deliver(self, alert: Alert) -> None:
        msg = EmailMessage()
        msg["Subject"] = f"[nightshift] {alert.title}"
        msg["From"] = self.sender
        msg["To"] = ", ".join(self.to)
        msg.set_content(alert.text() + "\n\n" + json.dumps(alert.details, indent=2, default=str))
        context = ssl.create_default_context()
        smtp_cls = smtplib.SMTP_SSL if self.use_ssl else smtplib.SMTP
        kwargs: dict[str, Any] = {"context": context} if self.use_ssl else {}
        with smtp_cls(self.host, self.port, timeout=self.timeout, **kwargs) as smtp:
            if self.starttls:
                smtp.starttls(context=context)
            if self.login:
                smtp.login(self.login, self.password or "")
            smtp.send_message(msg)


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


Channel = FileChannel | SmtpChannel | WebhookChannel


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
        to = extra.get("to") or []
        to = [to] if isinstance(to, str) else list(to)
        if not host or not to:
            raise ValueError("an smtp alert connection needs a host and extra.to (a list of addresses)")
        return SmtpChannel(
            host=host, port=int(port or 25), to=to, sender=extra.get("from") or login or "nightshift@localhost",
            login=login or None, password=password or None, use_ssl=bool(extra.get("ssl", False)),
            starttls=bool(extra.get("starttls", False)),
        )
    if kind in ("http", "https", "slackwebhook", "webhook"):
        url = extra.get("url") or host or ""
        if "://" not in url:
            scheme = schema or ("https" if kind != "http" else "http")
            url = f"{scheme}://{url}{':' + str(port) if port else ''}"
        if "://" not in url or url.endswith("://"):
            raise ValueError("a webhook alert connection needs the webhook URL in host or extra.url")
        return WebhookChannel(url=url, payload=extra.get("payload", "slack"))
    raise ValueError(f"alert connection type {conn_type!r} is not supported: use fs, smtp or http")
