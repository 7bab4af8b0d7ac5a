"""The HTTP API's FastAPI app (``invsort serve``): :func:`create_app`, ``/healthz``, ``/metrics`` and the errors.

Routes: ``POST /v1/classify`` (:mod:`worker.web.classify`), ``/v1/jobs`` (:mod:`worker.web.jobs`), ``/v1/items`` and
``POST /v1/reviews`` (:mod:`worker.web.items`). OpenAPI at ``/openapi.json``, its pages at ``/docs``. With
``INVSORT_API_TOKEN`` set, every route but ``/healthz`` needs the token or the pages' session (:mod:`worker.web.auth`).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import anyio
import anyio.to_thread
from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import InterfaceError, OperationalError

from db.session import session_scope
from pipeline.settings import Settings
from pipeline.sorting import get_predictor
from worker.web import auth, changes, classify, items, jobs, pages
from worker.web.context import Ctx, WebContext
from worker.web.metrics import Metrics, RequestMetrics
from worker.web.runner import JobStarter
from worker.web.schemas import DatabaseHealth, Health, ModelInfo

log = logging.getLogger(__name__)

CLASSIFY_CONCURRENCY = 2  # classify requests decoding and running the model at once; the others wait their turn


def _first_line(exc: BaseException) -> str:
    text_ = str(exc).strip()
    return text_.splitlines()[0].strip() if text_ else type(exc).__name__


def _database_error(exc: BaseException) -> str | None:
    """One line for a database that did not answer (SQLAlchemy's OperationalError or InterfaceError), else None."""
    if isinstance(exc, OperationalError | InterfaceError):
        return f"database unavailable: {_first_line(exc.orig or exc)}"
    return None


def _validation_message(exc: RequestValidationError) -> str:
    """Every problem of a request in one line: where, what is valid, what was sent."""
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err.get("loc", ()) if p not in ("body", "query", "path")) or "body"
        got = f" (got {err['input']!r})" if "input" in err and not isinstance(err["input"], dict | list) else ""
        parts.append(f"{where}: {err.get('msg', 'invalid')}{got}")
    return "; ".join(parts)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def bad_request(_request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{k: err[k] for k in ("loc", "msg", "type") if k in err} for err in exc.errors()]
        return JSONResponse({"detail": _validation_message(exc), "errors": errors}, status_code=422)

    async def database_down(_request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"detail": _database_error(exc) or _first_line(exc)}, status_code=503)

    app.add_exception_handler(OperationalError, database_down)
    app.add_exception_handler(InterfaceError, database_down)

    @app.exception_handler(Exception)
    async def unexpected(_request: Request, exc: Exception) -> JSONResponse:
        log.error("unexpected error answering a request", exc_info=exc)
        return JSONResponse({"detail": f"internal error ({type(exc).__name__}); the server's log has the "
                                       "traceback"}, status_code=500)


def _app_version() -> str:
    try:
        return version("invsort")
    except PackageNotFoundError:  # pragma: no cover - run from a checkout that was never installed
        return "0"


def create_app(settings: Settings, *, model_spec: str | None = None) -> FastAPI:
    """The HTTP API for ``settings`` (database, limits, local roots, broker), with ``model_spec`` (default
    ``settings.model_path``) for every request and job.

    The model is loaded when the app starts (its lifespan), so that a bad model file stops the server at start-up
    rather than at its first request; an embedded job still running when it stops is failed with that reason. The
    database must be at the latest schema (``invsort serve`` migrates it first). With ``settings.api_token`` every
    route but ``/healthz``, the login page and the pages' assets needs the token (:mod:`worker.web.auth`).

    Returns:
        A :class:`~fastapi.FastAPI` app; serve it with uvicorn, or test it with FastAPI's ``TestClient`` (as a
        context manager, which runs the lifespan).

    Raises:
        ModelFileError, FileNotFoundError, ConfigError: when the app starts (not here): the model is unusable.
    """
    spec = model_spec or settings.model_path
    ctx = WebContext(settings=settings, model_spec=spec, metrics=Metrics(settings.database_url),
                     jobs=JobStarter(settings, spec))

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        predictor = await anyio.to_thread.run_sync(functools.partial(get_predictor, settings, spec))
        log.info("serving model %s version %s", predictor.model_file.name, predictor.model_file.version)
        ctx.classify_limiter = anyio.CapacityLimiter(CLASSIFY_CONCURRENCY)
        yield
        await anyio.to_thread.run_sync(ctx.jobs.shutdown)

    app = FastAPI(
        title="invsort", version=_app_version(), lifespan=lifespan,
        description="Sort product photos into catalogue categories with a CNN: classify uploads, run jobs over "
                    "folders, S3 prefixes and manifests, read the catalog. When the server has a token "
                    "(INVSORT_API_TOKEN), every request but /healthz needs `Authorization: Bearer <token>` (401 "
                    "without); the web pages ask for it once at /login. Without a token there is no authentication "
                    "and `invsort serve` listens on a loopback address only.",
    )
    app.state.invsort = ctx
    secured: list[Any] = []
    if settings.api_token is not None:
        auth.install(app, settings.api_token)  # inside RequestMetrics: refused requests are counted too
        secured = auth.openapi_security()
    app.add_middleware(RequestMetrics, metrics=ctx.metrics)
    _install_error_handlers(app)
    app.include_router(_health_router(secured))
    for module in (classify, jobs, items):
        app.include_router(module.router, dependencies=secured)
    app.include_router(changes.router, dependencies=secured)  # /v1/changes (worker/web/changes.py)
    app.include_router(pages.router)  # the HTML pages (worker/web/pages.py)
    return app


def _health_router(secured: list[Any]) -> APIRouter:
    """``/healthz`` (always open) and ``/metrics`` (with ``secured``: the token's OpenAPI security)."""
    router = APIRouter(tags=["server"])

    @router.get("/healthz", response_model=Health, summary="Is the server able to work",
                responses={503: {"model": Health, "description": "the database did not answer"}})
    def healthz(ctx: Ctx) -> JSONResponse:
        """200 with the model's name and version when the database answers; 503 (same body) when it does not."""
        mf = get_predictor(ctx.settings, ctx.model_spec).model_file
        dialect = make_url(ctx.settings.database_url).get_backend_name()
        error = None
        try:
            with session_scope(ctx.settings.database_url) as session:
                session.execute(text("SELECT 1"))
        except Exception as exc:  # noqa: BLE001 - the answer says the database is down, with why
            error = _database_error(exc) or f"{type(exc).__name__}: {_first_line(exc)}"
        body = Health(status="ok" if error is None else "unavailable",
                      model=ModelInfo(name=mf.name, version=mf.version, classes=list(mf.class_names),
                                      review_threshold=float(mf.review_threshold)),
                      database=DatabaseHealth(reachable=error is None, dialect=dialect, error=error))
        return JSONResponse(body.model_dump(mode="json"), status_code=200 if error is None else 503)

    @router.get("/metrics", summary="Prometheus metrics", response_class=Response, dependencies=secured,
                responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text format"}})
    def metrics(ctx: Ctx) -> Response:
        """Requests, classify latency, photos classified by status, jobs started by mode, jobs by status."""
        return Response(generate_latest(ctx.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return router
