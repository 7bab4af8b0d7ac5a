"""``/v1/items``: catalog rows by filters in keyset pages, one row by its id; ``/v1/reviews``: a person's decision."""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import json

from fastapi import APIRouter, HTTPException, Query

from db.catalog import get_item
from db.queries import ItemFilters, list_items
from db.reviews import ItemNotFoundError, ReviewError, record_review
from db.session import session_scope
from pipeline.records import STATUSES
from pipeline.sorting import get_predictor
from worker.web.context import Ctx
from worker.web.schemas import BAD_JSON, ApiError, ItemOut, ItemPageOut, ReviewEntry, ReviewIn, ReviewOut

router = APIRouter(tags=["items"])


def _fingerprint(filters: ItemFilters) -> str:
    """A short digest of the filters a cursor was made for (a cursor is refused with other filters)."""
    text = json.dumps([getattr(filters, name) for name in ItemFilters.__slots__])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def encode_cursor(after: str, filters: ItemFilters) -> str:
    """The opaque cursor of the page after key ``after`` (URL-safe base64 of a small JSON object)."""
    raw = json.dumps({"after": after, "filters": _fingerprint(filters)}, ensure_ascii=False).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str, filters: ItemFilters) -> str:
    """The key a cursor continues after.

    Raises:
        HTTPException: 422, the cursor is not one this API made, or was made for other filters.
    """
    try:
        data = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        after, made_for = data["after"], data["filters"]
    except (binascii.Error, ValueError, TypeError, KeyError):
        raise HTTPException(422, "cursor: not a cursor of this API; pass the next_cursor of the previous page as it "
                                 "was, or no cursor for the first page") from None
    if not isinstance(after, str) or made_for != _fingerprint(filters):
        raise HTTPException(422, "cursor: it was made for other filters; repeat the previous page's filters with "
                                 "its next_cursor, or start again without a cursor") from None
    return after


def _filters(status: str | None, category: str | None, min_confidence: float | None, max_confidence: float | None,
             model_version: str | None, job_id: str | None) -> ItemFilters:
    if status is not None and status not in STATUSES:
        raise HTTPException(422, f"status: must be one of {', '.join(STATUSES)}, got {status!r}")
    if min_confidence is not None and max_confidence is not None and min_confidence > max_confidence:
        raise HTTPException(422, f"min_confidence ({min_confidence}) must not be above max_confidence "
                                 f"({max_confidence})")
    return ItemFilters(status=status, category=category, min_confidence=min_confidence,
                       max_confidence=max_confidence, model_version=model_version, job_id=job_id)


@router.get("/v1/items", response_model=ItemPageOut, summary="Catalog rows, filtered, a page at a time",
            responses={422: {"model": ApiError, "description": "a bad filter, limit or cursor"}})
def items(
    ctx: Ctx,
    status: str | None = Query(None, description=f"one of {', '.join(STATUSES)}"),
    category: str | None = Query(None, description="top-1 category, exactly"),
    min_confidence: float | None = Query(None, ge=0, le=1, description="confidence at least (0..1)"),
    max_confidence: float | None = Query(None, ge=0, le=1, description="confidence at most (0..1)"),
    model_version: str | None = Query(None, description="the model version that sorted the row"),
    job_id: str | None = Query(None, description="the job that last wrote the row"),
    limit: int = Query(50, ge=1, le=500, description="rows per page (1..500)"),
    cursor: str | None = Query(None, description="the previous page's next_cursor; none for the first page"),
) -> ItemPageOut:
    """Rows of `catalog_items` that match every filter given, ordered by item id. Pages are keyset pages: follow
    `next_cursor` (with the same filters) until it is null; a walk sees each row once, even while jobs write."""
    filters = _filters(status, category, min_confidence, max_confidence, model_version, job_id)
    after = None if cursor is None else decode_cursor(cursor, filters)
    with session_scope(ctx.settings.database_url) as session:
        page = list_items(session=session, filters=filters, after=after, limit=limit)
    next_cursor = None if page.next_after is None else encode_cursor(page.next_after, filters)
    return ItemPageOut(items=[ItemOut.of(row) for row in page.rows], next_cursor=next_cursor)


@router.get("/v1/items/{item_id:path}", response_model=ItemOut, summary="One catalog row",
            responses={404: {"model": ApiError, "description": "no such item"}})
def item(item_id: str, ctx: Ctx) -> ItemOut:
    """One item by its id. Ids may hold slashes (`file:///photos/a.jpg`, `s3://bucket/key`): put the id in the
    path as it is, or percent-encoded (`?`, `#` and `%` must be)."""
    with session_scope(ctx.settings.database_url) as session:
        row = get_item(session=session, item_id=item_id)
    if row is None:
        raise HTTPException(404, f"no item {item_id!r} in the catalog")
    return ItemOut.of(row)


@router.post("/v1/reviews", response_model=ReviewOut, status_code=201, summary="Record a person's decision",
             responses={404: {"model": ApiError, "description": "no such item"},
                        422: {"model": ApiError, "description": "a category the model does not have, a bad reviewer"},
                        **BAD_JSON})
def review(body: ReviewIn, ctx: Ctx) -> ReviewOut:
    """A person decides an item's category (`category`, one of the server model's categories), or that it is not a
    product / unknown (`category` null). The row becomes `reviewed` and no later sort overwrites it; the model's
    prediction moves to `model_category` / `model_confidence`, and the decision is appended to the review log."""
    classes = get_predictor(ctx.settings, ctx.model_spec).model_file.class_names
    try:
        with session_scope(ctx.settings.database_url) as session:
            entry = record_review(session=session, item_id=body.item_id, category=body.category,
                                  reviewer=body.reviewer, allowed=list(classes))
            row = get_item(session=session, item_id=body.item_id)
    except ItemNotFoundError:
        row = None
    except ReviewError as exc:
        raise HTTPException(422, str(exc)) from None
    if row is None:
        raise HTTPException(404, f"no item {body.item_id!r} in the catalog")
    return ReviewOut(review=ReviewEntry(**dataclasses.asdict(entry)), item=ItemOut.of(row))
