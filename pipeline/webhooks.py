"""Webhooks: the events of the outbox (:mod:`db.webhooks`) POSTed to ``INVSORT_WEBHOOK_URL``, signed, at least once.

:class:`Dispatcher` runs in every ``invsort worker`` (a thread, :mod:`worker.webhooks`) and in
``invsort webhooks run``; one process at a time does the work (the ``webhooks`` lease, :func:`db.jobs.acquire_lease`).
Each pass:

1. produces: the change feed's next entries and the jobs that ended become outbox rows (:func:`db.webhooks.produce`);
2. delivers the due rows oldest first, one event per POST, signed as the Standard Webhooks specification says
   (https://www.standardwebhooks.com/, https://github.com/standard-webhooks/standard-webhooks/blob/main/spec/
   standard-webhooks.md): headers ``webhook-id`` (the event's idempotency key, the same on every attempt),
   ``webhook-timestamp`` (Unix seconds of this attempt) and ``webhook-signature``: ``v1,`` and the base64 of
   HMAC-SHA256(key, ``{webhook-id}.{webhook-timestamp}.{body}``), the key as :func:`pipeline.settings.
   webhook_signing_key` derives it from ``INVSORT_WEBHOOK_SECRET``;
3. now and then deletes delivered rows older than ``INVSORT_WEBHOOK_RETENTION_DAYS``.

A 2xx answer delivers an event; anything else (another status, no answer within ``INVSORT_WEBHOOK_TIMEOUT_S``, a
refused connection; redirects are not followed) is a failed attempt: the event is due again after a backoff that
doubles with each of its failures, from ``INVSORT_WEBHOOK_BACKOFF_S`` up to ``INVSORT_WEBHOOK_MAX_BACKOFF_S``, drawn
between half of it and all of it (jitter). No event is ever dropped: it is retried until the receiver takes it.
After a failure the dispatcher also pauses before its next attempt of any event (a random part of half the backoff
of its run of failures, capped likewise): a receiver that is down gets one probe at a time, not the whole backlog,
while an event the receiver refuses alone (a 400 for that body) backs off alone and does not hold the others up.
An event is marked delivered after its 2xx: a crash in between sends it again, with the same ``webhook-id``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import os
import random
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from db.jobs import acquire_lease
from db.session import session_scope
from db.webhooks import (
    OutboxRow,
    OutboxStats,
    due_rows,
    lease_holder,
    mark_delivered,
    mark_failed,
    outbox_stats,
    produce,
    prune_delivered,
)
from pipeline.errors import ConfigError
from pipeline.settings import Settings, webhook_signing_key

if TYPE_CHECKING:
    import httpx

log = logging.getLogger(__name__)

LEASE = "webhooks"
POLL_S = 1.0  # seconds between two passes of the lease holder when nothing is due
LEASE_RETRY_S = 10.0  # seconds between two tries for the lease of a process that does not hold it
PASS_S = 10.0  # a pass delivers for at most about this long, then renews the lease
DUE_PAGE = 100  # rows read per look at what is due
PRODUCE_PAGES = 10  # feed pages produced per pass at most (a backlog is produced over several passes)
FLUSH_EVERY = 50  # deliveries recorded per transaction
PRUNE_EVERY_S = 3600.0
_RESPONSE_BYTES = 1024  # of a failed answer's body kept in last_error
_READ_BYTES = 65536  # of an answer's body read at most (a longer one closes its connection)


def signature(key: bytes, event_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` header: ``v1,`` and the base64 of HMAC-SHA256(``key``,
    ``{event_id}.{timestamp}.{body}``) (Standard Webhooks)."""
    signed = f"{event_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()


def backoff_ceiling(failures: int, *, base: float, cap: float) -> float:
    """The backoff after ``failures`` failures in a row (1 or more): ``base`` doubled ``failures - 1`` times, at most
    ``cap`` seconds."""
    return min(cap, base * 2.0 ** min(max(failures - 1, 0), 60))


def safe_webhook_url(url: str) -> str:
    """``scheme://host[:port]`` of ``url``: how logs and ``invsort webhooks status`` show it (its path, query and
    any credentials may carry a token)."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname}" + (f":{parts.port}" if parts.port else "")


@dataclass(frozen=True, slots=True)
class Attempt:
    """How one POST went: ``ok`` (a 2xx), the HTTP ``status`` (None: no answer) and ``error`` (why it failed)."""

    ok: bool
    status: int | None
    error: str | None = None


@dataclass
class PassReport:
    """What one :meth:`Dispatcher.run_once` did: ``leader`` (it held the lease; all else is 0 when not),
    ``produced`` (events put in the outbox), ``delivered``, ``failed`` (attempts; ``errors`` says how), ``more``
    (events are due or left to produce: run again at once), ``paused_s`` (seconds until the dispatcher POSTs again
    after a failure)."""

    leader: bool = False
    produced: int = 0
    delivered: int = 0
    failed: int = 0
    more: bool = False
    paused_s: float = 0.0
    errors: list[str] = field(default_factory=list)


def _printable(data: bytes) -> str:
    return data.decode("utf-8", "replace").replace("\n", " ").replace("\r", " ").strip()


class Dispatcher:
    """Produces webhook events and delivers them (see the module docstring).

    Args:
        settings: the database and the ``webhook_*`` settings; ``webhook_url`` and ``webhook_secret`` must be set.
        holder: this process's name for the lease (default ``host:pid``, as :func:`pipeline.jobs.worker_id`).
        client: the HTTP client to POST with (default: an ``httpx.Client`` made on first use, closed by
            :meth:`close`).
        rng: the source of the jitter (default: a new :class:`random.Random`).

    Raises:
        ConfigError: no webhook URL or secret is set.
    """

    def __init__(self, settings: Settings, *, holder: str | None = None, client: httpx.Client | None = None,
                 rng: random.Random | None = None) -> None:
        if settings.webhook_url is None or settings.webhook_secret is None:
            raise ConfigError("webhooks need INVSORT_WEBHOOK_URL and INVSORT_WEBHOOK_SECRET")
        self.settings = settings
        self.url: str = settings.webhook_url
        self._key = webhook_signing_key(settings.webhook_secret.get_secret_value())
        self.holder = holder or f"{socket.gethostname()}:{os.getpid()}"
        self._client, self._own_client = client, client is None
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not a secret
        self._failures = 0  # attempts failed in a row (any event)
        self._paused_until = 0.0  # time.monotonic() before which nothing is POSTed
        self._pruned_at = -PRUNE_EVERY_S

    # ------------------------------------------------------------------------------------------------ HTTP

    def _http(self) -> httpx.Client:
        if self._client is None:
            import httpx  # only a process that delivers webhooks needs it

            # httpx logs every request at INFO with the whole URL, whose path or query may carry a token
            # (safe_webhook_url): not in the worker's log, unless someone set that logger's level on purpose.
            quiet = logging.getLogger("httpx")
            if quiet.level == logging.NOTSET:
                quiet.setLevel(logging.WARNING)
            self._client = httpx.Client(timeout=self.settings.webhook_timeout_s, follow_redirects=False,
                                        headers={"user-agent": "invsort-webhooks"})
        return self._client

    def close(self) -> None:
        """Close the HTTP client this dispatcher made."""
        if self._own_client and self._client is not None:
            self._client.close()
            self._client = None

    def post(self, row: OutboxRow) -> Attempt:
        """POST one event, signed now. Never raises for what the receiver or the network does."""
        import httpx

        body = row.payload.encode("utf-8")
        timestamp = int(time.time())
        headers = {"content-type": "application/json", "webhook-id": row.event_id,
                   "webhook-timestamp": str(timestamp),
                   "webhook-signature": signature(self._key, row.event_id, timestamp, body)}
        try:
            with self._http().stream("POST", self.url, content=body, headers=headers) as response:
                answer = b""
                for chunk in response.iter_bytes():  # read to the end (up to a limit): the connection is kept
                    answer += chunk
                    if len(answer) > _READ_BYTES:
                        break
                if 200 <= response.status_code < 300:
                    return Attempt(True, response.status_code)
                text = _printable(answer[:_RESPONSE_BYTES])
                return Attempt(False, response.status_code,
                               f"HTTP {response.status_code}" + (f": {text}" if text else ""))
        except httpx.HTTPError as exc:
            error = f"{type(exc).__name__}: {exc}".strip().rstrip(":")
            return Attempt(False, None, error.replace(self.url, safe_webhook_url(self.url)))

    # ----------------------------------------------------------------------------------------------- passes

    def _retry_at(self, attempts: int, now: datetime) -> datetime:
        s = self.settings
        ceiling = backoff_ceiling(attempts, base=s.webhook_backoff_s, cap=s.webhook_max_backoff_s)
        return now + timedelta(seconds=self._rng.uniform(ceiling / 2, ceiling))

    def _pause(self) -> float:
        s = self.settings
        ceiling = backoff_ceiling(self._failures, base=s.webhook_backoff_s, cap=s.webhook_max_backoff_s)
        pause = self._rng.uniform(0, ceiling / 2)
        self._paused_until = time.monotonic() + pause
        return pause

    def paused_for(self) -> float:
        """Seconds until the dispatcher POSTs again after a failure (0: it may now)."""
        return max(0.0, self._paused_until - time.monotonic())

    def produce(self) -> tuple[int, bool]:
        """Up to :data:`PRODUCE_PAGES` pages of events into the outbox; returns how many and whether more wait."""
        produced, more = 0, True
        events = set(self.settings.webhook_events)
        for _ in range(PRODUCE_PAGES):
            with session_scope(self.settings.database_url) as session:
                result = produce(session=session, events=events)
            produced += result.changes + result.jobs
            more = result.more
            if not more:
                break
        return produced, more

    def deliver(self, report: PassReport, deadline: float) -> bool:
        """POST the due events oldest first until none is due, one fails, or ``deadline`` (monotonic) passes.
        Returns True when it stopped at the deadline with events still due."""
        url = self.settings.database_url
        delivered: list[tuple[int, int]] = []

        def flush() -> None:
            if delivered:
                with session_scope(url) as session:
                    mark_delivered(session=session, delivered=delivered, now=datetime.now(UTC))
                report.delivered += len(delivered)
                delivered.clear()

        try:
            while self.paused_for() == 0:
                with session_scope(url) as session:
                    rows = due_rows(session=session, now=datetime.now(UTC), limit=DUE_PAGE)
                if not rows:
                    return False
                for row in rows:
                    if time.monotonic() >= deadline:
                        return True
                    attempt = self.post(row)
                    if not attempt.ok:
                        flush()
                        self._failed(row, attempt, report)
                        return False
                    self._failures = 0
                    delivered.append((row.id, attempt.status or 200))
                    if len(delivered) >= FLUSH_EVERY:
                        flush()
                flush()
            return False
        finally:
            flush()

    def _failed(self, row: OutboxRow, attempt: Attempt, report: PassReport) -> None:
        now = datetime.now(UTC)
        error = attempt.error or "failed"
        with session_scope(self.settings.database_url) as session:
            mark_failed(session=session, row_id=row.id, next_attempt_at=self._retry_at(row.attempts + 1, now),
                        status=attempt.status, error=error)
        self._failures += 1
        report.failed += 1
        report.errors.append(f"{row.event_id}: {error}")
        pause = self._pause()
        log.warning("webhook %s to %s failed (attempt %d): %s; the dispatcher tries again in %.3g s",
                    row.event_id, safe_webhook_url(self.url), row.attempts + 1, error, pause)

    def _prune(self) -> None:
        if time.monotonic() - self._pruned_at < PRUNE_EVERY_S:
            return
        self._pruned_at = time.monotonic()
        cutoff = datetime.now(UTC) - timedelta(days=self.settings.webhook_retention_days)
        with session_scope(self.settings.database_url) as session:
            pruned = prune_delivered(session=session, older_than=cutoff)
        if pruned:
            log.info("webhooks: %d delivered event(s) older than %d days deleted", pruned,
                     self.settings.webhook_retention_days)

    def take_lease(self) -> bool:
        """Take or renew the ``webhooks`` lease; True if this process holds it."""
        ttl = 3 * (PASS_S + self.settings.webhook_timeout_s)
        with session_scope(self.settings.database_url) as session:
            return acquire_lease(session=session, name=LEASE, holder=self.holder, ttl_s=ttl)

    def run_once(self) -> PassReport:
        """One pass, if this process holds the lease: produce, deliver what is due, prune now and then."""
        report = PassReport()
        if not self.take_lease():
            return report
        report.leader = True
        report.produced, more = self.produce()
        more = self.deliver(report, time.monotonic() + PASS_S) or more
        report.paused_s = self.paused_for()
        report.more = more and report.paused_s == 0
        self._prune()
        return report

    def run_forever(self, stop: threading.Event, on_pass: Callable[[PassReport], None] | None = None) -> None:
        """Run passes until ``stop`` is set: at once while there is more to do, every :data:`POLL_S` seconds when
        idle, after the pause when an attempt failed, every :data:`LEASE_RETRY_S` seconds while another process
        holds the lease. Errors (the database away) are logged and the loop goes on."""
        log.info("webhooks: delivering %s to %s", ", ".join(self.settings.webhook_events),
                 safe_webhook_url(self.url))
        try:
            while not stop.is_set():
                try:
                    report = self.run_once()
                except Exception as exc:  # noqa: BLE001 - a database outage must not end the dispatcher
                    log.warning("webhooks pass failed: %s", exc)
                    stop.wait(POLL_S * 5)
                    continue
                if on_pass is not None:
                    on_pass(report)
                if not report.leader:
                    stop.wait(LEASE_RETRY_S)
                elif not report.more:
                    stop.wait(min(POLL_S, report.paused_s) if report.paused_s else POLL_S)
        finally:
            self.close()


@dataclass(frozen=True, slots=True)
class WebhooksStatus:
    """``invsort webhooks status``: the outbox's figures, where events go, and who delivers them."""

    url: str | None
    events: list[str]
    holder: str | None
    outbox: OutboxStats

    def to_json(self) -> dict[str, Any]:
        return {"url": self.url, "events": self.events, "holder": self.holder, **self.outbox.to_json()}


def webhooks_status(settings: Settings) -> WebhooksStatus:
    """The state of the webhooks in ``settings.database_url``."""
    with session_scope(settings.database_url) as session:
        stats = outbox_stats(session=session)
        holder = lease_holder(session=session, name=LEASE)
    url = None if settings.webhook_url is None else safe_webhook_url(settings.webhook_url)
    return WebhooksStatus(url=url, events=list(settings.webhook_events), holder=holder, outbox=stats)


@contextmanager
def running(settings: Settings, *, holder: str | None = None) -> Iterator[Dispatcher]:
    """A :class:`Dispatcher` running in a thread for the block (a test's, or a command's), stopped after it."""
    dispatcher = Dispatcher(settings, holder=holder)
    stop = threading.Event()
    thread = threading.Thread(target=dispatcher.run_forever, args=(stop,), name="invsort-webhooks", daemon=True)
    thread.start()
    try:
        yield dispatcher
    finally:
        stop.set()
        thread.join(timeout=30)
