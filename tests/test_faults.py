"""Faults of the queued path with real processes: a Redis the test starts and restarts without persistence, a
worker process that a poison image crashes (a real SIGSEGV), PostgreSQL cut off behind a TCP proxy the test
runs, and a job's model file replaced or removed after ``submit``. Each test proves its fault happened and ends
with the job in a stated state, exactly one row per item and exact counters, within a bound.

The machine's own Redis and PostgreSQL are never stopped: the Redis here is the test's own ``redis-server`` on a
free port, and the PostgreSQL outage is a proxy in front of it that the test cuts.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from db.catalog import get_job, iter_items
from db.session import session_scope
from tests.fixtures.net import TcpProxy, free_port
from tests.images import example_files
from tests.test_worker import ROOT, invsort, start_worker, stop_worker, wait_for, worker_env

pytestmark = pytest.mark.slow

FAST_RECONCILER = dict(INVSORT_RECONCILE_INTERVAL_S="2", INVSORT_REQUEUE_GRACE_S="3",
                       INVSORT_HEARTBEAT_INTERVAL_S="1")


REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


@pytest.fixture
def own_redis(tmp_path) -> Iterator[tuple[str, Path]]:
    """A ``redis-server`` of this test on a free port, with no persistence (no RDB snapshots, no AOF)."""
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not installed (.ci/run installs it)")
    port = free_port()
    conf = tmp_path / "redis.conf"
    conf.write_text(f"port {port}\nbind 127.0.0.1\nsave \"\"\nappendonly no\ndir {tmp_path}\n")
    procs = []

    def start() -> None:
        procs.append(subprocess.Popen([REDIS_SERVER, str(conf)], stdout=subprocess.DEVNULL))
        client = redis.Redis(port=port)
        wait_for(lambda: _pings(client), 10, "redis-server answers")

    start()
    yield f"redis://127.0.0.1:{port}/0", conf
    with contextlib.suppress(redis.ConnectionError):  # whichever redis-server answers now (may be a restarted one)
        redis.Redis(port=port).shutdown(nosave=True)
    for p in procs:
        if p.poll() is None:
            p.terminate()
            p.wait(timeout=10)


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False


def photos(tmp_path: Path, n: int) -> Path:
    src = tmp_path / "photos"
    for f in example_files()[:n]:
        (src / f.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(f, src / f.parent.name / f.name)
    return src


def submit_job(env: dict[str, str], source: Path, *args: str) -> str:
    out = subprocess.run(invsort("submit", str(source), *args), cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout.split()[1].rstrip(":")


def job_of(url: str, job_id: str):
    with session_scope(url) as session:
        return get_job(session=session, job_id=job_id)


def rows_of(url: str, job_id: str):
    with session_scope(url) as session:
        return list(iter_items(session=session, job_id=job_id))


def ended(url: str, job_id: str):
    return lambda: (job := job_of(url, job_id)).status in ("done", "failed", "cancelled") and job


def assert_exact(url: str, job_id: str, n: int):
    """The job is done with n items: one row per item, none duplicated, counters equal to the rows."""
    job = job_of(url, job_id)
    rows = rows_of(url, job_id)
    assert job.status == "done", job
    assert len(rows) == len({r.item_id for r in rows}) == n == job.total_items == job.processed
    counts = {s: sum(r.status == s for r in rows) for s in ("sorted", "needs_review", "failed")}
    assert (job.sorted_count, job.needs_review_count, job.failed_count) == (
        counts["sorted"], counts["needs_review"], counts["failed"])
    assert job.batches_done == job.total_batches
    return job, rows


def test_redis_restarted_without_persistence_mid_job_only_workers_running_job_ends_done(
        pg_url, s3_server, own_redis, tmp_path):
    """The queue loses every queued and unacknowledged task; the workers' reconciler enqueues them again."""
    broker_url, _ = own_redis
    src = photos(tmp_path, 40)
    env = {**worker_env(pg_url, s3_server, broker_url), **FAST_RECONCILER, "INVSORT_LOCAL_ROOTS": str(src),
           "INVSORT_ITEMS_PER_TASK": "2"}
    client = redis.Redis.from_url(broker_url)
    log = tmp_path / "w.log"
    worker = start_worker(env, "w", log, own_session=True)
    try:
        wait_for(lambda: " ready." in log.read_text(), 60, "the worker is ready", (log,))
        os.killpg(worker.pid, signal.SIGSTOP)  # freeze the worker so the job is mid-way when Redis goes
        job_id = submit_job(env, src)
        queued = client.llen("invsort")
        os.killpg(worker.pid, signal.SIGCONT)
        wait_for(lambda: job_of(pg_url, job_id).batches_done >= 2, 60, "some batches are done", (log,), poll_s=0.01)
        os.killpg(worker.pid, signal.SIGSTOP)
        before = job_of(pg_url, job_id)
        in_redis = client.llen("invsort") + client.hlen("unacked")
        client.shutdown(nosave=True)  # Redis goes down without saving: every task in it is gone
        restarted_at = time.monotonic()
        subprocess.Popen([REDIS_SERVER, str(own_redis[1])], stdout=subprocess.DEVNULL)
        wait_for(lambda: _pings(client), 10, "redis-server is back")
        assert client.llen("invsort") == 0 and client.hlen("unacked") == 0  # the fault: the queue is empty
        os.killpg(worker.pid, signal.SIGCONT)
        job = wait_for(ended(pg_url, job_id), 120, "the job ends after the restart", (log,))
        took = time.monotonic() - restarted_at
    finally:
        with_cont(worker)
        stop_worker(worker)
    # proof the fault hit the job: it was mid-way and Redis held tasks of it when it went down
    # (queued: 20 tasks, or 19 when the frozen worker's BRPOP, already waiting in Redis, took the first one)
    assert 2 <= before.batches_done < before.total_batches and in_redis > 0 and queued in (19, 20)
    assert job.status == "done"
    assert_exact(pg_url, job_id, 40)
    assert "enqueued again" in log.read_text()
    print(f"Redis restarted with {in_redis} tasks in it after {before.batches_done}/20 batches: done {took:.1f} s "
          "later")


def with_cont(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGCONT)


DECODE_HOOK = '''
import ctypes
import threading

import pipeline.inference.streaming as streaming

_decode = streaming.decode_image


def _decode_or_fail(data, *args, **kwargs):
    if b"INVSORT-TEST-POISON" in bytes(data[-64:]):
        ctypes.string_at(0)  # a real SIGSEGV, as a native decoder's bug would give
    if b"INVSORT-TEST-HANG" in bytes(data[-64:]):
        threading.Event().wait()  # hangs for ever, as a stuck native decoder would
    return _decode(data, *args, **kwargs)


streaming.decode_image = _decode_or_fail
'''


def marked_photos(tmp_path: Path, n: int, index: int, marker: bytes) -> tuple[Path, Path, Path]:
    """``n`` example photos with ``marker`` appended to the ``index``-th (still a valid PNG: bytes after IEND), and a
    folder holding a ``sitecustomize.py`` that makes the worker's decoder crash or hang on the marked photo (give it
    to the worker alone, in ``PYTHONPATH``). Returns ``(photos, the marked photo, the hook folder)``."""
    src = photos(tmp_path, n)
    marked = sorted(src.rglob("*.png"))[index]
    marked.write_bytes(marked.read_bytes() + marker)
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(DECODE_HOOK)
    return src, marked, hook


def sort_with_a_marked_photo(pg_url: str, s3_server: str, broker_url: str, tmp_path: Path, n: int, index: int,
                             marker: bytes, *, bound_s: float, **env: str) -> tuple[Any, Path, str, float]:
    """Queue a job of :func:`marked_photos` (one batch), run one worker with the decoder hook until the job ends
    (within ``bound_s`` seconds), and return ``(job, the marked photo, the worker's log, seconds taken)``."""
    src, marked, hook = marked_photos(tmp_path, n, index, marker)
    env = {**worker_env(pg_url, s3_server, broker_url), **FAST_RECONCILER, "INVSORT_LOCAL_ROOTS": str(src),
           "INVSORT_ITEMS_PER_TASK": str(n), "PYTHONPATH": str(hook), **env}
    job_id = submit_job({**env, "PYTHONPATH": ""}, src)
    log = tmp_path / "w.log"
    started = time.monotonic()
    worker = start_worker(env, "w", log)
    try:
        job = wait_for(ended(pg_url, job_id), bound_s, "the job ends", (log,))
    finally:
        stop_worker(worker)
    return job, marked, log.read_text(), time.monotonic() - started


def test_a_poison_image_that_crashes_the_worker_fails_alone_and_its_batch_is_written(
        pg_url, s3_server, own_redis, tmp_path):
    job, poison, text, took = sort_with_a_marked_photo(pg_url, s3_server, own_redis[0], tmp_path, 12, 5,
                                                       b"INVSORT-TEST-POISON", bound_s=180)
    crashes = text.count("exited with 'signal 11 (SIGSEGV)'")
    # the fault: the worker's pool process really died: once running the whole batch, then poison_crashes (2)
    # times on the poison item when the batch ran item by item; redelivery did not loop for ever
    assert crashes == 3, text[-3000:]
    assert job.status == "done"
    job, rows = assert_exact(pg_url, job.id, 12)
    failed = [r for r in rows if r.status == "failed"]
    assert [r.image_uri for r in failed] == [poison.as_uri()] and "poison item" in failed[0].error
    print(f"poison image: {crashes} worker crashes, job done in {took:.1f} s with 11 rows sorted and 1 failed")


def test_a_job_whose_model_file_is_replaced_or_removed_after_submit_fails_with_the_reason(
        pg_url, s3_server, own_redis, tmp_path):
    import pipeline.assets

    broker_url, _ = own_redis
    src = photos(tmp_path, 6)
    bundled = Path(pipeline.assets.__file__).parent / "fashion_mnist_cnn.pt"
    replaced, removed = tmp_path / "replaced.pt", tmp_path / "removed.pt"
    shutil.copy(bundled, replaced)
    shutil.copy(bundled, removed)
    env = {**worker_env(pg_url, s3_server, broker_url), **FAST_RECONCILER, "INVSORT_LOCAL_ROOTS": str(src),
           "INVSORT_ITEMS_PER_TASK": "3"}
    job_replaced = submit_job(env, src, "--model", str(replaced))
    job_removed = submit_job(env, src, "--model", str(removed))
    # another model under the same path: the bundled one with another review threshold (another version)
    from dataclasses import replace

    from pipeline.models.modelfile import load_model_file, save_model_file

    mf = load_model_file(str(replaced))
    save_model_file(replace(mf, review_threshold=0.5), replaced)
    assert load_model_file(str(replaced)).version != mf.version
    removed.unlink()
    log = tmp_path / "w.log"
    started = time.monotonic()
    worker = start_worker(env, "w", log)
    try:
        a = wait_for(ended(pg_url, job_replaced), 120, "the replaced-model job ends", (log,))
        b = wait_for(ended(pg_url, job_removed), 120, "the removed-model job ends", (log,))
    finally:
        stop_worker(worker)
    took = time.monotonic() - started
    assert a.status == "failed" and a.model_version in a.error and "replaced.pt" in a.error, a.error
    assert b.status == "failed" and "removed.pt" in b.error, b.error
    assert rows_of(pg_url, job_replaced) == [] and rows_of(pg_url, job_removed) == []
    print(f"model replaced / removed after submit: both jobs failed within {took:.1f} s\n  {a.error}\n  {b.error}")


def test_postgresql_unreachable_for_30_s_mid_job_the_job_ends_done_with_every_item_once(
        pg_url, s3_server, own_redis, tmp_path):
    from sqlalchemy.engine import make_url

    broker_url, _ = own_redis
    url = make_url(pg_url)
    proxy = TcpProxy((url.host or "127.0.0.1", url.port or 5432))
    proxied = url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    src = photos(tmp_path, 40)
    env = {**worker_env(proxied, s3_server, broker_url), **FAST_RECONCILER, "INVSORT_LOCAL_ROOTS": str(src),
           "INVSORT_ITEMS_PER_TASK": "2"}
    log = tmp_path / "w.log"
    worker = start_worker(env, "w", log, own_session=True)
    try:
        wait_for(lambda: " ready." in log.read_text(), 60, "the worker is ready", (log,))
        os.killpg(worker.pid, signal.SIGSTOP)
        job_id = submit_job(env, src)
        os.killpg(worker.pid, signal.SIGCONT)
        wait_for(lambda: job_of(pg_url, job_id).batches_done >= 2, 60, "some batches are done", (log,), poll_s=0.01)
        proxy.cut()
        cut_at = time.monotonic()
        during = job_of(pg_url, job_id)  # straight to PostgreSQL, not through the proxy
        time.sleep(30)
        still = job_of(pg_url, job_id)
        proxy.restore()
        job = wait_for(ended(pg_url, job_id), 300, "the job ends after the outage", (log,))
        took = time.monotonic() - cut_at
    finally:
        with_cont(worker)
        stop_worker(worker)
        proxy.close()
    # proof the outage overlapped the job: it was mid-way, made no progress while cut, workers were refused
    assert during.batches_done < during.total_batches and still.batches_done <= during.batches_done + 1
    assert proxy.refused > 0
    assert job.status == "done"
    assert_exact(pg_url, job_id, 40)
    print(f"PostgreSQL cut for 30 s at {during.batches_done}/20 batches ({proxy.refused} connections refused): "
          f"done {took:.1f} s after the cut")


def test_an_image_that_hangs_the_worker_fails_alone_after_the_time_limits_and_its_batch_is_written(
        pg_url, s3_server, own_redis, tmp_path):
    job, stuck, text, took = sort_with_a_marked_photo(pg_url, s3_server, own_redis[0], tmp_path, 8, 3,
                                                      b"INVSORT-TEST-HANG", bound_s=300, INVSORT_TASK_TIME_LIMIT_S="35")
    limits = text.count("SoftTimeLimitExceeded") + text.count("TimeLimitExceeded(35")
    assert limits >= 2, text[-3000:]  # the fault: the item really hung the task until a time limit, repeatedly
    job, rows = assert_exact(pg_url, job.id, 8)
    failed = [r for r in rows if r.status == "failed"]
    assert [r.image_uri for r in failed] == [stuck.as_uri()] and "poison item" in failed[0].error
    print(f"hanging image: {limits} time-limit hits, job done in {took:.1f} s with 7 rows sorted and 1 failed")
