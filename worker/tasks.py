"""Celery tasks: thin wrappers over :mod:`pipeline.jobs`; a task names a stored batch, never its images."""

from __future__ import annotations

import logging
import os
import random
from typing import Any

from celery import Task
from celery.exceptions import SoftTimeLimitExceeded
from celery.signals import worker_process_init, worker_process_shutdown

from db.catalog import JobNotFoundError
from pipeline.jobs import BatchBusy, run_batch
from pipeline.logs import log_context
from pipeline.records import Item
from pipeline.settings import get_settings
from pipeline.sorting import configure_torch_threads, sort_batch
from worker.app import PRUNE_HISTORY_TASK, RECATEGORIZE_TASK, app
from worker.metrics import process_ended, worker_metrics

log = logging.getLogger(__name__)
TASK_NAME = "invsort.sort_batch"
MAX_BACKOFF_S = 60


@worker_process_init.connect
def _after_fork(**_: object) -> None:
    # Engines and thread pools must not be shared across a fork; torch threads split between the processes.
    from db.session import dispose_engines

    dispose_engines()
    concurrency = app.conf.worker_concurrency or 1
    configure_torch_threads(share=concurrency)
    worker_metrics()  # its metrics show (at 0) from the start


@worker_process_shutdown.connect
def _before_exit(pid: int | None = None, **_: object) -> None:
    process_ended(pid or os.getpid())  # its gauges leave the worker's totals


def backoff_s(retries: int) -> float:
    """Seconds before retry number ``retries + 1``: exponential from 2 s, capped at 60 s, with full jitter
    (AWS Architecture Blog, "Exponential Backoff And Jitter", 2015)."""
    return random.uniform(1.0, min(MAX_BACKOFF_S, 2.0 * 2**retries))  # noqa: S311 - jitter, not a secret


@app.task(name=TASK_NAME, bind=True, acks_late=True, reject_on_worker_lost=True, max_retries=None)
def sort_batch_task(self: Task, job_id: str, batch_no: int, items: list[list[str]] | None = None,
                    model: str | None = None) -> dict[str, Any]:
    """Run batch ``batch_no`` of job ``job_id`` as stored in the database (:func:`pipeline.jobs.run_batch`).

    ``items`` and ``model`` are only read from tasks queued before batches were stored. Any error is retried with
    backoff (the task is idempotent); the batch's attempts in the database bound the retries, after which its
    items become ``failed`` rows with the error. A worker process that dies holding the task (``acks_late``,
    ``reject_on_worker_lost``) has it delivered again, and the batch then runs item by item to find a poison item.
    Returns the batch's counts by status (empty when there was nothing to do). The worker's metrics count the
    task (:mod:`worker.metrics`) and its log records carry ``job_id`` and ``batch_no`` (:mod:`pipeline.logs`).
    """
    settings = get_settings()
    metrics = worker_metrics()
    with log_context(job_id=job_id, batch_no=batch_no), metrics.task() as task:
        try:
            counts = run_batch(job_id, batch_no, settings=settings, crash_exceptions=(SoftTimeLimitExceeded,),
                               observer=metrics)
            task.outcome = "done" if counts else "skipped"
            return {**counts}
        except JobNotFoundError:
            if items is None or model is None:
                log.error("job %s batch %s is not in the database: task dropped", job_id, batch_no)
                task.outcome = "dropped"
                return {}
            legacy = sort_batch(job_id, batch_no, [Item(i, u) for i, u in items], settings=settings,
                                model_spec=model)
            task.outcome = "done"
            return {**legacy}
        except BatchBusy as exc:
            task.outcome = "busy"
            log.info("%s; trying again in %s s", exc, 3 * settings.heartbeat_interval_s)
            raise self.retry(countdown=3 * settings.heartbeat_interval_s) from None
        except Exception as exc:
            delay = backoff_s(self.request.retries)
            log.warning("job %s batch %s failed (%s: %s); retry in %.0f s", job_id, batch_no, type(exc).__name__,
                        exc, delay)
            raise self.retry(countdown=delay) from exc


def enqueue_batch(job_id: str, batch_no: int, task_id: str, model: str | None = None) -> None:
    """Put a stored batch's task on the queue under ``task_id`` (:func:`db.jobs.task_id_for`)."""
    sort_batch_task.apply_async(args=(job_id, batch_no, None, model), task_id=task_id)


# --- what invsort beat sends (worker/app.py: beat_schedule) ------------------------------------------------------


@app.task(name=RECATEGORIZE_TASK, acks_late=False)
def recategorize_task() -> dict[str, Any]:
    """The scheduled re-categorisation: every catalog row whose model version is not ``INVSORT_MODEL_PATH``'s is
    listed here and queued for the workers as one job (:func:`pipeline.recategorize.recategorize`). Another
    re-categorisation starting or active makes it end at once (one at a time, under a database lease), and so
    does a catalog with nothing to re-sort (no job is made). Acknowledged on receipt and never retried: the next
    tick of the schedule does what this one could not. Returns the job and what it queued."""
    from pipeline.recategorize import AlreadyRunningError, recategorize

    settings = get_settings()
    try:
        outcome = recategorize(settings, enqueue=enqueue_batch)
    except AlreadyRunningError as exc:
        log.info("scheduled re-categorisation not started: %s", exc)
        return {"job_id": None, "skipped_because": str(exc)}
    if outcome.job_id is None:
        log.info("scheduled re-categorisation: nothing to re-sort (model version %s)", outcome.selection.version)
    else:
        log.info("scheduled re-categorisation: job %s, %d items queued in %d tasks (model version %s)",
                 outcome.job_id, outcome.items, outcome.batches, outcome.selection.version)
    return {"job_id": outcome.job_id, "items": outcome.items, "batches": outcome.batches,
            "skipped_outside_roots": outcome.skipped}


@app.task(name=PRUNE_HISTORY_TASK, acks_late=False)
def prune_history_task() -> int:
    """The daily pruning of ``catalog_history`` (``invsort db prune-history``) when
    ``INVSORT_HISTORY_RETENTION_DAYS`` is set. Returns how many entries it deleted."""
    from db.history import prune_history, retention_cutoff
    from db.session import session_scope

    settings = get_settings()
    if settings.history_retention_days is None:
        return 0
    cutoff = retention_cutoff(settings.history_retention_days)
    with session_scope(settings.database_url) as session:
        deleted = prune_history(session=session, older_than=cutoff)
    log.info("history pruned: %d entries older than %s deleted", deleted, cutoff.isoformat(timespec="minutes"))
    return deleted
