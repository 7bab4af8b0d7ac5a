"""The queued job end to end: real Redis, two real Celery worker processes, S3 (moto server), PostgreSQL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from db.catalog import get_job, iter_items
from db.session import session_scope
from tests.images import BAD_IMAGES, EXAMPLES, example_files

ROOT = Path(__file__).resolve().parents[1]
REDIS_URL = "redis://127.0.0.1:6379/13"


@pytest.fixture
def broker():
    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.ping()
    except redis.ConnectionError:
        pytest.fail("Redis is not running on 127.0.0.1:6379 (.ci/run starts it)")
    client.flushdb()
    yield REDIS_URL
    client.flushdb()


def worker_env(pg_url: str, s3_endpoint: str, broker_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("INVSORT_")}
    env.update(
        INVSORT_DATABASE_URL=pg_url,
        INVSORT_BROKER_URL=broker_url,
        INVSORT_S3_ENDPOINT_URL=s3_endpoint,
        INVSORT_LOCAL_ROOTS=str(EXAMPLES),
        INVSORT_ITEMS_PER_TASK="8",
        INVSORT_BATCH_SIZE="4",
        PYTHONUNBUFFERED="1",
    )
    return env


def invsort(*args: str) -> list[str]:
    return [sys.executable, "-m", "worker.cli", *args]


@pytest.fixture
def workers(pg_url, s3_server, broker, tmp_path):
    env = worker_env(pg_url, s3_server, broker)
    procs = []
    for name in ("w1", "w2"):
        log = open(tmp_path / f"{name}.log", "wb")  # noqa: SIM115 - closed below
        procs.append((subprocess.Popen(invsort("worker", "-c", "1", "-n", f"{name}@%h", "-l", "INFO"),
                                       cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT), log))
    yield env, [tmp_path / "w1.log", tmp_path / "w2.log"]
    for proc, _ in procs:
        proc.send_signal(signal.SIGTERM)
    for proc, log in procs:
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def test_submitted_s3_job_is_sorted_by_two_workers_into_postgresql(workers, s3_bucket, pg_url, tmp_path):
    env, logs = workers
    client, bucket = s3_bucket
    for f in example_files():
        client.upload_file(str(f), bucket, f"photos/{f.parent.name}/{f.name}")
    for name, data in BAD_IMAGES.items():
        client.put_object(Bucket=bucket, Key=f"photos/bad/{name}", Body=data)
    client.put_object(Bucket=bucket, Key="photos/readme.txt", Body=b"not listed: not an image name")

    submit = subprocess.run(invsort("submit", f"s3://{bucket}/photos/", "--wait"), cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert submit.returncode == 0, submit.stdout + submit.stderr + "".join(p.read_text() for p in logs)
    job_id = submit.stdout.split()[1].rstrip(":")
    n = len(example_files()) + len(BAD_IMAGES)

    with session_scope(pg_url) as session:
        job = get_job(session=session, job_id=job_id)
        rows = list(iter_items(session=session, job_id=job_id))
    assert job.status == "done" and job.total_items == n and job.processed == n
    assert job.failed_count == len(BAD_IMAGES)
    assert len(rows) == n and len({r.item_id for r in rows}) == n
    failed = {r.image_uri.rsplit("/", 1)[1] for r in rows if r.status == "failed"}
    assert failed == set(BAD_IMAGES)
    good = [r for r in rows if r.status != "failed"]
    accuracy = sum(r.image_uri.split("/")[-2] == r.category for r in good) / len(good)
    assert accuracy >= 0.8
    # both workers took part (8 items per task, 8 tasks, prefetch 1)
    assert all("invsort.sort_batch" in p.read_text() for p in logs)

    # the same photos sorted embedded agree on every category
    embedded = subprocess.run(invsort("sort", str(EXAMPLES), "--db", f"sqlite:///{tmp_path}/e.db", "--no-progress"),
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert embedded.returncode == 0, embedded.stderr
    with session_scope(f"sqlite:///{tmp_path}/e.db") as session:
        local = {"/".join(r.image_uri.split("/")[-2:]): r.category for r in iter_items(session=session)}
    queued = {"/".join(r.image_uri.split("/")[-2:]): r.category for r in good}
    assert queued == local

    status = subprocess.run(invsort("status", job_id), cwd=ROOT, env=env, capture_output=True, text=True)
    assert status.returncode == 0 and "done" in status.stdout and f"{n}/{n}" in status.stdout


def test_task_messages_are_json_only(broker, pg_url, s3_server):
    env = worker_env(pg_url, s3_server, broker)
    code = (
        "from worker.app import app; c = app.conf;"
        "print(c.task_serializer, c.accept_content, c.task_acks_late, c.worker_prefetch_multiplier,"
        " c.task_reject_on_worker_lost)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert out.stdout.split() == ["json", "['json']", "True", "1", "True"]


def test_submit_refuses_a_non_model_file_before_queueing(broker, pg_url, s3_server, tmp_path):
    env = worker_env(pg_url, s3_server, broker)
    out = subprocess.run(invsort("submit", str(EXAMPLES), "--model", str(ROOT / "pyproject.toml")), cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "not an invsort model file" in out.stderr
    assert redis.Redis.from_url(broker).llen("invsort") == 0


def test_worker_killed_mid_job_loses_nothing(pg_url, s3_server, broker, tmp_path):
    """A worker SIGKILLed while it holds tasks: acks_late + reject_on_worker_lost redeliver them."""
    env = worker_env(pg_url, s3_server, broker)
    env["INVSORT_ITEMS_PER_TASK"] = "2"
    env["INVSORT_VISIBILITY_TIMEOUT_S"] = "5"
    submit = subprocess.run(invsort("submit", str(EXAMPLES)), cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=120)
    assert submit.returncode == 0, submit.stderr
    job_id = submit.stdout.split()[1].rstrip(":")
    victim = subprocess.Popen(invsort("worker", "-c", "1", "-n", "victim@%h"), cwd=ROOT, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        with session_scope(pg_url) as session:
            if get_job(session=session, job_id=job_id).processed > 0:
                break
        time.sleep(0.2)
    os.killpg(victim.pid, signal.SIGKILL)  # the main process and its pool child, mid-job
    victim.wait()
    time.sleep(6)  # past the 5 s visibility timeout: the rescuer's first sweep already finds the tasks
    rescuer = subprocess.Popen(invsort("worker", "-c", "1", "-n", "rescuer@%h"), cwd=ROOT, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 180
        while time.time() < deadline:
            with session_scope(pg_url) as session:
                job = get_job(session=session, job_id=job_id)
            if job.status == "done":
                break
            time.sleep(0.5)
    finally:
        rescuer.terminate()
        rescuer.wait(timeout=30)
    assert job.status == "done", job
    with session_scope(pg_url) as session:
        rows = list(iter_items(session=session, job_id=job_id))
    assert len(rows) == 50 and job.processed == 50  # nothing lost, nothing counted twice
