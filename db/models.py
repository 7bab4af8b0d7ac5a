"""SQLAlchemy models of the catalog database: catalogued items and their attributes, sorting jobs, the batches of
each job, leases, the log of human review decisions, the history of every catalog row, and the webhooks' outbox and
cursor.

The schema itself is created by the Alembic migrations in ``migrations/versions``; these models must match
them (``tests/test_migrations.py`` checks it with Alembic's autogenerate comparison).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
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

from pipeline.records import SORT_STATUSES, STATUSES

JOB_STATUSES: tuple[str, ...] = ("listing", "running", "done", "failed", "cancelled")
TERMINAL_JOB_STATUSES: tuple[str, ...] = ("done", "failed", "cancelled")
#: A batch of a queued job: ``queued`` (enqueued, not started), ``running`` (a worker holds it), then ``done``,
#: ``failed`` (given up: its items are ``failed`` rows) or ``cancelled`` (its job was cancelled before it ran).
BATCH_STATES: tuple[str, ...] = ("queued", "running", "done", "failed", "cancelled")
#: What a decision in ``reviews`` did: ``review`` (a human's category, :func:`db.reviews.record_review`),
#: ``accept`` (the model's top-1 accepted, :func:`db.reviews.accept_top1`) or ``undo`` (an earlier one undone).
REVIEW_ACTIONS: tuple[str, ...] = ("review", "accept", "undo")
REVIEW_QUEUE_WHERE = "status = 'needs_review'"
#: Who wrote a ``catalog_history`` entry: ``model`` (a sort, :func:`db.catalog.upsert_items`), ``review`` (a human's
#: decision or its undo, :mod:`db.reviews`) or ``rollback`` (a job's writes taken back).
HISTORY_SOURCES: tuple[str, ...] = ("model", "review", "rollback")

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
    """One catalogued item: the latest result of sorting its photo (one row per ``item_id``), or a human's
    decision on it.

    ``item_id`` is the item's id, or for an id longer than 1,024 characters or 2,048 UTF-8 bytes a key derived
    from it (:func:`db.catalog.catalog_key`), with the whole id in ``item_id_full`` (null for every other row).
    A ``reviewed`` row (:mod:`db.reviews`) has the human's ``category`` (null: not a product / unknown), no
    ``confidence``, the model's top-1 and its probability in ``model_category`` / ``model_confidence``, and
    ``reviewed_by`` / ``reviewed_at``; a sort never overwrites it. On every other row those four are null.
    """

    __tablename__ = "catalog_items"

    item_id: Mapped[str] = mapped_column(String(1024), primary_key=True)
    item_id_full: Mapped[str | None] = mapped_column(Text)
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
    model_category: Mapped[str | None] = mapped_column(String(255))
    model_confidence: Mapped[float | None] = mapped_column(Float)
    reviewed_by: Mapped[str | None] = mapped_column(String(255))
    reviewed_at: Mapped[datetime | None]

    __table_args__ = (
        CheckConstraint(_in_list("status", STATUSES), name="status"),
        Index(None, "job_id", "status"),
        Index(None, "category"),
        # The review queue (least confident first, keyset-paginated): only needs_review rows are in it, so
        # sorted rows cost their upserts nothing.
        Index("ix_catalog_items_review_queue", "confidence", "item_id",
              postgresql_where=text(REVIEW_QUEUE_WHERE), sqlite_where=text(REVIEW_QUEUE_WHERE)),
    )


class CatalogAttribute(Base):
    """What the model of one attribute other than the category (``toe``, ``material``) predicted for one item
    (:mod:`db.attributes`): one row per item and attribute, written by the sort that writes the item's row, in its
    transaction; the next prediction of that attribute replaces it.

    ``item_id`` is the item's ``catalog_items`` key. ``value`` is the model's top-1 (null: ``failed``, whose
    ``error`` says why), ``confidence`` its probability 0..1, ``status`` ``sorted`` or ``needs_review`` by the
    attribute model's own review threshold (``error`` = ``unknown`` when its open-set score rejected the photo),
    ``topk`` ``[[value, probability], ...]``.
    """

    __tablename__ = "catalog_attributes"

    item_id: Mapped[str] = mapped_column(String(1024), primary_key=True)
    attribute: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str | None] = mapped_column(String(255))
    confidence: Mapped[float | None] = mapped_column(Float)
    status: Mapped[str] = mapped_column(String(16))
    error: Mapped[str | None] = mapped_column(Text)
    topk: Mapped[list[list[str | float]] | None] = mapped_column(JSON)
    model_name: Mapped[str | None] = mapped_column(String(255))
    model_version: Mapped[str | None] = mapped_column(String(64))
    job_id: Mapped[str | None] = mapped_column(String(36))
    updated_at: Mapped[datetime]

    __table_args__ = (
        CheckConstraint(_in_list("status", SORT_STATUSES), name="status"),
        # a re-categorisation's selection: an attribute's rows by version
        Index(None, "attribute", "model_version"),
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
    # The job's models of other attributes than the category, beside model_path's:
    # [{"attribute", "path", "name", "version"}, ...] (pipeline.attributes.AttributeModel); null: none.
    attribute_models: Mapped[list[dict[str, str]] | None] = mapped_column(JSON)

    __table_args__ = (CheckConstraint(_in_list("status", JOB_STATUSES), name="status"),)


class SortingJobBatch(Base):
    """One batch of a job: its state, its items (queued jobs) and its counts, recorded once.

    A redelivered batch replaces its counts, never adds. Queued jobs insert the row (``state='queued'``, with
    ``items`` as ``[[item_id, image_uri], ...]``) before the task is enqueued, so the database knows every batch
    and the reconciler (:mod:`worker.reconciler`) can enqueue one again; embedded jobs record batches as they
    finish (``state='done'``, no items). ``attempts`` counts task starts, ``requeues`` the reconciler's
    re-enqueues; ``progress`` is the number of items written so far when a batch runs item by item after a
    crash, and ``item_crashes`` how often the item at ``progress`` took its worker process down.
    """

    __tablename__ = "sorting_job_batches"

    job_id: Mapped[str] = mapped_column(
        String(36), ForeignKey("sorting_jobs.id", ondelete="CASCADE"), primary_key=True
    )
    batch_no: Mapped[int] = mapped_column(Integer, primary_key=True)
    sorted_count: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    needs_review_count: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    failed_count: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    updated_at: Mapped[datetime]
    state: Mapped[str] = mapped_column(String(16), default="done", server_default="done")
    items: Mapped[list[list[str]] | None] = mapped_column(JSON)
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    requeues: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    progress: Mapped[int | None] = mapped_column(Integer)
    item_crashes: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    task_id: Mapped[str | None] = mapped_column(String(155))
    worker: Mapped[str | None] = mapped_column(String(255))
    enqueued_at: Mapped[datetime | None]
    started_at: Mapped[datetime | None]
    heartbeat_at: Mapped[datetime | None]
    error: Mapped[str | None] = mapped_column(Text)

    __table_args__ = (CheckConstraint(_in_list("state", BATCH_STATES), name="state"), Index(None, "state"))


class Lease(Base):
    """A named lock that expires: one holder at a time (e.g. the reconciler among all worker processes)."""

    __tablename__ = "leases"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    holder: Mapped[str] = mapped_column(String(255))
    expires_at: Mapped[datetime]


class Review(Base):
    """One human decision on a catalog item, appended to an append-only log (:mod:`db.reviews`).

    ``item_id`` is the item's ``catalog_items`` key. ``category`` is what the decision set (null: not a product
    / unknown; for an ``undo``, what the row got back). ``model_name`` / ``model_version`` / ``model_category`` /
    ``model_confidence`` are the model's prediction the decision corrected or confirmed. ``previous_*`` is the
    row as it was before (what an undo restores). ``undone_at`` marks a decision undone later, and an ``undo``
    entry names the decision it undid in ``undoes``.
    """

    __tablename__ = "reviews"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    item_id: Mapped[str] = mapped_column(String(1024))
    action: Mapped[str] = mapped_column(String(16))
    category: Mapped[str | None] = mapped_column(String(255))
    reviewer: Mapped[str] = mapped_column(String(255))
    decided_at: Mapped[datetime]
    model_name: Mapped[str | None] = mapped_column(String(255))
    model_version: Mapped[str | None] = mapped_column(String(64))
    model_category: Mapped[str | None] = mapped_column(String(255))
    model_confidence: Mapped[float | None] = mapped_column(Float)
    previous_status: Mapped[str] = mapped_column(String(16))
    previous_category: Mapped[str | None] = mapped_column(String(255))
    previous_reviewed_by: Mapped[str | None] = mapped_column(String(255))
    previous_reviewed_at: Mapped[datetime | None]
    undone_at: Mapped[datetime | None]
    undoes: Mapped[int | None] = mapped_column(Integer)

    __table_args__ = (
        CheckConstraint(_in_list("action", REVIEW_ACTIONS), name="action"),
        Index(None, "item_id"),
        Index(None, "decided_at"),
    )


class CatalogHistory(Base):
    """One state of one catalog row, appended in the transaction that wrote it: every row a sort writes (not the
    reviewed rows it leaves alone), every human decision and undo, every rollback (:mod:`db.history`).

    ``item_id`` is the row's ``catalog_items`` key. ``category`` ... ``topk`` are the row as that write left it;
    ``reason`` is its ``error`` for a sort (why it failed, ``unknown``), the decision (``review``, ``accept``,
    ``undo``) for a review. ``job_id`` is the sort's job (null for a review), ``changed_by`` the reviewer.
    ``previous_category`` / ``previous_status`` are the item's state before the write (null: a new item) and
    ``changed`` says whether the category or status differs from it (or the item is new): the change feed is the
    ``changed`` entries in ``id`` order. ``id`` is the feed's cursor.
    """

    __tablename__ = "catalog_history"

    # BIGSERIAL on PostgreSQL; INTEGER PRIMARY KEY AUTOINCREMENT on SQLite (the rowid: no id is ever used twice).
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer(), "sqlite"), primary_key=True,
                                    autoincrement=True)
    item_id: Mapped[str] = mapped_column(String(1024))
    job_id: Mapped[str | None] = mapped_column(String(36))
    model_name: Mapped[str | None] = mapped_column(String(255))
    model_version: Mapped[str | None] = mapped_column(String(64))
    category: Mapped[str | None] = mapped_column(String(255))
    confidence: Mapped[float | None] = mapped_column(Float)
    status: Mapped[str] = mapped_column(String(16))
    topk: Mapped[list[list[str | float]] | None] = mapped_column(JSON)
    reason: Mapped[str | None] = mapped_column(Text)
    source: Mapped[str] = mapped_column(String(16))
    changed_by: Mapped[str | None] = mapped_column(String(255))
    changed: Mapped[bool] = mapped_column(Boolean)
    previous_category: Mapped[str | None] = mapped_column(String(255))
    previous_status: Mapped[str | None] = mapped_column(String(16))
    written_at: Mapped[datetime]

    __table_args__ = (
        CheckConstraint(_in_list("source", HISTORY_SOURCES), name="source"),
        # An item's entries in order: its previous state (every write looks it up), its history, pruning.
        Index(None, "item_id", "id"),
        # A job's entries: what a rollback restores (db.history.previous_entries). The change feed has no index of
        # its own: it reads the primary key from its cursor on, and its cursor moves past unchanged entries too.
        Index(None, "job_id"),
        {"sqlite_autoincrement": True},
    )


#: What a webhook tells: ``item.changed`` (an entry of the change feed) or ``job.completed`` (a job ended: done,
#: failed or cancelled). :mod:`db.webhooks`.
WEBHOOK_EVENT_TYPES: tuple[str, ...] = ("item.changed", "job.completed")
WEBHOOK_PENDING_WHERE = "delivered_at IS NULL"


class WebhookOutbox(Base):
    """One webhook event to deliver, and how its delivery went (:mod:`db.webhooks`).

    ``event_id`` is the event's idempotency key (the ``webhook-id`` header; ``change:<cursor>``,
    ``job:<job id>:<status>:<finished_at in microseconds>``): unique, the same on every attempt. ``payload`` is the
    exact request body, so that every attempt sends the same bytes. A row is pending until ``delivered_at`` is set
    (a 2xx answer); ``attempts`` counts the POSTs so far, ``next_attempt_at`` is when it is due (retries back off),
    ``last_status`` / ``last_error`` say how the last attempt failed (the HTTP status, or null: no answer).
    """

    __tablename__ = "webhook_outbox"

    # BIGSERIAL on PostgreSQL; INTEGER PRIMARY KEY AUTOINCREMENT on SQLite.
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer(), "sqlite"), primary_key=True,
                                    autoincrement=True)
    event_id: Mapped[str] = mapped_column(String(160), unique=True)
    event_type: Mapped[str] = mapped_column(String(32))
    payload: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime]
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    next_attempt_at: Mapped[datetime]
    delivered_at: Mapped[datetime | None]
    last_status: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(Text)

    __table_args__ = (
        CheckConstraint(_in_list("event_type", WEBHOOK_EVENT_TYPES), name="event_type"),
        # What is due, oldest first: only pending rows are in it, so delivered ones cost nothing.
        Index("ix_webhook_outbox_due", "next_attempt_at", "id",
              postgresql_where=text(WEBHOOK_PENDING_WHERE), sqlite_where=text(WEBHOOK_PENDING_WHERE)),
        Index(None, "delivered_at"),  # pruning delivered rows
        {"sqlite_autoincrement": True},
    )


class WebhookCursor(Base):
    """Where the webhooks' producer is (one row, ``name`` = ``webhooks``): ``feed_cursor``, the change feed's cursor
    read up to; ``jobs_after``, the time of its last look at ended jobs; ``started_at``, when it first ran (jobs
    that ended before are not told)."""

    __tablename__ = "webhook_cursor"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    feed_cursor: Mapped[int] = mapped_column(BigInteger)
    jobs_after: Mapped[datetime]
    started_at: Mapped[datetime]
    updated_at: Mapped[datetime]
