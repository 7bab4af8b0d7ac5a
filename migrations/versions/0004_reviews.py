"""human review decisions: catalog_items status ``reviewed`` and the model's prediction beside it; ``reviews`` log

A row a human has decided on (:mod:`db.reviews`) gets status ``reviewed``, the human's category (null: not a
product / unknown), ``reviewed_by`` and ``reviewed_at``; the model's top-1 and its probability move to
``model_category`` and ``model_confidence``. A sort never overwrites a reviewed row. ``reviews`` is the
append-only log of decisions (who, when, which model version they corrected, what the row was before), undos
included. A partial index on the needs_review rows serves the review queue. No existing row changes.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01 09:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_OLD_STATUS = "status IN ('sorted', 'needs_review', 'failed')"
_NEW_STATUS = "status IN ('sorted', 'needs_review', 'failed', 'reviewed')"
_ACTION = "action IN ('review', 'accept', 'undo')"
_QUEUE = "status = 'needs_review'"


def upgrade() -> None:
    with op.batch_alter_table("catalog_items") as batch:
        batch.drop_constraint(op.f("ck_catalog_items_status"), type_="check")
        batch.add_column(sa.Column("model_category", sa.String(length=255), nullable=True))
        batch.add_column(sa.Column("model_confidence", sa.Float(), nullable=True))
        batch.add_column(sa.Column("reviewed_by", sa.String(length=255), nullable=True))
        batch.add_column(sa.Column("reviewed_at", sa.DateTime(timezone=True), nullable=True))
        batch.create_check_constraint("status", _NEW_STATUS)
    # Outside the batch: both databases create a partial index in place.
    op.create_index(
        op.f("ix_catalog_items_review_queue"), "catalog_items", ["confidence", "item_id"],
        postgresql_where=sa.text(_QUEUE), sqlite_where=sa.text(_QUEUE),
    )
    op.create_table(
        "reviews",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("item_id", sa.String(length=1024), nullable=False),
        sa.Column("action", sa.String(length=16), nullable=False),
        sa.Column("category", sa.String(length=255), nullable=True),
        sa.Column("reviewer", sa.String(length=255), nullable=False),
        sa.Column("decided_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("model_name", sa.String(length=255), nullable=True),
        sa.Column("model_version", sa.String(length=64), nullable=True),
        sa.Column("model_category", sa.String(length=255), nullable=True),
        sa.Column("model_confidence", sa.Float(), nullable=True),
        sa.Column("previous_status", sa.String(length=16), nullable=False),
        sa.Column("previous_category", sa.String(length=255), nullable=True),
        sa.Column("previous_reviewed_by", sa.String(length=255), nullable=True),
        sa.Column("previous_reviewed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("undone_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("undoes", sa.Integer(), nullable=True),
        sa.CheckConstraint(_ACTION, name=op.f("ck_reviews_action")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_reviews")),
    )
    op.create_index(op.f("ix_reviews_item_id"), "reviews", ["item_id"])
    op.create_index(op.f("ix_reviews_decided_at"), "reviews", ["decided_at"])


def downgrade() -> None:
    # The decisions are lost with the table: a reviewed row goes back to what the model said of it, with the
    # status it had before it was reviewed (from the log; failed where the model had no category, else
    # needs_review, where the log does not say).
    op.execute(
        "UPDATE catalog_items SET status = COALESCE(("
        "SELECT r.previous_status FROM reviews r WHERE r.item_id = catalog_items.item_id AND r.action <> 'undo' "
        "AND r.previous_status <> 'reviewed' ORDER BY r.id DESC LIMIT 1), "
        "CASE WHEN model_category IS NULL THEN 'failed' ELSE 'needs_review' END), "
        "category = model_category, confidence = model_confidence WHERE status = 'reviewed'"
    )
    op.drop_index(op.f("ix_reviews_decided_at"), table_name="reviews")
    op.drop_index(op.f("ix_reviews_item_id"), table_name="reviews")
    op.drop_table("reviews")
    op.drop_index(op.f("ix_catalog_items_review_queue"), table_name="catalog_items")
    with op.batch_alter_table("catalog_items") as batch:
        batch.drop_constraint(op.f("ck_catalog_items_status"), type_="check")
        for name in ("reviewed_at", "reviewed_by", "model_confidence", "model_category"):
            batch.drop_column(name)
        batch.create_check_constraint("status", _OLD_STATUS)
