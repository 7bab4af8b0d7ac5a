"""The web pages of ``invsort serve``: server-rendered HTML (Jinja2) with a little plain JavaScript, no CDN.

Pages: ``/`` (classify photos: drop, paste or pick; each calls ``POST /v1/classify``), ``/review`` (the review
queue, keyboard first), ``/catalog`` (filters, keyset pages, CSV and JSON Lines export), ``/jobs`` (start, follow,
cancel), ``/models`` (the model card, thresholds, open-set score).

What the pages need that the API lacks lives under ``/ui/``: accepting the model's top-1 and undoing decisions
(``/ui/review/accept``, ``/ui/review/undo``, through :mod:`db.reviews`; a category is set with the API's
``POST /v1/reviews``), a catalog row's thumbnail
(``/ui/thumb?item_id=``: only the photo of a row the catalog holds, read through the server's
:class:`~pipeline.io.storage.ObjectReader`, so within ``INVSORT_LOCAL_ROOTS`` or S3, decoded with the limits of a
sort and re-encoded as a small PNG) and the pages' own CSS and JavaScript (``/ui/static/NAME``). Every page is
sent with a Content-Security-Policy that lets it load nothing but this server's own URLs.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlencode

import cv2
from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.orm import Session
from starlette.templating import Jinja2Templates

from db.catalog import CatalogRow, get_item
from db.export import csv_chunks, jsonl_lines, walk_items
from db.queries import ItemFilters, list_items
from db.reviews import (
    MAX_QUEUE_PAGE,
    ItemNotFoundError,
    ReviewError,
    accept_top1,
    review_queue,
    undo_review,
)
from db.session import session_scope
from pipeline.errors import ImageError, SourceError, TransientError
from pipeline.io.images import DecodeBudget, check_image_header, decode_image
from pipeline.io.storage import ObjectReader, make_reader, uri_scheme
from pipeline.models.fileversion import resolve_model_path
from pipeline.models.meta import ModelMeta, load_model_meta
from pipeline.models.modelcard import model_card
from pipeline.records import STATUSES
from pipeline.sorting import get_predictor
from worker.web.context import Ctx, WebContext

if TYPE_CHECKING:  # torch only for the type: a lean server (INVSORT_RUNTIME=onnxruntime) never imports it
    from pipeline.models.modelfile import ModelFile

router = APIRouter(include_in_schema=False)

_HERE = Path(__file__).resolve().parent
STATIC_DIR = _HERE / "static"
TEMPLATES = Jinja2Templates(directory=str(_HERE / "templates"))
TEMPLATES.env.filters["q"] = lambda value: quote(str(value), safe="")

#: Sent with every page: nothing but this server's own URLs (and the photos a page holds, as blob: URLs).
CSP = ("default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; connect-src 'self'; "
       "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
_STATIC_TYPES = {".css": "text/css; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                 ".svg": "image/svg+xml", ".png": "image/png", ".ico": "image/x-icon"}
THUMB_SIDE = 160  # longest side of a thumbnail, pixels (smaller photos are sent at their own size)
REVIEW_PAGE = 25
CATALOG_PAGE = 50
NOT_A_PRODUCT = "not a product / unknown"


def _static_files() -> dict[str, tuple[bytes, str, str]]:
    """The pages' assets by name: ``(bytes, media type, short content hash)``, read once (a fixed set: no other
    path is ever served)."""
    found = {}
    for path in sorted(STATIC_DIR.iterdir()):
        if path.is_file() and path.suffix in _STATIC_TYPES:
            data = path.read_bytes()
            found[path.name] = (data, _STATIC_TYPES[path.suffix], hashlib.sha256(data).hexdigest()[:10])
    return found


_STATIC = _static_files()


def _asset(name: str) -> str:
    """The URL path of a static asset, with its content hash (so a changed file is never served from a cache)."""
    return f"/ui/static/{name}?v={_STATIC[name][2]}"


TEMPLATES.env.globals["asset"] = _asset


# ------------------------------------------------------------------------------------------------ helpers


def _model(ctx: WebContext) -> tuple[ModelFile | ModelMeta, float]:
    """The served model's file and its review threshold in effect (INVSORT_REVIEW_THRESHOLD or the file's)."""
    predictor = get_predictor(ctx.settings, ctx.model_spec)
    return predictor.model_file, float(predictor.review_threshold)


def _render(request: Request, name: str, status_code: int = 200, **context: Any) -> HTMLResponse:
    base = request.scope.get("root_path", "").rstrip("/")
    response = TEMPLATES.TemplateResponse(request, name, {"base": base, "page": name.removesuffix(".html"),
                                                          **context}, status_code=status_code)
    response.headers["Content-Security-Policy"] = CSP
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "same-origin"
    return response


def _topk(row: CatalogRow) -> list[tuple[str, float]]:
    return [(str(c), float(p)) for c, p in row.topk]


def _key_of(index: int) -> str | None:
    """The key that picks class ``index`` on the review page: 1..9 for the first nine, 0 for the tenth."""
    return str(index + 1) if index < 9 else ("0" if index == 9 else None)


# --------------------------------------------------------------------------------------------------- pages


@router.get("/", response_class=HTMLResponse)
@router.get("/classify", response_class=HTMLResponse)
def classify_page(request: Request, ctx: Ctx) -> HTMLResponse:
    """Drop, paste or pick photos; each is sent to ``POST /v1/classify`` and its result shown as it comes."""
    mf, threshold = _model(ctx)
    return _render(request, "classify.html", model=mf, threshold=threshold)


@router.get("/review", response_class=HTMLResponse)
def review_page(
    request: Request, ctx: Ctx,
    after_confidence: float | None = Query(None, ge=0, le=1), after_id: str | None = Query(None),
    job_id: str | None = Query(None), limit: int = Query(REVIEW_PAGE, ge=1, le=MAX_QUEUE_PAGE),
) -> HTMLResponse:
    """One keyset page of the review queue, least confident first."""
    mf, threshold = _model(ctx)
    after = None if after_confidence is None or after_id is None else (after_confidence, after_id)
    job = job_id or None
    with session_scope(ctx.settings.database_url) as session:
        rows = review_queue(session=session, limit=limit, after=after, job_id=job)
    more = None
    if len(rows) == limit:
        last = rows[-1]
        more = urlencode({k: v for k, v in (("after_confidence", repr(last.confidence)), ("after_id", last.item_id),
                                            ("job_id", job), ("limit", limit)) if v is not None})
    start = urlencode({k: v for k, v in (("job_id", job), ("limit", limit)) if v is not None})
    classes = [(_key_of(i), name) for i, name in enumerate(mf.class_names)]
    config = {"classes": list(mf.class_names), "keys": {k: name for k, name in classes if k is not None}}
    return _render(request, "review.html", rows=[(r, _topk(r)) for r in rows], classes=classes, config=config,
                   model=mf, threshold=threshold, next_query=more, start_query=start, job_id=job,
                   first_page=after is None)


def _parse_filters(params: dict[str, str]) -> tuple[ItemFilters, list[str]]:
    """The catalog filters of a page's query (empty fields are no filter) and what was wrong with them."""
    errors = []
    values: dict[str, Any] = {}
    for name in ("status", "category", "model_version", "job_id"):
        values[name] = params.get(name, "").strip() or None
    if values["status"] is not None and values["status"] not in STATUSES:
        errors.append(f"status must be one of {', '.join(STATUSES)}, got {values['status']!r}")
        values["status"] = None
    for name in ("min_confidence", "max_confidence"):
        text = params.get(name, "").strip()
        values[name] = None
        if text:
            try:
                values[name] = float(text)
            except ValueError:
                errors.append(f"{name.replace('_', ' ')} must be a number from 0 to 1, got {text!r}")
                continue
            if not 0 <= values[name] <= 1:
                errors.append(f"{name.replace('_', ' ')} must be from 0 to 1, got {text}")
                values[name] = None
    lo, hi = values["min_confidence"], values["max_confidence"]
    if lo is not None and hi is not None and lo > hi:
        errors.append(f"min confidence ({lo}) is above max confidence ({hi})")
    return ItemFilters(**values), errors


def _filter_query(filters: ItemFilters, **extra: Any) -> str:
    pairs = [(name, getattr(filters, name)) for name in ItemFilters.__slots__]
    return urlencode([(k, v) for k, v in [*pairs, *extra.items()] if v is not None])


@router.get("/catalog", response_class=HTMLResponse)
def catalog_page(request: Request, ctx: Ctx) -> HTMLResponse:
    """Catalog rows by status, category, confidence range, model version and job, a keyset page at a time."""
    params = dict(request.query_params)
    filters, errors = _parse_filters(params)
    try:
        limit = min(max(int(params.get("limit") or CATALOG_PAGE), 1), 500)
    except ValueError:
        errors.append(f"rows per page must be a whole number, got {params['limit']!r}")
        limit = CATALOG_PAGE
    after = params.get("after") or None
    rows: list[CatalogRow] = []
    next_query = None
    if not errors:
        with session_scope(ctx.settings.database_url) as session:
            page = list_items(session=session, filters=filters, after=after, limit=limit)
        rows = page.rows
        if page.next_after is not None:
            next_query = _filter_query(filters, limit=limit, after=page.next_after)
    mf, _ = _model(ctx)
    return _render(request, "catalog.html", 422 if errors else 200, rows=rows, filters=filters, errors=errors,
                   statuses=STATUSES, classes=mf.class_names, limit=limit, next_query=next_query,
                   first_query=_filter_query(filters, limit=limit) if after else None,
                   export_query=_filter_query(filters))


@router.get("/jobs", response_class=HTMLResponse)
def jobs_page(request: Request, ctx: Ctx) -> HTMLResponse:
    """Start a job on a folder, S3 prefix or manifest; the latest jobs with live progress; cancel."""
    roots = [str(r) for r in ctx.settings.local_roots]
    return _render(request, "jobs.html", roots=roots)


def _card_text(request: Request, ctx: WebContext, mf: ModelFile | ModelMeta) -> tuple[str, str]:
    """The model card (``<stem>.card.md`` beside the model file) and where it came from; without one, the card
    made from the model file itself."""
    spec = resolve_model_path(ctx.model_spec)
    if uri_scheme(spec) == "s3":
        stem, dot, _ = spec.rpartition(".")
        uri = (stem if dot else spec) + ".card.md"
        try:
            return _photos(request, ctx).reader.read(uri).decode("utf-8", "replace"), uri
        except (OSError, SourceError, TransientError):
            pass
    else:
        path = Path(spec)
        card = path.with_name(path.stem + ".card.md")
        if card.is_file():
            return card.read_text(encoding="utf-8", errors="replace"), str(card)
    return model_card(mf), "made from the model file (no .card.md beside it)"


@dataclass(frozen=True, slots=True)
class _AttributeModelShown:
    """A configured model of another attribute as the Models page shows it: its fields, or why they cannot be read."""

    spec: str
    meta: ModelMeta | None
    error: str | None


def _attribute_models(request: Request, ctx: WebContext) -> list[_AttributeModelShown]:
    """``INVSORT_ATTRIBUTE_MODELS``, each read without torch (a file that cannot be read is shown with the reason;
    the jobs would refuse it)."""
    shown = []
    for spec in ctx.settings.attribute_models:
        try:
            shown.append(_AttributeModelShown(spec, load_model_meta(spec, reader=_photos(request, ctx).reader), None))
        except Exception as exc:  # noqa: BLE001 - the page says why, the jobs refuse it with the same reason
            shown.append(_AttributeModelShown(spec, None, f"{type(exc).__name__}: {exc}"))
    return shown


@router.get("/models", response_class=HTMLResponse)
def models_page(request: Request, ctx: Ctx) -> HTMLResponse:
    """The served model: classes, thresholds, open-set score and its model card; the configured models of other
    attributes (``INVSORT_ATTRIBUTE_MODELS``) that run with every job."""
    mf, threshold = _model(ctx)
    card, card_source = _card_text(request, ctx, mf)
    return _render(request, "models.html", model=mf, threshold=threshold, spec=ctx.model_spec, card=card,
                   card_source=card_source, overridden=ctx.settings.review_threshold is not None,
                   attribute_models=_attribute_models(request, ctx))


# ---------------------------------------------------------------------------------------------- exports


@router.get("/catalog/export.{fmt}")
def catalog_export(fmt: str, request: Request, ctx: Ctx) -> StreamingResponse:
    """Every row of the catalog page's filters, streamed: ``csv`` (``topk`` as JSON text) or ``jsonl``."""
    if fmt not in ("csv", "jsonl"):
        raise HTTPException(404, f"no export as {fmt!r}: use export.csv or export.jsonl")
    filters, errors = _parse_filters(dict(request.query_params))
    if errors:
        raise HTTPException(422, "; ".join(errors))
    rows = walk_items(ctx.settings.database_url, filters)
    lines = csv_chunks(rows) if fmt == "csv" else jsonl_lines(rows)
    media = "text/csv; charset=utf-8" if fmt == "csv" else "application/x-ndjson; charset=utf-8"
    return StreamingResponse(lines, media_type=media,
                             headers={"Content-Disposition": f'attachment; filename="catalog.{fmt}"'})


# ------------------------------------------------------------------------------------ assets, thumbnails


@router.get("/ui/static/{name}")
def static_asset(name: str) -> Response:
    """One of the pages' own assets (a fixed set read at start-up)."""
    found = _STATIC.get(name)
    if found is None:
        raise HTTPException(404, f"no asset {name!r}")
    data, media, _ = found
    return Response(data, media_type=media, headers={"Cache-Control": "public, max-age=86400",
                                                     "X-Content-Type-Options": "nosniff"})


@dataclass
class _Photos:
    """How the pages read and decode catalog photos: one reader (it holds the S3 client) and one decode budget
    per app."""

    reader: ObjectReader
    budget: DecodeBudget


_photos_lock = threading.Lock()


def _photos(request: Request, ctx: WebContext) -> _Photos:
    with _photos_lock:
        photos: _Photos | None = getattr(request.app.state, "invsort_pages_photos", None)
        if photos is None:
            photos = _Photos(make_reader(ctx.settings), DecodeBudget(ctx.settings.decode_memory_bytes))
            request.app.state.invsort_pages_photos = photos
        return photos


def _thumbnail(data: bytes, ctx: WebContext, budget: DecodeBudget) -> bytes:
    """A PNG of the photo ``data``, its longest side at most :data:`THUMB_SIDE`, decoded as a sort decodes it."""
    s = ctx.settings
    header = check_image_header(data, max_pixels=s.max_image_pixels)
    scale = min(1.0, THUMB_SIDE / max(header.width, header.height))
    size = (max(8, round(header.height * scale)), max(8, round(header.width * scale)))
    image = decode_image(data, size=size, in_chans=3, max_pixels=s.max_image_pixels, budget=budget)
    ok, encoded = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    if not ok:  # pragma: no cover - encoding a decoded uint8 image does not fail
        raise ImageError("could not encode the thumbnail")
    return encoded.tobytes()


@router.get("/ui/thumb")
def thumbnail(request: Request, ctx: Ctx, item_id: str = Query(..., min_length=1)) -> Response:
    """A PNG thumbnail of the photo of catalog row ``item_id``. Only rows the catalog holds are shown, read as a
    sort reads them (within INVSORT_LOCAL_ROOTS, or S3); 404 when the row or its photo cannot be read."""
    with session_scope(ctx.settings.database_url) as session:
        row = get_item(session=session, item_id=item_id)
    if row is None:
        raise HTTPException(404, f"no item {item_id!r} in the catalog")
    try:
        photos = _photos(request, ctx)
        png = _thumbnail(photos.reader.read(row.image_uri), ctx, photos.budget)
    except TransientError as exc:
        raise HTTPException(503, f"photo not read: {exc}") from None
    except (OSError, SourceError, ImageError) as exc:
        raise HTTPException(404, f"photo not shown: {exc}") from None
    return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=300",
                                                          "X-Content-Type-Options": "nosniff"})


# ------------------------------------------------------------------------------------- review decisions


class ItemsIn(BaseModel):
    """Items to accept the model's top-1 of, or to undo the latest decision on."""

    model_config = ConfigDict(extra="forbid")

    item_ids: list[str] = Field(min_length=1, max_length=MAX_QUEUE_PAGE)
    reviewer: str = Field(min_length=1, max_length=255)


class RowState(BaseModel):
    item_id: str
    status: str
    category: str | None
    confidence: float | None
    model_category: str | None
    reviewed_by: str | None


class DecisionOut(BaseModel):
    changed: int = Field(description="rows this call changed")
    rows: list[RowState] = Field(description="the rows as they are now, in the order asked")


def _states(session: Session, item_ids: Sequence[str]) -> list[RowState]:
    states = []
    for item_id in item_ids:
        row = get_item(session=session, item_id=item_id)
        if row is not None:
            states.append(RowState(item_id=row.item_id, status=row.status, category=row.category,
                                   confidence=row.confidence, model_category=row.model_category,
                                   reviewed_by=row.reviewed_by))
    return states


def _decision_errors(exc: Exception) -> HTTPException:
    if isinstance(exc, ItemNotFoundError):
        return HTTPException(404, str(exc))
    return HTTPException(422, str(exc))


@router.post("/ui/review/accept", response_model=DecisionOut)
def accept(body: ItemsIn, ctx: Ctx) -> DecisionOut:
    """Accept the model's top-1 of each item not reviewed yet (all or nothing)."""
    try:
        with session_scope(ctx.settings.database_url) as session:
            n = accept_top1(session=session, item_ids=body.item_ids, reviewer=body.reviewer)
            return DecisionOut(changed=n, rows=_states(session, body.item_ids))
    except (ReviewError, ItemNotFoundError) as exc:
        raise _decision_errors(exc) from None


@router.post("/ui/review/undo", response_model=DecisionOut)
def undo(body: ItemsIn, ctx: Ctx) -> DecisionOut:
    """Undo the latest decision on each item (all or nothing)."""
    try:
        with session_scope(ctx.settings.database_url) as session:
            n = sum(undo_review(session=session, item_id=i, reviewer=body.reviewer) is not None
                    for i in body.item_ids)
            return DecisionOut(changed=n, rows=_states(session, body.item_ids))
    except (ReviewError, ItemNotFoundError) as exc:
        raise _decision_errors(exc) from None
