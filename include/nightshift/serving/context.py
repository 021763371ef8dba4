"""A request's context: the server it reached and the facts noted about it for the access log and the metrics."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fastapi import Request

if TYPE_CHECKING:
    from nightshift.serving.server import Server


def server_of(request: Request) -> Server:
    return request.app.state.server


def note(request: Request, **values: Any) -> None:
    """Record facts about the request for the access log and the metrics (never its content)."""
    request.scope.setdefault("state", {}).update(values)
