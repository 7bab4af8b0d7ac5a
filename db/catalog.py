"""Reads and writes of the catalog and of sorting jobs, on SQLite and PostgreSQL.

Every function takes the :class:`~sqlalchemy.orm.Session` as a keyword argument and runs inside the
caller's transaction: nothing here commits. Writes to shared rows are single SQL statements that are safe when
many workers run them at once on PostgreSQL (counters are incremented in SQL, never read-modify-written in Python).

Every write of a catalog row appends its new state to ``catalog_history`` in the same transaction
(:func:`upsert_items` for sorts, :func:`record_history` for every other writer); :mod:`db.history` reads it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import operator
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, fields, replace
from datetime import UTC, datetime
from typing import Any, TypedDict, cast
from urllib.parse import urlencode

from sqlalchemy import CursorResult, Result, Select, Table, and_, bindparam, func, literal, or_, select, text, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DataError, DBAPIError, IntegrityError
from sqlalchemy.orm import Session

from db.attributes import attributes_of, upsert_attributes
from db.models import CatalogAttribute, CatalogItem, SortingJob, SortingJobBatch, UTCDateTime
from pipeline.errors import InvsortError
from pipeline.records import REVIEWED, SORT_STATUSES, ItemResult, printable

__all__ = [
    "CATALOG_SOURCE",
    "CatalogRow",
    "JobNotFoundError",
    "JobStateError",
    "JobStatus",
    "ResortItem",
    "ResortSelection",
    "StatusCounts",
    "active_resorts",
    "catalog_key",
    "complete_job_if_done",
    "count_resort",
    "create_job",
    "fail_job",
    "finish_listing",
    "get_item",
    "get_job",
    "iter_items",
    "list_jobs",
    "record_batch",
    "record_history",
    "resort_page",
    "upsert_items",
]

_items = cast(Table, CatalogItem.__table__)
_jobs = cast(Table, SortingJob.__table__)
_attributes = cast(Table, CatalogAttribute.__table__)
_batches = cast(Table, SortingJobBatch.__table__)

log = logging.getLogger(__name__)

_RESULT_FIELDS = tuple(f.name for f in fields(ItemResult) if f.name != "attributes")  # catalog_attributes' own


class StatusCounts(TypedDict):
    """Rows of a batch by status."""

    sorted_count: int
    needs_review_count: int
    failed_count: int


#: Batch states whose counts are in the job's counters (and in ``batches_done``).
FINISHED_BATCH_STATES = ("done", "failed")


class JobNotFoundError(InvsortError, LookupError):
    """No sorting job has the given id."""


class JobStateError(InvsortError):
    """The job is not in a state that allows the requested change."""


@dataclass(frozen=True, slots=True)
class JobStatus:
    """A snapshot of one ``sorting_jobs`` row."""

    id: str
    source: str
    model_path: str
    model_name: str
    model_version: str
    status: str
    total_items: int | None
    total_batches: int | None
    batches_done: int
    sorted_count: int
    needs_review_count: int
    failed_count: int
    error: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    updated_at: datetime

    @property
    def processed(self) -> int:
        """Items with a result so far: sorted + needs_review + failed."""
        return self.sorted_count + self.needs_review_count + self.failed_count


@dataclass(frozen=True, slots=True)
class CatalogRow:
    """One ``catalog_items`` row as read back: an :class:`ItemResult` plus when it was written and, on a
    ``reviewed`` row (:mod:`db.reviews`), the model's prediction the human decided on and who decided when
    (``category`` is then the human's, null for "not a product / unknown", and ``confidence`` null)."""

    item_id: str
    image_uri: str
    status: str
    category: str | None
    confidence: float | None
    topk: list[list[str | float]]
    error: str | None
    model_name: str | None
    model_version: str | None
    job_id: str | None
    updated_at: datetime
    model_category: str | None = None
    model_confidence: float | None = None
    reviewed_by: str | None = None
    reviewed_at: datetime | None = None
    # the item's other attributes, {"toe": "open_toe"} (catalog_attributes; filled where read with them: the pages
    # of db.queries.list_items, get_item)
    attributes: dict[str, str | None] = field(default_factory=dict)

    def to_result(self) -> ItemResult:
        """The row as the :class:`ItemResult` that was written (without ``updated_at``)."""
        return ItemResult(**{name: getattr(self, name) for name in _RESULT_FIELDS})


_JOB_FIELDS = tuple(f.name for f in fields(JobStatus))
_ROW_FIELDS = tuple(f.name for f in fields(CatalogRow) if f.name != "attributes")  # catalog_items' columns


def _rowcount(result: Result[Any]) -> int:
    """Rows an UPDATE matched (``execute`` of a DML statement returns a :class:`CursorResult`)."""
    return cast(CursorResult[Any], result).rowcount


def _now() -> datetime:
    return datetime.now(UTC)


def _insert(session: Session, table: Table) -> postgresql.Insert | sqlite.Insert:
    """The dialect's INSERT (which has ``on_conflict_do_update``) for the session's database."""
    name = session.get_bind().dialect.name
    if name == "postgresql":
        return postgresql.insert(table)
    if name == "sqlite":
        return sqlite.insert(table)
    raise InvsortError(f"unsupported database dialect {name!r}: use SQLite or PostgreSQL")


# Columns written by upsert_items: ItemResult's fields, in their order, then item_id_full, the review columns
# (null: a sort's row is nobody's decision) and updated_at. _row_values builds its tuples from the same list, so
# the two cannot drift apart (tests/test_db.py checks that they are every column of the table).
_REVIEW_COLUMNS = ("model_category", "model_confidence", "reviewed_by", "reviewed_at")
_NO_REVIEW = (None,) * len(_REVIEW_COLUMNS)
_UPSERT_COLUMNS = (*_RESULT_FIELDS, "item_id_full", *_REVIEW_COLUMNS, "updated_at")
_result_values = operator.attrgetter(*_RESULT_FIELDS)  # one C-level call per row for the whole tuple
_TOPK = _RESULT_FIELDS.index("topk")  # the one field stored as JSON text
_AT = {name: i for i, name in enumerate(_UPSERT_COLUMNS)}
_COLUMN_LIST = ", ".join(_UPSERT_COLUMNS)
# Human decisions win: a reviewed row is never overwritten by a sort (its conflict updates nothing).
_SET_ALL = (
    ", ".join(f"{name} = excluded.{name}" for name in _UPSERT_COLUMNS if name != "item_id")
    + f" WHERE catalog_items.status <> '{REVIEWED}'"
)

_SQLITE_UPSERT = (
    f"INSERT INTO catalog_items ({_COLUMN_LIST}) VALUES ({', '.join('?' * len(_UPSERT_COLUMNS))}) "
    f"ON CONFLICT (item_id) DO UPDATE SET {_SET_ALL}"
)

# --- catalog_history: every write appends the rows' new states ------------------------------------------------
#
# An entry is a snapshot of the catalog row right after the write, taken by INSERT ... SELECT from catalog_items
# (no per-row work in Python or SQLAlchemy), with the item's state before the write: its latest entry. That lookup is
# exact because every writer of catalog_items holds the row's lock (the upsert's, or SELECT ... FOR UPDATE) when it
# appends, and appends in the transaction of the write: a writer that wrote the row before has committed its entry
# (we waited for its lock), a writer after us waits for ours. The append runs as a statement of its own after the
# write, so under READ COMMITTED (PostgreSQL's default) its snapshot sees those entries. Rows written before the
# history existed got an entry from migration 0005.
#
# SQLite has one writer at a time: the upsert takes the write lock first, reads the rows as they are (their
# previous state: the same as their latest entries, one lookup instead of three) and appends the entries with a
# plain INSERT ... VALUES of tuples built from the upsert's own (measured: the faster way there).
#
# The change feed reads entries in id order (db.history.iter_changes). On PostgreSQL ids are drawn when a writer
# appends but become visible when it commits, not necessarily in id order; so that a reader can tell which ids may
# still appear, each writer first draws one id of the history's sequence as a marker and holds an advisory
# transaction lock on MARKER_BASE + marker until it commits or rolls back: its entries all get higher ids.
HISTORY_SEQUENCE = "catalog_history_id_seq"
#: Advisory lock keys MARKER_BASE + id (ids below 2**48) mark writers of catalog_history in flight (PostgreSQL).
MARKER_BASE = 0x4953 << 48
_PG_MARKER = f"SELECT pg_advisory_xact_lock({MARKER_BASE} + nextval('{HISTORY_SEQUENCE}'))"
_HISTORY_COLUMNS = (
    "item_id, job_id, model_name, model_version, category, confidence, status, topk, reason, source, changed_by, "
    "changed, previous_category, previous_status, written_at"
)


def _history_insert(dialect: str, *, keys: str, job_id: str, reason: str, source: str, changed_by: str,
                    skip_reviewed: bool) -> str:
    """``INSERT INTO catalog_history ... SELECT`` of the catalog rows that ``keys`` (a condition on ``c.item_id``)
    selects, as they are now, each with its latest history entry as its previous state; ``job_id``, ``reason``,
    ``source`` and ``changed_by`` are SQL expressions (columns of ``c``, literals or parameters). With
    ``skip_reviewed``, reviewed rows (which a sort leaves alone) get no entry."""
    if dialect == "postgresql":
        previous = ("LEFT JOIN LATERAL (SELECT h.category, h.status FROM catalog_history h "
                    "WHERE h.item_id = c.item_id ORDER BY h.id DESC LIMIT 1) p ON true")
        differs = "IS DISTINCT FROM"
    else:
        previous = ("LEFT JOIN catalog_history p "
                    "ON p.id = (SELECT max(h.id) FROM catalog_history h WHERE h.item_id = c.item_id)")
        differs = "IS NOT"  # SQLite's null-safe comparison (IS DISTINCT FROM only since 3.39)
    # p.status is never null in an entry: null means the item has none, it is new.
    changed = f"(p.status IS NULL OR p.category {differs} c.category OR p.status <> c.status)"
    where = keys + (f" AND c.status <> '{REVIEWED}'" if skip_reviewed else "")
    return (
        f"INSERT INTO catalog_history ({_HISTORY_COLUMNS}) SELECT c.item_id, {job_id}, c.model_name, c.model_version, "
        f"c.category, c.confidence, c.status, c.topk, {reason}, {source}, {changed_by}, {changed}, p.category, "
        f"p.status, c.updated_at FROM catalog_items c {previous} WHERE {where}"
    )


# A sort's entries: its job, the row's error as the reason.
_SORT_ENTRY = {"job_id": "c.job_id", "reason": "c.error", "source": "'model'", "changed_by": "NULL"}
# SQLite: taking the write lock (a write that changes nothing), the rows before, the entries.
_SQLITE_LOCK = "UPDATE catalog_items SET status = status WHERE 0"
_SQLITE_BEFORE = "SELECT item_id, category, status FROM catalog_items WHERE item_id IN ({})"
_SQLITE_HISTORY = f"INSERT INTO catalog_history ({_HISTORY_COLUMNS}) VALUES ({', '.join('?' * 15)})"
_SQLITE_READ_CHUNK = 500  # keys per read: well under SQLite's limit of bound parameters
_ENTRY_AT = tuple(_AT[name] for name in ("item_id", "job_id", "model_name", "model_version", "category", "confidence",
                                         "status", "topk", "error"))

# An id is its own key when it fits the key column (varchar(1024)) and PostgreSQL's B-tree index (about 2,700
# bytes an entry); a longer one is stored under a key derived from it, with the whole id in item_id_full.
KEY_MAX_CHARS = 1024
KEY_MAX_BYTES = 2048
_DIGEST_MARK = "#sha256:"
_KEY_PREFIX_CHARS = KEY_MAX_CHARS - len(_DIGEST_MARK) - 64
_KEY_PREFIX_BYTES = KEY_MAX_BYTES - len(_DIGEST_MARK) - 64
# SQLSTATE classes of a refused row: data exception, integrity constraint violation, program limit exceeded
_REFUSAL_CLASSES = ("22", "23", "54")
_REFUSED_ERROR_CHARS = 2000


def catalog_key(item_id: str) -> str:
    """The ``catalog_items.item_id`` key an item id is stored under.

    An id of at most :data:`KEY_MAX_CHARS` (1,024) characters and :data:`KEY_MAX_BYTES` (2,048) UTF-8 bytes is
    its own key. A longer one gets ``PREFIX#sha256:HEX``: its first characters (NUL and unpaired surrogates
    escaped, :func:`pipeline.records.printable`), cut so that the key keeps within both limits, then the SHA-256
    of the whole id's UTF-8 (64 hex digits); :func:`upsert_items` keeps the whole id in ``item_id_full`` and
    :func:`iter_items` gives it back. Deterministic, so a re-sorted item finds its row again.
    """
    if len(item_id) <= KEY_MAX_BYTES // 4 or (
        len(item_id) <= KEY_MAX_CHARS and len(item_id.encode("utf-8", "surrogatepass")) <= KEY_MAX_BYTES
    ):
        return item_id
    return _derived_key(item_id)


def _derived_key(item_id: str) -> str:
    digest = hashlib.sha256(item_id.encode("utf-8", "surrogatepass")).hexdigest()
    prefix = printable(item_id)[:_KEY_PREFIX_CHARS].encode()[:_KEY_PREFIX_BYTES].decode("utf-8", "ignore")
    return f"{prefix}{_DIGEST_MARK}{digest}"


@dataclass(frozen=True, slots=True)
class _PgStaging:
    """The SQL of the PostgreSQL path: a per-connection staging table, filled by COPY, merged in one INSERT."""

    prepare: str
    copy: str
    merge: str


@functools.cache
def _pg_staging() -> _PgStaging:
    dialect = postgresql.dialect()
    columns = ", ".join(f"{name} {_items.c[name].type.compile(dialect=dialect)}" for name in _UPSERT_COLUMNS)
    # The name carries a digest of the column list: a connection that outlives a schema change (a pooler's
    # server connection) never reuses a staging table of the wrong shape.
    table = f"invsort_catalog_upsert_{hashlib.sha1(columns.encode(), usedforsecurity=False).hexdigest()[:10]}"
    return _PgStaging(
        # No constraints on the staging table: they are checked by the merge, which SQLAlchemy runs, so a
        # violation raises the usual sqlalchemy.exc.IntegrityError. ON COMMIT DELETE ROWS empties it after
        # every transaction; the DELETE empties it between two calls in one transaction.
        prepare=(f"CREATE TEMPORARY TABLE IF NOT EXISTS {table} ({columns}) ON COMMIT DELETE ROWS; "
                 f"DELETE FROM {table}; {_PG_MARKER}"),
        copy=f"COPY {table} ({_COLUMN_LIST}) FROM STDIN",
        # ORDER BY: concurrent writers of overlapping items lock their rows in the same order (no deadlock). The
        # conflict locks a reviewed row too (its update is skipped): so after the merge every row of the batch is
        # locked, and the history entries go to the rows that are not reviewed, which are exactly the rows it
        # wrote. Both statements go in one round trip; the rowcount is the merge's (psycopg: the first result).
        merge=(
            f"INSERT INTO catalog_items ({_COLUMN_LIST}) SELECT {_COLUMN_LIST} FROM {table} ORDER BY item_id "
            f"ON CONFLICT (item_id) DO UPDATE SET {_SET_ALL}; "
            + _history_insert("postgresql", keys=f"c.item_id IN (SELECT item_id FROM {table})", skip_reviewed=True,
                              **_SORT_ENTRY)
        ),
    )


def _row_values(rows: Sequence[ItemResult], updated_at: Any) -> dict[str, tuple[Any, ...]]:
    """One tuple per distinct item in ``_UPSERT_COLUMNS`` order, by item id, the last result of each item
    winning; a long id goes under its :func:`catalog_key`, the whole id in ``item_id_full``."""
    dumps = json.dumps  # what SQLAlchemy's JSON type uses by default: the same text on both databases
    by_id = {}
    for r in rows:
        v = _result_values(r)
        item_id = v[0]
        if len(item_id) <= KEY_MAX_BYTES // 4:  # nearly every id: its own key, whatever its characters
            by_id[item_id] = (*v[:_TOPK], dumps(v[_TOPK]), *v[_TOPK + 1 :], None, *_NO_REVIEW, updated_at)
            continue
        key = catalog_key(item_id)
        full = None if key == item_id else item_id
        by_id[item_id] = (key, *v[1:_TOPK], dumps(v[_TOPK]), *v[_TOPK + 1 :], full, *_NO_REVIEW, updated_at)
    return by_id


def _writer(connection: Connection) -> tuple[Callable[[list[tuple[Any, ...]]], int], Any]:
    """``(write, updated_at)``: the batched upsert of value tuples on the connection's database (it returns how
    many rows it inserted or replaced: a reviewed row it left alone is not one), and now (UTC) as ``write``
    takes it.

    Raises:
        InvsortError: not SQLite, or PostgreSQL without psycopg 3.
    """
    dialect = connection.dialect
    now = _now()
    if dialect.name == "sqlite":
        # Stored as SQLAlchemy stores it (UTC text), converted once for the whole call.
        process = _items.c.updated_at.type.dialect_impl(dialect).bind_processor(dialect)
        return functools.partial(_sqlite_write, connection), process(now) if process else now
    if dialect.name != "postgresql":
        raise InvsortError(f"unsupported database dialect {dialect.name!r}: use SQLite or PostgreSQL")
    if dialect.driver != "psycopg":
        raise InvsortError(f"PostgreSQL driver {dialect.driver!r} is not supported: use postgresql+psycopg://")
    return functools.partial(_pg_write, connection), now


def _sqlite_write(connection: Connection, values: list[tuple[Any, ...]]) -> int:
    """Upsert ``values`` with one prepared statement and append their history entries with another (the write
    lock taken and the rows' previous states read first); returns the rows inserted or replaced (sqlite3 sums the
    changes of every execution, and a conflict whose update is skipped changes nothing)."""
    connection.exec_driver_sql(_SQLITE_LOCK)  # no other writer from here on: the rows read below stay as they are
    before: dict[str, tuple[str | None, str]] = {}
    for i in range(0, len(values), _SQLITE_READ_CHUNK):
        keys = tuple(value[0] for value in values[i : i + _SQLITE_READ_CHUNK])
        sql = _SQLITE_BEFORE.format(", ".join("?" * len(keys)))
        before.update((key, (category, status)) for key, category, status in connection.exec_driver_sql(sql, keys))
    written = connection.exec_driver_sql(_SQLITE_UPSERT, values).rowcount
    entries = []
    category_at, status_at, updated_at = _AT["category"], _AT["status"], _AT["updated_at"]
    for value in values:
        previous = before.get(value[0])
        if previous is None:
            entries.append((*map(value.__getitem__, _ENTRY_AT), "model", None, True, None, None, value[updated_at]))
        elif previous[1] != REVIEWED:  # a reviewed row was left alone: no entry
            changed = previous[0] != value[category_at] or previous[1] != value[status_at]
            entries.append((*map(value.__getitem__, _ENTRY_AT), "model", None, changed, *previous, value[updated_at]))
    if entries:
        connection.exec_driver_sql(_SQLITE_HISTORY, entries)
    return written


def _pg_write(connection: Connection, values: list[tuple[Any, ...]]) -> int:
    """COPY ``values`` into the connection's staging table (after taking the history marker), merge them into
    ``catalog_items`` and append their history entries; returns the rows the merge inserted or replaced."""
    dialect = connection.dialect
    sql = _pg_staging()
    dbapi_error = dialect.loaded_dbapi.Error
    try:
        with connection.connection.driver_connection.cursor() as cursor:  # type: ignore[union-attr]
            cursor.execute(sql.prepare)
            with cursor.copy(sql.copy) as copy:
                for value in values:
                    copy.write_row(value)
    except dbapi_error as exc:
        # Straight from the driver: wrap it as SQLAlchemy would have (DataError, OperationalError, ...).
        raise DBAPIError.instance(sql.copy, None, exc, dbapi_error, dialect=dialect) from exc
    return connection.exec_driver_sql(sql.merge).rowcount


def _refusal(exc: Exception) -> str | None:
    """Why the database refused the data (a value that does not fit, breaks a constraint or cannot be encoded),
    in one line; None for any other error (a lost connection, a deadlock...), which must not be blamed on rows."""
    if isinstance(exc, UnicodeEncodeError):
        return f"text it cannot encode: {exc}"
    if not isinstance(exc, DBAPIError):
        return None
    sqlstate = getattr(exc.orig, "sqlstate", None) or ""
    if not isinstance(exc, DataError | IntegrityError) and sqlstate[:2] not in _REFUSAL_CLASSES:
        return None
    lines = str(exc.orig).strip().splitlines()  # the first line: the message without the row (CONTEXT, DETAIL)
    return (lines[0] if lines else type(exc.orig).__name__)[:300]


def _write_or_refuse(
    session: Session, write: Callable[[list[tuple[Any, ...]]], int], values: list[tuple[Any, ...]]
) -> tuple[int, list[tuple[tuple[Any, ...], str]]]:
    """Write ``values`` in one batch inside a savepoint; if the database refuses it, find the rows it refuses by
    halving (each half in a savepoint of its own) and write the rest. Returns how many rows were inserted or
    replaced, and the refused rows, each with why.

    Raises what :func:`_refusal` does not recognise as a refusal of the data.
    """
    written = 0
    refused: list[tuple[tuple[Any, ...], str]] = []
    pending = [values]
    while pending:
        chunk = pending.pop()
        try:
            with session.begin_nested():
                session.connection(bind_arguments={"mapper": CatalogItem})  # emits the SAVEPOINT (it is lazy)
                n = write(chunk)
            written += n
            continue
        except (DBAPIError, UnicodeEncodeError) as exc:
            reason = _refusal(exc)
            if reason is None:
                raise
        if len(chunk) == 1:
            refused.append((chunk[0], reason))
        else:
            pending += [chunk[len(chunk) // 2 :], chunk[: len(chunk) // 2]]
    return written, refused


def _failed_value(value: tuple[Any, ...], item_id: str, reason: str) -> tuple[Any, ...]:
    """The ``failed`` row that replaces a refused one: the reason in ``error``, no prediction, text the databases
    can store (escaped where it could not be), an id they cannot store under its derived key."""
    v = list(value)
    if printable(item_id) != item_id:
        v[0], v[_AT["item_id_full"]] = _derived_key(item_id), None
    v[_AT["status"]], v[_AT["category"]], v[_AT["confidence"]], v[_AT["topk"]] = "failed", None, None, "[]"
    v[_AT["error"]] = printable(f"the database refused this row: {reason}")[:_REFUSED_ERROR_CHARS]
    for name, limit in (("image_uri", None), ("model_name", 255), ("model_version", 64)):
        if isinstance(v[_AT[name]], str):
            v[_AT[name]] = printable(v[_AT[name]])[:limit]
    return tuple(v)


def _fail_refused(
    session: Session,
    write: Callable[[list[tuple[Any, ...]]], int],
    rows: Sequence[ItemResult],
    by_id: dict[str, tuple[Any, ...]],
    refused: list[tuple[tuple[Any, ...], str]],
) -> int:
    """Write a ``failed`` row for each refused one, change the refused :class:`ItemResult` objects of ``rows`` in
    place to what was written, and return how many ``failed`` rows were inserted or replaced (not those refused
    as failed rows too, nor reviewed rows left alone)."""
    key_of = {id(value): item_id for item_id, value in by_id.items()}
    reasons = {key_of[id(value)]: reason for value, reason in refused}
    failed = {item_id: _failed_value(by_id[item_id], item_id, reason) for item_id, reason in reasons.items()}
    written, lost = _write_or_refuse(session, write, list(failed.values()))
    for value, why in lost:
        log.error("catalog row of item %r not written, even as a failed row: %s", value[0], why)
    for item_id, reason in reasons.items():
        log.warning("the database refused the catalog row of item %r: %s", printable(item_id)[:200], reason)
    for r in rows:
        if r.item_id in failed:
            r.status, r.category, r.confidence, r.topk = "failed", None, None, []
            r.error = failed[r.item_id][_AT["error"]]
    return written


def upsert_items(*, session: Session, rows: Sequence[ItemResult]) -> int:
    """Insert or replace the catalog rows of ``rows``, keyed by ``item_id``, with one batched write.

    ``INSERT ... ON CONFLICT (item_id) DO UPDATE`` sets every column of an existing row to the new values
    (the review columns to null), with one ``updated_at`` (now, UTC) for the whole call. If ``rows`` names an
    item more than once, its last result wins. Runs in the caller's transaction and does not commit; an empty
    ``rows`` does nothing. An id too long for the key column is stored under its :func:`catalog_key`, the whole
    id in ``item_id_full``.

    Human decisions win: a row whose status is ``reviewed`` (:mod:`db.reviews`) is left entirely as it is, its
    ``updated_at`` and ``job_id`` included (``ON CONFLICT ... DO UPDATE ... WHERE status <> 'reviewed'``, so on
    PostgreSQL a sort that meets a decision being committed waits for it and then leaves the row alone). The
    :class:`ItemResult` of such an item keeps what the sort found: a job's counters count what its sort found.

    On PostgreSQL (psycopg 3) the rows are sent with ``COPY`` into a temporary staging table of the session's
    connection (created on first use, emptied at commit; needs the ``TEMPORARY`` privilege, which PostgreSQL
    grants to everyone by default) and merged with one ``INSERT ... SELECT``. On SQLite they go through one
    prepared statement with ``executemany``. Either way there is no per-row SQLAlchemy work: figures are in
    ``pipeline/bench/catalog.py``.

    Rows the database refuses fail alone: the batch is written inside a savepoint; when the database refuses it
    (a value that does not fit its column, a NUL character on PostgreSQL, text with an unpaired surrogate, a
    broken constraint such as an unknown ``status``), the refused rows are found by halving the batch, each half
    in a savepoint, and the rest is written. Each refused row is written as a ``failed`` row instead, ``error``
    = ``the database refused this row: REASON`` (its text escaped, an id the database cannot store under its
    derived key); the :class:`ItemResult` objects of ``rows`` are changed in place to match (status ``failed``,
    no category, confidence or top-k, that error), so counts taken from ``rows`` after this call agree with the
    table. A row refused even then is left out and logged.

    Attributes: the :attr:`~ItemResult.attributes` of every row that is not ``failed`` (a refused row's included
    are not) are written into ``catalog_attributes`` in the same transaction (:func:`db.attributes.upsert_attributes`),
    a reviewed item's too (a person decides the category only).

    History: every row written (a refused row written as ``failed`` included; not a reviewed row left alone) gets
    an entry in ``catalog_history`` in the same statement batch and transaction: the row as written, source
    ``model``, its job, ``reason`` = its ``error``, and the item's state before (``previous_category`` /
    ``previous_status``, null for a new item) with ``changed`` = whether the category or status differs from it
    (or the item is new). The previous state is the item's latest history entry, read while this transaction holds
    the row's lock, so two workers writing the same item at once each record the state the other left (the later
    one waits for the earlier one's commit). On PostgreSQL each call also holds an advisory lock until the
    transaction ends that tells the change feed its entries may still appear (:func:`db.history.iter_changes`).

    Returns:
        The number of distinct items whose row this call inserted or replaced (a refused row written as
        ``failed`` included); reviewed rows left as they were and rows refused even as ``failed`` are not
        counted.

    Raises:
        InvsortError: the session is not bound to SQLite or PostgreSQL with psycopg 3.
        sqlalchemy.exc.DBAPIError: an error that is not a refusal of the data (e.g. ``OperationalError``: the
            connection was lost).
    """
    if not rows:
        return 0
    connection = session.connection(bind_arguments={"mapper": CatalogItem})
    write, updated_at = _writer(connection)
    by_id = _row_values(rows, updated_at)
    written, refused = _write_or_refuse(session, write, list(by_id.values()))
    if refused:
        written += _fail_refused(session, write, rows, by_id, refused)
    with_attributes = [r for r in rows if r.attributes and r.status != "failed"]
    if with_attributes:
        upsert_attributes(session=session, rows=with_attributes, keys=[catalog_key(r.item_id) for r in with_attributes])
    return written


def record_history(
    *,
    session: Session,
    keys: Sequence[str],
    source: str,
    reason: str | None = None,
    changed_by: str | None = None,
    job_id: str | None = None,
) -> int:
    """Append one ``catalog_history`` entry per catalog row of ``keys``, a snapshot of the row as it is now:
    what every writer of ``catalog_items`` other than :func:`upsert_items` calls right after its write.

    The caller must hold the rows' locks (it has just updated them, or locked them with ``SELECT ... FOR UPDATE``)
    and call this in the transaction of the write, at READ COMMITTED: that is what makes each entry's previous
    state (the item's latest entry) and ``changed`` exact when writers race. ``keys`` are ``catalog_items`` keys
    (:func:`catalog_key`); keys without a row are skipped. ``written_at`` is the row's ``updated_at``.

    Args:
        source: ``review`` or ``rollback`` (``model`` is :func:`upsert_items`'s).
        reason: why the row is as it is now (e.g. the decision: ``review``, ``accept``, ``undo``); None: the row's
            ``error``.
        changed_by: who made the change (a reviewer).
        job_id: the job the entry belongs to (e.g. the job a rollback took back); None for a review.

    Returns:
        How many entries were appended.
    """
    dialect = session.get_bind().dialect.name
    sql = text(_history_insert(dialect, keys="c.item_id IN :keys", job_id=":job_id", source=":source",
                               changed_by=":changed_by",
                               reason="c.error" if reason is None else ":reason",
                               skip_reviewed=False))
    sql = sql.bindparams(bindparam("keys", expanding=True))
    if dialect == "postgresql" and keys:
        session.execute(text(_PG_MARKER))
    unique = sorted(set(keys))
    appended = 0
    for i in range(0, len(unique), _HISTORY_CHUNK):
        chunk = unique[i : i + _HISTORY_CHUNK]
        params = {"keys": chunk, "job_id": job_id, "source": source, "changed_by": changed_by, "reason": reason}
        appended += _rowcount(session.execute(sql, params))
    return appended


_HISTORY_CHUNK = 500  # keys per statement: well under SQLite's limit of bound parameters


def create_job(
    *,
    session: Session,
    source: str,
    model_path: str,
    model_name: str,
    model_version: str,
    job_id: str | None = None,
    attribute_models: list[dict[str, str]] | None = None,
) -> str:
    """Insert a new sorting job in status ``listing``, created now. ``attribute_models``: its models of other
    attributes than the category (:meth:`pipeline.attributes.AttributeModel.to_json`; None or empty: none).

    Returns:
        The job's id: ``job_id`` if given, else a new uuid4 string.

    Raises:
        sqlalchemy.exc.IntegrityError: a job with ``job_id`` already exists.
    """
    job_id = job_id or str(uuid.uuid4())
    now = _now()
    session.execute(
        _jobs.insert().values(
            id=job_id,
            source=source,
            model_path=model_path,
            model_name=model_name,
            model_version=model_version,
            attribute_models=attribute_models or None,
            status="listing",
            batches_done=0,
            sorted_count=0,
            needs_review_count=0,
            failed_count=0,
            created_at=now,
            updated_at=now,
        )
    )
    return job_id


def record_batch(
    *,
    session: Session,
    job_id: str,
    batch_no: int,
    sorted_count: int,
    needs_review_count: int,
    failed_count: int,
    state: str = "done",
) -> None:
    """Record the counts of one finished batch of a job and add them to the job's counters, exactly once.

    The first call that finishes ``(job_id, batch_no)`` (no row yet, or a ``queued``/``running`` row of a queued
    job) stores the counts, sets ``state`` (``done``, or ``failed`` for a batch given up on), drops the batch's
    stored items and adds its counts and 1 to ``batches_done``. A later call for the same batch (a redelivered
    task) replaces the stored counts and adds only the difference, leaving ``batches_done`` alone. Counters are
    incremented in SQL (``x = x + :delta``), so concurrent workers on PostgreSQL never lose an update.
    Sets the job's ``started_at`` if it is not set yet.
    Runs in the caller's transaction and does not commit. Returns None.

    Raises:
        ValueError: a count is negative.
        sqlalchemy.exc.IntegrityError: no job has ``job_id`` (foreign key).
        JobNotFoundError: no job has ``job_id`` (where the foreign key did not already say so).
    """
    counts = {
        "sorted_count": sorted_count,
        "needs_review_count": needs_review_count,
        "failed_count": failed_count,
    }
    if any(v < 0 for v in counts.values()):
        raise ValueError(f"batch counts must not be negative, got {counts}")
    if state not in FINISHED_BATCH_STATES:
        raise ValueError(f"a recorded batch is {' or '.join(FINISHED_BATCH_STATES)}, got {state!r}")
    now = _now()
    key = (_batches.c.job_id == job_id) & (_batches.c.batch_no == batch_no)

    # Write first (no read snapshot to go stale on SQLite); on PostgreSQL a concurrent delivery of the same
    # batch waits here for the first one to commit and then sees the conflict.
    ins = _insert(session, _batches).values(job_id=job_id, batch_no=batch_no, updated_at=now, **counts)
    ins = ins.on_conflict_do_nothing(index_elements=[_batches.c.job_id, _batches.c.batch_no])
    inserted = session.execute(ins.returning(_batches.c.batch_no)).first() is not None

    if inserted:
        first, delta = True, counts
        if state != "done":
            session.execute(update(_batches).where(key).values(state=state))
    else:
        old = session.execute(
            select(_batches.c.sorted_count, _batches.c.needs_review_count, _batches.c.failed_count,
                   _batches.c.state)
            .where(key)
            .with_for_update()
        ).one()
        # Counts of a batch that has not finished yet were never added to the job (a batch run item by item
        # keeps its running counts on its own row until it finishes).
        first = old.state not in FINISHED_BATCH_STATES
        delta = counts if first else {name: counts[name] - old._mapping[name] for name in counts}
        # A done batch's items are not needed again; a failed one keeps them for ``invsort jobs retry``.
        session.execute(update(_batches).where(key).values(
            updated_at=now, state=state, items=None if state == "done" else _batches.c["items"], worker=None,
            heartbeat_at=None, **counts))

    now_param = literal(now, UTCDateTime())
    result = session.execute(
        update(_jobs)
        .where(_jobs.c.id == job_id)
        .values(
            batches_done=_jobs.c.batches_done + (1 if first else 0),
            started_at=func.coalesce(_jobs.c.started_at, now_param),
            updated_at=now_param,
            **{name: _jobs.c[name] + d for name, d in delta.items()},
        )
    )
    if _rowcount(result) != 1:
        raise JobNotFoundError(f"no sorting job {job_id!r}")


def finish_listing(*, session: Session, job_id: str, total_items: int, total_batches: int) -> None:
    """Mark the listing of a job as finished: set its totals and move it from ``listing`` to ``running``.

    Call :func:`complete_job_if_done` after committing: the batches may all be done already. Returns None.

    Raises:
        JobNotFoundError: no job has ``job_id``.
        JobStateError: the job is not in status ``listing``.
        ValueError: a total is negative.
    """
    if total_items < 0 or total_batches < 0:
        raise ValueError(f"totals must not be negative, got {total_items} items, {total_batches} batches")
    result = session.execute(
        update(_jobs)
        .where(_jobs.c.id == job_id, _jobs.c.status == "listing")
        .values(status="running", total_items=total_items, total_batches=total_batches, updated_at=_now())
    )
    if _rowcount(result) != 1:
        status = session.execute(select(_jobs.c.status).where(_jobs.c.id == job_id)).scalar_one_or_none()
        if status is None:
            raise JobNotFoundError(f"no sorting job {job_id!r}")
        raise JobStateError(f"job {job_id} is {status!r}, not 'listing': its listing cannot finish again")


def complete_job_if_done(*, session: Session, job_id: str) -> bool:
    """Mark the job ``done`` if its listing has finished and all its batches are recorded.

    One conditional UPDATE (``status='running' AND batches_done >= total_batches``), so when the submitter and
    workers call it concurrently, each in its own transaction after committing their own work, exactly one
    call completes the job. Does not commit.

    Returns:
        True if this call moved the job to ``done``; False if it is not finished yet, already done or failed,
        or does not exist.
    """
    now = _now()
    result = session.execute(
        update(_jobs)
        .where(
            _jobs.c.id == job_id,
            _jobs.c.status == "running",
            _jobs.c.total_batches.is_not(None),
            _jobs.c.batches_done >= _jobs.c.total_batches,
        )
        .values(status="done", finished_at=now, updated_at=now)
    )
    return _rowcount(result) == 1


def fail_job(*, session: Session, job_id: str, error: str) -> bool:
    """Mark a job that is still ``listing`` or ``running`` as ``failed`` with ``error``, finished now.

    A job that is already ``done``, ``failed`` or ``cancelled`` is left as it is. Does not commit.

    Returns:
        True if this call marked the job failed, False otherwise (finished already, or no such job).
    """
    now = _now()
    result = session.execute(
        update(_jobs)
        .where(_jobs.c.id == job_id, _jobs.c.status.in_(("listing", "running")))
        .values(status="failed", error=error, finished_at=now, updated_at=now)
    )
    return _rowcount(result) == 1


def _job_status(row: Any) -> JobStatus:
    m = row._mapping
    return JobStatus(**{name: m[name] for name in _JOB_FIELDS})


def get_job(*, session: Session, job_id: str) -> JobStatus | None:
    """The current state of one job.

    Returns:
        A :class:`JobStatus`, or None if no job has ``job_id``.
    """
    row = session.execute(select(_jobs).where(_jobs.c.id == job_id)).first()
    return None if row is None else _job_status(row)


def list_jobs(*, session: Session, limit: int = 20) -> list[JobStatus]:
    """The ``limit`` most recently created jobs.

    Returns:
        A list of :class:`JobStatus`, newest first.
    """
    rows = session.execute(select(_jobs).order_by(_jobs.c.created_at.desc(), _jobs.c.id).limit(limit))
    return [_job_status(row) for row in rows]


def _select_rows() -> Select[Any]:
    """``SELECT`` of :class:`CatalogRow`'s columns in its order, ``item_id`` the whole id."""
    whole_id = func.coalesce(_items.c.item_id_full, _items.c.item_id)
    return select(*(whole_id if name == "item_id" else _items.c[name] for name in _ROW_FIELDS))


def get_item(*, session: Session, item_id: str) -> CatalogRow | None:
    """The catalog row of one item (its whole id; a long one is looked up under its :func:`catalog_key`).

    Returns:
        A :class:`CatalogRow` with its attributes, or None if the catalog has no row for ``item_id``.
    """
    key = catalog_key(item_id)
    row = session.execute(_select_rows().where(_items.c.item_id == key)).first()
    if row is None:
        return None
    return replace(CatalogRow(*row), attributes=attributes_of(session=session, keys=[key]).get(key, {}))


def iter_items(
    *, session: Session, job_id: str | None = None, chunk: int = 1000, status: str | None = None
) -> Iterator[CatalogRow]:
    """Stream catalog rows ordered by ``item_id``: all of them, or those last written by ``job_id``, or those
    with ``status`` (e.g. ``reviewed``: the human decisions, for a training manifest), or both.

    Rows are fetched ``chunk`` at a time (a server-side cursor on PostgreSQL), so memory stays flat for
    exports of any size. Consume the iterator inside the session's transaction. A reviewed row keeps the
    ``job_id`` of the sort it was reviewed after.

    Yields:
        One :class:`CatalogRow` per catalog item, its ``item_id`` the whole id (``item_id_full`` for a row
        stored under a derived key, :func:`catalog_key`).
    """
    stmt = _select_rows().order_by(_items.c.item_id)
    if job_id is not None:
        stmt = stmt.where(_items.c.job_id == job_id)
    if status is not None:
        stmt = stmt.where(_items.c.status == status)
    result = session.execute(stmt.execution_options(yield_per=chunk))
    try:
        for row in result:
            yield CatalogRow(*row)
    finally:
        result.close()


# --- re-categorisation: the rows another model re-sorts ------------------------------------------------------------

#: The ``source`` of every re-categorisation job begins with this (:attr:`ResortSelection.source`): it is how such
#: jobs are told from sorts of folders, prefixes and manifests, which can never have it.
CATALOG_SOURCE = "catalog:"


@dataclass(frozen=True, slots=True)
class ResortSelection:
    """The catalog rows a re-categorisation re-sorts: each row whose ``model_version`` is not ``version`` (or is
    null) or, for each ``(attribute, version)`` of ``attributes``, a row that is not ``failed`` and has no value of
    that attribute by that version; never a ``reviewed`` one; narrowed by the filters, each of which is off when
    empty: ``categories`` (the row's category is one of them), ``statuses`` (``sorted``, ``needs_review``,
    ``failed``), ``job_ids`` (the row was last written by one of these jobs) and ``before`` (the row was last
    written before then; aware).

    Raises:
        ValueError: a status that is not a sort's, or a naive ``before``.
    """

    version: str
    categories: tuple[str, ...] = ()
    statuses: tuple[str, ...] = ()
    job_ids: tuple[str, ...] = ()
    before: datetime | None = None
    attributes: tuple[tuple[str, str], ...] = ()  # (attribute, version) of the job's models of other attributes

    def __post_init__(self) -> None:
        wrong = [s for s in self.statuses if s not in SORT_STATUSES]
        if wrong:
            raise ValueError(f"a re-categorisation re-sorts rows of status {', '.join(SORT_STATUSES)} (never "
                             f"{REVIEWED}: human decisions win), got {', '.join(map(repr, wrong))}")
        if self.before is not None and (self.before.tzinfo is None or self.before.utcoffset() is None):
            raise ValueError(f"naive datetime {self.before!r}: pass a timezone-aware datetime (UTC)")

    @property
    def source(self) -> str:
        """What the job's ``source`` says: ``catalog:?not_model_version=VERSION`` and the filters, URL-encoded."""
        query = [("not_model_version", self.version),
                 *(("not_attribute_version", f"{a}:{v}") for a, v in self.attributes),
                 *(("category", c) for c in self.categories),
                 *(("status", s) for s in self.statuses), *(("job", j) for j in self.job_ids)]
        if self.before is not None:
            query.append(("before", self.before.astimezone(UTC).isoformat()))
        return f"{CATALOG_SOURCE}?{urlencode(query)}"

    def where(self) -> list[Any]:
        """The conditions on ``catalog_items`` that select the rows."""
        version = _items.c.model_version
        stale = [version.is_(None), version != self.version]
        for attribute, attribute_version in self.attributes:
            has = (select(literal(1)).select_from(_attributes)
                   .where(_attributes.c.item_id == _items.c.item_id, _attributes.c.attribute == attribute,
                          _attributes.c.model_version == attribute_version))
            stale.append(and_(_items.c.status != "failed", ~has.exists()))
        conditions = [_items.c.status != REVIEWED, or_(*stale)]
        if self.categories:
            conditions.append(_items.c.category.in_(self.categories))
        if self.statuses:
            conditions.append(_items.c.status.in_(self.statuses))
        if self.job_ids:
            conditions.append(_items.c.job_id.in_(self.job_ids))
        if self.before is not None:
            conditions.append(_items.c.updated_at < self.before)
        return conditions


@dataclass(frozen=True, slots=True)
class ResortItem:
    """One row a re-categorisation re-sorts: its catalog ``key`` (the keyset cursor), the whole ``item_id``, its
    photo and its status now."""

    key: str
    item_id: str
    image_uri: str
    status: str


def count_resort(*, session: Session, selection: ResortSelection) -> int:
    """How many catalog rows ``selection`` selects now (one ``COUNT``)."""
    return int(session.execute(select(func.count()).select_from(_items).where(*selection.where())).scalar_one())


def resort_page(*, session: Session, selection: ResortSelection, after: str | None, limit: int) -> list[ResortItem]:
    """The next ``limit`` rows ``selection`` selects whose key comes after ``after`` (None: from the first), in key
    order: one keyset page, read by its own short statement (pass the last row's ``key`` to read on), so that a
    listing of any size holds one page in memory and no transaction open between pages.

    Returns:
        Up to ``limit`` :class:`ResortItem`; fewer means the listing is at its end.
    """
    stmt = (select(_items.c.item_id, func.coalesce(_items.c.item_id_full, _items.c.item_id), _items.c.image_uri,
                   _items.c.status)
            .where(*selection.where()).order_by(_items.c.item_id).limit(limit))
    if after is not None:
        stmt = stmt.where(_items.c.item_id > after)
    return [ResortItem(*row) for row in session.execute(stmt)]


def active_resorts(*, session: Session) -> list[JobStatus]:
    """The re-categorisation jobs (``source`` beginning with :data:`CATALOG_SOURCE`) still ``listing`` or
    ``running``, oldest first."""
    rows = session.execute(select(_jobs).where(_jobs.c.source.startswith(CATALOG_SOURCE, autoescape=True),
                                               _jobs.c.status.in_(("listing", "running")))
                           .order_by(_jobs.c.created_at, _jobs.c.id))
    return [_job_status(row) for row in rows]
