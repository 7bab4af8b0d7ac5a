"""Queued jobs that never hang (pipeline/jobs.py, db/jobs.py) on real SQLite and PostgreSQL and real images,
without Celery: the batch states a crash, a poison item, a lost task, a missing model or a cancel leave behind are
written into the database as a dead worker would have left them, then the real code runs on them. The same faults
with real worker processes, a real Redis and a real crash are in tests/test_faults.py."""

import shutil
import sys
import time
from datetime import UTC, datetime, timedelta

import pytest
from prometheus_client import CollectorRegistry
from sqlalchemy import text

from db.catalog import JobStateError, get_job, iter_items
from db.jobs import get_batch
from db.session import session_scope
from pipeline.jobs import BatchBusy, Reconciler, cancel, retry, run_batch
from pipeline.settings import build_settings
from pipeline.sorting import submit_job
from tests.images import example_files
from worker.metrics import WorkerMetrics

MODEL = "bundled:fashion_mnist_cnn"


def _submit(db_url, tmp_path, n=10, per_task=4, model=MODEL, **overrides):
    src = tmp_path / "photos"
    for f in example_files()[:n]:
        (src / f.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(f, src / f.parent.name / f.name)
    settings = build_settings(database_url=db_url, items_per_task=per_task, batch_size=4, device="cpu",
                              local_roots=str(src), **overrides)
    queue: list[tuple[str, int, str]] = []
    job_id, total, batches = submit_job(str(src), settings=settings, model_spec=model,
                                        enqueue=lambda *task: queue.append(task))
    return settings, job_id, queue


def _set(db_url, job_id, batch_no, **values):
    cols = ", ".join(f"{k} = :{k}" for k in values)
    with session_scope(db_url) as session:
        session.execute(text(f"UPDATE sorting_job_batches SET {cols} WHERE job_id = :j AND batch_no = :b"),
                        {**values, "j": job_id, "b": batch_no})


def _batch(db_url, job_id, batch_no):
    with session_scope(db_url) as session:
        return get_batch(session=session, job_id=job_id, batch_no=batch_no)


def _job(db_url, job_id):
    with session_scope(db_url) as session:
        return get_job(session=session, job_id=job_id)


def _rows(db_url, job_id):
    with session_scope(db_url) as session:
        return {r.item_id: r for r in iter_items(session=session, job_id=job_id)}


def _only_job(db_url, job_id):
    """The reconciler looks at every job of the database: leave only this test's (and no lease)."""
    with session_scope(db_url) as session:
        session.execute(text("DELETE FROM sorting_jobs WHERE id != :j"), {"j": job_id})
        session.execute(text("DELETE FROM leases"))


def _dead_holder() -> str:
    import socket
    import subprocess

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()  # a pid of this host that has exited
    return f"{socket.gethostname()}:{proc.pid}"


def test_a_batch_whose_worker_died_runs_item_by_item_and_a_poison_item_fails_alone(db_url, tmp_path):
    settings, job_id, queue = _submit(db_url, tmp_path, n=8, per_task=8, poison_crashes=2)
    batch = _batch(db_url, job_id, 0)
    poison = batch.items[3][0]
    # The state after the batch took its worker down twice, the second time at item 3 (item-by-item mode).
    _set(db_url, job_id, 0, state="running", worker=_dead_holder(), progress=3, item_crashes=1, attempts=2,
         heartbeat_at=datetime.now(UTC))
    counts = run_batch(job_id, 0, settings=settings)

    rows = _rows(db_url, job_id)
    assert len(rows) == 5  # items 3..7: the items before 3 were written by the attempts that crashed
    assert rows[poison].status == "failed" and "poison item" in rows[poison].error
    assert all(r.status != "failed" for i, r in rows.items() if i != poison)
    assert counts["failed_count"] == 1 and sum(counts.values()) == 5
    after = _batch(db_url, job_id, 0)
    assert (after.state, after.progress, after.items) == ("done", 8, None)


def test_a_batch_whose_worker_died_in_batch_mode_is_rerun_item_by_item_from_the_start(db_url, tmp_path):
    settings, job_id, _ = _submit(db_url, tmp_path, n=6, per_task=6)
    _set(db_url, job_id, 0, state="running", worker="elsewhere:1", attempts=1,
         heartbeat_at=datetime.now(UTC) - timedelta(minutes=5))  # no heartbeat for 5 minutes
    counts = run_batch(job_id, 0, settings=settings)
    assert sum(counts.values()) == 6 and counts["failed_count"] == 0
    assert _batch(db_url, job_id, 0).progress == 6
    assert _job(db_url, job_id).status == "done"


def test_a_batch_held_by_a_live_worker_is_not_run_twice(db_url, tmp_path):
    settings, job_id, _ = _submit(db_url, tmp_path, n=4, per_task=4)
    _set(db_url, job_id, 0, state="running", worker="another-host:1", heartbeat_at=datetime.now(UTC))
    with pytest.raises(BatchBusy, match="another-host:1 is running it"):
        run_batch(job_id, 0, settings=settings)
    assert _rows(db_url, job_id) == {}


def test_a_batch_failing_max_attempts_times_has_its_items_failed_with_the_error_and_the_job_ends(db_url, tmp_path):
    settings, job_id, _ = _submit(db_url, tmp_path, n=6, per_task=3, max_batch_attempts=3)
    _set(db_url, job_id, 1, attempts=3, error="OperationalError: the database refused the batch")
    run_batch(job_id, 0, settings=settings)
    counts = run_batch(job_id, 1, settings=settings)
    assert counts["failed_count"] == 3
    rows = _rows(db_url, job_id)
    failed = [r for r in rows.values() if r.status == "failed"]
    assert len(rows) == 6 and len(failed) == 3
    assert all("gave up after 3 attempts: OperationalError: the database refused" in r.error for r in failed)
    job = _job(db_url, job_id)
    assert (job.status, job.processed, job.failed_count) == ("done", 6, 3)
    assert _batch(db_url, job_id, 1).state == "failed"


def test_a_missing_model_fails_the_job_with_the_reason_and_retry_finishes_it_once_the_model_is_back(
        db_url, tmp_path):
    from pathlib import Path

    import pipeline.assets

    model = tmp_path / "model.pt"
    shutil.copy(Path(pipeline.assets.__file__).parent / "fashion_mnist_cnn.pt", model)
    settings, job_id, queue = _submit(db_url, tmp_path, n=6, per_task=3, model=str(model))
    model.rename(tmp_path / "away.pt")
    assert run_batch(job_id, 0, settings=settings) == {}
    job = _job(db_url, job_id)
    assert job.status == "failed" and "model.pt" in job.error and "not usable" in job.error
    assert run_batch(job_id, 1, settings=settings) == {}  # the job has ended: nothing to do
    assert _rows(db_url, job_id) == {}  # no rows: the items keep what earlier jobs wrote

    (tmp_path / "away.pt").rename(model)
    again: list = []
    assert retry(settings, job_id, lambda *task: again.append(task)) == 2
    assert [no for _, no, _ in again] == [0, 1] and all(tid.endswith(":r1") for _, _, tid in again)
    for jid, no, _ in again:
        run_batch(jid, no, settings=settings)
    job = _job(db_url, job_id)
    assert (job.status, job.processed, job.error) == ("done", 6, None)
    assert len(_rows(db_url, job_id)) == 6


def test_cancel_skips_the_queued_batches_and_retry_runs_them(db_url, tmp_path):
    settings, job_id, queue = _submit(db_url, tmp_path, n=9, per_task=3)
    run_batch(job_id, 0, settings=settings)
    assert cancel(settings, job_id) is True and cancel(settings, job_id) is False
    assert run_batch(job_id, 1, settings=settings) == {}
    job = _job(db_url, job_id)
    assert (job.status, job.processed) == ("cancelled", 3)
    assert [_batch(db_url, job_id, n).state for n in range(3)] == ["done", "cancelled", "cancelled"]
    again: list = []
    assert retry(settings, job_id, lambda *task: again.append(task)) == 2
    for jid, no, _ in again:
        run_batch(jid, no, settings=settings)
    job = _job(db_url, job_id)
    assert (job.status, job.processed) == ("done", 9) and len(_rows(db_url, job_id)) == 9
    with pytest.raises(JobStateError, match="embedded"):
        from pipeline.sorting import sort_source

        outcome = sort_source(str(tmp_path / "photos"), settings=settings, model_spec=MODEL)
        _set(db_url, outcome.job_id, 0, state="failed")
        with session_scope(db_url) as session:
            session.execute(text("UPDATE sorting_jobs SET status = 'failed' WHERE id = :j"), {"j": outcome.job_id})
        retry(settings, outcome.job_id, lambda *task: None)


def test_the_reconciler_enqueues_lost_batches_again_and_gives_up_after_max_requeues(db_url, tmp_path):
    settings, job_id, queue = _submit(db_url, tmp_path, n=9, per_task=3, requeue_grace_s=1, max_requeues=1,
                                      heartbeat_interval_s=1)
    _only_job(db_url, job_id)
    broker = {tid for _, _, tid in queue}  # what the broker holds
    requeued: list[tuple[str, int, str]] = []
    registry = CollectorRegistry()
    metrics = WorkerMetrics(registry)
    reconciler = Reconciler(settings, enqueue=lambda *t: requeued.append(t), broker_task_ids=lambda: set(broker),
                            holder="test-a", observer=metrics)
    time.sleep(1.2)
    assert reconciler.run_once()["requeued"] == 0  # all three are in the broker
    broker.discard(f"{job_id}:1")  # the queue lost batch 1 (Redis restarted without persistence)
    # A batch running on a worker that stopped beating (and whose task the broker no longer holds):
    _set(db_url, job_id, 2, state="running", worker="gone:1", heartbeat_at=datetime.now(UTC) - timedelta(minutes=1))
    broker.discard(f"{job_id}:2")
    assert reconciler.run_once()["requeued"] == 0  # absent once: could be a message in flight
    assert reconciler.run_once()["requeued"] == 2
    assert sorted(requeued) == [(job_id, 1, f"{job_id}:1:r1"), (job_id, 2, f"{job_id}:2:r1")]
    other = Reconciler(settings, enqueue=lambda *t: requeued.append(t), broker_task_ids=set, holder="test-b")
    assert other.run_once() == dict(requeued=0, given_up=0, listing_failed=0, completed=0)  # test-a holds the lease

    run_batch(job_id, 0, settings=settings)
    run_batch(job_id, 2, settings=settings)  # its re-enqueued task: the dead holder's batch, item by item
    time.sleep(1.2)  # batch 1's second task is lost too: at max_requeues its items fail with the reason
    reconciler.run_once()
    report = reconciler.run_once()
    assert report["given_up"] == 1
    job = _job(db_url, job_id)
    assert (job.status, job.processed, job.failed_count) == ("done", 9, 3)
    failed = [r for r in _rows(db_url, job_id).values() if r.status == "failed"]
    assert len(failed) == 3 and all("lost 2 times" in r.error for r in failed)
    # the worker's metrics count what the reconciler gave up, as they count what tasks write
    assert registry.get_sample_value("invsort_worker_images_total", {"status": "failed"}) == 3
    assert registry.get_sample_value("invsort_worker_failures_total", {"reason": "lost"}) == 3


def test_the_reconciler_fails_a_job_whose_listing_stopped(db_url, tmp_path):
    settings, job_id, _ = _submit(db_url, tmp_path, n=3, per_task=3)
    _only_job(db_url, job_id)
    with session_scope(db_url) as session:
        session.execute(text("UPDATE sorting_jobs SET status = 'listing', updated_at = :t WHERE id = :j"),
                        {"t": datetime.now(UTC) - timedelta(hours=1), "j": job_id})
    report = Reconciler(settings, enqueue=lambda *t: None, broker_task_ids=set, holder="x").run_once()
    assert report["listing_failed"] == 1
    job = _job(db_url, job_id)
    assert job.status == "failed" and "listing stopped" in job.error


@pytest.mark.slow  # a real Redis (db 13, as tests/test_worker.py) for the re-enqueued tasks; real processes
def test_jobs_cancel_and_retry_on_the_command_line(pg_url, tmp_path):
    """``invsort jobs cancel|retry`` as a user runs them (a process of their own: its Celery app is made from its
    own settings, so the re-enqueued tasks land in the test's Redis database)."""
    import json
    import os
    import subprocess

    import redis

    broker = "redis://127.0.0.1:6379/13"
    client = redis.Redis.from_url(broker)
    client.flushdb()
    settings, job_id, _ = _submit(pg_url, tmp_path, n=6, per_task=3)
    env = {k: v for k, v in os.environ.items() if not k.startswith("INVSORT_")}
    env["INVSORT_BROKER_URL"] = broker

    def invsort(*args):
        return subprocess.run([sys.executable, "-m", "worker.cli", *args, "--db", pg_url], env=env,
                              capture_output=True, text=True, timeout=120)

    out = invsort("jobs", "cancel", job_id)
    assert out.returncode == 0 and f"job {job_id} cancelled" in out.stdout, out.stdout + out.stderr
    assert "already ended" in invsort("jobs", "cancel", job_id).stdout
    out = invsort("jobs", "retry", job_id)
    assert out.returncode == 0 and "2 batch(es) queued again" in out.stdout, out.stdout + out.stderr
    queued = [json.loads(m)["headers"]["id"] for m in client.lrange("invsort", 0, -1)]
    assert sorted(queued) == [f"{job_id}:0:r1", f"{job_id}:1:r1"]
    assert _job(pg_url, job_id).status == "running"
    missing = invsort("jobs", "cancel", "no-such-job")
    assert missing.returncode == 1 and "no sorting job 'no-such-job'" in missing.stdout + missing.stderr
    assert "Traceback" not in missing.stderr
    client.flushdb()
