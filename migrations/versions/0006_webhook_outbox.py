"""webhook_outbox (the webhook events to deliver, at least once) and webhook_cursor (where their producer is)

Nothing is produced until ``INVSORT_WEBHOOK_URL`` is set: the producer's first pass starts at the end of the change
feed (:mod:`db.webhooks`). No existing row changes.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03 09:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | Sequence[str] | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_EVENT_TYPE = "event_type IN ('item.changed', 'job.completed')"
_PENDING = "delivered_at IS NULL"


def upgrade() -> None:
    op.create_table(
        "webhook_outbox",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False),
        sa.Column("event_id", sa.String(length=160), nullable=False),
        sa.Column("event_type", sa.String(length=32), nullable=False),
        sa.Column("payload", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("attempts", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("delivered_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_status", sa.Integer(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.CheckConstraint(_EVENT_TYPE, name=op.f("ck_webhook_outbox_event_type")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_webhook_outbox")),
        sa.UniqueConstraint("event_id", name=op.f("uq_webhook_outbox_event_id")),
        sqlite_autoincrement=True,
    )
    op.create_index(
        op.f("ix_webhook_outbox_due"), "webhook_outbox", ["next_attempt_at", "id"],
        postgresql_where=sa.text(_PENDING), sqlite_where=sa.text(_PENDING),
    )
    op.create_index(op.f("ix_webhook_outbox_delivered_at"), "webhook_outbox", ["delivered_at"])
    op.create_table(
        "webhook_cursor",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("feed_cursor", sa.BigInteger(), nullable=False),
        sa.Column("jobs_after", sa.DateTime(timezone=True), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_webhook_cursor")),
    )


def downgrade() -> None:
    op.drop_table("webhook_cursor")
    op.drop_index(op.f("ix_webhook_outbox_delivered_at"), table_name="webhook_outbox")
    op.drop_index(op.f("ix_webhook_outbox_due"), table_name="webhook_outbox")
    op.drop_table("webhook_outbox")
