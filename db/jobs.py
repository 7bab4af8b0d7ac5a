"""The batches of queued jobs and the leases of the reconciler, on SQLite and PostgreSQL.

The database is the source of truth for queued work; the queue is only a transport. ``invsort submit`` inserts
every batch (``state='queued'``, with its ``[[item_id, image_uri], ...]``) before its task is enqueued; a worker
claims it (``running``, with a heartbeat), then records it ``done`` (or ``failed``) with
:func:`db.catalog.record_batch`. The reconciler (:mod:`pipeline.jobs`) finds batches that are neither done nor
alive and enqueues them again. Like :mod:`db.catalog`, every function runs in the caller's transaction and
never commits.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from datetime import UTC, datetime, timedelta
from typing import Any, cast

from sqlalchemy import Table, and_, or_, select, update
from sqlalchemy.orm import Session

from db.catalog import FINISHED_BATCH_STATES, JobNotFoundError, JobStateError, StatusCounts, _insert, _rowcount
from db.models import TERMINAL_JOB_STATUSES, Lease, SortingJob, SortingJobBatch

__all__ = [
    "Batch",
    "abandon_batch",
    "acquire_lease",
    "add_batches",
    "advance",
    "batch_counts",
    "cancel_job",
    "claim_batch",
    "complete_finished_jobs",
    "find_stale_batches",
    "get_batch",
    "heartbeat",
    "mark_requeued",
    "release_batch",
    "release_lease",
    "retry_job",
    "set_progress",
    "stale_listing_jobs",
    "task_id_for",
]

_jobs = cast(Table, SortingJob.__table__)
_batches = cast(Table, SortingJobBatch.__table__)
_leases = cast(Table, Lease.__table__)
ACTIVE_JOB_STATUSES = ("listing", "running")


def _now() -> datetime:
    return datetime.now(UTC)


def task_id_for(job_id: str, batch_no: int, requeue: int = 0) -> str:
    """The Celery task id of a batch's ``requeue``-th delivery (0: the first): ``JOB:BATCH[:rN]``.

    Deterministic, so the reconciler can tell from the broker whether a batch's task is still there.
    """
    return f"{job_id}:{batch_no}" + (f":r{requeue}" if requeue else "")


@dataclass(frozen=True, slots=True)
class Batch:
    """One ``sorting_job_batches`` row of a queued job, with its job's status and pinned model."""

    job_id: str
    batch_no: int
    state: str
    items: list[list[str]] | None
    attempts: int
    requeues: int
    progress: int | None
    item_crashes: int
    task_id: str | None
    worker: str | None
    enqueued_at: datetime | None
    heartbeat_at: datetime | None
    error: str | None
    job_status: str
    model_path: str
    model_version: str
    job_error: str | None
    attribute_models: list[dict[str, str]] | None = None  # the job's models of other attributes (pipeline.attributes)


_BATCH_COLUMNS = [_batches.c[f.name] for f in fields(Batch) if f.name in _batches.c]
_JOB_COLUMNS = [_jobs.c.status.label("job_status"), _jobs.c.model_path, _jobs.c.model_version,
                _jobs.c.error.label("job_error"), _jobs.c.attribute_models]


def _batch_query() -> Any:
    return select(*_BATCH_COLUMNS, *_JOB_COLUMNS).join(_jobs, _jobs.c.id == _batches.c.job_id)


def _key(job_id: str, batch_no: int) -> Any:
    return and_(_batches.c.job_id == job_id, _batches.c.batch_no == batch_no)


def add_batches(*, session: Session, job_id: str, batches: Sequence[tuple[int, list[list[str]]]]) -> None:
    """Insert ``batches`` (``(batch_no, [[item_id, image_uri], ...])``) of ``job_id`` as ``queued``, enqueued now.

    Call it, commit, then enqueue their tasks (ids from :func:`task_id_for`): a task is never in the queue
    without its batch in the database. Also touches the job's ``updated_at`` (the listing is alive).

    Raises:
        sqlalchemy.exc.IntegrityError: a batch exists already, or no job has ``job_id``.
    """
    if not batches:
        return
    now = _now()
    session.execute(_batches.insert(), [
        dict(job_id=job_id, batch_no=no, state="queued", items=items, task_id=task_id_for(job_id, no),
             enqueued_at=now, updated_at=now, sorted_count=0, needs_review_count=0, failed_count=0, attempts=0,
             requeues=0, item_crashes=0)
        for no, items in batches
    ])
    session.execute(update(_jobs).where(_jobs.c.id == job_id).values(updated_at=now))


def get_batch(*, session: Session, job_id: str, batch_no: int, lock: bool = False) -> Batch | None:
    """One batch with its job's status and model, or None when the batch has no row (an embedded job's batch
    that has not finished, or a task from before batches were stored). ``lock``: ``SELECT ... FOR UPDATE`` on
    PostgreSQL, so that two deliveries of one batch claim it one after the other."""
    stmt = _batch_query().where(_key(job_id, batch_no))
    if lock:
        stmt = stmt.with_for_update(of=_batches)
    row = session.execute(stmt).first()
    return None if row is None else Batch(**row._mapping)


def claim_batch(*, session: Session, job_id: str, batch_no: int, worker: str) -> None:
    """Mark a batch ``running`` on ``worker`` (``host:pid``): one more attempt, heartbeat now.

    Raises:
        JobNotFoundError: the batch has no row.
    """
    now = _now()
    result = session.execute(update(_batches).where(_key(job_id, batch_no)).values(
        state="running", attempts=_batches.c.attempts + 1, worker=worker, started_at=now, heartbeat_at=now,
        updated_at=now))
    if _rowcount(result) != 1:
        raise JobNotFoundError(f"no batch {batch_no} of job {job_id!r}")


def heartbeat(*, session: Session, job_id: str, batch_no: int, worker: str) -> bool:
    """Refresh the heartbeat of a batch that ``worker`` runs. Returns False if it no longer holds it."""
    result = session.execute(update(_batches).where(
        _key(job_id, batch_no), _batches.c.state == "running", _batches.c.worker == worker,
    ).values(heartbeat_at=_now()))
    return _rowcount(result) == 1


def release_batch(*, session: Session, job_id: str, batch_no: int, worker: str, error: str) -> None:
    """Give a running batch back (``queued``) after an attempt that failed cleanly (it will be retried)."""
    session.execute(update(_batches).where(
        _key(job_id, batch_no), _batches.c.state == "running", _batches.c.worker == worker,
    ).values(state="queued", worker=None, heartbeat_at=None, error=error[:2000], updated_at=_now()))


def abandon_batch(*, session: Session, job_id: str, batch_no: int, worker: str, error: str) -> None:
    """Leave a running batch as if its worker had died (no holder, no heartbeat), e.g. after a time limit, so
    that its next delivery treats it as crashed."""
    session.execute(update(_batches).where(
        _key(job_id, batch_no), _batches.c.state == "running", _batches.c.worker == worker,
    ).values(worker=None, heartbeat_at=None, error=error[:2000], updated_at=_now()))


def set_progress(*, session: Session, job_id: str, batch_no: int, progress: int, item_crashes: int) -> None:
    """Record that the first ``progress`` items of a batch run item by item are written, and how often the item
    at ``progress`` took a worker process down (``item_crashes``)."""
    session.execute(update(_batches).where(_key(job_id, batch_no)).values(
        progress=progress, item_crashes=item_crashes, heartbeat_at=_now()))


def advance(*, session: Session, job_id: str, batch_no: int, progress: int, counts: StatusCounts) -> None:
    """A batch run item by item wrote its items up to ``progress``: store the position, add ``counts``
    (``{"sorted_count": n, ...}``) to the batch's own counts (not the job's: :func:`db.catalog.record_batch` adds
    them when the batch finishes), and start its attempts and the item's crash count over (it made progress)."""
    session.execute(update(_batches).where(_key(job_id, batch_no)).values(
        progress=progress, item_crashes=0, attempts=0, heartbeat_at=_now(),
        **{name: _batches.c[name] + n for name, n in counts.items()}))


def batch_counts(*, session: Session, job_id: str, batch_no: int) -> StatusCounts:
    """A batch's counts as stored on its row: ``{"sorted_count": n, "needs_review_count": n, "failed_count": n}``.

    Raises:
        JobNotFoundError: the batch has no row.
    """
    row = session.execute(select(_batches.c.sorted_count, _batches.c.needs_review_count, _batches.c.failed_count)
                          .where(_key(job_id, batch_no))).first()
    if row is None:
        raise JobNotFoundError(f"no batch {batch_no} of job {job_id!r}")
    return StatusCounts(sorted_count=row.sorted_count, needs_review_count=row.needs_review_count,
                        failed_count=row.failed_count)


def mark_requeued(*, session: Session, job_id: str, batch_no: int) -> str:
    """Count one more re-enqueue of a batch by the reconciler; returns the new task id to enqueue it under."""
    requeues = session.execute(select(_batches.c.requeues).where(_key(job_id, batch_no))).scalar_one() + 1
    task_id = task_id_for(job_id, batch_no, requeues)
    session.execute(update(_batches).where(_key(job_id, batch_no)).values(
        requeues=requeues, task_id=task_id, enqueued_at=_now()))
    return task_id


def find_stale_batches(
    *, session: Session, queued_before: datetime, heartbeat_before: datetime, limit: int = 1000
) -> list[Batch]:
    """Batches of listing or running jobs that may have been lost: ``queued`` and enqueued before
    ``queued_before``, or ``running`` with no heartbeat since ``heartbeat_before``. Oldest first, at most
    ``limit``. Whether one is really lost (its task is in neither the queue nor a worker) is the caller's call."""
    stmt = _batch_query().where(
        _jobs.c.status.in_(ACTIVE_JOB_STATUSES),
        or_(
            and_(_batches.c.state == "queued", _batches.c.enqueued_at < queued_before),
            and_(_batches.c.state == "running",
                 or_(_batches.c.heartbeat_at.is_(None), _batches.c.heartbeat_at < heartbeat_before)),
        ),
    ).order_by(_batches.c.enqueued_at, _batches.c.job_id, _batches.c.batch_no).limit(limit)
    return [Batch(**row._mapping) for row in session.execute(stmt)]


def stale_listing_jobs(*, session: Session, before: datetime) -> list[str]:
    """Ids of jobs still ``listing`` whose listing has shown no progress since ``before`` (its submitter died)."""
    return list(session.execute(select(_jobs.c.id).where(
        _jobs.c.status == "listing", _jobs.c.updated_at < before)).scalars())


def complete_finished_jobs(*, session: Session) -> int:
    """Mark ``done`` every running job whose batches are all recorded (a last completion a worker could not
    write). Returns how many jobs it finished."""
    now = _now()
    result = session.execute(update(_jobs).where(
        _jobs.c.status == "running", _jobs.c.total_batches.is_not(None),
        _jobs.c.batches_done >= _jobs.c.total_batches,
    ).values(status="done", finished_at=now, updated_at=now))
    return _rowcount(result)


def cancel_job(*, session: Session, job_id: str) -> bool:
    """Cancel a job that is still listing or running: its ``queued`` batches become ``cancelled`` (their tasks
    are skipped when they arrive); a batch a worker is running finishes and keeps its rows.

    Returns:
        True if this call cancelled the job; False if it had already ended (done, failed or cancelled).

    Raises:
        JobNotFoundError: no job has ``job_id``.
    """
    now = _now()
    result = session.execute(update(_jobs).where(
        _jobs.c.id == job_id, _jobs.c.status.in_(ACTIVE_JOB_STATUSES),
    ).values(status="cancelled", finished_at=now, updated_at=now))
    if _rowcount(result) != 1:
        if session.execute(select(_jobs.c.id).where(_jobs.c.id == job_id)).first() is None:
            raise JobNotFoundError(f"no sorting job {job_id!r}")
        return False
    session.execute(update(_batches).where(_batches.c.job_id == job_id, _batches.c.state == "queued")
                    .values(state="cancelled", updated_at=now))
    return True


def retry_job(*, session: Session, job_id: str, alive_after: datetime | None = None) -> list[tuple[int, str]]:
    """Queue a finished job's failed, cancelled and unfinished batches again and set the job ``running``.

    Failed batches' counts are taken off the job's counters (their items are sorted again); attempts, re-enqueues
    and poison-item state start over. A ``running`` batch with a heartbeat after ``alive_after`` (default: the
    last minute) is left to its worker.

    Returns:
        ``[(batch_no, task_id), ...]`` to enqueue after committing (empty: nothing to retry; the job is left as
        it is).

    Raises:
        JobNotFoundError: no job has ``job_id``.
        JobStateError: the job is still listing or running, its listing never finished, or it ran embedded
            (its batches were not stored).
    """
    job = session.execute(select(_jobs).where(_jobs.c.id == job_id).with_for_update()).first()
    if job is None:
        raise JobNotFoundError(f"no sorting job {job_id!r}")
    if job.status not in TERMINAL_JOB_STATUSES:
        raise JobStateError(f"job {job_id} is {job.status}: cancel it first, or wait for it to end")
    if job.total_batches is None:
        raise JobStateError(f"job {job_id}'s listing never finished: submit its source again")
    alive_after = alive_after or _now() - timedelta(minutes=1)
    rows = session.execute(select(_batches).where(_batches.c.job_id == job_id, or_(
        _batches.c.state.in_(("failed", "cancelled", "queued")),
        and_(_batches.c.state == "running",
             or_(_batches.c.heartbeat_at.is_(None), _batches.c.heartbeat_at < alive_after)),
    )).order_by(_batches.c.batch_no)).all()
    if not rows:
        return []
    if any(r._mapping["items"] is None for r in rows):
        raise JobStateError(f"job {job_id} ran embedded (its batches are not stored): run invsort sort again")
    failed = [r for r in rows if r.state in FINISHED_BATCH_STATES]
    now = _now()
    session.execute(update(_jobs).where(_jobs.c.id == job_id).values(
        status="running", error=None, finished_at=None, updated_at=now,
        batches_done=_jobs.c.batches_done - len(failed),
        **{c: _jobs.c[c] - sum(r._mapping[c] for r in failed)
           for c in ("sorted_count", "needs_review_count", "failed_count")},
    ))
    out = []
    for r in rows:
        task_id = task_id_for(job_id, r.batch_no, r.requeues + 1)
        session.execute(update(_batches).where(_key(job_id, r.batch_no)).values(
            state="queued", attempts=0, requeues=r.requeues + 1, progress=None, item_crashes=0, error=None,
            worker=None, heartbeat_at=None, task_id=task_id, enqueued_at=now, updated_at=now,
            sorted_count=0, needs_review_count=0, failed_count=0))
        out.append((r.batch_no, task_id))
    return out


def acquire_lease(*, session: Session, name: str, holder: str, ttl_s: float) -> bool:
    """Take or renew the lease ``name`` for ``holder`` for ``ttl_s`` seconds; True if ``holder`` now has it.

    One conditional write: it succeeds when nobody holds the lease, ``holder`` already does, or the current
    holder's lease has expired. Commit right after, so that others see it.
    """
    now = _now()
    expires = now + timedelta(seconds=ttl_s)
    ins = _insert(session, _leases).values(name=name, holder=holder, expires_at=expires)
    if session.execute(ins.on_conflict_do_nothing(index_elements=[_leases.c.name])
                       .returning(_leases.c.name)).first() is not None:
        return True
    result = session.execute(update(_leases).where(
        _leases.c.name == name, or_(_leases.c.holder == holder, _leases.c.expires_at < now),
    ).values(holder=holder, expires_at=expires))
    return _rowcount(result) == 1


def release_lease(*, session: Session, name: str, holder: str) -> bool:
    """Give the lease ``name`` up if ``holder`` holds it (it expires now), so that the next taker need not wait for
    it to run out. Commit right after. Returns True if ``holder`` held it."""
    result = session.execute(update(_leases).where(_leases.c.name == name, _leases.c.holder == holder)
                             .values(expires_at=_now()))
    return _rowcount(result) == 1
