"""catalog_items.item_id_full: the whole id of an item whose id is too long for the item_id key

An id longer than 1,024 characters or 2,048 UTF-8 bytes (a deep file path, a long S3 key, a manifest's own id) is
stored under a key derived from it in ``item_id`` (its first characters, ``#sha256:`` and the SHA-256 of the
whole id; :func:`db.catalog.catalog_key`), and the whole id in ``item_id_full``; for every other row
``item_id_full`` is null. No existing row changes: ids that fitted before keep their key.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30 08:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("catalog_items") as batch:
        batch.add_column(sa.Column("item_id_full", sa.Text(), nullable=True))


def downgrade() -> None:
    # Rows stored under a derived key keep it: their whole id cannot go back into a varchar(1024) column.
    with op.batch_alter_table("catalog_items") as batch:
        batch.drop_column("item_id_full")
