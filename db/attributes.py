"""``catalog_attributes``: what the models of attributes other than the category (``toe``, ``material``, ...)
predicted for each item, one row per item and attribute (:class:`db.models.CatalogAttribute`).

A job may name several models (:mod:`pipeline.attributes`): the one that predicts ``category`` writes
``catalog_items``; each of the others writes its attribute here, in the same transaction
(:func:`db.catalog.upsert_items` calls :func:`upsert_attributes`). A person's review decides the category only: an
item's attributes are written whatever its status, a ``reviewed`` item's included.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any, cast

from sqlalchemy import Table, select, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from db.models import CatalogAttribute
from pipeline.errors import InvsortError
from pipeline.records import ItemResult

_table = cast(Table, CatalogAttribute.__table__)
_COLUMNS = ("item_id", "attribute", "value", "confidence", "status", "error", "topk", "model_name",
            "model_version", "job_id", "updated_at")


def upsert_attributes(*, session: Session, rows: Sequence[ItemResult], keys: Sequence[str]) -> int:
    """Insert or replace the ``catalog_attributes`` rows of ``rows``' :attr:`~ItemResult.attributes`, keyed by
    (item, attribute), in the caller's transaction (no commit). ``keys[i]`` is the catalog key of ``rows[i]``
    (:func:`db.catalog.catalog_key`). One ``updated_at`` (now, UTC) for the whole call; an item named twice keeps
    its last result. Returns the number of attribute rows written.

    Raises:
        InvsortError: the session is not bound to SQLite or PostgreSQL.
        sqlalchemy.exc.DBAPIError: the database refused the write (a value longer than 255 characters).
    """
    now = datetime.now(UTC)
    values: dict[tuple[str, str], dict[str, Any]] = {}
    for key, row in zip(keys, rows, strict=True):
        for a in row.attributes:
            values[key, a.attribute] = {
                "item_id": key, "attribute": a.attribute, "value": a.value, "confidence": a.confidence,
                "status": a.status, "error": a.error, "topk": a.topk or None, "model_name": a.model_name,
                "model_version": a.model_version, "job_id": row.job_id, "updated_at": now,
            }
    if not values:
        return 0
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        stmt: Any = postgresql.insert(_table)
    elif dialect == "sqlite":
        stmt = sqlite.insert(_table)
    else:
        raise InvsortError(f"unsupported database dialect {dialect!r}: use SQLite or PostgreSQL")
    stmt = stmt.on_conflict_do_update(
        index_elements=["item_id", "attribute"],
        set_={c: stmt.excluded[c] for c in _COLUMNS if c not in ("item_id", "attribute")},
    )
    session.execute(stmt, list(values.values()))
    return len(values)


def attributes_of(*, session: Session, keys: Iterable[str]) -> dict[str, dict[str, str | None]]:
    """The attributes of the catalog keys ``keys``: ``{key: {"toe": "open_toe", ...}}``, each item's in attribute
    order, a value None where its model failed (keys without any are absent), as ``catalog_current.attributes``
    shows them."""
    found: dict[str, dict[str, str | None]] = defaultdict(dict)
    wanted = list(dict.fromkeys(keys))
    for start in range(0, len(wanted), 500):  # SQLite's bound-parameter limit is far above; PostgreSQL's too
        chunk = wanted[start:start + 500]
        stmt = (select(_table.c.item_id, _table.c.attribute, _table.c.value)
                .where(_table.c.item_id.in_(chunk)).order_by(_table.c.item_id, _table.c.attribute))
        for item_id, attribute, value in session.execute(stmt):
            found[item_id][attribute] = value
    return dict(found)


def attribute_names(*, session: Session) -> list[str]:
    """The attributes the catalog has values of, in name order."""
    return list(session.execute(text("SELECT DISTINCT attribute FROM catalog_attributes ORDER BY attribute"))
                .scalars())

