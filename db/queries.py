"""Reads of the catalog for the HTTP API: items by filters in keyset pages, jobs by status (one item by its id is
:func:`db.catalog.get_item`).

Like :mod:`db.catalog`, every function takes the :class:`~sqlalchemy.orm.Session` as a keyword argument, runs in
the caller's transaction and never commits. Nothing here writes.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any, cast

from sqlalchemy import Table, func, select
from sqlalchemy.orm import Session

from db.attributes import attributes_of
from db.catalog import CatalogRow
from db.models import JOB_STATUSES, CatalogItem, SortingJob

__all__ = ["ItemFilters", "ItemPage", "count_jobs_by_status", "list_items"]

_items = cast(Table, CatalogItem.__table__)
_jobs = cast(Table, SortingJob.__table__)


def _row_columns() -> list[Any]:
    """The columns of a :class:`CatalogRow`, in its field order; ``item_id`` is the whole id (``item_id_full`` for a
    row stored under a derived key)."""
    whole_id = func.coalesce(_items.c.item_id_full, _items.c.item_id)
    return [whole_id if f.name == "item_id" else _items.c[f.name] for f in fields(CatalogRow)
            if f.name != "attributes"]


@dataclass(frozen=True, slots=True)
class ItemFilters:
    """What :func:`list_items` keeps; None keeps everything. Confidences are 0..1, inclusive bounds (a row without
    a confidence, a ``failed`` one, is left out by either bound)."""

    status: str | None = None
    category: str | None = None
    min_confidence: float | None = None
    max_confidence: float | None = None
    model_version: str | None = None
    job_id: str | None = None

    def where(self) -> list[Any]:
        """The SQL conditions of these filters."""
        c = _items.c
        conditions: list[Any] = []
        for name in ("status", "category", "model_version", "job_id"):
            value = getattr(self, name)
            if value is not None:
                conditions.append(c[name] == value)
        if self.min_confidence is not None:
            conditions.append(c.confidence >= self.min_confidence)
        if self.max_confidence is not None:
            conditions.append(c.confidence <= self.max_confidence)
        return conditions


@dataclass(frozen=True, slots=True)
class ItemPage:
    """One page of :func:`list_items`: its rows, and the key to pass as ``after`` for the next page (None: this
    was the last page)."""

    rows: list[CatalogRow]
    next_after: str | None


def list_items(*, session: Session, filters: ItemFilters | None = None, after: str | None = None,
               limit: int = 50) -> ItemPage:
    """A page of catalog rows that match ``filters``, ordered by their key (``catalog_items.item_id``).

    Keyset pagination: the page holds the first ``limit`` matching rows whose key is greater than ``after``, so a
    walk from ``after=None`` through each page's :attr:`ItemPage.next_after` sees every row that existed throughout
    exactly once, however rows are written meanwhile (one indexed range scan of the primary key per page, no
    OFFSET).

    Args:
        filters: the rows to keep (None: all).
        after: the key the previous page ended at (:attr:`ItemPage.next_after`), None for the first page.
        limit: rows per page, at least 1.

    Returns:
        An :class:`ItemPage`; its rows' ``item_id`` is the whole id, with their :attr:`CatalogRow.attributes`.

    Raises:
        ValueError: ``limit`` below 1.
    """
    if limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    stmt = select(_items.c.item_id.label("key"), *_row_columns()).order_by(_items.c.item_id).limit(limit + 1)
    conditions = (filters or ItemFilters()).where()
    if after is not None:
        conditions.append(_items.c.item_id > after)
    if conditions:
        stmt = stmt.where(*conditions)
    found = session.execute(stmt).all()
    page = found[:limit]
    attributes = attributes_of(session=session, keys=[row.key for row in page])
    rows = [replace(CatalogRow(*row[1:]), attributes=attributes.get(row.key, {})) for row in page]
    return ItemPage(rows, page[-1].key if len(found) > limit else None)


def count_jobs_by_status(*, session: Session) -> dict[str, int]:
    """How many jobs ``sorting_jobs`` holds in each status: every status of :data:`db.models.JOB_STATUSES`, 0 where
    there is none."""
    counts = dict.fromkeys(JOB_STATUSES, 0)
    for status, n in session.execute(select(_jobs.c.status, func.count()).group_by(_jobs.c.status)):
        counts[status] = n
    return counts
