"""initial schema: catalog_items, sorting_jobs, sorting_job_batches

Revision ID: 0001
Revises:
Create Date: 2024-11-23 10:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _counter(name: str) -> sa.Column:
    return sa.Column(name, sa.Integer(), server_default=sa.text("0"), nullable=False)


def upgrade() -> None:
    op.create_table(
        "catalog_items",
        sa.Column("item_id", sa.String(length=1024), nullable=False),
        sa.Column("image_uri", sa.Text(), nullable=False),
        sa.Column("category", sa.String(length=255), nullable=True),
        sa.Column("confidence", sa.Float(), nullable=True),
        sa.Column("topk", sa.JSON(), nullable=False),
        sa.Column("model_name", sa.String(length=255), nullable=True),
        sa.Column("model_version", sa.String(length=64), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("job_id", sa.String(length=36), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint(
            "status IN ('sorted', 'needs_review', 'failed')", name=op.f("ck_catalog_items_status")
        ),
        sa.PrimaryKeyConstraint("item_id", name=op.f("pk_catalog_items")),
    )
    op.create_index(op.f("ix_catalog_items_job_id_status"), "catalog_items", ["job_id", "status"])
    op.create_index(op.f("ix_catalog_items_category"), "catalog_items", ["category"])

    op.create_table(
        "sorting_jobs",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("source", sa.Text(), nullable=False),
        sa.Column("model_path", sa.Text(), nullable=False),
        sa.Column("model_name", sa.String(length=255), nullable=False),
        sa.Column("model_version", sa.String(length=64), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("total_items", sa.Integer(), nullable=True),
        sa.Column("total_batches", sa.Integer(), nullable=True),
        _counter("batches_done"),
        _counter("sorted_count"),
        _counter("needs_review_count"),
        _counter("failed_count"),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint(
            "status IN ('listing', 'running', 'done', 'failed')", name=op.f("ck_sorting_jobs_status")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_sorting_jobs")),
    )

    op.create_table(
        "sorting_job_batches",
        sa.Column("job_id", sa.String(length=36), nullable=False),
        sa.Column("batch_no", sa.Integer(), nullable=False),
        _counter("sorted_count"),
        _counter("needs_review_count"),
        _counter("failed_count"),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["job_id"],
            ["sorting_jobs.id"],
            name=op.f("fk_sorting_job_batches_job_id_sorting_jobs"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("job_id", "batch_no", name=op.f("pk_sorting_job_batches")),
    )


def downgrade() -> None:
    op.drop_table("sorting_job_batches")
    op.drop_table("sorting_jobs")
    op.drop_index(op.f("ix_catalog_items_category"), table_name="catalog_items")
    op.drop_index(op.f("ix_catalog_items_job_id_status"), table_name="catalog_items")
    op.drop_table("catalog_items")
