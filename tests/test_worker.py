"""The queued job end to end: real Redis, two real Celery worker processes, S3 (moto server), PostgreSQL."""

from __future__ import annotations

import base64
import contextlib
import json
import math
import os
import pickle
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import pytest
import redis
from celery import Celery
from sqlalchemy import func, select

from db.catalog import get_job, iter_items
from db.models import SortingJobBatch
from db.session import session_scope
from tests.images import BAD_IMAGES, EXAMPLES, example_files

T = TypeVar("T")

ROOT = Path(__file__).resolve().parents[1]
REDIS_URL = "redis://127.0.0.1:6379/13"


@contextlib.contextmanager
def flushed_redis(url: str) -> Iterator[redis.Redis]:
    """The machine's Redis database ``url``, emptied before and after the block (fails the test when Redis is not
    running)."""
    client = redis.Redis.from_url(url)
    try:
        client.ping()
    except redis.ConnectionError:
        pytest.fail("Redis is not running on 127.0.0.1:6379 (.ci/run starts it)")
    client.flushdb()
    try:
        yield client
    finally:
        client.flushdb()


@pytest.fixture
def broker():
    with flushed_redis(REDIS_URL):
        yield REDIS_URL


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


@pytest.mark.slow
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


@pytest.mark.slow  # a real process against the real Redis; in-process: tests/test_cli.py and test_sorting.py
def test_submit_refuses_a_non_model_file_before_queueing(broker, pg_url, s3_server, tmp_path):
    env = worker_env(pg_url, s3_server, broker)
    out = subprocess.run(invsort("submit", str(EXAMPLES), "--model", str(ROOT / "pyproject.toml")), cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "not an invsort model file" in out.stderr
    assert redis.Redis.from_url(broker).llen("invsort") == 0




def start_worker(env: dict[str, str], name: str, log_path: Path, *, own_session: bool = False) -> subprocess.Popen:
    """``invsort worker -c 1`` (one pool process, prefetch 1) logging at INFO into ``log_path``."""
    with open(log_path, "wb") as log:
        return subprocess.Popen(invsort("worker", "-c", "1", "-n", f"{name}@%h", "-l", "INFO"), cwd=ROOT, env=env,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=own_session)


def stop_worker(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_for(condition: Callable[[], T], timeout_s: float, what: str, logs: tuple[Path, ...] = (),
             poll_s: float = 0.1) -> T:
    """Poll ``condition`` every ``poll_s`` until it returns something truthy; fail after ``timeout_s`` seconds."""
    deadline = time.monotonic() + timeout_s
    while not (value := condition()):
        if time.monotonic() > deadline:
            pytest.fail(f"not within {timeout_s} s: {what}\n" + "\n".join(p.read_text() for p in logs if p.exists()))
        time.sleep(poll_s)
    return value


def unacked_tasks(client: redis.Redis) -> dict[str, tuple[str, list[Any]]]:
    """kombu's Redis ``unacked`` hash: delivery tag -> (task id, task args) of each message a worker holds."""
    held = {}
    for tag, raw in client.hgetall("unacked").items():
        message = json.loads(raw)[0]
        assert message["content-type"] == "application/json" and message["properties"]["body_encoding"] == "base64"
        args = json.loads(base64.b64decode(message["body"]))[0]
        held[tag.decode()] = (message["headers"]["id"], args)
    return held


def log_time(log: Path, text: str) -> datetime:
    """The timestamp of the first line of a worker log that contains ``text``."""
    line = next(line for line in log.read_text().splitlines() if text in line)
    return datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")


def batch_updated_at(pg_url: str, job_id: str, batch_no: int) -> datetime | None:
    """When ``record_batch`` last wrote batch ``batch_no`` of the job; None while it is not recorded."""
    with session_scope(pg_url) as session:
        return session.execute(select(SortingJobBatch.updated_at).where(
            SortingJobBatch.job_id == job_id, SortingJobBatch.batch_no == batch_no,
            SortingJobBatch.state.in_(("done", "failed")))).scalar()


def batch_items(pg_url: str, job_id: str, batch_no: int) -> list[list[str]]:
    """The ``[[item_id, image_uri], ...]`` that ``submit`` stored for a batch (while it is not done)."""
    with session_scope(pg_url) as session:
        return session.execute(select(SortingJobBatch.items).where(
            SortingJobBatch.job_id == job_id, SortingJobBatch.batch_no == batch_no)).scalar_one()


def recorded_batches(pg_url: str, job_id: str, before: datetime | None = None) -> tuple[int, int]:
    """(batches, items) recorded for the job, last written before ``before`` if given."""
    b = SortingJobBatch
    stmt = select(func.count(), func.coalesce(func.sum(b.sorted_count + b.needs_review_count + b.failed_count), 0)
                  ).where(b.job_id == job_id, b.state.in_(("done", "failed")))
    if before is not None:
        stmt = stmt.where(b.updated_at < before)
    with session_scope(pg_url) as session:
        return tuple(session.execute(stmt).one())


def submit(env: dict[str, str], *args: str) -> str:
    out = subprocess.run(invsort("submit", *args), cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout.split()[1].rstrip(":")


def job_done(pg_url: str, job_id: str) -> Callable[[], Any]:
    def done() -> Any:
        with session_scope(pg_url) as session:
            job = get_job(session=session, job_id=job_id)
        return job if job.status == "done" else None
    return done


class _MkdirOnUnpickle:
    """Pickles to ``os.mkdir(path)``: deserialising the pickle (nothing else) creates the directory ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return os.mkdir, (self.path,)


@pytest.mark.slow
def test_worker_refuses_a_pickle_task_message_without_deserialising_it(pg_url, s3_server, broker, tmp_path):
    """A pickle message for invsort.sort_batch, whose unpickling would create a directory, is discarded unread."""
    env = worker_env(pg_url, s3_server, broker)
    env["INVSORT_ITEMS_PER_TASK"] = "2"
    client = redis.Redis.from_url(broker)
    marker, control = tmp_path / "unpickled-1", tmp_path / "unpickled-2"  # same length: one payload serves both
    item_id = f"pickle-{uuid.uuid4().hex}"
    image = example_files()[0]

    sender = Celery("pickle-sender", broker=broker)
    sender.conf.update(task_default_queue="invsort", task_serializer="pickle", accept_content=["pickle"])
    try:
        sent = sender.send_task("invsort.sort_batch", serializer="pickle",
                                args=[str(uuid.uuid4()), 0, [[item_id, image.as_uri()]], _MkdirOnUnpickle(marker)])
    finally:
        sender.close()
    queued = json.loads(client.lindex("invsort", 0))
    assert queued["content-type"] == "application/x-python-serialize" and queued["headers"]["id"] == sent.id
    assert queued["headers"]["task"] == "invsort.sort_batch"
    body = base64.b64decode(queued["body"])
    assert body.count(str(marker).encode()) == 1
    # the queued payload is live: unpickled here with the marker renamed, it runs os.mkdir
    pickle.loads(body.replace(str(marker).encode(), str(control).encode()))  # noqa: S301 - the point of the test
    assert control.is_dir()

    job_id = submit(env, str(EXAMPLES), "--limit", "2")  # one JSON task, queued behind the pickle one
    assert client.llen("invsort") == 2
    log = tmp_path / "worker.log"
    worker = start_worker(env, "w", log)
    try:
        wait_for(job_done(pg_url, job_id), 60, "the JSON task queued after the pickle one is done", (log,))
        assert not marker.exists(), "the worker unpickled the message"  # it took the pickle one first (FIFO)
        wait_for(lambda: "Refusing to deserialize" in log.read_text(), 10, "the refusal is logged", (log,))
    finally:
        stop_worker(worker)
    text = log.read_text()
    assert "Refusing to deserialize untrusted content of type pickle (application/x-python-serialize)" in text
    assert f"[{sent.id}] received" not in text  # never became a task request
    assert not marker.exists()
    assert client.llen("invsort") == 0 and client.hlen("unacked") == 0  # discarded, not waiting for redelivery
    with session_scope(pg_url) as session:
        assert all(r.item_id != item_id for r in iter_items(session=session))


@pytest.mark.slow
def test_worker_killed_holding_a_task_has_it_rerun_by_another_worker(pg_url, s3_server, broker, tmp_path):
    """Worker A is SIGKILLed holding an unfinished task; worker B gets it after the visibility timeout and runs it.

    acks_late leaves the message in kombu's ``unacked`` hash while A works on it; with a 5 s visibility timeout
    (swept every 2 s) B restores it and runs it, and the job ends done with every item once, within 60 s.
    """
    env = worker_env(pg_url, s3_server, broker)
    env["INVSORT_ITEMS_PER_TASK"] = "2"
    env["INVSORT_VISIBILITY_TIMEOUT_S"] = "5"
    client = redis.Redis.from_url(broker)
    n = len(example_files())
    batches = math.ceil(n / 2)
    job_id = submit(env, str(EXAMPLES))
    assert client.llen("invsort") == batches
    a_log, b_log = tmp_path / "a.log", tmp_path / "b.log"

    def frozen_holding_an_unfinished_task() -> tuple[str, str, list[Any]] | None:
        """Freeze A (SIGSTOP); if it holds one task it has not finished, return it frozen, else let it go on."""
        with session_scope(pg_url) as session:
            if get_job(session=session, job_id=job_id).batches_done == 0:
                return None  # mid-job: A has finished some batches first
        os.killpg(a.pid, signal.SIGSTOP)  # the main process and its pool child: nothing moves while we look
        held = unacked_tasks(client)
        if len(held) == 1:
            ((tag, (task_id, args)),) = held.items()
            if f"[{task_id}] received" in a_log.read_text() and batch_updated_at(pg_url, job_id, args[1]) is None:
                return tag, task_id, args
        os.killpg(a.pid, signal.SIGCONT)  # between two tasks: try again
        return None

    a = start_worker(env, "a", a_log, own_session=True)
    try:
        tag, task_id, args = wait_for(frozen_holding_an_unfinished_task, 60, "worker A holds a task", (a_log,),
                                       poll_s=0.01)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(a.pid, signal.SIGKILL)
        a.wait(timeout=10)
    killed_at = datetime.now(UTC)
    batch_no = args[1]
    items = batch_items(pg_url, job_id, batch_no)  # tasks name a batch the database holds
    assert a.returncode == -signal.SIGKILL
    # A died holding it: received, never acknowledged, never finished; other batches it did finish
    assert unacked_tasks(client) == {tag: (task_id, args)}
    assert f"[{task_id}] succeeded" not in a_log.read_text()
    assert batch_updated_at(pg_url, job_id, batch_no) is None
    with session_scope(pg_url) as session:
        job = get_job(session=session, job_id=job_id)
    assert job.status == "running" and 0 < job.batches_done < batches
    done_by_a = recorded_batches(pg_url, job_id)
    assert done_by_a[0] == job.batches_done

    b = start_worker(env, "b", b_log)
    started = time.monotonic()
    try:
        job = wait_for(job_done(pg_url, job_id), 60, "worker B finishes the job", (a_log, b_log))
        elapsed = time.monotonic() - started
    finally:
        stop_worker(b)
    b_text = b_log.read_text()
    assert f"[{task_id}] succeeded" in b_text
    # B got it from kombu's sweep of unacked messages: not before the 5 s visibility timeout since A took it
    # (less the milliseconds between kombu's timestamp and A's log line), and the sweep runs every 2 s, so within
    # 5 s (2 s + slack) of the later of that timeout and B being ready
    a_took, b_took = log_time(a_log, f"[{task_id}] received"), log_time(b_log, f"[{task_id}] received")
    assert (b_took - a_took).total_seconds() >= 4.9
    assert (b_took - max(a_took + timedelta(seconds=5), log_time(b_log, " ready."))).total_seconds() < 5
    assert batch_updated_at(pg_url, job_id, batch_no) > killed_at  # written by B, after A died
    assert client.llen("invsort") == 0 and client.hlen("unacked") == 0

    with session_scope(pg_url) as session:
        rows = list(iter_items(session=session, job_id=job_id))
    by_id = {r.item_id: r for r in rows}
    assert len(rows) == len(by_id) == n
    assert {"/".join(r.image_uri.split("/")[-2:]) for r in rows} == {
        f"{f.parent.name}/{f.name}" for f in example_files()}
    assert all(by_id[item_id].updated_at > killed_at for item_id, _ in items)
    counts = {s: sum(r.status == s for r in rows) for s in ("sorted", "needs_review", "failed")}
    assert (job.total_items, job.processed, job.total_batches, job.batches_done) == (n, n, batches, batches)
    assert (job.sorted_count, job.needs_review_count, job.failed_count) == (
        counts["sorted"], counts["needs_review"], counts["failed"])
    # A's finished batches were acknowledged: nobody ran them again
    assert recorded_batches(pg_url, job_id, before=killed_at) == done_by_a
    assert sum(r.updated_at < killed_at for r in rows) == done_by_a[1]
    print(f"A held batch {batch_no} ({task_id}) after {done_by_a} batches; B took it {b_took - a_took} later, "
          f"finished in {elapsed:.1f} s")
