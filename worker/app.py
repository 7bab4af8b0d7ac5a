"""The Celery application: JSON only, late acks, one task at a time per worker process.

Built from :func:`pipeline.settings.get_settings` when this module is imported by a worker
(``celery -A worker.app`` or ``invsort worker``) or by ``invsort submit``; nothing touches CUDA here, so the
prefork pool forks before any model is loaded. With ``INVSORT_LOG_FORMAT=json`` the loggers Celery sets up write
JSON lines too (:mod:`pipeline.logs`).
"""

from __future__ import annotations

import logging
import re
from typing import Any

from celery import Celery
from celery.schedules import crontab
from celery.signals import after_setup_logger, after_setup_task_logger

from pipeline.logs import format_handler
from pipeline.settings import Settings, get_settings

#: Celery task names that ``invsort beat`` sends (worker/tasks.py); part of the queue's contract.
RECATEGORIZE_TASK = "invsort.recategorize"
PRUNE_HISTORY_TASK = "invsort.prune_history"


def beat_schedule(settings: Settings) -> dict[str, dict[str, Any]]:
    """What ``invsort beat`` sends, and when (UTC): a re-categorisation on ``INVSORT_RECATEGORIZE_SCHEDULE`` (a cron
    expression) when it is set, and the history's pruning every day at 03:17 when
    ``INVSORT_HISTORY_RETENTION_DAYS`` is."""
    schedule: dict[str, dict[str, Any]] = {}
    if settings.recategorize_schedule:
        minute, hour, day_of_month, month, day_of_week = settings.recategorize_schedule.split()
        schedule["invsort-recategorize"] = {"task": RECATEGORIZE_TASK, "schedule": crontab(
            minute=minute, hour=hour, day_of_month=day_of_month, month_of_year=month, day_of_week=day_of_week)}
    if settings.history_retention_days is not None:
        schedule["invsort-prune-history"] = {"task": PRUNE_HISTORY_TASK, "schedule": crontab(minute="17", hour="3")}
    return schedule


def make_app() -> Celery:
    settings = get_settings()
    app = Celery("invsort", broker=settings.broker_url,
                 include=["worker.tasks", "worker.reconciler", "worker.webhooks"])
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
        beat_schedule=beat_schedule(settings),  # invsort beat (worker/beat.py)
    )
    return app


_BATCH_TASK_ID = re.compile(r"(?P<job_id>.+):(?P<batch_no>\d+)(:r\d+)?")  # db.jobs.task_id_for


class _BatchOfTask(logging.Filter):
    """Celery's own lines about a batch task (received, succeeded, retry: they carry the task in ``data``) get its
    ``job_id`` and ``batch_no``, read from the task id."""

    def filter(self, record: logging.LogRecord) -> bool:
        data = getattr(record, "data", None)
        if isinstance(data, dict) and data.get("name") == "invsort.sort_batch" and not hasattr(record, "job_id"):
            match = _BATCH_TASK_ID.fullmatch(str(data.get("id", "")))
            if match:
                record.job_id, record.batch_no = match["job_id"], int(match["batch_no"])
        return True


@after_setup_logger.connect
@after_setup_task_logger.connect
def _log_format(logger: logging.Logger | None = None, **_: object) -> None:
    """Celery's root and task loggers in ``INVSORT_LOG_FORMAT``; text keeps Celery's own formats."""
    log_format = get_settings().log_format
    if logger is None or log_format == "text":
        return
    for handler in logger.handlers:
        format_handler(handler, log_format)
        if not any(isinstance(f, _BatchOfTask) for f in handler.filters):
            handler.addFilter(_BatchOfTask())


app = make_app()
