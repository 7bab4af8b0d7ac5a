"""Queued jobs that never hang and never lose an item: running a batch, the reconciler, cancel and retry.

The database is the source of truth; the queue is a transport. ``invsort submit`` stores every batch before its
task is enqueued (:func:`db.jobs.add_batches`), and the task names the batch, not its items.

- :func:`run_batch` (the Celery task's body): claims the batch, keeps a heartbeat on it while it runs, sorts it and
  records it, exactly once however often it is delivered. A batch found ``running`` by a worker that is gone (its
  process is dead, or its heartbeat is stale) crashed its worker: it is then run item by item, committing each row
  and the position reached, so that an item that crashes or hangs the process again and again (a poison item) is
  found and fails alone after :attr:`~pipeline.settings.Settings.poison_crashes` crashes while the rest of its batch
  is written. A batch that fails :attr:`~pipeline.settings.Settings.max_batch_attempts` times without progress
  has its remaining items written as ``failed`` rows with the last error. A job whose model file cannot be loaded,
  or no longer has the version the job was submitted with, fails with that reason.
- :class:`Reconciler`: one pass every :attr:`~pipeline.settings.Settings.reconcile_interval_s` in every
  ``invsort worker`` (one at a time, under a lease): batches that are neither done nor alive (queued but absent
  from the broker twice in a row, or running without a heartbeat and absent from the broker) are enqueued again,
  up to :attr:`~pipeline.settings.Settings.max_requeues` times, then their items fail with the reason; jobs whose
  listing stopped fail; jobs whose batches are all recorded are completed.
- :func:`cancel` and :func:`retry`: ``invsort jobs cancel|retry JOB``.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Protocol

from db.catalog import JobNotFoundError, StatusCounts, complete_job_if_done, fail_job, record_batch, upsert_items
from db.jobs import (
    Batch,
    abandon_batch,
    acquire_lease,
    advance,
    batch_counts,
    cancel_job,
    claim_batch,
    complete_finished_jobs,
    find_stale_batches,
    get_batch,
    heartbeat,
    mark_requeued,
    release_batch,
    retry_job,
    set_progress,
    stale_listing_jobs,
)
from db.session import session_scope
from pipeline.attributes import attribute_models_of
from pipeline.errors import InvsortError, ModelFileError
from pipeline.inference.streaming import Summary, run_pipeline
from pipeline.io.storage import ObjectReader, make_reader
from pipeline.records import Item, ItemResult
from pipeline.settings import Settings
from pipeline.sorting import AnyPredictor, count_statuses, job_predictor

log = logging.getLogger(__name__)

#: ``enqueue(job_id, batch_no, task_id)``: put a batch's task on the queue (the Celery app supplies it).
Enqueue = Callable[[str, int, str], None]
LISTING_STALE = timedelta(minutes=10)


class BatchBusy(InvsortError):
    """Another live worker holds this batch (a duplicate delivery): try again later."""


class BatchObserver(Protocol):
    """What :func:`run_batch` tells whoever watches it (a worker's metrics: :mod:`worker.metrics`)."""

    def model(self, predictor: AnyPredictor) -> None:
        """The batch runs on ``predictor``."""

    def written(self, rows: Sequence[ItemResult]) -> None:
        """``rows`` were committed to the catalog."""

    def stages(self, seconds: Mapping[str, float]) -> None:
        """Where the batch's time went: ``fetch`` and ``decode`` (summed over the decode threads), ``forward``
        and ``write`` (the catalog transactions), in seconds; once a batch, when it ran to the end."""


class _Unobserved:
    def model(self, predictor: AnyPredictor) -> None:
        pass

    def written(self, rows: Sequence[ItemResult]) -> None:
        pass

    def stages(self, seconds: Mapping[str, float]) -> None:
        pass


STAGES = ("fetch", "decode", "forward", "write")


def _add_stages(seconds: dict[str, float], summary: Summary | None = None, write_s: float = 0.0) -> dict[str, float]:
    """``seconds`` (by stage) plus a run's: its summary's fetch, decode and forward, and ``write_s``."""
    if summary is not None:
        seconds["fetch"] = seconds.get("fetch", 0.0) + summary.fetch_s
        seconds["decode"] = seconds.get("decode", 0.0) + summary.decode_s
        seconds["forward"] = seconds.get("forward", 0.0) + summary.forward_s
    seconds["write"] = seconds.get("write", 0.0) + write_s
    return seconds


def worker_id() -> str:
    """This process as a batch holder: ``host:pid``."""
    return f"{socket.gethostname()}:{os.getpid()}"


def _holder_is_dead(holder: str | None) -> bool:
    """True when ``holder`` (``host:pid``) is a process of this host that no longer exists."""
    if not holder or ":" not in holder:
        return False
    host, _, pid = holder.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


@dataclass(frozen=True)
class Decision:
    """What a delivery of a batch does: ``run``, ``skip`` (finished, cancelled, or its job ended), ``busy``
    (another live worker holds it), or ``crashed`` (its last holder died: run it item by item)."""

    action: str
    reason: str = ""


def decide(batch: Batch, worker: str, *, now: datetime, stale_after: timedelta) -> Decision:
    """Decide what a delivery of ``batch`` to ``worker`` does (see :class:`Decision`)."""
    if batch.job_status in ("done", "failed", "cancelled"):
        return Decision("skip", f"job is {batch.job_status}")
    if batch.state in ("done", "failed", "cancelled"):
        return Decision("skip", f"batch is {batch.state}")
    if batch.state == "running":
        if batch.worker == worker:
            return Decision("run", "this process's earlier attempt ended without releasing it")
        if _holder_is_dead(batch.worker):
            return Decision("crashed", f"its worker process {batch.worker} is gone")
        if batch.heartbeat_at is None or batch.heartbeat_at < now - stale_after:
            return Decision("crashed", f"no heartbeat from {batch.worker} since {batch.heartbeat_at}")
        return Decision("busy", f"{batch.worker} is running it")
    return Decision("run")


@contextmanager
def keep_heartbeat(url: str, job_id: str, batch_no: int, worker: str, interval_s: float) -> Iterator[None]:
    """Refresh the batch's heartbeat every ``interval_s`` seconds in a thread while the block runs.

    Database errors are logged and ignored (the reconciler decides only after three missed beats).
    """
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(interval_s):
            try:
                with session_scope(url) as session:
                    heartbeat(session=session, job_id=job_id, batch_no=batch_no, worker=worker)
            except Exception as exc:  # noqa: BLE001 - a missed beat must not kill the batch
                log.warning("heartbeat of job %s batch %s failed: %s", job_id, batch_no, exc)

    thread = threading.Thread(target=beat, name=f"heartbeat-{batch_no}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)


def failed_rows(items: list[Item], reason: str, job_id: str) -> list[ItemResult]:
    """``failed`` rows for ``items``, each with ``reason``."""
    return [ItemResult(item_id=it.item_id, image_uri=it.uri, status="failed", error=reason[:2000], job_id=job_id)
            for it in items]


def give_up(url: str, batch: Batch, reason: str, observer: BatchObserver | None = None) -> StatusCounts:
    """Write the batch's items not written yet as ``failed`` rows with ``reason``, record it ``failed`` and
    complete its job if that was the last batch. Returns the batch's counts."""
    items = [Item(i, u) for i, u in batch.items or []]
    start = batch.progress or 0
    rows = failed_rows(items[start:], reason, batch.job_id)
    with session_scope(url) as session:
        upsert_items(session=session, rows=rows)
        counts = batch_counts(session=session, job_id=batch.job_id, batch_no=batch.batch_no)
        counts["failed_count"] += len(items) - start
        record_batch(session=session, job_id=batch.job_id, batch_no=batch.batch_no, state="failed", **counts)
    (observer or _Unobserved()).written(rows)
    with session_scope(url) as session:
        complete_job_if_done(session=session, job_id=batch.job_id)
    log.error("job %s batch %s: %d item(s) failed: %s", batch.job_id, batch.batch_no, len(items) - start, reason)
    return counts


def fail_job_of(url: str, batch: Batch, reason: str) -> None:
    """Fail the batch's job with ``reason`` (no rows are written: the items keep what an earlier job wrote) and
    record this batch ``failed`` with no rows, so that ``invsort jobs retry`` can run it again."""
    with session_scope(url) as session:
        fail_job(session=session, job_id=batch.job_id, error=reason[:2000])
        record_batch(session=session, job_id=batch.job_id, batch_no=batch.batch_no, state="failed",
                     sorted_count=0, needs_review_count=0, failed_count=0)
    log.error("job %s failed: %s", batch.job_id, reason)


def run_batch(job_id: str, batch_no: int, *, settings: Settings, worker: str | None = None,
              crash_exceptions: tuple[type[BaseException], ...] = (),
              observer: BatchObserver | None = None) -> StatusCounts | dict:
    """Run one delivery of a stored batch (see the module docstring). Returns the batch's counts by status
    (empty when this delivery had nothing to do).

    Args:
        worker: this process as a holder (default :func:`worker_id`).
        crash_exceptions: raised by the caller's watchdog (a soft time limit): the batch is left as if its
            worker had died, so that its next delivery runs it item by item. So is it after a ``SystemExit`` or
            ``KeyboardInterrupt`` (Celery's hard time limit terminates the process).
        observer: told the model, the rows written and the time by stage (:class:`BatchObserver`).

    Raises:
        BatchBusy: another live worker holds the batch; deliver it again later.
        JobNotFoundError: the batch has no row.
        TransientError, sqlalchemy.exc.OperationalError, ...: this attempt failed; the batch was given back
            (``queued``, with the error) where the database allowed, to be retried.
    """
    worker = worker or worker_id()
    observer = observer or _Unobserved()
    url = settings.database_url
    stale_after = timedelta(seconds=3 * settings.heartbeat_interval_s)
    with session_scope(url) as session:
        batch = get_batch(session=session, job_id=job_id, batch_no=batch_no, lock=True)
        if batch is None:
            raise JobNotFoundError(f"no batch {batch_no} of job {job_id!r}")
        decision = decide(batch, worker, now=datetime.now(UTC), stale_after=stale_after)
        if decision.action == "skip":
            log.info("job %s batch %s: nothing to do (%s)", job_id, batch_no, decision.reason)
            return {}
        if decision.action == "busy":
            raise BatchBusy(f"job {job_id} batch {batch_no}: {decision.reason}")
        if batch.attempts >= settings.max_batch_attempts:
            reason = f"gave up after {batch.attempts} attempts: {batch.error or decision.reason or 'no error'}"
        else:
            reason = ""
            claim_batch(session=session, job_id=job_id, batch_no=batch_no, worker=worker)
    if reason:
        return give_up(url, batch, reason, observer)
    crashed = decision.action == "crashed"
    if crashed:
        log.warning("job %s batch %s: %s; running it item by item", job_id, batch_no, decision.reason)
    try:
        return _run_claimed(batch, settings=settings, worker=worker, crashed=crashed, observer=observer)
    except BaseException as exc:
        error = f"{type(exc).__name__}: {exc}"
        try:
            with session_scope(url) as session:
                if isinstance(exc, crash_exceptions) or not isinstance(exc, Exception):  # a time limit, SIGTERM
                    abandon_batch(session=session, job_id=job_id, batch_no=batch_no, worker=worker, error=error)
                else:
                    release_batch(session=session, job_id=job_id, batch_no=batch_no, worker=worker, error=error)
        except Exception as release_exc:  # noqa: BLE001 - the database may be what failed
            log.warning("job %s batch %s could not be given back: %s", job_id, batch_no, release_exc)
        raise


def _run_claimed(batch: Batch, *, settings: Settings, worker: str, crashed: bool,
                 observer: BatchObserver) -> StatusCounts | dict:
    url = settings.database_url
    reader = make_reader(settings)
    try:
        predictor = job_predictor(settings, batch.model_path, attribute_models_of(batch.attribute_models),
                                  reader=reader, version=batch.model_version)
    except (ModelFileError, FileNotFoundError, PermissionError) as exc:
        fail_job_of(url, batch, f"model {batch.model_path} is not usable on worker {worker}: {exc}")
        return {}
    observer.model(predictor)
    items = [Item(i, u) for i, u in batch.items or []]
    with keep_heartbeat(url, batch.job_id, batch.batch_no, worker, settings.heartbeat_interval_s):
        if crashed or batch.progress is not None:
            counts = _run_item_by_item(batch, items, settings=settings, predictor=predictor, reader=reader,
                                       crashed=crashed, observer=observer)
        else:
            rows: list[ItemResult] = []
            summary = run_pipeline(items, predictor=predictor, reader=reader, on_batch=rows.extend,
                                   batch_size=settings.batch_size, decode_threads=settings.decode_threads,
                                   max_pixels=settings.max_image_pixels, job_id=batch.job_id,
                                   decode_memory_bytes=settings.decode_memory_bytes)
            began = time.perf_counter()
            with session_scope(url) as session:
                upsert_items(session=session, rows=rows)  # a row the database refuses becomes failed in rows
                counts = count_statuses(rows)
                record_batch(session=session, job_id=batch.job_id, batch_no=batch.batch_no, **counts)
            observer.written(rows)
            observer.stages(_add_stages({}, summary, time.perf_counter() - began))
    with session_scope(url) as session:
        complete_job_if_done(session=session, job_id=batch.job_id)
    return counts


def _run_item_by_item(batch: Batch, items: list[Item], *, settings: Settings, predictor: AnyPredictor,
                      reader: ObjectReader, crashed: bool, observer: BatchObserver) -> StatusCounts:
    """Sort a batch that crashed its worker one item at a time, committing each row with the position reached,
    so that the next crash is blamed on the one item in progress."""
    url, job_id, batch_no = settings.database_url, batch.job_id, batch.batch_no
    seconds = dict.fromkeys(STAGES, 0.0)
    position = batch.progress or 0
    crashes = batch.item_crashes + 1 if crashed and batch.progress is not None else 0
    with session_scope(url) as session:
        set_progress(session=session, job_id=job_id, batch_no=batch_no, progress=position, item_crashes=crashes)
    while position < len(items):
        item = items[position]
        if crashes >= settings.poison_crashes:
            rows = failed_rows([item], f"poison item: it crashed or hung the worker process {crashes} times "
                                       "(a decoder crash, a hang past the task time limit, or out of memory)",
                               batch.job_id)
            log.error("job %s batch %s: item %s failed alone as a poison item", batch.job_id, batch.batch_no,
                      item.item_id)
        else:
            rows = []
            _add_stages(seconds, run_pipeline(
                [item], predictor=predictor, reader=reader, on_batch=rows.extend, batch_size=1, decode_threads=1,
                max_pixels=settings.max_image_pixels, job_id=batch.job_id,
                decode_memory_bytes=settings.decode_memory_bytes))
        position += 1
        crashes = 0
        began = time.perf_counter()
        with session_scope(url) as session:
            upsert_items(session=session, rows=rows)
            advance(session=session, job_id=job_id, batch_no=batch_no, progress=position,
                    counts=count_statuses(rows))
        _add_stages(seconds, write_s=time.perf_counter() - began)
        observer.written(rows)
    with session_scope(url) as session:
        counts = batch_counts(session=session, job_id=job_id, batch_no=batch_no)
        record_batch(session=session, job_id=job_id, batch_no=batch_no, **counts)
    observer.stages(seconds)
    return counts


class Reconciler:
    """Finds the batches of running jobs that were lost and enqueues them again (see the module docstring).

    Args:
        settings: the database, intervals and limits.
        enqueue: puts a batch's task on the queue under a task id.
        broker_task_ids: the ids of every task the broker holds (queued, or delivered and not yet
            acknowledged), or None when the broker cannot be inspected; then a queued batch counts as lost only
            after the visibility timeout.
        holder: this process's name for the lease (default :func:`worker_id`).
        observer: told the ``failed`` rows of the batches it gives up (the worker's metrics count them with the
            rows the batches' own tasks write).
    """

    LEASE = "reconciler"

    def __init__(self, settings: Settings, *, enqueue: Enqueue,
                 broker_task_ids: Callable[[], set[str] | None], holder: str | None = None,
                 observer: BatchObserver | None = None) -> None:
        self.settings, self.enqueue, self.broker_task_ids = settings, enqueue, broker_task_ids
        self.holder = holder or worker_id()
        self.observer = observer
        self._missing_once: set[str] = set()  # task ids absent from the broker in the previous pass

    def run_once(self) -> dict[str, int]:
        """One pass, if this process holds the lease. Returns counts: ``requeued``, ``given_up``,
        ``listing_failed``, ``completed`` (all 0 when another process holds the lease)."""
        s = self.settings
        report = dict(requeued=0, given_up=0, listing_failed=0, completed=0)
        with session_scope(s.database_url) as session:
            if not acquire_lease(session=session, name=self.LEASE, holder=self.holder,
                                 ttl_s=3 * s.reconcile_interval_s):
                return report
        in_broker = self.broker_task_ids()
        now = datetime.now(UTC)
        grace = s.requeue_grace_s if in_broker is not None else s.visibility_timeout_s
        with session_scope(s.database_url) as session:
            stale = find_stale_batches(session=session, queued_before=now - timedelta(seconds=grace),
                                       heartbeat_before=now - timedelta(seconds=3 * s.heartbeat_interval_s))
        missing = set()
        for batch in stale:
            if in_broker is not None and batch.task_id in in_broker:
                continue  # waiting in the queue, or delivered to a worker that has not acknowledged it yet
            if batch.state == "running" and in_broker is None and batch.heartbeat_at is not None and \
                    batch.heartbeat_at > now - timedelta(seconds=s.visibility_timeout_s):
                continue  # the broker redelivers it after the visibility timeout
            key = batch.task_id or f"{batch.job_id}:{batch.batch_no}"
            if in_broker is not None and key not in self._missing_once:
                missing.add(key)  # absent once: look again next pass (a message may have been moving)
                continue
            self._requeue_or_give_up(batch, report)
        self._missing_once = missing
        with session_scope(s.database_url) as session:
            for job_id in stale_listing_jobs(session=session, before=now - LISTING_STALE):
                if fail_job(session=session, job_id=job_id, error="listing stopped: no batch was added for "
                            f"{LISTING_STALE.total_seconds() / 60:.0f} minutes (the submitting process died?)"):
                    report["listing_failed"] += 1
            report["completed"] = complete_finished_jobs(session=session)
        if any(report.values()):
            log.info("reconciler: %s", ", ".join(f"{k} {v}" for k, v in report.items()))
        return report

    def _requeue_or_give_up(self, batch: Batch, report: dict[str, int]) -> None:
        s = self.settings
        if batch.requeues >= s.max_requeues:
            give_up(s.database_url, batch, f"lost {batch.requeues + 1} times (never finished by a worker): "
                                           f"{batch.error or 'its task vanished from the queue'}", self.observer)
            report["given_up"] += 1
            return
        with session_scope(s.database_url) as session:
            task_id = mark_requeued(session=session, job_id=batch.job_id, batch_no=batch.batch_no)
        self.enqueue(batch.job_id, batch.batch_no, task_id)
        report["requeued"] += 1
        log.warning("reconciler: job %s batch %s was %s and is not in the queue: enqueued again as %s",
                    batch.job_id, batch.batch_no, batch.state, task_id)

    def run_forever(self, stop: threading.Event) -> None:
        """Run a pass every ``reconcile_interval_s`` seconds until ``stop`` is set; errors are logged."""
        while not stop.wait(self.settings.reconcile_interval_s):
            try:
                self.run_once()
            except Exception as exc:  # noqa: BLE001 - a database outage must not end the reconciler
                log.warning("reconciler pass failed: %s", exc)


def cancel(settings: Settings, job_id: str) -> bool:
    """Cancel a listing or running job (``invsort jobs cancel``); True if this call cancelled it.

    Raises:
        JobNotFoundError: no such job.
    """
    with session_scope(settings.database_url) as session:
        return cancel_job(session=session, job_id=job_id)


def retry(settings: Settings, job_id: str, enqueue: Enqueue) -> int:
    """Queue a finished job's failed, cancelled and lost batches again (``invsort jobs retry``); returns how
    many batches were enqueued (0: nothing to retry).

    Raises:
        JobNotFoundError: no such job.
        JobStateError: the job has not ended, its listing never finished, or it ran embedded.
    """
    with session_scope(settings.database_url) as session:
        todo = retry_job(session=session, job_id=job_id)
    for batch_no, task_id in todo:
        enqueue(job_id, batch_no, task_id)
    return len(todo)
