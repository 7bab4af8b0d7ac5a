"""The Celery application: JSON only, late acks, one task at a time per worker process.

Built from :func:`pipeline.settings.get_settings` when this module is imported by a worker
(``celery -A worker.app`` or ``invsort worker``) or by ``invsort submit``; nothing touches CUDA here, so the
prefork pool forks before any model is loaded.
"""

from __future__ import annotations

from celery import Celery

from pipeline.settings import get_settings


def make_app() -> Celery:
    settings = get_settings()
    app = Celery("invsort", broker=settings.broker_url, include=["worker.tasks", "worker.reconciler"])
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],  # never pickle: a message cannot run code in the worker
        event_serializer="json",
        task_ignore_result=True,  # progress lives in SQL (sorting_jobs), not in a result backend
        task_acks_late=True,  # a batch is acknowledged after its rows are committed
        task_reject_on_worker_lost=True,  # a worker killed mid-batch → the batch is redelivered
        worker_prefetch_multiplier=1,  # a worker holds one batch beyond the one it runs
        task_time_limit=settings.task_time_limit_s,
        task_soft_time_limit=max(1, settings.task_time_limit_s - 30),
        task_default_queue="invsort",
        broker_connection_retry_on_startup=True,
        # Redis hands a dead worker's unacknowledged task to another after the visibility timeout; a running
        # task older than it is handed out again too (harmless: tasks are idempotent, but wasted work).
        # kombu sweeps for such tasks every interval x throttle seconds (100 s by default): sweep every
        # min(10 s, half the visibility timeout) so a dead worker's batch comes back soon after the timeout.
        broker_transport_options={
            "visibility_timeout": settings.visibility_timeout_s,
            "unacked_restore_interval": max(1, min(10, settings.visibility_timeout_s // 2)),
            "unacked_restore_throttle": 1,
        },
        worker_hijack_root_logger=False,
    )
    return app


app = make_app()
