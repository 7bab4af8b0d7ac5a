"""Prometheus metrics of ``invsort worker``: every pool process counts, the main process serves the total.

Celery's prefork pool runs the batches in child processes. prometheus-client's multiprocess mode has each process
write its metrics to files of its own in one folder (``PROMETHEUS_MULTIPROC_DIR``) and the main process add them
up at each scrape. :func:`prepare` makes that folder (``INVSORT_METRICS_DIR``, emptied; by default a new one,
removed at exit) and sets the variable: the ``worker`` command calls it before anything imports
prometheus_client, which reads the variable once, at import. :func:`serve` then starts the HTTP server in the main
process (``INVSORT_METRICS_ADDR``:``INVSORT_METRICS_PORT``, ``GET /metrics``). A pool process that ends is marked
dead (:func:`process_ended`, and at each scrape any whose process is gone): its counts stay in the totals, its
gauges leave them.

Metrics (names as the web app's in :mod:`worker.web.metrics`: ``invsort_`` then the part of invsort):

- ``invsort_worker_images_total{status}``: images whose rows were written, by status (``sorted``,
  ``needs_review``, ``failed``).
- ``invsort_worker_failures_total{reason}``: ``failed`` images by the class of their reason
  (:data:`FAILURE_REASONS`, :func:`failure_reason`): a short fixed set, never the message itself.
- ``invsort_worker_batch_stage_seconds{stage}``: histogram, one observation per stage for each batch run to the
  end: ``fetch`` and ``decode`` (seconds the decode threads spent on the batch's images, summed over the threads),
  ``forward`` (the model) and ``write`` (the catalog transactions).
- ``invsort_worker_batch_seconds``: histogram of the time of a task that ran its batch, start to end.
- ``invsort_worker_batches_total{outcome}``: task deliveries by outcome (:data:`OUTCOMES`).
- ``invsort_worker_tasks_in_flight``: tasks running now, in the live pool processes.
- ``invsort_worker_model_info{model_name, model_version, runtime, device}``: 1 for each model a live pool
  process ran its last batch with (none before the first batch: a model is loaded by the first batch).
- ``invsort_worker_queue_depth{queue}``: tasks waiting in the Redis queue (every priority), read at each scrape;
  ``invsort_worker_broker_up`` is 0 when Redis did not answer that read (and the depth is then absent).
"""

from __future__ import annotations

import atexit
import glob
import logging
import os
import re
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # prometheus_client is imported late: after prepare() (see the module docstring)
    from prometheus_client.core import Metric

    from pipeline.records import ItemResult
    from pipeline.settings import Settings
    from pipeline.sorting import AnyPredictor

log = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
STAGES = ("fetch", "decode", "forward", "write")
#: What a delivery of a batch's task came to: ``done`` (the batch ran), ``skipped`` (nothing to do: finished,
#: cancelled, or its job failed), ``busy`` (another worker holds it: retried later), ``error`` (retried with
#: backoff), ``dropped`` (the batch is not in the database).
OUTCOMES = ("done", "skipped", "busy", "error", "dropped")
STAGE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
BATCH_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)

# The class of a failed row's reason, by how the reason begins (the messages of pipeline/io, db.catalog and
# pipeline.jobs); first match wins, anything else is "other".
_REASONS: tuple[tuple[str, re.Pattern[str]], ...] = tuple((name, re.compile(pattern)) for name, pattern in (
    ("poison", r"poison item"),
    ("gave_up", r"gave up after"),
    ("lost", r"lost \d+ times"),
    ("database_refused", r"the database refused"),
    ("empty", r"empty file"),
    ("too_large", r"image dimensions too large|(file|object) is .*more than the limit"),
    ("too_small", r"image too small"),
    ("truncated", r"truncated|corrupt or truncated"),
    ("not_an_image", r"not an image"),
    ("decode", r"not a decodable image|.* that OpenCV cannot decode|float image with no finite"),
    ("not_found", r"no such (file|object|bucket)|is a directory"),
    ("permission", r"local file access refused|S3 \w+ on .* refused"),
    ("fetch", r"S3 \w+ on "),
))
#: Every value of the ``reason`` label of ``invsort_worker_failures_total``.
FAILURE_REASONS: tuple[str, ...] = (*(name for name, _ in _REASONS), "other")


def failure_reason(error: str | None) -> str:
    """The class of a ``failed`` row's reason (one of :data:`FAILURE_REASONS`)."""
    for name, pattern in _REASONS:
        if error and pattern.match(error):
            return name
    return "other"


class WorkerMetrics:
    """The worker's metrics (see the module docstring) and a :class:`pipeline.jobs.BatchObserver`.

    Args:
        registry: where they are registered; None (the worker): nowhere, the main process reads them from the
            pool processes' files. A test passes a ``CollectorRegistry`` to read them.
    """

    def __init__(self, registry: Any = None) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        self.images = Counter("invsort_worker_images", "Images whose catalog rows a worker wrote, by status",
                              ["status"], registry=registry)
        self.failures = Counter("invsort_worker_failures", "Failed images by the class of their reason",
                                ["reason"], registry=registry)
        self.stage_seconds = Histogram("invsort_worker_batch_stage_seconds", "Seconds a batch spent in each "
                                       "stage: fetch and decode (summed over the decode threads), forward, write",
                                       ["stage"], buckets=STAGE_BUCKETS, registry=registry)
        self.batch_seconds = Histogram("invsort_worker_batch_seconds", "Seconds a task that ran its batch took",
                                       buckets=BATCH_BUCKETS, registry=registry)
        self.batches = Counter("invsort_worker_batches", "Batch task deliveries, by outcome", ["outcome"],
                               registry=registry)
        self.in_flight = Gauge("invsort_worker_tasks_in_flight", "Batch tasks running now",
                               multiprocess_mode="livesum", registry=registry)
        self.model_info = Gauge("invsort_worker_model_info", "1 for each model that a live worker process ran "
                                "its last batch with", ["model_name", "model_version", "runtime", "device"],
                                multiprocess_mode="livemax", registry=registry)
        self._model: tuple[str, str, str, str] | None = None
        for status in ("sorted", "needs_review", "failed"):
            self.images.labels(status)  # every label shows, at 0 until it happens
        for reason in FAILURE_REASONS:
            self.failures.labels(reason)
        for stage in STAGES:
            self.stage_seconds.labels(stage)
        for outcome in OUTCOMES:
            self.batches.labels(outcome)
        self.in_flight.set(0)

    # pipeline.jobs.BatchObserver
    def model(self, predictor: AnyPredictor) -> None:
        labels = (predictor.model_file.name, predictor.model_file.version, predictor.runtime, str(predictor.device))
        if labels != self._model:
            if self._model is not None:
                self.model_info.labels(*self._model).set(0)
            self.model_info.labels(*labels).set(1)
            self._model = labels

    def written(self, rows: Sequence[ItemResult]) -> None:
        for row in rows:
            self.images.labels(row.status).inc()
            if row.status == "failed":
                self.failures.labels(failure_reason(row.error)).inc()

    def stages(self, seconds: Mapping[str, float]) -> None:
        for stage, s in seconds.items():
            if stage in STAGES:
                self.stage_seconds.labels(stage).observe(s)

    @contextmanager
    def task(self) -> Iterator[_Task]:
        """Around a batch task: counts it in flight while it runs, then by its outcome (set ``.outcome``;
        ``error`` when it raised without one), and times it when it is ``done``."""
        task = _Task()
        began = time.perf_counter()
        self.in_flight.inc()
        try:
            yield task
        finally:
            self.in_flight.dec()
            outcome = task.outcome or "error"
            self.batches.labels(outcome).inc()
            if outcome == "done":
                self.batch_seconds.observe(time.perf_counter() - began)


@dataclass
class _Task:
    outcome: str | None = None


_metrics: WorkerMetrics | None = None
_metrics_lock = threading.Lock()


def worker_metrics() -> WorkerMetrics:
    """This process's :class:`WorkerMetrics`, made at the first call."""
    global _metrics
    with _metrics_lock:
        if _metrics is None:
            _metrics = WorkerMetrics()
        return _metrics


def prepare(settings: Settings) -> Path | None:
    """Make the folder of the pool processes' metrics and point ``PROMETHEUS_MULTIPROC_DIR`` at it; None (and
    nothing done) when the metrics are off (``INVSORT_METRICS_PORT=0``).

    ``INVSORT_METRICS_DIR`` is created if needed and emptied of metric files (a worker's counts start at 0);
    unset, a new folder under ``$XDG_RUNTIME_DIR`` (else the temporary folder) is made and removed when this
    process exits.

    Raises:
        RuntimeError: prometheus_client was imported already (it would not see the folder).
        OSError: the folder cannot be made.
    """
    if settings.metrics_port == 0:
        return None
    if "prometheus_client.values" in sys.modules:
        raise RuntimeError(f"prometheus_client was imported before {MULTIPROC_ENV} was set")
    if settings.metrics_dir is not None:
        path = settings.metrics_dir.expanduser()
        path.mkdir(parents=True, exist_ok=True)
        for old in path.glob("*.db"):
            old.unlink()
    else:
        runtime = os.environ.get("XDG_RUNTIME_DIR")
        path = Path(tempfile.mkdtemp(prefix="invsort-worker-metrics-",
                                     dir=runtime if runtime and os.path.isdir(runtime) else None))
        atexit.register(_remove_in, os.getpid(), path)
    os.environ[MULTIPROC_ENV] = str(path)
    return path


def _remove_in(owner: int, path: Path) -> None:
    if os.getpid() == owner:  # not in a pool process that exits through atexit
        shutil.rmtree(path, ignore_errors=True)


def process_ended(pid: int) -> None:
    """A pool process ended: its gauges leave the totals (nothing when the metrics are off)."""
    path = os.environ.get(MULTIPROC_ENV)
    if path:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid, path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def reap(path: str | Path) -> list[int]:
    """Mark dead every process whose live-gauge files are in ``path`` but that no longer runs (a pool process
    killed with SIGKILL never says it ended). Returns their pids."""
    from prometheus_client import multiprocess

    pids = {Path(name).stem.rpartition("_")[2] for name in glob.glob(os.path.join(path, "gauge_live*_*.db"))}
    dead = sorted(int(p) for p in pids if p.isdigit() and int(p) != os.getpid() and not _alive(int(p)))
    for pid in dead:
        multiprocess.mark_process_dead(pid, str(path))
    return dead


def queue_keys(queue: str) -> list[str]:
    """The Redis lists of a kombu queue, one per priority step (as :mod:`worker.reconciler` reads them)."""
    from kombu.transport.redis import PRIORITY_STEPS, Channel

    return [f"{queue}{Channel.sep}{step}" if step else queue for step in PRIORITY_STEPS]


class QueueDepth:
    """``invsort_worker_queue_depth{queue}`` and ``invsort_worker_broker_up``, read from Redis at each scrape
    (``LLEN`` of the queue's lists, waiting at most ``timeout_s``: a scrape answers while Redis is down)."""

    def __init__(self, broker_url: str, queues: Sequence[str], timeout_s: float = 2.0) -> None:
        import redis

        url = "unix://" + broker_url.removeprefix("redis+socket://") if broker_url.startswith("redis+socket://") \
            else broker_url
        self.client = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        self.queues = list(queues)

    def collect(self) -> Iterable[Metric]:
        from prometheus_client.core import GaugeMetricFamily

        up = GaugeMetricFamily("invsort_worker_broker_up", "1 when the Redis broker answered this scrape, else 0")
        try:
            with self.client.pipeline(transaction=False) as pipe:
                for queue in self.queues:
                    for key in queue_keys(queue):
                        pipe.llen(key)
                lengths = iter(pipe.execute())
            depths = {queue: sum(next(lengths) for _ in queue_keys(queue)) for queue in self.queues}
        except Exception as exc:  # noqa: BLE001 - a scrape must answer while Redis is down
            log.warning("metrics: queue depth not read: %s", type(exc).__name__)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        depth = GaugeMetricFamily("invsort_worker_queue_depth", "Tasks waiting in the Redis queue", labels=["queue"])
        for queue, n in depths.items():
            depth.add_metric([queue], n)
        yield depth


def registry(path: str | Path, broker_url: str, queues: Sequence[str]) -> Any:
    """The registry the main process serves: the pool processes' metrics from ``path`` (dead ones reaped first)
    and the queue depth."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    class PoolCollector(MultiProcessCollector):
        def collect(self) -> Iterable[Metric]:
            reap(path)
            return super().collect()

    served = CollectorRegistry()
    PoolCollector(served, str(path))
    served.register(QueueDepth(broker_url, queues))
    return served


def serve(settings: Settings, path: Path, queues: Sequence[str]) -> bool:
    """Serve the metrics on ``INVSORT_METRICS_ADDR``:``INVSORT_METRICS_PORT`` from this process (a thread).
    Returns False, after logging why, when the port cannot be had: the worker runs on without metrics."""
    from prometheus_client import start_http_server

    served = registry(path, settings.broker_url, queues)
    try:
        start_http_server(settings.metrics_port, settings.metrics_addr, registry=served)
    except OSError as exc:
        log.error("metrics not served: %s:%s: %s (set INVSORT_METRICS_PORT to a free port, or 0 for none)",
                  settings.metrics_addr, settings.metrics_port, exc)
        return False
    log.info("metrics on http://%s:%s/metrics", settings.metrics_addr, settings.metrics_port)
    return True
