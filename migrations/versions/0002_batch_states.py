"""batch states for the reconciler, job cancellation, leases

Every batch of a queued job is a row from the moment it is enqueued (``state`` queued → running → done, or
failed/cancelled), holding its items so that the reconciler can enqueue it again without listing the source;
``attempts``, ``requeues`` and the poison-item fields bound redelivery. Jobs gain the terminal status
``cancelled``. ``leases`` holds named, expiring locks (one reconciler at a time across all workers).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-30 07:10:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_OLD_JOB = "status IN ('listing', 'running', 'done', 'failed')"
_NEW_JOB = "status IN ('listing', 'running', 'done', 'failed', 'cancelled')"
_BATCH = "state IN ('queued', 'running', 'done', 'failed', 'cancelled')"


def _counter(name: str) -> sa.Column:
    return sa.Column(name, sa.Integer(), server_default=sa.text("0"), nullable=False)


def upgrade() -> None:
    with op.batch_alter_table("sorting_jobs") as batch:
        batch.drop_constraint(op.f("ck_sorting_jobs_status"), type_="check")
        batch.create_check_constraint("status", _NEW_JOB)
    with op.batch_alter_table("sorting_job_batches") as batch:
        batch.add_column(sa.Column("state", sa.String(length=16), server_default="done", nullable=False))
        batch.add_column(sa.Column("items", sa.JSON(), nullable=True))
        batch.add_column(_counter("attempts"))
        batch.add_column(_counter("requeues"))
        batch.add_column(sa.Column("progress", sa.Integer(), nullable=True))
        batch.add_column(_counter("item_crashes"))
        batch.add_column(sa.Column("task_id", sa.String(length=155), nullable=True))
        batch.add_column(sa.Column("worker", sa.String(length=255), nullable=True))
        batch.add_column(sa.Column("enqueued_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("started_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("error", sa.Text(), nullable=True))
        batch.create_check_constraint("state", _BATCH)
        batch.create_index(op.f("ix_sorting_job_batches_state"), ["state"])
    op.create_table(
        "leases",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("holder", sa.String(length=255), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_leases")),
    )


def downgrade() -> None:
    op.drop_table("leases")
    with op.batch_alter_table("sorting_job_batches") as batch:
        batch.drop_index(op.f("ix_sorting_job_batches_state"))
        batch.drop_constraint(op.f("ck_sorting_job_batches_state"), type_="check")
        for name in ("error", "heartbeat_at", "started_at", "enqueued_at", "worker", "task_id", "item_crashes",
                     "progress", "requeues", "attempts", "items", "state"):
            batch.drop_column(name)
    op.execute("UPDATE sorting_jobs SET status = 'failed' WHERE status = 'cancelled'")
    with op.batch_alter_table("sorting_jobs") as batch:
        batch.drop_constraint(op.f("ck_sorting_jobs_status"), type_="check")
        batch.create_check_constraint("status", _OLD_JOB)
