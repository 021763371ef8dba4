"""Alerts by mail through Airflow's SMTP provider (apache-airflow-providers-smtp), with the ``nightshift_alerts``
connection as its one setting.

The provider's hook is the transport of its SmtpNotifier and reads the same connection fields: host, port,
login and password; extra ``disable_ssl`` (true for a plain or STARTTLS server), ``disable_tls`` (true: no
STARTTLS), ``from_email``, ``timeout``, ``retry_limit``, ``auth_type``/OAuth2 tokens. nightshift adds extra ``to``
(a list of addresses). SmtpNotifier itself is not used: it renders its subject and body as Jinja templates, and
an alert's text (an error message, a source's name) must never be evaluated as one.
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass
from typing import Any

from nightshift.alerts.channels import Alert

OLD_EXTRAS = {"ssl": "disable_ssl: false (SSL from the first byte) or true",
              "starttls": "disable_tls: false (STARTTLS) or true, with disable_ssl: true",
              "from": "from_email"}
"""Extras of nightshift's earlier mail channel: refused with what the provider reads instead."""
SUBJECT_CHARS = 200


@dataclass(frozen=True)
class ProviderMail:
    conn: Any
    """The Airflow connection, already looked up (inside a task or outside one: nightshift.airflow.connections)."""
    to: tuple[str, ...]
    sender: str

    @classmethod
    def of(cls, conn: Any, conn_id: str) -> ProviderMail:
        extra = conn.extra_dejson or {}
        old = sorted(k for k in OLD_EXTRAS if k in extra)
        if old:
            raise ValueError(f"connection {conn_id!r}: extra {old} is not read any more; mail goes through Airflow's "
                             "SMTP provider, which reads " + "; ".join(f"{k} -> {OLD_EXTRAS[k]}" for k in old))
        to = extra.get("to") or []
        to = [to] if isinstance(to, str) else list(to)
        if not conn.host or not to or not all(isinstance(t, str) and "@" in t for t in to):
            raise ValueError(f"connection {conn_id!r}: an smtp alert connection needs a host and extra.to (a list "
                             "of addresses)")
        return cls(conn, tuple(to), extra.get("from_email") or conn.login or "nightshift@localhost")

    def deliver(self, alert: Alert) -> None:
        from airflow.providers.smtp.hooks.smtp import SmtpHook

        conn = self.conn

        class Hook(SmtpHook):
            @classmethod
            def get_connection(cls, _conn_id: str) -> Any:  # the connection nightshift looked up
                return conn

        text = alert.text() + "\n\n" + json.dumps(alert.details, indent=2, default=str)
        # One line, bounded: a title naming a source or an error must not become a header of its own, nor a
        # Subject line that the server refuses.
        subject = " ".join(f"[nightshift] {alert.title}".split())[:SUBJECT_CHARS]
        with Hook(smtp_conn_id=conn.conn_id or "nightshift_alerts") as hook:
            hook.send_email_smtp(to=list(self.to), subject=subject,
                                 html_content=f"<pre>{html.escape(text)}</pre>", from_email=self.sender)
