"""Reads and writes of the catalog and of sorting jobs, on SQLite and PostgreSQL.

Every function takes the :class:`~sqlalchemy.orm.Session` as a keyword argument and runs inside the
caller's transaction: nothing here commits. Writes to shared rows are single SQL statements that are safe when
many workers run them at once on PostgreSQL (counters are incremented in SQL, never read-modify-written in Python).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import operator
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from typing import Any, TypedDict, cast

from sqlalchemy import CursorResult, Result, Select, Table, func, literal, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DataError, DBAPIError, IntegrityError
from sqlalchemy.orm import Session

from db.models import CatalogItem, SortingJob, SortingJobBatch, UTCDateTime
from pipeline.errors import InvsortError
from pipeline.records import REVIEWED, ItemResult, printable

__all__ = [
    "CatalogRow",
    "JobNotFoundError",
    "JobStateError",
    "JobStatus",
    "StatusCounts",
    "catalog_key",
    "complete_job_if_done",
    "create_job",
    "fail_job",
    "finish_listing",
    "get_item",
    "get_job",
    "iter_items",
    "list_jobs",
    "record_batch",
    "upsert_items",
]

_items = cast(Table, CatalogItem.__table__)
_jobs = cast(Table, SortingJob.__table__)
_batches = cast(Table, SortingJobBatch.__table__)

log = logging.getLogger(__name__)

_RESULT_FIELDS = tuple(f.name for f in fields(ItemResult))


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

    def to_result(self) -> ItemResult:
        """The row as the :class:`ItemResult` that was written (without ``updated_at``)."""
        return ItemResult(**{name: getattr(self, name) for name in _RESULT_FIELDS})


_JOB_FIELDS = tuple(f.name for f in fields(JobStatus))
_ROW_FIELDS = tuple(f.name for f in fields(CatalogRow))


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
        prepare=f"CREATE TEMPORARY TABLE IF NOT EXISTS {table} ({columns}) ON COMMIT DELETE ROWS; DELETE FROM {table}",
        copy=f"COPY {table} ({_COLUMN_LIST}) FROM STDIN",
        # ORDER BY: concurrent writers of overlapping items lock their rows in the same order (no deadlock).
        merge=(
            f"INSERT INTO catalog_items ({_COLUMN_LIST}) SELECT {_COLUMN_LIST} FROM {table} ORDER BY item_id "
            f"ON CONFLICT (item_id) DO UPDATE SET {_SET_ALL}"
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
    """Upsert ``values`` with one prepared statement; returns the rows inserted or replaced (sqlite3 sums the
    changes of every execution, and a conflict whose update is skipped changes nothing)."""
    return connection.exec_driver_sql(_SQLITE_UPSERT, values).rowcount


def _pg_write(connection: Connection, values: list[tuple[Any, ...]]) -> int:
    """COPY ``values`` into the connection's staging table and merge them into ``catalog_items``; returns the
    rows the merge inserted or replaced."""
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
    if not refused:
        return written
    return written + _fail_refused(session, write, rows, by_id, refused)


def create_job(
    *,
    session: Session,
    source: str,
    model_path: str,
    model_name: str,
    model_version: str,
    job_id: str | None = None,
) -> str:
    """Insert a new sorting job in status ``listing``, created now.

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
        A :class:`CatalogRow`, or None if the catalog has no row for ``item_id``.
    """
    row = session.execute(_select_rows().where(_items.c.item_id == catalog_key(item_id))).first()
    return None if row is None else CatalogRow(*row)


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
