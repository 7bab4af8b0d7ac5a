"""Celery tasks: thin wrappers over :mod:`pipeline.sorting`; they take ids and URIs, never images."""

from __future__ import annotations

import logging

from celery import Task
from celery.exceptions import SoftTimeLimitExceeded
from celery.signals import worker_process_init
from sqlalchemy.exc import OperationalError

from pipeline.records import Item
from pipeline.settings import get_settings
from pipeline.sorting import configure_torch_threads, sort_batch
from worker.app import app

log = logging.getLogger(__name__)


@worker_process_init.connect
def _after_fork(**_: object) -> None:
    # Engines and thread pools must not be shared across a fork; torch threads split between the processes.
    from db.session import dispose_engines

    dispose_engines()
    concurrency = app.conf.worker_concurrency or 1
    configure_torch_threads(share=concurrency)


@app.task(
    name="invsort.sort_batch",
    bind=True,
    acks_late=True,
    reject_on_worker_lost=True,
    autoretry_for=(OperationalError, ConnectionError),  # database or network blips: the task is idempotent
    retry_backoff=True,
    retry_backoff_max=300,
    max_retries=8,
)
def sort_batch_task(self: Task, job_id: str, batch_no: int, items: list[list[str]], model: str) -> dict[str, int]:
    """Sort one image batch of job ``job_id``: ``items`` is ``[[item_id, image_uri], ...]``.

    Returns the batch's counts by status (also written to ``sorting_jobs``).
    """
    settings = get_settings()
    try:
        return sort_batch(job_id, batch_no, [Item(i, u) for i, u in items], settings=settings, model_spec=model)
    except SoftTimeLimitExceeded:
        log.error("job %s batch %s hit the soft time limit; it will be retried", job_id, batch_no)
        raise self.retry(countdown=10) from None
