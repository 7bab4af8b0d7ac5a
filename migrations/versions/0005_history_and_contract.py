"""catalog_history (every state of every catalog row, the change feed) and the contract view catalog_current v1

``catalog_history`` gets one entry per catalog row a sort writes, per human decision and undo, per rollback, in
the transaction of the write (:mod:`db.history`). Each existing catalog row gets one entry now (``changed``, no
previous state, written at its ``updated_at``): every later write finds the state it replaces in the history,
and a rollback of the first job after the upgrade has a state to go back to.

``catalog_current`` version 1 is the stable interface of the catalog for other systems (:mod:`db.contract`). Its
SELECT is frozen here: this migration builds the same view whatever db/contract.py says later.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02 09:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_SOURCE = "source IN ('model', 'review', 'rollback')"
_VIEW_V1 = (
    "CREATE VIEW catalog_current AS "
    "SELECT coalesce(item_id_full, item_id) AS item_id, category, status, confidence, "
    "status = 'reviewed' AS reviewed, model_version, updated_at FROM catalog_items"
)
_COMMENT_V1 = (
    "COMMENT ON VIEW catalog_current IS "
    "'invsort catalog contract, version 1 (README: Warehouse systems: the contract)'"
)
_BACKFILL = (
    "INSERT INTO catalog_history (item_id, job_id, model_name, model_version, category, confidence, status, topk, "
    "reason, source, changed_by, changed, previous_category, previous_status, written_at) "
    "SELECT item_id, CASE WHEN status = 'reviewed' THEN NULL ELSE job_id END, model_name, model_version, category, "
    "confidence, status, topk, CASE WHEN status = 'reviewed' THEN 'review' ELSE error END, "
    "CASE WHEN status = 'reviewed' THEN 'review' ELSE 'model' END, reviewed_by, {true}, NULL, NULL, updated_at "
    "FROM catalog_items ORDER BY updated_at, item_id"
)


def upgrade() -> None:
    op.create_table(
        "catalog_history",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False),
        sa.Column("item_id", sa.String(length=1024), nullable=False),
        sa.Column("job_id", sa.String(length=36), nullable=True),
        sa.Column("model_name", sa.String(length=255), nullable=True),
        sa.Column("model_version", sa.String(length=64), nullable=True),
        sa.Column("category", sa.String(length=255), nullable=True),
        sa.Column("confidence", sa.Float(), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("topk", sa.JSON(), nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("source", sa.String(length=16), nullable=False),
        sa.Column("changed_by", sa.String(length=255), nullable=True),
        sa.Column("changed", sa.Boolean(), nullable=False),
        sa.Column("previous_category", sa.String(length=255), nullable=True),
        sa.Column("previous_status", sa.String(length=16), nullable=True),
        sa.Column("written_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint(_SOURCE, name=op.f("ck_catalog_history_source")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_catalog_history")),
        sqlite_autoincrement=True,
    )
    op.create_index(op.f("ix_catalog_history_item_id_id"), "catalog_history", ["item_id", "id"])
    op.create_index(op.f("ix_catalog_history_job_id"), "catalog_history", ["job_id"])
    postgresql = op.get_context().dialect.name == "postgresql"
    op.execute(_BACKFILL.format(true="true" if postgresql else "1"))
    op.execute(_VIEW_V1)
    if postgresql:
        op.execute(_COMMENT_V1)


def downgrade() -> None:
    op.execute("DROP VIEW catalog_current")
    op.drop_index(op.f("ix_catalog_history_job_id"), table_name="catalog_history")
    op.drop_index(op.f("ix_catalog_history_item_id_id"), table_name="catalog_history")
    op.drop_table("catalog_history")
