"""Prometheus metrics of the HTTP API (``GET /metrics``), in a registry of the app's own (prometheus-client).

- ``invsort_http_requests_total{method, route, status}``: requests answered, by route template (``/v1/jobs/{job_id}``,
  not the id: the label set stays small), ``unmatched`` for paths no route has.
- ``invsort_classify_seconds``: histogram of the time ``POST /v1/classify`` takes to classify a request's photos
  (decode and model, after the upload was read).
- ``invsort_images_classified_total{status}``: photos classified by ``POST /v1/classify``, by status.
- ``invsort_classify_batch_photos`` and ``invsort_classify_batch_requests``: histograms of the photos and of the
  requests that ``POST /v1/classify``'s batcher (:mod:`worker.web.batcher`) ran together, one observation a batch.
- ``invsort_jobs_started_total{mode}``: jobs started through the API, ``embedded`` or ``queued``.
- ``invsort_jobs{status}``: jobs in the catalog database by status, read at every scrape (every job, whoever
  started it); ``invsort_database_up`` is 0 when that read failed.
- ``invsort_webhook_events_pending``, ``invsort_webhook_oldest_pending_seconds``, ``invsort_webhook_max_attempts``:
  the webhooks' outbox (:mod:`db.webhooks`) at every scrape: what ``invsort webhooks run`` has not delivered yet,
  how old the oldest of it is, and the most attempts one has had (a receiver that is down shows here first).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from db.queries import count_jobs_by_status
from db.session import session_scope
from db.webhooks import pending_figures
from pipeline.records import SORT_STATUSES, ItemResult

log = logging.getLogger(__name__)

CLASSIFY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_PHOTOS_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)
BATCH_REQUESTS_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64, 128)


class _JobsByStatus(Collector):
    """``invsort_jobs{status}``, ``invsort_database_up`` and the webhook outbox's gauges, read from the database at
    each scrape."""

    def __init__(self, database_url: str) -> None:
        self.database_url = database_url

    def collect(self) -> Iterable[Metric]:
        up = GaugeMetricFamily("invsort_database_up", "1 when the catalog database answered this scrape, else 0")
        try:
            with session_scope(self.database_url) as session:
                counts = count_jobs_by_status(session=session)
        except Exception as exc:  # noqa: BLE001 - a scrape must answer while the database is down
            log.warning("metrics: jobs by status not read: %s", type(exc).__name__)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        jobs = GaugeMetricFamily("invsort_jobs", "Jobs in the catalog database, by status", labels=["status"])
        for status, n in counts.items():
            jobs.add_metric([status], n)
        yield jobs
        try:
            with session_scope(self.database_url) as session:
                pending, oldest_s, attempts = pending_figures(session=session)
        except Exception as exc:  # noqa: BLE001 - as above
            log.warning("metrics: webhook outbox not read: %s", type(exc).__name__)
            return
        for name, doc, value in (
            ("invsort_webhook_events_pending", "Webhook events in the outbox not delivered yet", pending),
            ("invsort_webhook_oldest_pending_seconds", "Age of the oldest undelivered webhook event, seconds "
             "(0 when none): how far behind the receivers are", oldest_s),
            ("invsort_webhook_max_attempts", "The most POSTs an undelivered webhook event has had", attempts),
        ):
            gauge = GaugeMetricFamily(name, doc)
            gauge.add_metric([], value)
            yield gauge


class Metrics:
    """The app's metrics and their registry (one per app, so that several apps in one process do not clash).

    Args:
        database_url: where ``invsort_jobs`` is counted.
    """

    def __init__(self, database_url: str) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("invsort_http_requests", "HTTP requests answered, by method, route template and "
                                "status code", ["method", "route", "status"], registry=self.registry)
        self.classify_seconds = Histogram("invsort_classify_seconds", "Seconds POST /v1/classify took to classify "
                                          "a request's photos (decode + model, after the upload)",
                                          buckets=CLASSIFY_BUCKETS, registry=self.registry)
        self.images = Counter("invsort_images_classified", "Photos classified by POST /v1/classify, by status",
                              ["status"], registry=self.registry)
        self.batch_photos = Histogram("invsort_classify_batch_photos", "Photos that POST /v1/classify's batcher "
                                      "ran through the model together (one observation a batch)",
                                      buckets=BATCH_PHOTOS_BUCKETS, registry=self.registry)
        self.batch_requests = Histogram("invsort_classify_batch_requests", "Requests whose photos POST "
                                        "/v1/classify's batcher ran through the model together (one observation a "
                                        "batch)", buckets=BATCH_REQUESTS_BUCKETS, registry=self.registry)
        self.jobs_started = Counter("invsort_jobs_started", "Jobs started through the API, by mode",
                                    ["mode"], registry=self.registry)
        for status in SORT_STATUSES:
            self.images.labels(status)  # every status shows, at 0 until it happens
        for mode in ("embedded", "queued"):
            self.jobs_started.labels(mode)
        self.registry.register(_JobsByStatus(database_url))

    def classified(self, seconds: float, rows: Sequence[ItemResult]) -> None:
        """Count one classify request: its time (seconds) and its photos by status."""
        self.classify_seconds.observe(seconds)
        for row in rows:
            self.images.labels(row.status).inc()

    def batched(self, photos: int, requests: int) -> None:
        """Count one batch of the classify batcher: its photos and the requests they came from."""
        self.batch_photos.observe(photos)
        self.batch_requests.observe(requests)


class RequestMetrics:
    """ASGI middleware: counts every HTTP request in ``Metrics.requests`` once it is answered (500 when the app
    raised before answering)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            self.metrics.requests.labels(scope["method"], route, str(status)).inc()
