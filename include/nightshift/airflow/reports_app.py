"""The nightshift pages inside the Airflow UI: a read-only FastAPI app the plugin mounts at /nightshift.

It serves the report folder ($NIGHTSHIFT_HOME/reports) and nothing else, to users logged in to Airflow
(the same JWT the UI sends, from its cookie or an ``Authorization: Bearer`` header). Only GET and HEAD exist.
"""

from __future__ import annotations

import logging
from pathlib import Path
from urllib.parse import quote

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response

from nightshift.provenance import safe_name
from nightshift.settings import load_settings

log = logging.getLogger(__name__)

PREFIX = "/nightshift"
MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8", ".svg": "image/svg+xml", ".png": "image/png", ".css": "text/css",
    ".js": "text/javascript", ".json": "application/json", ".bin": "application/octet-stream",
    ".ico": "image/x-icon", ".woff": "font/woff", ".woff2": "font/woff2", ".ttf": "font/ttf", ".otf": "font/otf",
}
# Pages may use their own inline styles and scripts (GX's Data Docs do), but load and contact nothing elsewhere.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; style-src 'self' 'unsafe-inline'; script-src 'self' "
    "'unsafe-inline'; img-src 'self' data:; font-src 'self' data:; connect-src 'self'; frame-ancestors 'self'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-cache",
}
EMPTY = """<!doctype html><html lang="en"><head><meta charset="utf-8"><title>nightshift</title></head>
<body style="font-family:system-ui,sans-serif;margin:2rem"><h1>nightshift</h1><p>{message}</p></body></html>"""


def resolve_report_file(root: Path, relative: str) -> Path | None:
    """Return the file ``relative`` names inside ``root``, or None for anything else.

    Refused: paths that leave the folder (``..``, absolute paths, symlinks pointing out), hidden entries
    (the staging folders of a publish in progress), folders, and file types a report does not contain.
    """
    if not relative or "\x00" in relative or "\\" in relative:
        return None
    parts = Path(relative).parts
    if Path(relative).is_absolute() or any(p in ("..", ".") or p.startswith(".") for p in parts):
        return None
    root = root.resolve()
    try:
        target = (root / relative).resolve()
    except (OSError, ValueError):
        return None
    if not target.is_relative_to(root) or not target.is_file() or target.suffix.lower() not in MEDIA_TYPES:
        return None
    return target


async def _require_login(request: Request) -> None:
    """Raise 401/403 unless the request carries a valid Airflow UI token (cookie or bearer header)."""
    from airflow.api_fastapi.auth.managers.base_auth_manager import COOKIE_NAME_JWT_TOKEN
    from airflow.api_fastapi.core_api.security import resolve_user_from_token

    header = request.headers.get("authorization", "")
    token = header[7:].strip() if header.lower().startswith("bearer ") else request.cookies.get(COOKIE_NAME_JWT_TOKEN)
    await resolve_user_from_token(token)


def create_app(reports_dir: Path | None = None) -> FastAPI:
    """Return the app; ``reports_dir`` defaults to the installation's report folder, read per request."""
    app = FastAPI(title="nightshift reports", docs_url=None, redoc_url=None, openapi_url=None)

    def root() -> Path:
        return Path(reports_dir) if reports_dir is not None else load_settings().reports_dir

    @app.middleware("http")
    async def login_and_headers(request: Request, call_next):
        if request.method not in ("GET", "HEAD"):
            return Response("read only", status_code=405, headers={"Allow": "GET, HEAD", **SECURITY_HEADERS})
        try:
            await _require_login(request)
        except HTTPException as exc:
            # Airflow's own login entry: it sends the browser to the auth manager's page and back here.
            login = f"/api/v2/auth/login?next={quote(str(request.url), safe='')}"
            if "text/html" in request.headers.get("accept", "") and exc.status_code == 401:
                return RedirectResponse(login, status_code=303, headers=SECURITY_HEADERS)
            return Response(str(exc.detail), status_code=exc.status_code, headers=SECURITY_HEADERS)
        response = await call_next(request)
        response.headers.update(SECURITY_HEADERS)
        return response

    @app.get("/", response_class=HTMLResponse)
    def overview():
        if (root() / "index.html").is_file():
            return RedirectResponse(f"{PREFIX}/reports/index.html", status_code=307)
        return HTMLResponse(EMPTY.format(message="No reports yet: run ingest_corpus (or <code>make run</code>)."))

    @app.get("/runs/{dag_id}/{run_id:path}")
    def run_page(dag_id: str, run_id: str):
        relative = f"runs/{safe_name(dag_id)}/{safe_name(run_id)}/index.html"
        if resolve_report_file(root(), relative) is None:
            return HTMLResponse(EMPTY.format(message="This run has no report yet: its steps publish one as they "
                                             "finish."), status_code=404)
        return RedirectResponse(f"{PREFIX}/reports/{relative}", status_code=307)

    @app.get("/reports/{relative:path}")
    def report_file(relative: str):
        target = resolve_report_file(root(), relative)
        if target is None:
            raise HTTPException(status_code=404, detail="not found")
        return FileResponse(target, media_type=MEDIA_TYPES[target.suffix.lower()])

    return app
