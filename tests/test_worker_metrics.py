"""The worker's Prometheus metrics and JSON logs (worker/metrics.py, pipeline/logs.py), and the Grafana dashboard.

The end-to-end test starts a real ``invsort worker`` with two prefork pool processes (Redis database 12 of its own,
PostgreSQL), sorts the example photos and the bad ones through it, and scrapes its ``/metrics``.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
import redis
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from db.catalog import get_job
from db.session import session_scope
from pipeline.inference.streaming import describe_error
from pipeline.io.images import decode_image
from pipeline.jobs import STAGES as JOB_STAGES
from pipeline.logs import format_handler, log_context
from pipeline.records import ItemResult
from pipeline.settings import build_settings
from tests.images import BAD_IMAGES, EXAMPLES, example_files
from tests.test_worker import flushed_redis
from worker.metrics import (
    FAILURE_REASONS,
    OUTCOMES,
    STAGES,
    QueueDepth,
    WorkerMetrics,
    failure_reason,
    prepare,
    queue_keys,
    reap,
)

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "deploy" / "grafana" / "invsort-dashboard.json"
REDIS_URL = "redis://127.0.0.1:6379/12"  # this file's own database (test_worker.py and test_jobs.py use 13)
BAD_REASONS = {"zero_bytes.jpg": "empty", "text_renamed.jpg": "not_an_image", "truncated.jpg": "truncated",
               "tiny_3x3.png": "too_small", "huge_dimensions.png": "too_large"}


def _bad_image_reason(data: bytes) -> str:
    try:
        decode_image(data, size=(28, 28), in_chans=1, max_pixels=100_000_000)
    except Exception as exc:  # noqa: BLE001 - the reason a failed row gets
        return describe_error(exc)
    raise AssertionError("decoded")


def test_every_bad_photo_fails_with_a_reason_class_of_its_own():
    assert set(BAD_REASONS) == set(BAD_IMAGES)
    assert {name: failure_reason(_bad_image_reason(data)) for name, data in BAD_IMAGES.items()} == BAD_REASONS


@pytest.mark.parametrize(("error", "reason"), [
    ("poison item: it crashed or hung the worker process 2 times (a decoder crash, ...)", "poison"),
    ("gave up after 5 attempts: OperationalError: connection refused", "gave_up"),
    ("lost 6 times (never finished by a worker): its task vanished from the queue", "lost"),
    ("the database refused this row: value too long for type character varying(255)", "database_refused"),
    ("file is 99 bytes, more than the limit of 10: /photos/a.jpg", "too_large"),
    ("object is 99 bytes, more than the limit of 10: s3://b/a.jpg", "too_large"),
    ("not a decodable image: broken data stream", "decode"),
    ("WEBP image (10x10 px, mode RGB) that OpenCV cannot decode", "decode"),
    ("no such file: /photos/gone.jpg", "not_found"),
    ("no such object: s3://b/gone.jpg", "not_found"),
    ("local file access refused for /etc/passwd: it is outside the local roots (/photos); add ...", "permission"),
    ("S3 GetObject on s3://b/k refused: AccessDenied", "permission"),
    ("S3 GetObject on s3://b/k failed: InternalError", "fetch"),
    ("RuntimeError: something new", "other"),
    ("", "other"),
    (None, "other"),
])
def test_failure_reasons_are_a_fixed_set_of_classes(error, reason):
    assert failure_reason(error) == reason
    assert reason in FAILURE_REASONS


def _row(status: str, error: str | None = None) -> ItemResult:
    return ItemResult(item_id="i", image_uri="u", status=status, error=error)


def _sample(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


def test_worker_metrics_count_what_a_batch_reports():
    registry = CollectorRegistry()
    m = WorkerMetrics(registry)
    assert STAGES == JOB_STAGES
    for status in ("sorted", "needs_review", "failed"):  # every label shows at 0 from the start
        assert _sample(registry, "invsort_worker_images_total", status=status) == 0
    assert all(_sample(registry, "invsort_worker_failures_total", reason=r) == 0 for r in FAILURE_REASONS)
    assert all(_sample(registry, "invsort_worker_batches_total", outcome=o) == 0 for o in OUTCOMES)

    def predictor(version: str) -> SimpleNamespace:
        return SimpleNamespace(model_file=SimpleNamespace(name="shoes", version=version), runtime="torch",
                               device="cpu")

    with m.task() as task:
        assert _sample(registry, "invsort_worker_tasks_in_flight") == 1
        m.model(predictor("aaaaaaaaaaaa"))
        m.written([_row("sorted"), _row("needs_review"), _row("failed", "empty file (0 bytes)"),
                   _row("failed", "no such file: x")])
        m.stages({"fetch": 0.01, "decode": 0.02, "forward": 0.5, "write": 0.003})
        task.outcome = "done"
    with pytest.raises(RuntimeError), m.task():
        m.model(predictor("bbbbbbbbbbbb"))
        raise RuntimeError("database down")
    with m.task() as task:
        task.outcome = "busy"

    assert _sample(registry, "invsort_worker_tasks_in_flight") == 0
    assert [_sample(registry, "invsort_worker_images_total", status=s) for s in ("sorted", "needs_review",
                                                                                  "failed")] == [1, 1, 2]
    assert _sample(registry, "invsort_worker_failures_total", reason="empty") == 1
    assert _sample(registry, "invsort_worker_failures_total", reason="not_found") == 1
    for stage in STAGES:
        assert _sample(registry, "invsort_worker_batch_stage_seconds_count", stage=stage) == 1
    assert _sample(registry, "invsort_worker_batch_stage_seconds_sum", stage="forward") == pytest.approx(0.5)
    assert _sample(registry, "invsort_worker_batch_seconds_count") == 1  # only the task that ran its batch
    outcomes = {o: _sample(registry, "invsort_worker_batches_total", outcome=o) for o in OUTCOMES}
    assert outcomes == {"done": 1, "skipped": 0, "busy": 1, "error": 1, "dropped": 0}
    info = dict(model_name="shoes", runtime="torch", device="cpu")
    assert _sample(registry, "invsort_worker_model_info", model_version="aaaaaaaaaaaa", **info) == 0  # replaced
    assert _sample(registry, "invsort_worker_model_info", model_version="bbbbbbbbbbbb", **info) == 1


def test_json_log_lines_carry_the_job_and_batch_they_are_about():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    format_handler(handler, "json")
    log = logging.getLogger("tests.json_logs")
    log.addHandler(handler)
    log.propagate = False
    try:
        log.warning("before")
        with log_context(job_id="job-1", batch_no=3):
            log.warning("inside %s", "a batch")
            with log_context(batch_no=4):
                log.warning("nested")
            log.warning("given", extra={"batch_no": 9})
        log.warning("after")
    finally:
        log.removeHandler(handler)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [(d["message"], d.get("job_id"), d.get("batch_no")) for d in lines] == [
        ("before", None, None), ("inside a batch", "job-1", 3), ("nested", "job-1", 4), ("given", "job-1", 9),
        ("after", None, None)]
    assert {"time", "level", "logger", "pid", "message"} <= set(lines[1])
    assert lines[1]["level"] == "WARNING" and lines[1]["logger"] == "tests.json_logs"


def test_the_queue_depth_is_read_from_redis_and_marked_down_when_redis_is_not_there():
    client = redis.Redis.from_url(REDIS_URL)
    client.flushdb()
    try:
        keys = queue_keys("invsort")
        assert keys[0] == "invsort" and len(keys) == 4  # kombu's priority steps: one list each
        client.rpush(keys[0], "a", "b", "c")
        client.rpush(keys[2], "d")
        depth = {m.name: m.samples for m in QueueDepth(REDIS_URL, ["invsort", "other"]).collect()}
        assert depth["invsort_worker_broker_up"][0].value == 1
        assert {s.labels["queue"]: s.value for s in depth["invsort_worker_queue_depth"]} == {"invsort": 4,
                                                                                              "other": 0}
    finally:
        client.flushdb()
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    down = {m.name: m.samples for m in QueueDepth(f"redis://127.0.0.1:{closed}/0", ["invsort"], 0.5).collect()}
    assert list(down) == ["invsort_worker_broker_up"] and down["invsort_worker_broker_up"][0].value == 0


def test_the_gauges_of_a_process_that_is_gone_leave_the_totals(tmp_path):
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(gone.stdout)
    for name in (f"gauge_livesum_{dead_pid}.db", f"gauge_livemax_{dead_pid}.db", f"counter_{dead_pid}.db",
                 f"gauge_livesum_{os.getpid()}.db"):
        (tmp_path / name).write_bytes(b"")
    assert reap(tmp_path) == [dead_pid]
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"counter_{dead_pid}.db", f"gauge_livesum_{os.getpid()}.db"]


def test_metrics_off_prepare_nothing_and_prepare_refuses_a_late_prometheus_import(tmp_path, monkeypatch):
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    assert prepare(build_settings(metrics_port=0, metrics_dir=str(tmp_path))) is None
    assert "PROMETHEUS_MULTIPROC_DIR" not in os.environ
    assert "prometheus_client.values" in sys.modules  # imported by this test module
    with pytest.raises(RuntimeError, match="imported before PROMETHEUS_MULTIPROC_DIR"):
        prepare(build_settings(metrics_port=9808, metrics_dir=str(tmp_path)))
    assert "PROMETHEUS_MULTIPROC_DIR" not in os.environ


SAMPLE_SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
                   "gauge": ("",)}


def _exported_names(sqlite_url: str) -> set[str]:
    """The name of every sample the worker and the web app export (a counter's ``_total``, a histogram's
    ``_bucket``, ...), whether or not it has a value yet."""
    from worker.web.metrics import Metrics

    registries = [CollectorRegistry(), Metrics(sqlite_url).registry]
    WorkerMetrics(registries[0])
    names = {m.name + suffix for r in registries for m in r.collect() for suffix in SAMPLE_SUFFIXES[m.type]}
    return names | {"invsort_worker_queue_depth", "invsort_worker_broker_up"}  # QueueDepth's, read from Redis


def _exprs(panels: list[dict]) -> list[str]:
    out = []
    for panel in panels:
        out += [t["expr"] for t in panel.get("targets", [])]
        out += _exprs(panel.get("panels", []))
    return out


def test_the_grafana_dashboard_queries_only_metrics_that_invsort_exports(sqlite_url):
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["schemaVersion"] >= 36 and dashboard["uid"] and dashboard["title"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    for panel in panels:
        assert set(panel["gridPos"]) == {"h", "w", "x", "y"}
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}" and panel["targets"], panel["title"]
    exprs = _exprs(panels)
    queried = {name for expr in exprs for name in re.findall(r"\binvsort_\w+", expr)}
    assert queried - _exported_names(sqlite_url) == set()
    worker = {"invsort_worker_images_total", "invsort_worker_failures_total", "invsort_worker_queue_depth",
              "invsort_worker_batch_stage_seconds_bucket", "invsort_worker_tasks_in_flight",
              "invsort_worker_model_info"}
    assert worker <= queried
    assert all(expr.count("(") == expr.count(")") for expr in exprs)


# --- a real worker ---------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _scrape(port: int) -> dict[str, list]:
    """``{sample name: [(labels, value), ...]}`` of the worker's ``/metrics``."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:  # noqa: S310 - http
        text = answer.read().decode()
    samples: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples.setdefault(s.name, []).append((s.labels, s.value))
    return samples


def _value(samples: dict[str, list], name: str, **labels: str) -> float:
    found = [v for have, v in samples.get(name, []) if all(have.get(k) == w for k, w in labels.items())]
    assert len(found) == 1, f"{name}{labels}: {found}"
    return found[0]


def _scrapes(port: int) -> dict[str, list] | None:
    try:
        return _scrape(port)
    except OSError:
        return None


@pytest.fixture
def broker12():
    with flushed_redis(REDIS_URL):
        yield REDIS_URL


@pytest.mark.slow
def test_a_worker_with_two_pool_processes_exports_every_metric_and_logs_json(pg_url, broker12, tmp_path):
    from tests.test_worker import invsort, job_done, stop_worker, wait_for

    photos = tmp_path / "photos"
    shutil.copytree(EXAMPLES, photos)
    for name, data in BAD_IMAGES.items():
        (photos / "bad" / name).parent.mkdir(exist_ok=True)
        (photos / "bad" / name).write_bytes(data)
    n, per_task = len(example_files()) + len(BAD_IMAGES), 8
    batches = -(-n // per_task)
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    (metrics_dir / "counter_424242.db").write_bytes(b"left by an earlier worker")  # emptied at start
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("INVSORT_", "PROMETHEUS_"))}
    env.update(INVSORT_DATABASE_URL=pg_url, INVSORT_BROKER_URL=broker12, INVSORT_LOCAL_ROOTS=str(photos),
               INVSORT_ITEMS_PER_TASK=str(per_task), INVSORT_BATCH_SIZE="4", INVSORT_METRICS_DIR=str(metrics_dir),
               INVSORT_LOG_FORMAT="json", PYTHONUNBUFFERED="1")
    log_path = tmp_path / "worker.log"
    with open(log_path, "wb") as log:
        worker = subprocess.Popen(invsort("worker", "-c", "2", "-n", "metrics@%h", "-l", "INFO", "--metrics-port",
                                          str(port)), cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: "ready." in log_path.read_text(), 90, "the worker is ready", (log_path,))
        before = wait_for(lambda: (s := _scrapes(port)) and "invsort_worker_images_total" in s and s, 30,
                          "/metrics shows the pool processes' metrics", (log_path,), poll_s=0.5)
        assert _value(before, "invsort_worker_images_total", status="sorted") == 0  # every label from the start
        assert _value(before, "invsort_worker_tasks_in_flight") == 0
        assert not (metrics_dir / "counter_424242.db").exists()
        submit = subprocess.run(invsort("submit", str(photos), "--wait"), cwd=ROOT, env=env, capture_output=True,
                                text=True, timeout=300)
        assert submit.returncode == 0, submit.stdout + submit.stderr + log_path.read_text()
        job_id = submit.stdout.split()[1].rstrip(":")
        job = wait_for(job_done(pg_url, job_id), 30, "the job is done", (log_path,))
        samples = _scrape(port)
        log_lines = log_path.read_text().splitlines()
    finally:
        stop_worker(worker)

    assert job.total_items == n and job.failed_count == len(BAD_IMAGES)
    by_status = {s: _value(samples, "invsort_worker_images_total", status=s) for s in ("sorted", "needs_review",
                                                                                        "failed")}
    assert sum(by_status.values()) == n and by_status["failed"] == len(BAD_IMAGES)
    assert by_status["sorted"] == job.sorted_count and by_status["needs_review"] == job.needs_review_count
    failures = {r: _value(samples, "invsort_worker_failures_total", reason=r) for r in FAILURE_REASONS}
    assert {r: v for r, v in failures.items() if v} == {r: 1 for r in BAD_REASONS.values()}
    for stage in STAGES:
        assert _value(samples, "invsort_worker_batch_stage_seconds_count", stage=stage) == batches, stage
        assert _value(samples, "invsort_worker_batch_stage_seconds_sum", stage=stage) > 0, stage
        assert _value(samples, "invsort_worker_batch_stage_seconds_bucket", stage=stage, le="+Inf") == batches
    assert _value(samples, "invsort_worker_batch_seconds_count") == batches
    assert _value(samples, "invsort_worker_batches_total", outcome="done") == batches
    assert _value(samples, "invsort_worker_tasks_in_flight") == 0
    assert _value(samples, "invsort_worker_queue_depth", queue="invsort") == 0
    assert _value(samples, "invsort_worker_broker_up") == 1
    info = [labels for labels, v in samples["invsort_worker_model_info"] if v == 1]
    assert [i["model_version"] for i in info] == [job.model_version]
    assert info[0]["model_name"] == job.model_name and info[0]["runtime"] == "torch" and info[0]["device"] == "cpu"

    # JSON lines only; every line about one of the job's batches names it
    records = [json.loads(line) for line in log_lines if line.strip()]
    assert all(isinstance(r, dict) and {"time", "level", "logger", "message"} <= set(r) for r in records)
    about_job = [r for r in records if job_id in r["message"] or r.get("job_id") == job_id]
    assert all(r.get("job_id") == job_id and isinstance(r.get("batch_no"), int) for r in about_job), about_job
    for logger in ("celery.worker.strategy", "celery.app.trace"):  # received (main process), succeeded (pool)
        assert {r["batch_no"] for r in about_job if r["logger"] == logger} == set(range(batches)), logger
    pools = {r["pid"] for r in records if r["logger"] == "pipeline.sorting" and "loaded model" in r["message"]}
    assert pools and all(r.get("job_id") == job_id for r in records if r["logger"] == "pipeline.sorting")
    with session_scope(pg_url) as session:
        assert get_job(session=session, job_id=job_id).status == "done"
