"""The web app's token (INVSORT_API_TOKEN, worker/web/auth.py): the real app through FastAPI's TestClient on SQLite,
real photos, and ``invsort serve`` refusing to listen beyond loopback without a token.

Nothing is mocked: a bearer token for the API, the login page's session cookie and CSRF token for the pages.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient
from itsdangerous import TimestampSigner, URLSafeTimedSerializer
from pydantic import SecretStr

from pipeline.errors import ConfigError
from pipeline.settings import build_settings
from tests.images import example_files
from worker.cli import _is_loopback, main
from worker.web.app import create_app
from worker.web.auth import SESSION_COOKIE, SESSION_MAX_AGE_S, TokenAuth, local_path

TOKEN = "tok-" + secrets.token_urlsafe(24)
PAGE = {"accept": "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"}
BEARER = {"authorization": f"Bearer {TOKEN}"}


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch, tmp_path):
    """No INVSORT_* variable or .env file of the caller's: every setting is the test's."""
    for name in [k for k in os.environ if k.startswith("INVSORT_")]:
        monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def roots(tmp_path: Path) -> Path:
    root = tmp_path / "roots"
    root.mkdir()
    return root


def _client(url: str, roots: Path, token: str | None) -> TestClient:
    settings = build_settings(database_url=url, local_roots=str(roots), batch_size=16, api_token=token)
    return TestClient(create_app(settings))


@pytest.fixture
def secured(sqlite_url: str, roots: Path) -> Iterator[TestClient]:
    """The app with the token set (no credentials of its own: each request brings them)."""
    with _client(sqlite_url, roots, TOKEN) as client:
        yield client


def _photo() -> tuple[str, tuple[str, bytes, str]]:
    path = example_files()[0]
    return ("file", (path.name, path.read_bytes(), "image/png"))


def _login(client: TestClient, next_: str = "/") -> str:
    """Log in through the login form; returns the CSRF token of the session the pages show."""
    answer = client.post("/login", data={"token": TOKEN, "next": next_}, follow_redirects=False)
    assert answer.status_code == 303, answer.text
    page = client.get("/", headers=PAGE)
    assert page.status_code == 200
    found = re.search(r'<meta name="csrf-token" content="([^"]+)">', page.text)
    assert found, "the page carries the session's CSRF token"
    return found.group(1)


# ----------------------------------------------------------------------------------------------- settings


def test_the_token_is_a_secret_of_at_least_16_visible_characters():
    settings = build_settings(api_token=TOKEN)
    assert settings.api_token is not None and settings.api_token.get_secret_value() == TOKEN
    assert TOKEN not in repr(settings) and TOKEN not in str(settings) and TOKEN not in repr(settings.api_token)
    assert build_settings(api_token="").api_token is None, "empty means unset"
    for bad in ("short", "fifteen-chars-x", "sixteen chars wi", "é" * 20):
        with pytest.raises(ConfigError) as refused:
            build_settings(api_token=bad)
        message = str(refused.value)
        assert "INVSORT_API_TOKEN must be at least 16 visible ASCII characters without spaces" in message
        assert bad not in message, "the refused token is not echoed"


def test_a_short_token_in_the_environment_stops_serve_with_one_line(tmp_path):
    db = tmp_path / "never.db"
    result = CliRunner().invoke(main, ["serve", "--db", f"sqlite:///{db}"], env={"INVSORT_API_TOKEN": "tooshort"})
    assert result.exit_code == 1
    assert "Error: invalid settings:" in result.output and "INVSORT_API_TOKEN must be at least 16" in result.output
    assert "tooshort" not in result.output and "Traceback" not in result.output
    assert not db.exists()


# ---------------------------------------------------------------------------------------------------- serve


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "[::]", "192.168.1.20", "10.0.0.1", "example.com", "fe80::1"])
def test_serve_refuses_an_address_beyond_loopback_without_a_token(tmp_path, host):
    db = tmp_path / "never.db"
    unset: dict[str, str | None] = {k: None for k in os.environ if k.startswith("INVSORT_")}
    result = CliRunner().invoke(main, ["serve", "--host", host, "--port", "9", "--db", f"sqlite:///{db}"], env=unset)
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"Error: refusing to listen on {host} without authentication: "
                                                   "set INVSORT_API_TOKEN")
    assert not db.exists(), "it stops before migrating the database (and before opening a port)"


@pytest.mark.parametrize(("host", "loopback"), [
    ("127.0.0.1", True), ("127.1.2.3", True), ("::1", True), ("[::1]", True), ("localhost", True),
    ("LOCALHOST", True), ("::ffff:127.0.0.1", True), ("0.0.0.0", False), ("::", False), ("::ffff:10.0.0.1", False),
    ("128.0.0.1", False), ("localhost.example.com", False), ("", False),
])
def test_which_hosts_are_loopback(host, loopback):
    assert _is_loopback(host) is loopback


# ------------------------------------------------------------------------------------------------------ API


def test_without_a_token_the_app_is_open_as_before(sqlite_url, roots):
    with _client(sqlite_url, roots, None) as client:
        assert client.post("/v1/classify", files=[_photo()]).status_code == 200
        page = client.get("/", headers=PAGE, follow_redirects=False)
        assert page.status_code == 200 and 'name="csrf-token"' not in page.text and "Log out" not in page.text
        assert client.get("/metrics").status_code == 200
        assert client.get("/login").status_code == 404, "no login page without a token"
        assert "securitySchemes" not in client.get("/openapi.json").text


def test_classify_needs_the_bearer_token(secured):
    missing = secured.post("/v1/classify", files=[_photo()])
    assert missing.status_code == 401
    assert missing.headers["www-authenticate"].startswith("Bearer")
    assert missing.json() == {"detail": "authentication required: send Authorization: Bearer <INVSORT_API_TOKEN>, "
                                        "or log in at /login"}
    for wrong in (f"Bearer {TOKEN}x", f"Bearer {TOKEN[:-1]}", "Bearer", f"Basic {TOKEN}", TOKEN):
        answer = secured.post("/v1/classify", files=[_photo()], headers={"authorization": wrong})
        assert answer.status_code == 401, wrong
        assert answer.json()["detail"].startswith("wrong token")
        assert 'error="invalid_token"' in answer.headers["www-authenticate"]

    right = secured.post("/v1/classify", files=[_photo()], headers=BEARER)
    assert right.status_code == 200, right.text
    (result,) = right.json()["results"]
    assert result["filename"] == example_files()[0].name and result["category"] == example_files()[0].parent.name
    assert secured.post("/v1/classify", files=[_photo()], headers={"authorization": f"bearer  {TOKEN} "}).status_code \
        == 200, "the scheme is case-insensitive"


def test_every_route_but_healthz_and_the_assets_needs_the_token(secured):
    assert secured.get("/healthz").status_code == 200
    assert secured.get("/ui/static/common.js").status_code == 200
    assert secured.get("/login").status_code == 200
    for path in ("/metrics", "/v1/jobs", "/v1/items", "/openapi.json", "/docs", "/ui/thumb?item_id=x",
                 "/catalog/export.csv", "/no/such/route", "/v1"):
        answer = secured.get(path)
        assert answer.status_code == 401, path
        assert answer.headers["content-type"] == "application/json" and answer.json()["detail"], path
    for path in ("/v1/jobs", "/v1/reviews", "/ui/review/accept"):
        assert secured.post(path, json={}).status_code == 401, path

    metrics = secured.get("/metrics", headers=BEARER)  # as Prometheus scrapes with a bearer token
    assert metrics.status_code == 200 and "invsort_http_requests_total" in metrics.text
    assert 'status="401"' in metrics.text, "refused requests are counted"
    assert secured.get("/v1/jobs", headers=BEARER).status_code == 200
    schema = secured.get("/openapi.json", headers=BEARER).json()
    assert schema["components"]["securitySchemes"]["token"] == {
        "type": "http", "scheme": "bearer", "description": "INVSORT_API_TOKEN (or the pages' session cookie, after "
                                                            "/login)"}
    assert schema["paths"]["/v1/classify"]["post"]["security"] == [{"token": []}]
    assert "security" not in schema["paths"]["/healthz"]["get"]
    assert secured.get("/docs", headers=BEARER).status_code == 200


def test_a_bearer_post_needs_no_csrf_token(secured, roots):
    answer = secured.post("/v1/jobs", json={"source": str(roots / "nowhere")}, headers=BEARER)
    assert answer.status_code == 422, answer.text  # past authentication: the folder does not exist
    cross = secured.post("/v1/jobs", json={"source": str(roots / "nowhere")},
                         headers={**BEARER, "origin": "https://evil.example", "sec-fetch-site": "cross-site"})
    assert cross.status_code == 422, "a bearer token is not sent by a browser on its own: no CSRF check"


# ---------------------------------------------------------------------------------------------------- pages


def test_a_page_sends_the_browser_to_the_login_page(secured):
    answer = secured.get("/review?limit=5&job_id=a b", headers=PAGE, follow_redirects=False)
    assert answer.status_code == 303
    assert answer.headers["location"] == "/login?next=%2Freview%3Flimit%3D5%26job_id%3Da%2520b"
    login = secured.get(answer.headers["location"])
    assert login.status_code == 200 and 'type="password"' in login.text
    assert 'name="next" value="/review?limit=5&amp;job_id=a%20b"' in login.text
    assert "default-src 'self'" in login.headers["content-security-policy"]
    assert "<script>" not in login.text and "style=" not in login.text, "no inline script or style (the CSP)"
    assert secured.get("/catalog", follow_redirects=False).status_code == 401, "not a browser: 401, no redirect"


def test_login_with_the_wrong_token_is_401_and_the_page_again(secured):
    answer = secured.post("/login", data={"token": "not-the-token-at-all", "next": "/jobs"}, follow_redirects=False)
    assert answer.status_code == 401
    assert "That is not the token of this server" in answer.text and 'value="/jobs"' in answer.text
    assert SESSION_COOKIE not in answer.headers.get("set-cookie", "")
    assert secured.get("/", headers=PAGE, follow_redirects=False).status_code == 303
    assert secured.post("/login", data={}, follow_redirects=False).status_code == 401


def test_login_sets_a_session_cookie_and_the_pages_load(secured):
    answer = secured.post("/login", data={"token": TOKEN, "next": "/catalog?status=sorted"}, follow_redirects=False)
    assert answer.status_code == 303 and answer.headers["location"] == "/catalog?status=sorted"
    cookie = answer.headers["set-cookie"]
    assert cookie.startswith(f"{SESSION_COOKIE}=")
    attributes = {part.strip().split("=")[0].lower() for part in cookie.split(";")[1:]}
    assert {"httponly", "max-age", "path"} <= attributes and "secure" not in attributes  # http here
    assert f"Max-Age={SESSION_MAX_AGE_S}" in cookie and "SameSite=strict" in cookie and "Path=/" in cookie
    for path in ("/", "/review", "/catalog", "/jobs", "/models"):
        page = secured.get(path, headers=PAGE, follow_redirects=False)
        assert page.status_code == 200, path
        assert 'name="csrf-token"' in page.text and 'action="/logout"' in page.text, path
    assert secured.get("/v1/jobs").status_code == 200, "GET with the cookie"
    assert secured.get("/login", follow_redirects=False).headers["location"] == "/", "already logged in"
    assert secured.get("/docs").status_code == 200 and secured.get("/openapi.json").status_code == 200

    logout = secured.post("/logout", data={"csrf_token": _login(secured)}, follow_redirects=False)
    assert logout.status_code == 303 and logout.headers["location"] == "/login"
    assert f'{SESSION_COOKIE}=""' in logout.headers["set-cookie"] and "Max-Age=0" in logout.headers["set-cookie"]
    assert secured.get("/", headers=PAGE, follow_redirects=False).status_code == 303


def test_over_https_the_cookie_is_secure(sqlite_url, roots):
    settings = build_settings(database_url=sqlite_url, local_roots=str(roots), api_token=TOKEN)
    with TestClient(create_app(settings), base_url="https://invsort.example") as client:
        answer = client.post("/login", data={"token": TOKEN}, follow_redirects=False)
        assert answer.status_code == 303 and "Secure" in answer.headers["set-cookie"]


def test_a_cookie_post_needs_the_csrf_token(secured, roots):
    csrf = _login(secured)
    body = {"source": str(roots / "nowhere")}
    missing = secured.post("/v1/jobs", json=body)
    assert missing.status_code == 403 and missing.json()["detail"].startswith("missing or wrong CSRF token")
    wrong = secured.post("/v1/jobs", json=body, headers={"x-csrf-token": csrf[:-1] + "0"})
    assert wrong.status_code == 403
    right = secured.post("/v1/jobs", json=body, headers={"x-csrf-token": csrf})
    assert right.status_code == 422, right.text  # past the checks: the folder does not exist
    photo = secured.post("/v1/classify", files=[_photo()], headers={"x-csrf-token": csrf})
    assert photo.status_code == 200 and photo.json()["results"][0]["status"] in ("sorted", "needs_review")
    assert secured.post("/v1/classify", files=[_photo()]).status_code == 403

    form = secured.post("/ui/review/accept", data={"csrf_token": csrf}, follow_redirects=False)
    assert form.status_code == 422, "a form field carries it too"
    assert "got b'csrf_token=" in form.json()["detail"], "and the route still reads the whole body"
    huge = secured.post("/ui/review/accept", content=f"csrf_token={csrf}&pad={'a' * 70_000}",
                        headers={"content-type": "application/x-www-form-urlencoded"})
    assert huge.status_code == 413
    assert secured.post("/ui/review/accept", data={"csrf_token": "x"}).status_code == 403

    for cross in ({"origin": "https://evil.example"}, {"origin": "null"}, {"sec-fetch-site": "cross-site"},
                  {"sec-fetch-site": "same-site"}):
        answer = secured.post("/v1/jobs", json=body, headers={"x-csrf-token": csrf, **cross})
        assert answer.status_code == 403 and answer.json()["detail"].startswith("cross-site request refused"), cross
    same = {"origin": "http://testserver", "sec-fetch-site": "same-origin", "x-csrf-token": csrf}
    assert secured.post("/v1/jobs", json=body, headers=same).status_code == 422


def test_a_session_from_another_token_or_too_old_is_not_accepted(sqlite_url, roots):
    with _client(sqlite_url, roots, TOKEN) as first:
        _login(first)
        cookie = first.cookies[SESSION_COOKIE]
    with _client(sqlite_url, roots, TOKEN) as other_process:  # the same token: the same key
        other_process.cookies.set(SESSION_COOKIE, cookie)
        assert other_process.get("/v1/jobs").status_code == 200
    with _client(sqlite_url, roots, TOKEN + "-new") as changed:  # a new token logs everybody out
        changed.cookies.set(SESSION_COOKIE, cookie)
        answer = changed.get("/v1/jobs")
        assert answer.status_code == 401 and "expired or is not valid" in answer.json()["detail"]
        forged = URLSafeTimedSerializer(b"guess", salt="invsort-session").dumps({"sid": "a"})
        changed.cookies.set(SESSION_COOKIE, forged)
        assert changed.get("/v1/jobs").status_code == 401


def test_a_session_expires_after_12_hours(monkeypatch):
    auth = TokenAuth(SecretStr(TOKEN))
    fresh = auth.new_session()
    with monkeypatch.context() as m:
        m.setattr(TimestampSigner, "get_timestamp", lambda _self: int(time.time()) - SESSION_MAX_AGE_S - 5)
        old = auth.new_session()
    assert auth.session_id(fresh) is not None and auth.session_id(old) is None
    assert auth.session_id(fresh[:-2]) is None and auth.session_id("") is None and auth.session_id(None) is None
    assert TOKEN not in repr(auth)


@pytest.mark.parametrize(("given", "kept"), [
    ("/review?limit=5", "/review?limit=5"), ("/", "/"), ("//evil.com", "/"), ("//evil.com/x", "/"),
    ("/\\evil.com", "/"), ("https://evil.com", "/"), ("http:/evil.com", "/"), ("evil.com", "/"), ("", "/"),
    (None, "/"), ("/\t/evil.com", "/"), ("/ok\r\nSet-Cookie: x", "/"), ("/login?next=//evil.com", "/"),
    ("javascript:alert(1)", "/"),
])
def test_next_is_a_local_path_only(given, kept):
    assert local_path(given) == kept


def test_login_never_redirects_to_another_site(secured):
    for evil in ("//evil.com", "https://evil.com/", "/\\evil.com"):
        answer = secured.post("/login", data={"token": TOKEN, "next": evil}, follow_redirects=False)
        assert answer.status_code == 303 and answer.headers["location"] == "/", evil
        page = secured.get("/login", params={"next": evil}, follow_redirects=False)
        assert page.headers["location"] == "/", evil
        secured.cookies.clear()


def test_the_token_is_never_logged_or_answered(secured, caplog, roots):
    caplog.set_level(logging.DEBUG)
    answers = [
        secured.post("/login", data={"token": TOKEN + "x"}),
        secured.post("/v1/classify", files=[_photo()], headers={"authorization": f"Bearer {TOKEN}x"}),
        secured.post("/v1/classify", files=[_photo()], headers=BEARER),
        secured.post("/login", data={"token": TOKEN}, follow_redirects=False),
        secured.get("/", headers=PAGE),
        secured.get("/v1/jobs"),
        secured.post("/v1/jobs", json={"source": str(roots)}),
        secured.get("/openapi.json"),
    ]
    assert [a.status_code for a in answers] == [401, 401, 200, 303, 200, 200, 403, 200]
    for answer in answers:
        assert TOKEN not in answer.text and TOKEN not in str(answer.headers)
    assert "login refused (wrong token)" in caplog.text and "login from" in caplog.text
    assert TOKEN not in caplog.text
    assert "Traceback" not in caplog.text
