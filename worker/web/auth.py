"""The web app's authentication when ``INVSORT_API_TOKEN`` is set: a bearer token for programs, a session cookie
for the pages, CSRF tokens for the cookie's unsafe requests.

Rules (:class:`AuthMiddleware`, in front of every route):

- Open: ``/healthz``, the pages' assets (``/ui/static/NAME``), ``/login`` and ``POST /logout``.
- Everything else (``/v1/*``, ``/metrics``, ``/docs``, ``/openapi.json``, the pages, ``/ui/*``) needs either
  ``Authorization: Bearer <token>`` (compared in constant time) or the session cookie that ``POST /login`` sets after
  the token was typed there. Without valid credentials an API call gets 401 JSON with ``WWW-Authenticate: Bearer``;
  a browser asking for a page is sent (303) to ``/login?next=<the page>`` (a local path only, never another site).
  When an ``Authorization`` header is sent, it alone counts: a wrong one is 401 whatever the cookie.
- The session cookie (``invsort_session``: HttpOnly, SameSite=Strict, Secure over https, 12 hours) is signed with
  itsdangerous by a key derived from the token (HMAC-SHA256 with a fixed label), so every server process with the
  same token accepts it and a new token logs everybody out. ``POST /logout`` clears it.
- A request authenticated by the cookie with an unsafe method (POST, PUT, PATCH, DELETE) must carry the session's
  CSRF token, in the ``X-CSRF-Token`` header (the pages' fetch calls, from ``<meta name="csrf-token">``) or in a
  ``csrf_token`` field of an ``application/x-www-form-urlencoded`` form; its ``Origin`` (when sent) must be this
  server's host, and ``Sec-Fetch-Site`` (when sent) same-origin. Else 403 JSON. Bearer requests need none of it.
  ``POST /login`` needs no CSRF token (it holds the token itself, and logging in again changes nothing), only the
  same-origin checks.

The token itself is never logged, echoed or put in a page.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

from fastapi import APIRouter, FastAPI, HTTPException, Query, Request, Security
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.security import HTTPBearer
from itsdangerous import BadData, URLSafeTimedSerializer
from pydantic import SecretStr
from starlette.datastructures import Headers
from starlette.requests import cookie_parser
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger(__name__)

SESSION_COOKIE = "invsort_session"
SESSION_MAX_AGE_S = 12 * 3600  # a browser logs in again after 12 hours
CSRF_HEADER = "x-csrf-token"
CSRF_FIELD = "csrf_token"
FORM_LIMIT = 64 << 10  # bytes of a form read to find its csrf_token, or of a login form
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
OPEN_PATHS = frozenset({"/healthz", "/login", "/logout"})
OPEN_PREFIXES = ("/ui/static/",)
#: Paths that are never pages: a browser without credentials gets 401 there, not the login page.
API_PREFIXES = ("/v1/", "/ui/", "/metrics", "/openapi.json")
#: The state key (``request.state.invsort_csrf``) of a cookie session's CSRF token: base.html puts it in a meta tag.
CSRF_STATE = "invsort_csrf"
AUTH_STATE = "invsort_auth"  # "bearer" or "cookie": how the request was authenticated

_WWW_AUTHENTICATE = 'Bearer realm="invsort"'


class TokenAuth:
    """The token's checks and what is derived from it: session cookies and CSRF tokens.

    Args:
        token: the server's token (``INVSORT_API_TOKEN``, already checked by :func:`pipeline.settings.check_api_token`).

    Raises:
        ValueError: ``token`` is not ASCII.
    """

    def __init__(self, token: SecretStr) -> None:
        raw = token.get_secret_value().encode("ascii")
        self._token = raw
        session_key = hmac.new(raw, b"invsort session cookie v1", hashlib.sha256).digest()
        self._sessions = URLSafeTimedSerializer(session_key, salt="invsort-session")
        self._csrf_key = hmac.new(raw, b"invsort csrf token v1", hashlib.sha256).digest()

    def __repr__(self) -> str:
        return "TokenAuth(token=**********)"

    def check_token(self, given: str | bytes) -> bool:
        """Whether ``given`` is the token, compared in constant time."""
        data = given.encode("utf-8", "surrogateescape") if isinstance(given, str) else given
        return hmac.compare_digest(data, self._token)

    def new_session(self) -> str:
        """A new session cookie's value: a random session id, signed and timestamped."""
        return self._sessions.dumps({"sid": secrets.token_urlsafe(16)})

    def session_id(self, cookie: str | None) -> str | None:
        """The session id of cookie value ``cookie`` when its signature is good and it is under
        :data:`SESSION_MAX_AGE_S` old, else None."""
        if not cookie:
            return None
        try:
            data = self._sessions.loads(cookie, max_age=SESSION_MAX_AGE_S)
        except BadData:
            return None
        sid = data.get("sid") if isinstance(data, dict) else None
        return sid if isinstance(sid, str) and sid else None

    def csrf_token(self, sid: str) -> str:
        """The CSRF token of session ``sid`` (an HMAC of it: nothing is stored on the server)."""
        return hmac.new(self._csrf_key, sid.encode(), hashlib.sha256).hexdigest()

    def check_csrf(self, sid: str, given: str | None) -> bool:
        """Whether ``given`` is the CSRF token of session ``sid``, compared in constant time."""
        if not given:
            return False
        return hmac.compare_digest(given.encode("utf-8", "surrogateescape"), self.csrf_token(sid).encode())


# ------------------------------------------------------------------------------------------------ helpers


def route_path(scope: Scope) -> str:
    """The request's path within the app (without the ``root_path`` it is mounted under)."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    if root and path.startswith(root) and path[len(root):len(root) + 1] in ("", "/"):
        return path[len(root):] or "/"
    return path


def local_path(value: str | None) -> str:
    """``value`` when it is a path of this app (``/...``, with an optional query), else ``/``: a ``next``
    parameter never sends a browser to another site (``//evil.com``, ``/\\evil.com``, ``https://...``)."""
    if not value or not value.startswith("/") or value.startswith(("//", "/\\")):
        return "/"
    if any(c == "\\" or ord(c) < 0x21 or ord(c) == 0x7F for c in value):
        return "/"
    parts = urlsplit(value)
    if parts.scheme or parts.netloc or parts.path.startswith(("/login", "/logout")):
        return "/"
    return value


def _is_open(path: str) -> bool:
    return path in OPEN_PATHS or path.startswith(OPEN_PREFIXES)


def _wants_page(method: str, path: str, headers: Headers) -> bool:
    """A browser navigating to a page (it is sent to the login page rather than answered 401)."""
    if method not in ("GET", "HEAD") or path == "/v1" or path.startswith(API_PREFIXES):
        return False
    return "text/html" in headers.get("accept", "")


def _bearer(headers: Headers) -> str | None:
    """The token of an ``Authorization: Bearer`` header, "" when the header is there in another form, None when
    there is no header."""
    value = headers.get("authorization")
    if value is None:
        return None
    scheme, _, token = value.strip().partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def _cross_site(headers: Headers) -> str | None:
    """Why an unsafe request by a browser seems to come from another site (its ``Origin`` or ``Sec-Fetch-Site``),
    else None. A request without these headers (not a browser, or an old one) passes."""
    site = headers.get("sec-fetch-site")
    if site is not None and site not in ("same-origin", "none"):
        return f"a {site} request (Sec-Fetch-Site)"
    origin = headers.get("origin")
    if origin is None:
        return None
    host = headers.get("host", "").lower()
    if origin == "null" or urlsplit(origin).netloc.lower() != host:
        return f"Origin {origin!r} is not this server ({host!r})"
    return None


async def read_small_body(receive: Receive, limit: int) -> bytes | None:
    """The whole request body read from ``receive``, or None when it is over ``limit`` bytes or the client left."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return None
        body = message.get("body", b"")
        size += len(body)
        if size > limit:
            return None
        chunks.append(body)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that gives ``body`` (already read) once, then whatever ``receive`` gives (a disconnect)."""
    given = False

    async def replay() -> Message:
        nonlocal given
        if not given:
            given = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def _form_field(body: bytes, name: str) -> str | None:
    values = parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True).get(name)
    return values[0] if values else None


def _unauthorized(detail: str, *, invalid: bool = False) -> JSONResponse:
    challenge = _WWW_AUTHENTICATE + (', error="invalid_token"' if invalid else "")
    return JSONResponse({"detail": detail}, status_code=401, headers={"WWW-Authenticate": challenge})


def _forbidden(detail: str) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=403)


# --------------------------------------------------------------------------------------------- middleware


class AuthMiddleware:
    """Pure ASGI middleware: every HTTP request is let through, sent to the login page, or answered 401, 403 or
    413 (JSON ``{"detail": ...}``) by the rules of the module docstring; a websocket without credentials is closed.

    Args:
        app: the app behind it.
        auth: the token's checks.
    """

    def __init__(self, app: ASGIApp, auth: TokenAuth) -> None:
        self.app, self.auth = app, auth

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        path = route_path(scope)
        method = scope.get("method", "GET")
        state = scope.setdefault("state", {})

        via: str | None = None
        refusal: Response | None = None
        sid: str | None = None
        bearer = _bearer(headers)
        if bearer is not None:
            if bearer and self.auth.check_token(bearer):
                via = "bearer"
            else:
                refusal = _unauthorized("wrong token: send Authorization: Bearer <INVSORT_API_TOKEN>", invalid=True)
        else:
            cookie = _cookie(headers, SESSION_COOKIE)
            sid = self.auth.session_id(cookie)
            if sid is not None:
                via = "cookie"
                state[CSRF_STATE] = self.auth.csrf_token(sid)
            else:
                refusal = _unauthorized(
                    "the session has expired or is not valid: log in again at /login" if cookie is not None else
                    "authentication required: send Authorization: Bearer <INVSORT_API_TOKEN>, or log in at /login")
        if via is not None:
            state[AUTH_STATE] = via

        if scope["type"] == "websocket":
            if via is None or (via == "cookie" and _cross_site(headers) is not None):
                await send({"type": "websocket.close", "code": 1008})
                return
            await self.app(scope, receive, send)
            return

        if via is None and not _is_open(path):
            if _wants_page(method, path, headers):
                target = path + (f"?{scope['query_string'].decode('latin-1')}" if scope.get("query_string") else "")
                base = scope.get("root_path", "").rstrip("/")
                refusal = RedirectResponse(f"{base}/login?next={quote(local_path(target), safe='')}", 303)
            assert refusal is not None
            await refusal(scope, receive, send)
            return

        if method not in SAFE_METHODS and via != "bearer":
            reason = _cross_site(headers)
            if reason is not None:
                log.warning("refused %s %s: %s", method, path, reason)
                await _forbidden(f"cross-site request refused: {reason}")(scope, receive, send)
                return
            if via == "cookie" and sid is not None and path != "/login":  # logging in again changes nothing
                given = headers.get(CSRF_HEADER)
                if given is None and headers.get("content-type", "").startswith("application/x-www-form-urlencoded"):
                    body = await read_small_body(receive, FORM_LIMIT)
                    if body is None:
                        await JSONResponse({"detail": f"form larger than {FORM_LIMIT} bytes"},
                                           status_code=413)(scope, receive, send)
                        return
                    given = _form_field(body, CSRF_FIELD)
                    receive = _replay(body, receive)
                if not self.auth.check_csrf(sid, given):
                    await _forbidden("missing or wrong CSRF token: send the page's token (meta csrf-token) in an "
                                     "X-CSRF-Token header or a csrf_token form field, or authenticate with "
                                     "Authorization: Bearer instead of the session cookie")(scope, receive, send)
                    return
        await self.app(scope, receive, send)


def _cookie(headers: Headers, name: str) -> str | None:
    """Cookie ``name`` of the request, None when it has none (Starlette's cookie parser)."""
    for value in headers.getlist("cookie"):
        found = cookie_parser(value).get(name)
        if found is not None:
            return found
    return None


# --------------------------------------------------------------------------------------------- login pages


def login_router(auth: TokenAuth) -> APIRouter:
    """``GET /login`` (the page), ``POST /login`` (check the token, set the session cookie) and ``POST /logout``."""
    from worker.web.pages import _render  # the pages' templates, headers and Content-Security-Policy

    router = APIRouter(include_in_schema=False)

    def base_of(request: Request) -> str:
        return str(request.scope.get("root_path", "")).rstrip("/")

    def page(request: Request, next_: str, error: str | None = None, status_code: int = 200) -> HTMLResponse:
        response = _render(request, "login.html", status_code, next=next_, error=error)
        response.headers["Cache-Control"] = "no-store"
        return response

    @router.get("/login", response_class=HTMLResponse)
    def login_page(request: Request, next_: str | None = Query(None, alias="next")) -> Response:
        """The login page; a browser already logged in goes on to ``next``."""
        target = local_path(next_)
        if request.scope.get("state", {}).get(AUTH_STATE):
            return RedirectResponse(base_of(request) + target, 303)
        return page(request, target)

    @router.post("/login", response_class=HTMLResponse)
    async def login(request: Request) -> Response:
        """Check the token of the form; when right, set the session cookie and go on to ``next``; else the page
        again with an error and status 401.

        Raises:
            HTTPException: 413 when the form is over :data:`FORM_LIMIT` bytes.
        """
        chunks: list[bytes] = []
        async for chunk in request.stream():
            chunks.append(chunk)
            if sum(map(len, chunks)) > FORM_LIMIT:
                raise HTTPException(413, f"form larger than {FORM_LIMIT} bytes")
        body = b"".join(chunks)
        target = local_path(_form_field(body, "next"))
        client = request.client.host if request.client else "?"
        if not auth.check_token(_form_field(body, "token") or ""):
            log.warning("login refused (wrong token) from %s", client)
            return page(request, target, "That is not the token of this server (INVSORT_API_TOKEN).", 401)
        log.info("login from %s", client)
        response = RedirectResponse(base_of(request) + target, 303)
        response.set_cookie(SESSION_COOKIE, auth.new_session(), max_age=SESSION_MAX_AGE_S,
                            path=base_of(request) + "/", httponly=True, samesite="strict",
                            secure=request.url.scheme == "https")
        return response

    @router.post("/logout")
    def logout(request: Request) -> Response:
        """Clear the session cookie and go to the login page."""
        response = RedirectResponse(base_of(request) + "/login", 303)
        response.delete_cookie(SESSION_COOKIE, path=base_of(request) + "/", httponly=True, samesite="strict",
                               secure=request.url.scheme == "https")
        return response

    return router


def openapi_security() -> list[Any]:
    """The dependency that documents ``Authorization: Bearer`` in the OpenAPI schema (``/docs`` gets an
    "Authorize" button); the check itself is :class:`AuthMiddleware`'s."""
    scheme = HTTPBearer(auto_error=False, scheme_name="token",
                        description="INVSORT_API_TOKEN (or the pages' session cookie, after /login)")
    return [Security(scheme)]


def install(app: FastAPI, token: SecretStr) -> None:
    """Put the token's checks in front of ``app`` (a FastAPI app) and add its login pages.

    Raises:
        ValueError: ``token`` is not ASCII (:func:`pipeline.settings.check_api_token` refuses it first).
    """
    auth = TokenAuth(token)
    app.state.invsort_auth = auth
    app.add_middleware(AuthMiddleware, auth=auth)
    app.include_router(login_router(auth))
