"""Celery tasks: thin wrappers over :mod:`pipeline.jobs`; a task names a stored batch, never its images."""

from __future__ import annotations

import logging
import random
from typing import Any

from celery import Task
from celery.exceptions import SoftTimeLimitExceeded
from celery.signals import worker_process_init

from db.catalog import JobNotFoundError
from pipeline.jobs import BatchBusy, run_batch
from pipeline.records import Item
from pipeline.settings import get_settings
from pipeline.sorting import configure_torch_threads, sort_batch
from worker.app import app

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
    Returns the batch's counts by status (empty when there was nothing to do).
    """
    settings = get_settings()
    try:
        return {**run_batch(job_id, batch_no, settings=settings, crash_exceptions=(SoftTimeLimitExceeded,))}
    except JobNotFoundError:
        if items is None or model is None:
            log.error("job %s batch %s is not in the database: task dropped", job_id, batch_no)
            return {}
        return {**sort_batch(job_id, batch_no, [Item(i, u) for i, u in items], settings=settings,
                             model_spec=model)}
    except BatchBusy as exc:
        log.info("%s; trying again in %s s", exc, 3 * settings.heartbeat_interval_s)
        raise self.retry(countdown=3 * settings.heartbeat_interval_s) from None
    except Exception as exc:
        delay = backoff_s(self.request.retries)
        log.warning("job %s batch %s failed (%s: %s); retry in %.0f s", job_id, batch_no, type(exc).__name__, exc,
                    delay)
        raise self.retry(countdown=delay) from exc


def enqueue_batch(job_id: str, batch_no: int, task_id: str, model: str | None = None) -> None:
    """Put a stored batch's task on the queue under ``task_id`` (:func:`db.jobs.task_id_for`)."""
    sort_batch_task.apply_async(args=(job_id, batch_no, None, model), task_id=task_id)
