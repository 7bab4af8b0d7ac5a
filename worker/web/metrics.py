"""Prometheus metrics of the HTTP API (``GET /metrics``), in a registry of the app's own (prometheus-client).

- ``invsort_http_requests_total{method, route, status}``: requests answered, by route template (``/v1/jobs/{job_id}``,
  not the id: the label set stays small), ``unmatched`` for paths no route has.
- ``invsort_classify_seconds``: histogram of the time ``POST /v1/classify`` takes to classify a request's photos
  (decode and model, after the upload was read).
- ``invsort_images_classified_total{status}``: photos classified by ``POST /v1/classify``, by status.
- ``invsort_jobs_started_total{mode}``: jobs started through the API, ``embedded`` or ``queued``.
- ``invsort_jobs{status}``: jobs in the catalog database by status, read at every scrape (every job, whoever
  started it); ``invsort_database_up`` is 0 when that read failed.
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
from pipeline.records import SORT_STATUSES, ItemResult

log = logging.getLogger(__name__)

CLASSIFY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class _JobsByStatus(Collector):
    """``invsort_jobs{status}`` and ``invsort_database_up``, read from the database at each scrape."""

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
