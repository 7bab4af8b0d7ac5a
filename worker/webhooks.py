"""The webhooks' dispatcher inside every ``invsort worker``: no extra process to remember.

When ``INVSORT_WEBHOOK_URL`` is set, each worker's main process runs :class:`pipeline.webhooks.Dispatcher` in a
thread; the ``webhooks`` lease makes one worker at a time produce and deliver the events (another takes over
within a minute when it stops). Without the URL nothing is started and nothing is produced.
"""

from __future__ import annotations

import logging
import threading

from celery.signals import worker_ready, worker_shutdown

from pipeline.settings import get_settings
from pipeline.webhooks import Dispatcher

log = logging.getLogger(__name__)
_stop = threading.Event()


@worker_ready.connect
def start_webhooks(**_: object) -> None:
    """Start the webhooks' thread in the worker's main process (when INVSORT_WEBHOOK_URL is set)."""
    settings = get_settings()
    if settings.webhook_url is None:
        log.debug("no INVSORT_WEBHOOK_URL: no webhooks")
        return
    _stop.clear()
    dispatcher = Dispatcher(settings)
    threading.Thread(target=dispatcher.run_forever, args=(_stop,), name="invsort-webhooks", daemon=True).start()


@worker_shutdown.connect
def stop_webhooks(**_: object) -> None:
    _stop.set()
