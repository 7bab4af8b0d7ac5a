"""``invsort beat``: Celery beat, of which one process at a time sends anything, however many are started.

Every ``invsort beat`` runs :class:`LeaderScheduler`: before each tick it takes or renews the ``beat`` lease in the
database (:func:`db.jobs.acquire_lease`; :data:`LEASE_TTL_S` seconds, renewed every :data:`RENEW_S`). Only the
holder sends the schedule's tasks (worker/app.py: ``beat_schedule``); the others stand by and the first to find
the lease run out (its holder stopped, or lost the database) takes over within :data:`LEASE_TTL_S` seconds. A
stopping holder gives the lease back at once. The lease's times come from each host's clock: keep them in sync
(NTP). The schedule lives in memory (no schedule file); what matters is in the database, and each scheduled task
is safe to receive twice anyway (a re-categorisation holds a lease of its own, :mod:`pipeline.recategorize`).
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

from celery.beat import Scheduler

from db.jobs import acquire_lease, release_lease
from db.session import session_scope
from pipeline.jobs import worker_id
from pipeline.settings import get_settings

log = logging.getLogger(__name__)

LEASE = "beat"
#: Seconds the beat lease lasts without a renewal: how long a standby waits for a holder that died.
LEASE_TTL_S = 30.0
#: Seconds between renewals of the lease (and the longest a beat sleeps between ticks).
RENEW_S = 5.0


class LeaderScheduler(Scheduler):
    """Celery's in-memory beat scheduler, sending only while this process holds the ``beat`` lease."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["max_interval"] = min(kwargs.get("max_interval") or RENEW_S, RENEW_S)
        self.holder = f"{worker_id()}:{uuid.uuid4().hex[:8]}"
        self.leading: bool | None = None  # not asked yet
        self._renewed_at = float("-inf")
        super().__init__(*args, **kwargs)

    def tick(self, *args: Any, **kwargs: Any) -> float:
        if not self._lead():
            return RENEW_S
        return min(super().tick(*args, **kwargs), RENEW_S)

    def _lead(self) -> bool:
        """Whether this process holds the lease: taken or renewed at most every :data:`RENEW_S` seconds."""
        now = time.monotonic()
        if self.leading and now - self._renewed_at < RENEW_S:
            return True
        try:
            with session_scope(get_settings().database_url) as session:
                leading = acquire_lease(session=session, name=LEASE, holder=self.holder, ttl_s=LEASE_TTL_S)
        except Exception as exc:  # noqa: BLE001 - a database outage makes this beat stand by, not stop
            log.warning("beat: the database did not answer (%s): standing by", exc)
            leading = False
        if leading != self.leading:
            log.info("beat %s: %s", self.holder, "holds the lease: sending the schedule's tasks" if leading else
                     "another beat holds the lease: standing by")
        self.leading, self._renewed_at = leading, now
        return leading

    def close(self) -> None:
        super().close()
        if self.leading:
            self.leading = False
            try:
                with session_scope(get_settings().database_url) as session:
                    release_lease(session=session, name=LEASE, holder=self.holder)
            except Exception as exc:  # noqa: BLE001 - it runs out by itself
                log.warning("beat: could not give the lease back (it expires within %.0f s): %s", LEASE_TTL_S, exc)
