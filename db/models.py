"""SQLAlchemy models of the catalog database: catalogued items, sorting jobs and the batches of each job.

The schema itself is created by the Alembic migrations in ``migrations/versions``; these models must match
them (``tests/test_migrations.py`` checks it with Alembic's autogenerate comparison).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    CheckConstraint,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

from pipeline.records import STATUSES

JOB_STATUSES: tuple[str, ...] = ("listing", "running", "done", "failed")

# Deterministic constraint and index names, so that migrations (and SQLite batch mode) can refer to them.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def _in_list(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware ``DateTime`` that stores UTC and always returns aware UTC datetimes.

    PostgreSQL stores it as ``timestamptz``; SQLite has no time zones, so the value is stored as UTC text and
    the UTC zone is put back when it is read. Naive datetimes are refused: their zone would be a guess.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError(f"naive datetime {value!r}: pass a timezone-aware datetime (UTC)")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


class Base(DeclarativeBase):
    """The declarative base of every invsort table."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map: dict[Any, Any] = {datetime: UTCDateTime()}


class CatalogItem(Base):
    """One catalogued item: the latest result of sorting its photo (one row per ``item_id``)."""

    __tablename__ = "catalog_items"

    item_id: Mapped[str] = mapped_column(String(1024), primary_key=True)
    image_uri: Mapped[str] = mapped_column(Text)
    category: Mapped[str | None] = mapped_column(String(255))
    confidence: Mapped[float | None] = mapped_column(Float)
    topk: Mapped[list[list[str | float]]] = mapped_column(JSON)
    model_name: Mapped[str | None] = mapped_column(String(255))
    model_version: Mapped[str | None] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16))
    error: Mapped[str | None] = mapped_column(Text)
    # Lookups by job use ix_catalog_items_job_id_status, whose leading column is job_id; a second index on
    # job_id alone would only slow every upsert down.
    job_id: Mapped[str | None] = mapped_column(String(36))
    updated_at: Mapped[datetime]

    __table_args__ = (
        CheckConstraint(_in_list("status", STATUSES), name="status"),
        Index(None, "job_id", "status"),
        Index(None, "category"),
    )


class SortingJob(Base):
    """One sorting run over a source (a directory, bucket prefix or manifest), split into batches."""

    __tablename__ = "sorting_jobs"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    source: Mapped[str] = mapped_column(Text)
    model_path: Mapped[str] = mapped_column(Text)
    model_name: Mapped[str] = mapped_column(String(255))
    model_version: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16))
    total_items: Mapped[int | None] = mapped_column(Integer)
    total_batches: Mapped[int | None] = mapped_column(Integer)
    batches_done: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    sorted_count: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    needs_review_count: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    failed_count: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime]
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    updated_at: Mapped[datetime]

    __table_args__ = (CheckConstraint(_in_list("status", JOB_STATUSES), name="status"),)


class SortingJobBatch(Base):
    """The counts of one batch of a job, recorded once: a redelivered batch replaces them, never adds."""

    __tablename__ = "sorting_job_batches"

    job_id: Mapped[str] = mapped_column(
        String(36), ForeignKey("sorting_jobs.id", ondelete="CASCADE"), primary_key=True
    )
    batch_no: Mapped[int] = mapped_column(Integer, primary_key=True)
    sorted_count: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    needs_review_count: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    failed_count: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    updated_at: Mapped[datetime]
