"""The nightshift plugin inside Airflow's real API server app: login required, read only, report folder only."""

import pytest
from fastapi.testclient import TestClient

from nightshift.airflow.reports_app import resolve_report_file


@pytest.fixture(scope="module")
def reports(settings):
    root = settings.reports_dir
    run = root / "runs" / "ingest_corpus" / "manual__2026-11-30T01_00_00_00_00"
    (run / "charts").mkdir(parents=True, exist_ok=True)
    (run / "index.html").write_text("<html><body>run page</body></html>")
    (run / "charts" / "chars.svg").write_text("<svg xmlns='http://www.w3.org/2000/svg'></svg>")
    (root / "index.html").write_text("<html><body>overview</body></html>")
    (root / ".index.html.123.tmp").write_text("half written")
    (settings.home / "secret.txt").write_text("not a report")
    (root / "runs" / "link.html").unlink(missing_ok=True)
    (root / "runs" / "link.html").symlink_to(settings.home / "secret.txt")
    return root


@pytest.fixture(scope="module")
def client(airflow_db, reports):
    from airflow.api_fastapi.app import create_app, purge_cached_app

    purge_cached_app()
    return TestClient(create_app(), base_url="http://127.0.0.1")


@pytest.fixture(scope="module")
def token(client):
    from airflow.api_fastapi.app import get_auth_manager
    from airflow.api_fastapi.auth.managers.simple.user import SimpleAuthManagerUser

    return get_auth_manager().generate_jwt(SimpleAuthManagerUser(username="viewer", role="viewer"))


def test_pages_need_the_airflow_login(client, token):
    assert client.get("/nightshift/reports/index.html").status_code == 401
    browser = client.get("/nightshift/", headers={"Accept": "text/html"}, follow_redirects=False)
    assert browser.status_code == 303 and browser.headers["location"].startswith("/api/v2/auth/login?next=")
    assert client.get("/nightshift/reports/index.html", headers={"Authorization": "Bearer forged.jwt.token"}) \
        .status_code in (401, 403)
    ok = client.get("/nightshift/reports/index.html", cookies={"_token": token})
    assert ok.status_code == 200 and "overview" in ok.text
    assert "default-src 'self'" in ok.headers["content-security-policy"]
    assert client.get("/nightshift/reports/index.html", headers={"Authorization": f"Bearer {token}"}).status_code \
        == 200


def test_run_links_from_the_ui_reach_the_run_page(client, token):
    # The UI fills {DAG_ID} and {RUN_ID} URL-encoded; run ids hold ':' and '+'.
    response = client.get("/nightshift/runs/ingest_corpus/manual__2026-11-30T01%3A00%3A00%2B00%3A00",
                          cookies={"_token": token}, follow_redirects=False)
    page = "/nightshift/reports/runs/ingest_corpus/manual__2026-11-30T01_00_00_00_00/index.html"
    assert response.status_code == 307 and response.headers["location"] == page
    assert "run page" in client.get(page, cookies={"_token": token}).text
    missing = client.get("/nightshift/runs/ingest_corpus/scheduled__2020", cookies={"_token": token})
    assert missing.status_code == 404 and "no report yet" in missing.text
    svg = client.get("/nightshift/reports/runs/ingest_corpus/manual__2026-11-30T01_00_00_00_00/charts/chars.svg",
                     cookies={"_token": token})
    assert svg.status_code == 200 and svg.headers["content-type"].startswith("image/svg+xml")


@pytest.mark.parametrize("path", [
    "../secret.txt", "..%2Fsecret.txt", "%2e%2e/secret.txt", "runs/../../secret.txt", "runs/link.html",
    "/etc/passwd", "%2Fetc%2Fpasswd", ".index.html.123.tmp", "runs", "runs/ingest_corpus/",
    "..%5Csecret.txt", "index.html%00.svg",
])
def test_nothing_outside_the_report_folder_is_served(client, token, path):
    response = client.get(f"/nightshift/reports/{path}", cookies={"_token": token})
    assert response.status_code == 404, (path, response.status_code)
    assert "not a report" not in response.text


def test_the_app_is_read_only(client, token):
    for method in ("POST", "PUT", "DELETE", "PATCH"):
        response = client.request(method, "/nightshift/reports/index.html", cookies={"_token": token})
        assert response.status_code == 405


def test_resolve_refuses_escapes(tmp_path):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "a.html").write_text("x")
    (tmp_path / "r" / "a.py").write_text("x")
    assert resolve_report_file(tmp_path / "r", "a.html") == (tmp_path / "r" / "a.html").resolve()
    for bad in ("", "../r/a.html", "a.py", "/r/a.html", "a.html\x00", "sub/../../r/a.html", ".hidden/a.html"):
        assert resolve_report_file(tmp_path / "r", bad) is None, bad
