"""Airflow 3's human-in-the-loop task, asked only when a policy read at run time says so.

``AskedApproval`` is the standard provider's HITLOperator whose subject and body are written when the task runs
(``ask(context)`` returns them, or None to skip the task: nobody needs to be asked). The form appears in the
Airflow UI's **Required Actions** while the task waits (state ``awaiting_input``); the answer, or the defaults
after ``response_timeout``, is the task's XCom: ``chosen_options``, ``params_input``, ``responded_by_user``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from airflow.providers.standard.operators.hitl import HITLOperator
from airflow.sdk.exceptions import AirflowSkipException

SUBJECT_CHARS = 250
BODY_CHARS = 20_000


class AskedApproval(HITLOperator):
    def __init__(self, *, ask: Callable[[Any], dict[str, str] | None], **kwargs: Any) -> None:
        super().__init__(subject=kwargs.pop("subject", "approval"), **kwargs)
        self.ask = ask

    def execute(self, context: Any) -> Any:
        asked = self.ask(context)
        if asked is None:
            raise AirflowSkipException("no approval needed")
        self.subject = asked["subject"][:SUBJECT_CHARS]
        self.body = asked["body"][:BODY_CHARS]
        return super().execute(context)


def answer_of(answer: dict[str, Any] | None, yes: str = "Approve") -> dict[str, str | bool]:
    """Return what a person answered a yes/no form (``yes``: the option that says yes) with a ``reason`` field:
    approved, by, at, reason.

    An answer without a user is the timeout's default (``by`` is ``timeout``)."""
    from nightshift.provenance import printable_line

    answer = answer or {}
    user = answer.get("responded_by_user") or {}
    return {"approved": (answer.get("chosen_options") or []) == [yes],
            "by": str(user.get("name") or user.get("id") or "timeout")[:200],
            "at": str(answer.get("responded_at") or ""),
            "reason": printable_line((answer.get("params_input") or {}).get("reason"))}
