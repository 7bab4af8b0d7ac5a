"""The reconciler inside every ``invsort worker``: no extra process to remember.

Each worker's main process runs :class:`pipeline.jobs.Reconciler` in a thread (one pass every
``INVSORT_RECONCILE_INTERVAL_S``; a database lease makes one worker at a time do the work). Whether a batch's
task is still in the broker is read from Redis itself: the queue's lists (one per priority step) and the hash
of delivered, unacknowledged messages. Other brokers cannot be listed that way: there a queued batch counts as
lost only after the visibility timeout.
"""

from __future__ import annotations

import json
import logging
import threading
from typing import Any

from celery.signals import worker_ready, worker_shutdown

from pipeline.jobs import Reconciler
from pipeline.settings import get_settings
from worker.app import app

log = logging.getLogger(__name__)
_stop = threading.Event()


def _task_id(raw: bytes | str) -> str | None:
    try:
        message = json.loads(raw)
    except ValueError:
        return None
    if isinstance(message, list):  # the unacked hash stores [message, exchange, routing_key]
        message = message[0] if message else {}
    headers = message.get("headers") if isinstance(message, dict) else None
    task_id = headers.get("id") if isinstance(headers, dict) else None
    return task_id if isinstance(task_id, str) else None


def broker_task_ids() -> set[str] | None:
    """Ids of every task in the Redis broker: queued (any priority) or delivered and not yet acknowledged.

    Returns None when the broker is not Redis. Raises the broker's connection errors.
    """
    with app.connection_for_read() as connection:
        if connection.transport.driver_type != "redis":
            return None
        channel: Any = connection.default_channel
        client = channel.client
        queue = app.conf.task_default_queue
        ids: set[str] = set()
        for key in [channel._q_for_pri(queue, p) for p in channel.priority_steps]:
            ids.update(filter(None, map(_task_id, client.lrange(key, 0, -1))))
        ids.update(filter(None, map(_task_id, client.hvals(channel.unacked_key))))
        return ids


def _enqueue(job_id: str, batch_no: int, task_id: str) -> None:
    from worker.tasks import enqueue_batch

    enqueue_batch(job_id, batch_no, task_id)


@worker_ready.connect
def start_reconciler(**_: object) -> None:
    """Start the reconciler thread in the worker's main process."""
    from worker.metrics import worker_metrics

    # the rows of batches it gives up count in invsort_worker_images_total / failures_total (reason "lost")
    reconciler = Reconciler(get_settings(), enqueue=_enqueue, broker_task_ids=broker_task_ids,
                            observer=worker_metrics())
    _stop.clear()
    threading.Thread(target=reconciler.run_forever, args=(_stop,), name="invsort-reconciler", daemon=True).start()
    log.info("reconciler started: a pass every %s s", get_settings().reconcile_interval_s)


@worker_shutdown.connect
def stop_reconciler(**_: object) -> None:
    _stop.set()
