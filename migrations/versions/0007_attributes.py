"""catalog_attributes (what models of attributes other than the category predicted: toe, material, style), the
models of each job (sorting_jobs.attribute_models), and the contract views at version 2: catalog_current gains
``attributes``, and catalog_current_attributes gives one row per item and attribute.

No existing row changes: a job from before has no attribute models (null), an item no attributes. Both views'
SELECTs are frozen here: this migration builds the same views whatever db/contract.py says later.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-04 09:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | Sequence[str] | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_STATUS = "status IN ('sorted', 'needs_review', 'failed')"

_VIEW_V1 = (
    "CREATE VIEW catalog_current AS "
    "SELECT coalesce(item_id_full, item_id) AS item_id, category, status, confidence, "
    "status = 'reviewed' AS reviewed, model_version, updated_at FROM catalog_items"
)
_COMMENT = ("COMMENT ON VIEW {view} IS "
            "'invsort catalog contract, version {version} (README: Warehouse systems: the contract)'")
_ATTRIBUTES_V2 = {
    "postgresql": (
        "coalesce((SELECT json_object_agg(a.attribute, a.value ORDER BY a.attribute) FROM catalog_attributes a "
        "WHERE a.item_id = catalog_items.item_id), '{}'::json)"
    ),
    "sqlite": (
        "(SELECT json_group_object(a.attribute, a.value) FROM (SELECT attribute, value FROM catalog_attributes "
        "WHERE item_id = catalog_items.item_id ORDER BY attribute) a)"
    ),
}
_VIEW_V2 = (
    "CREATE VIEW catalog_current AS "
    "SELECT coalesce(item_id_full, item_id) AS item_id, category, status, confidence, "
    "status = 'reviewed' AS reviewed, model_version, updated_at, {attributes} AS attributes FROM catalog_items"
)
_ATTRIBUTES_VIEW_V2 = (
    "CREATE VIEW catalog_current_attributes AS "
    "SELECT coalesce(i.item_id_full, a.item_id) AS item_id, a.attribute, a.value, a.confidence, a.status, "
    "a.model_version, a.updated_at FROM catalog_attributes a JOIN catalog_items i ON i.item_id = a.item_id"
)


def upgrade() -> None:
    op.create_table(
        "catalog_attributes",
        sa.Column("item_id", sa.String(length=1024), nullable=False),
        sa.Column("attribute", sa.String(length=64), nullable=False),
        sa.Column("value", sa.String(length=255), nullable=True),
        sa.Column("confidence", sa.Float(), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("topk", sa.JSON(), nullable=True),
        sa.Column("model_name", sa.String(length=255), nullable=True),
        sa.Column("model_version", sa.String(length=64), nullable=True),
        sa.Column("job_id", sa.String(length=36), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint(_STATUS, name=op.f("ck_catalog_attributes_status")),
        sa.PrimaryKeyConstraint("item_id", "attribute", name=op.f("pk_catalog_attributes")),
    )
    op.create_index(op.f("ix_catalog_attributes_attribute_model_version"), "catalog_attributes",
                    ["attribute", "model_version"])
    with op.batch_alter_table("sorting_jobs") as batch:
        batch.add_column(sa.Column("attribute_models", sa.JSON(), nullable=True))
    dialect = op.get_context().dialect.name
    op.execute("DROP VIEW catalog_current")
    op.execute(_VIEW_V2.format(attributes=_ATTRIBUTES_V2["postgresql" if dialect == "postgresql" else "sqlite"]))
    op.execute(_ATTRIBUTES_VIEW_V2)
    if dialect == "postgresql":
        op.execute(_COMMENT.format(view="catalog_current", version=2))
        op.execute(_COMMENT.format(view="catalog_current_attributes", version=2))


def downgrade() -> None:
    op.execute("DROP VIEW catalog_current_attributes")
    op.execute("DROP VIEW catalog_current")
    op.execute(_VIEW_V1)
    if op.get_context().dialect.name == "postgresql":
        op.execute(_COMMENT.format(view="catalog_current", version=1))
    with op.batch_alter_table("sorting_jobs") as batch:
        batch.drop_column("attribute_models")
    op.drop_index(op.f("ix_catalog_attributes_attribute_model_version"), table_name="catalog_attributes")
    op.drop_table("catalog_attributes")
