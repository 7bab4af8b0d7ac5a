"""``/v1/changes``: the change feed of the catalog (:func:`db.history.iter_changes`), a page at a time."""

from __future__ import annotations

from datetime import datetime

from fastapi import APIRouter, Query
from pydantic import BaseModel, Field

from db.history import MAX_CHANGES_PAGE, Change, read_changes
from db.session import session_scope
from worker.web.context import Ctx
from worker.web.schemas import ApiError

router = APIRouter(tags=["changes"])


class ChangeOut(BaseModel):
    """One change of an item's category or status (or a new item)."""

    cursor: int = Field(description="this change's position in the feed: pass the last one read as `since`")
    item_id: str
    category: str | None = Field(description="the category now (null: failed, or not a product / unknown)")
    status: str = Field(description="sorted, needs_review, failed or reviewed")
    previous_category: str | None = Field(description="the category before (null: none, or a new item)")
    previous_status: str | None = Field(description="the status before; null for a new item")
    model_version: str | None = Field(description="the version of the model that sorted the item")
    source: str = Field(description="model (a sort), review (a person's decision or its undo) or rollback")
    job_id: str | None = Field(description="the sorting job, for source model")
    changed_by: str | None = Field(description="the reviewer, for source review")
    changed_at: datetime = Field(description="when the change was written (UTC)")

    @classmethod
    def of(cls, change: Change) -> ChangeOut:
        return cls(**change.to_json())


class ChangesOut(BaseModel):
    changes: list[ChangeOut] = Field(description="oldest first; empty when there is nothing new yet")
    next: int = Field(description="the cursor to pass as `since` next time (past the entries read, the ones that "
                                  "changed nothing included)")


@router.get("/v1/changes", response_model=ChangesOut, summary="The change feed: categories and statuses that changed",
            responses={422: {"model": ApiError, "description": "a bad cursor or limit"}})
def changes(
    ctx: Ctx,
    since: int = Query(0, ge=0, le=2**63 - 1, description="the `next` of the previous page; 0 for the start of the "
                       "feed"),  # le: a cursor is a BIGINT; a larger one overflowed the query (500)
    limit: int = Query(100, ge=1, le=MAX_CHANGES_PAGE, description=f"changes per page (1..{MAX_CHANGES_PAGE})"),
) -> ChangesOut:
    """Each change of an item's category or status, and each new item, in the order of the feed: by sorts, a
    person's decisions and rollbacks. Ordered and resumable: follow `next` to read every change exactly once, even
    while jobs write. The view `catalog_current` has the items' current state (README: Warehouse systems)."""
    with session_scope(ctx.settings.database_url) as session:
        page = read_changes(session=session, since=since, limit=limit)
    return ChangesOut(changes=[ChangeOut.of(change) for change in page.changes], next=page.next)
