"""Webhooks (db/webhooks.py, pipeline/webhooks.py, worker/webhooks.py, ``invsort webhooks``): real HTTP to a receiver
on 127.0.0.1 that verifies every signature with the README's own snippet, on real SQLite and PostgreSQL.

The receiver is down (nothing listens on its port) while the example photos are sorted and the dispatcher tries;
once it listens on the same port, every event arrives: each change of the feed, the job's completion and a
reviewer's decision, each signed, none missing, duplicates only as redeliveries of the same ``webhook-id``.
"""

from __future__ import annotations

import json
import logging
import random
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy import select, update

import db.webhooks as outbox
from db import catalog, history, jobs, migrate, reviews
from db.models import SortingJob, WebhookOutbox
from db.session import session_scope
from pipeline import webhooks
from pipeline.errors import ConfigError
from pipeline.records import ItemResult
from pipeline.settings import Settings, build_settings, webhook_signing_key
from pipeline.sorting import sort_source
from tests.fixtures.net import free_port
from tests.images import EXAMPLES
from worker.cli import main

ROOT = Path(__file__).resolve().parents[1]
SECRET = "test-webhook-secret-0123456789"


def _readme_verifier() -> Callable[..., dict[str, Any]]:
    """``verify_webhook`` as the README gives it to receivers: the receiver below runs that very code."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("### Webhooks", 1)[1]
    code = re.search(r"```python\n(.*?def verify_webhook.*?)```", section, flags=re.DOTALL)
    assert code, "README: no Python snippet with verify_webhook in the Webhooks section"
    namespace: dict[str, Any] = {}
    exec(compile(code.group(1), "README.md", "exec"), namespace)  # noqa: S102 - our own README
    return namespace["verify_webhook"]


verify_webhook = _readme_verifier()


@dataclass
class Receiver:
    """A webhook receiver on 127.0.0.1:``port``, down (nothing listens) until :meth:`up`. Every request is verified
    with the README's ``verify_webhook``; a valid one is answered 204 (or ``refuse[id]``), a bad one 401."""

    port: int
    secret: str = SECRET
    refuse: dict[str, int] = field(default_factory=dict)
    requests: list[tuple[str, bytes]] = field(default_factory=list)
    invalid: list[str] = field(default_factory=list)
    server: ThreadingHTTPServer | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks/invsort?token=abc"

    def up(self) -> None:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as a real receiver

            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers["content-length"]))
                try:
                    event = verify_webhook(receiver.secret, self.headers, body)
                    ok = event["id"] == self.headers["webhook-id"]
                except (ValueError, KeyError) as exc:
                    ok, event = False, {"error": str(exc)}
                with receiver.lock:
                    if not ok:
                        receiver.invalid.append(self.headers.get("webhook-id", "?"))
                    else:
                        receiver.requests.append((self.headers["webhook-id"], body))
                code = receiver.refuse.get(self.headers["webhook-id"], 204) if ok else 401
                self.send_response(code)
                answer = b"" if code == 204 else b"refused: not today"
                self.send_header("content-length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, name="receiver", daemon=True).start()

    def down(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    def ids(self) -> set[str]:
        with self.lock:
            return {i for i, _ in self.requests}

    def bodies(self) -> dict[str, set[bytes]]:
        found: dict[str, set[bytes]] = {}
        with self.lock:
            for i, body in self.requests:
                found.setdefault(i, set()).add(body)
        return found


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver(free_port())
    yield r
    r.down()


def _settings(url: str, receiver: Receiver | None, **extra: Any) -> Settings:
    hooks = {} if receiver is None else dict(webhook_url=receiver.url, webhook_secret=SECRET)
    return build_settings(database_url=url, webhook_backoff_s=0.05, webhook_max_backoff_s=0.4, webhook_timeout_s=3,
                          **hooks, **extra)


def _rows(url: str) -> list[Any]:
    with session_scope(url) as session:
        return list(session.execute(select(WebhookOutbox).order_by(WebhookOutbox.id)).scalars())


def _wait(what: str, check: Callable[[], bool], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"timed out after {timeout_s} s waiting for {what}"
        time.sleep(0.05)


def _pending(url: str) -> int:
    with session_scope(url) as session:
        return outbox.outbox_stats(session=session).pending


def _result(item_id: str, category: str = "Bag", job_id: str = "job-1") -> ItemResult:
    return ItemResult(item_id=item_id, image_uri=f"s3://bucket/{item_id}.jpg", status="sorted", category=category,
                      confidence=0.9, topk=[[category, 0.9]], model_name="m", model_version="v1", job_id=job_id)


@pytest.fixture
def empty_db(empty_db_url: str) -> str:
    """A migrated database of this test's own (SQLite or PostgreSQL): the tests read the whole outbox and feed."""
    migrate.upgrade(empty_db_url)
    return empty_db_url


# ------------------------------------------------------------------------------------ the outage test


def test_a_receiver_that_is_down_misses_nothing(empty_db: str, receiver: Receiver) -> None:
    url = empty_db
    settings = _settings(url, receiver)
    with webhooks.running(settings, holder="test-dispatcher") as dispatcher:
        _wait("the dispatcher's first pass", lambda: _rows(url) == [] and _cursor(url) is not None)
        outcome = sort_source(str(EXAMPLES), settings=settings)
        # Down: every event is produced, and attempts fail while nothing listens.
        _wait("the sort's events in the outbox", lambda: len(_rows(url)) == 51)
        _wait("a failed attempt", lambda: any(r.attempts > 0 and r.last_error for r in _rows(url)))
        failed = [r for r in _rows(url) if r.last_error]
        assert all(r.delivered_at is None and r.last_status is None for r in _rows(url))
        assert "ConnectError" in failed[0].last_error and receiver.requests == []
        time.sleep(0.5)  # a few more failed probes
        receiver.up()
        _wait("every event delivered", lambda: _pending(url) == 0)
        with session_scope(url) as session:
            first = history.read_changes(session=session, since=0, limit=1).changes[0]
            reviews.record_review(session=session, item_id=first.item_id, category="Sandal", reviewer="ana")
        _wait("the decision's event delivered", lambda: len(_rows(url)) == 52 and _pending(url) == 0)
        assert dispatcher.holder == "test-dispatcher"

    rows = _rows(url)
    assert receiver.invalid == [], "every request is signed with the secret"
    assert receiver.ids() == {r.event_id for r in rows}, "every event arrived, and nothing else"
    bodies = receiver.bodies()
    assert all(bodies[r.event_id] == {r.payload.encode()} for r in rows), "a redelivery sends the same body"
    assert all(r.delivered_at is not None and r.last_status == 204 and r.last_error is None for r in rows)
    assert max(r.attempts for r in rows) >= 2, "the events tried while the receiver was down were tried again"

    with session_scope(url) as session:
        changes = history.read_changes(session=session, since=0, limit=1000).changes
    events = [json.loads(r.payload) for r in rows]
    items = [e for e in events if e["type"] == "item.changed"]
    assert [e["data"] for e in items] == [c.to_json() for c in changes], "one event per change of the feed, in order"
    assert [e["id"] for e in items] == [f"change:{c.cursor}" for c in changes]
    job = [i for i, e in enumerate(events) if e["type"] == "job.completed"]
    assert len(job) == 1 and job[0] == 50, "the job's completion after its items' changes"
    data = events[50]["data"]
    assert (data["job_id"], data["status"], data["processed"], data["total_items"]) == (outcome.job_id, "done", 50, 50)
    assert events[50]["id"].startswith(f"job:{outcome.job_id}:done:")
    decision = events[51]["data"]
    assert (decision["source"], decision["changed_by"], decision["category"], decision["status"]) == \
        ("review", "ana", "Sandal", "reviewed")
    assert decision["previous_status"] in ("sorted", "needs_review")


def _cursor(url: str) -> int | None:
    with session_scope(url) as session:
        return outbox.outbox_stats(session=session).feed_cursor


# ------------------------------------------------------------------------------------------ production


def test_nothing_is_produced_without_a_url(sqlite_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = _settings(sqlite_url, None)
    assert settings.webhook_url is None
    sort_source(str(EXAMPLES), settings=settings, limit=5)
    with pytest.raises(ConfigError, match="INVSORT_WEBHOOK_URL"):
        webhooks.Dispatcher(settings)

    # A worker starts no dispatcher thread without the URL.
    from worker import webhooks as worker_webhooks

    monkeypatch.setenv("INVSORT_DATABASE_URL", sqlite_url)
    monkeypatch.delenv("INVSORT_WEBHOOK_URL", raising=False)
    monkeypatch.setattr(worker_webhooks, "get_settings", lambda: settings)
    worker_webhooks.start_webhooks()
    assert not [t for t in threading.enumerate() if t.name == "invsort-webhooks"]

    runner = CliRunner()
    result = runner.invoke(main, ["webhooks", "status", "--db", sqlite_url, "--json"], env={"INVSORT_WEBHOOK_URL": ""})
    assert result.exit_code == 0, result.output
    status = json.loads(result.output)
    assert (status["url"], status["pending"], status["delivered"], status["feed_cursor"]) == (None, 0, 0, None)
    assert status["feed_end"] == 5
    result = runner.invoke(main, ["webhooks", "run", "--once", "--db", sqlite_url], env={"INVSORT_WEBHOOK_URL": ""})
    assert result.exit_code == 1 and "INVSORT_WEBHOOK_URL is not set" in result.output
    assert _rows(sqlite_url) == []


def test_the_first_pass_starts_at_the_end_of_the_feed(sqlite_url: str, receiver: Receiver,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    with session_scope(sqlite_url) as session:
        catalog.upsert_items(session=session, rows=[_result("old-1"), _result("old-2")])
        job_id = catalog.create_job(session=session, source="s", model_path="m", model_name="m", model_version="v")
        jobs.cancel_job(session=session, job_id=job_id)  # ended before webhooks were set up: not told
    dispatcher = webhooks.Dispatcher(_settings(sqlite_url, receiver))
    receiver.up()
    report = dispatcher.run_once()
    assert (report.leader, report.produced, report.delivered) == (True, 0, 0)
    with session_scope(sqlite_url) as session:
        catalog.upsert_items(session=session, rows=[_result("old-1", "Coat"), _result("new-1")])
        catalog.upsert_items(session=session, rows=[_result("new-1")])  # changes nothing: no event
    report = dispatcher.run_once()
    assert (report.produced, report.delivered, report.failed) == (2, 2, 0)
    changed = [json.loads(body)["data"] for _, body in receiver.requests]
    assert sorted((c["item_id"], c["previous_category"], c["category"]) for c in changed) == \
        [("new-1", None, "Bag"), ("old-1", "Bag", "Coat")]
    dispatcher.close()
    assert "token=abc" not in caplog.text and SECRET not in caplog.text, "the URL's query and the secret: not logged"


def test_events_can_be_limited_to_job_completions(sqlite_url: str, receiver: Receiver) -> None:
    receiver.up()
    settings = _settings(sqlite_url, receiver, webhook_events="job.completed")
    dispatcher = webhooks.Dispatcher(settings)
    dispatcher.run_once()
    outcome = sort_source(str(EXAMPLES), settings=settings, limit=3)
    with session_scope(sqlite_url) as session:
        catalog.upsert_items(session=session, rows=[_result("x")])
    report = dispatcher.run_once()
    assert (report.produced, report.delivered) == (1, 1)
    assert [json.loads(body)["type"] for _, body in receiver.requests] == ["job.completed"]
    assert receiver.requests[0][0].startswith(f"job:{outcome.job_id}:done:")
    assert dispatcher.run_once().produced == 0, "each job is told once"
    with session_scope(sqlite_url) as session:
        assert outbox.outbox_stats(session=session).feed_cursor == 4, "the cursor moved past the item changes"
        # Retried and ended again (what jobs.retry_job and a cancel do to a queued job): a new event.
        session.execute(update(SortingJob).where(SortingJob.id == outcome.job_id).values(status="running",
                                                                                        finished_at=None))
        jobs.cancel_job(session=session, job_id=outcome.job_id)
    assert dispatcher.run_once().delivered == 1
    assert receiver.requests[1][0].startswith(f"job:{outcome.job_id}:cancelled:")
    dispatcher.close()


def test_a_jobs_completion_waits_for_its_changes_in_the_feed(empty_db: str) -> None:
    with session_scope(empty_db) as session:
        assert outbox.produce(session=session, events={"item.changed", "job.completed"}).cursor == 0
        job_id = catalog.create_job(session=session, source="s", model_path="m", model_name="m", model_version="v")
        catalog.upsert_items(session=session, rows=[_result(f"i{n}", job_id=job_id) for n in range(5)])
        catalog.fail_job(session=session, job_id=job_id, error="boom")
    with session_scope(empty_db) as session:
        produced = outbox.produce(session=session, events={"item.changed", "job.completed"}, limit=3)
    assert (produced.changes, produced.jobs, produced.waiting, produced.more) == (3, 0, 1, True)
    with session_scope(empty_db) as session:
        produced = outbox.produce(session=session, events={"item.changed", "job.completed"}, limit=3)
    assert (produced.changes, produced.jobs, produced.waiting, produced.more) == (2, 1, 0, False)
    types = [(r.event_type, json.loads(r.payload)["data"].get("status")) for r in _rows(empty_db)]
    assert types == [("item.changed", "sorted")] * 5 + [("job.completed", "failed")]
    assert json.loads(_rows(empty_db)[-1].payload)["data"]["error"] == "boom"
    with session_scope(empty_db) as session:  # an event id is inserted once at most
        again = [(r.event_id, r.event_type, r.payload) for r in _rows(empty_db)[-2:]]
        assert outbox._insert_events(session, again + [("job:x", "job.completed", "{}")], datetime.now(UTC)) == 1


def test_a_job_that_ended_late_in_the_slack_is_still_found(sqlite_url: str) -> None:
    """A job whose finished_at is before the producer's last look (its transaction committed late) is found."""
    events = {"job.completed"}
    with session_scope(sqlite_url) as session:
        outbox.produce(session=session, events=events)
        job_id = catalog.create_job(session=session, source="s", model_path="m", model_name="m", model_version="v")
    with session_scope(sqlite_url) as session:
        outbox.produce(session=session, events=events, now=datetime.now(UTC) + timedelta(minutes=30))
        jobs.cancel_job(session=session, job_id=job_id)  # finished_at: now, before the look above
    with session_scope(sqlite_url) as session:
        produced = outbox.produce(session=session, events=events, now=datetime.now(UTC) + timedelta(minutes=31))
    assert produced.jobs == 1 and _rows(sqlite_url)[0].event_id.startswith(f"job:{job_id}:cancelled:")


# ------------------------------------------------------------------------------------------ delivery


def test_an_event_the_receiver_refuses_alone_does_not_hold_the_others_up(sqlite_url: str, receiver: Receiver) -> None:
    dispatcher = webhooks.Dispatcher(_settings(sqlite_url, receiver))
    dispatcher.run_once()
    with session_scope(sqlite_url) as session:
        catalog.upsert_items(session=session, rows=[_result(f"item-{n}") for n in range(6)])
    receiver.refuse["change:2"] = 400
    receiver.up()
    assert dispatcher.produce() == (6, False)
    deadline = time.monotonic() + 20
    while _pending(sqlite_url) > 1:
        assert time.monotonic() < deadline
        dispatcher.run_once()
        time.sleep(dispatcher.paused_for())
    rows = {r.event_id: r for r in _rows(sqlite_url)}
    assert set(rows) == {f"change:{n}" for n in range(1, 7)}, rows
    poison = rows["change:2"]
    assert poison.delivered_at is None and poison.last_status == 400 and "HTTP 400: refused: not today" in \
        poison.last_error
    assert all(r.delivered_at is not None for i, r in rows.items() if i != "change:2")
    with session_scope(sqlite_url) as session:
        stats = outbox.outbox_stats(session=session)
    assert (stats.pending, stats.delivered, stats.last_failed_event) == (1, 5, "change:2")
    del receiver.refuse["change:2"]  # the receiver is fixed: the event is retried until it is taken
    _drain(dispatcher, sqlite_url)
    assert _rows(sqlite_url)[1].attempts >= 2 and receiver.ids() == set(rows)
    dispatcher.close()


def _drain(dispatcher: webhooks.Dispatcher, url: str, timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while _pending(url):
        assert time.monotonic() < deadline, "the outbox did not drain"
        dispatcher.run_once()
        time.sleep(min(0.05, dispatcher.paused_for()) or 0.01)


def test_a_crash_after_the_post_sends_the_event_again_with_the_same_id(sqlite_url: str, receiver: Receiver,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    dispatcher = webhooks.Dispatcher(_settings(sqlite_url, receiver))
    dispatcher.run_once()
    with session_scope(sqlite_url) as session:
        catalog.upsert_items(session=session, rows=[_result("a"), _result("b")])
    receiver.up()

    def crash(**_: object) -> None:
        raise RuntimeError("the process died before it recorded the delivery")

    with monkeypatch.context() as m:
        m.setattr(webhooks, "mark_delivered", crash)
        with pytest.raises(RuntimeError):
            dispatcher.run_once()
    assert receiver.ids() == {"change:1", "change:2"} and _pending(sqlite_url) == 2
    _drain(dispatcher, sqlite_url)
    assert [i for i, _ in receiver.requests] == ["change:1", "change:2", "change:1", "change:2"]
    assert all(len(bodies) == 1 for bodies in receiver.bodies().values()), "the same body each time"
    dispatcher.close()


def test_delivered_events_are_pruned_pending_ones_never(sqlite_url: str) -> None:
    with session_scope(sqlite_url) as session:
        outbox.produce(session=session, events={"item.changed"})
        catalog.upsert_items(session=session, rows=[_result("a"), _result("b"), _result("c")])
    with session_scope(sqlite_url) as session:
        outbox.produce(session=session, events={"item.changed"})
        long_ago = datetime.now(UTC) - timedelta(days=8)
        outbox.mark_delivered(session=session, delivered=[(1, 200), (2, 204)], now=long_ago)
        session.execute(update(WebhookOutbox).where(WebhookOutbox.id == 3).values(created_at=long_ago))
    with session_scope(sqlite_url) as session:
        assert outbox.prune_delivered(session=session, older_than=datetime.now(UTC) - timedelta(days=7)) == 2
    assert [r.event_id for r in _rows(sqlite_url)] == ["change:3"]


def test_one_dispatcher_at_a_time(sqlite_url: str, receiver: Receiver) -> None:
    first = webhooks.Dispatcher(_settings(sqlite_url, receiver), holder="worker-a")
    second = webhooks.Dispatcher(_settings(sqlite_url, receiver), holder="worker-b")
    assert first.run_once().leader and not second.run_once().leader
    with session_scope(sqlite_url) as session:
        assert outbox.lease_holder(session=session, name=webhooks.LEASE) == "worker-a"
        jobs.acquire_lease(session=session, name=webhooks.LEASE, holder="worker-a", ttl_s=-1)  # worker-a is gone
    assert second.run_once().leader and not first.run_once().leader


class _Highest(random.Random):
    """Jitter that always draws the highest value."""

    def uniform(self, a: float, b: float) -> float:
        return b


def test_a_slow_receiver_is_a_failed_attempt(sqlite_url: str) -> None:
    import socket

    listener = socket.create_server(("127.0.0.1", 0))  # accepts, never answers
    try:
        port = listener.getsockname()[1]
        settings = build_settings(database_url=sqlite_url, webhook_url=f"http://127.0.0.1:{port}/",
                                  webhook_secret=SECRET, webhook_timeout_s=0.3, webhook_backoff_s=5)
        dispatcher = webhooks.Dispatcher(settings, rng=_Highest())
        dispatcher.run_once()
        with session_scope(sqlite_url) as session:
            catalog.upsert_items(session=session, rows=[_result("a")])
        began = time.monotonic()
        report = dispatcher.run_once()
        assert time.monotonic() - began < 3
        assert (report.failed, report.delivered) == (1, 0) and "Timeout" in report.errors[0]
        row = _rows(sqlite_url)[0]
        assert row.attempts == 1 and row.last_status is None
        assert 4 < (row.next_attempt_at - datetime.now(UTC)).total_seconds() <= 5, "backed off: base 5 s"
        assert 2 < report.paused_s <= 2.5, "the dispatcher pauses too: up to half the backoff"
        assert dispatcher.run_once().failed == 0
        dispatcher.close()
    finally:
        listener.close()


def test_the_backoff_doubles_up_to_the_cap() -> None:
    ceilings = [webhooks.backoff_ceiling(n, base=2, cap=300) for n in range(1, 12)]
    assert ceilings == [2, 4, 8, 16, 32, 64, 128, 256, 300, 300, 300]
    assert webhooks.backoff_ceiling(10_000, base=2, cap=300) == 300


def test_the_signature_is_the_standard_webhooks_one() -> None:
    # The test vector of the Standard Webhooks specification's libraries.
    key = webhook_signing_key("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
    signed = webhooks.signature(key, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, b'{"test": 2432232314}')
    assert signed == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
    # The README's verifier accepts it (at that time) and refuses a tampered body or another secret.
    headers = {"webhook-id": "msg_p5jXN8AQM9LWM0D4loKWxJek", "webhook-timestamp": str(int(time.time())),
               "webhook-signature": ""}
    headers["webhook-signature"] = "v0,xyz " + webhooks.signature(key, headers["webhook-id"],
                                                                  int(headers["webhook-timestamp"]), b"{}")
    assert verify_webhook("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", headers, b"{}") == {}
    for secret, body in (("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", b"{ }"), (SECRET, b"{}")):
        with pytest.raises(ValueError, match="bad signature"):
            verify_webhook(secret, headers, body)
    with pytest.raises(ValueError, match="stale"):
        verify_webhook("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", {**headers, "webhook-timestamp": "1614265330"}, b"{}")


# ---------------------------------------------------------------------------------- commands, settings


def test_webhooks_run_once_and_status(sqlite_url: str, receiver: Receiver) -> None:
    runner = CliRunner()
    env = {"INVSORT_WEBHOOK_URL": receiver.url, "INVSORT_WEBHOOK_SECRET": SECRET, "INVSORT_WEBHOOK_BACKOFF_S": "0.05"}
    result = runner.invoke(main, ["webhooks", "run", "--once", "--db", sqlite_url], env=env)
    assert result.exit_code == 0, result.output
    with session_scope(sqlite_url) as session:
        catalog.upsert_items(session=session, rows=[_result("a"), _result("b")])
    result = runner.invoke(main, ["webhooks", "run", "--once", "--db", sqlite_url], env=env)
    assert result.exit_code == 1 and "ConnectError" in result.output, result.output  # down
    result = runner.invoke(main, ["webhooks", "status", "--db", sqlite_url], env=env)
    assert result.exit_code == 0, result.output
    assert f"url: http://127.0.0.1:{receiver.port};" in result.output and "token" not in result.output
    assert "pending: 2" in result.output and "last error: change:1: ConnectError" in result.output
    assert SECRET not in result.output
    receiver.up()
    with session_scope(sqlite_url) as session:  # due now, not after the backoff
        session.execute(update(WebhookOutbox).values(next_attempt_at=datetime.now(UTC)))
    result = runner.invoke(main, ["webhooks", "run", "--once", "--db", sqlite_url], env=env)
    assert result.exit_code == 0 and "0 produced, 2 delivered, 0 failed" in result.output, result.output
    status = json.loads(runner.invoke(main, ["webhooks", "status", "--json", "--db", sqlite_url], env=env).output)
    assert (status["pending"], status["delivered"], status["feed_cursor"], status["feed_end"]) == (0, 2, 2, 2)


def test_the_worker_starts_the_dispatcher_when_the_url_is_set(sqlite_url: str, receiver: Receiver,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from worker import webhooks as worker_webhooks

    monkeypatch.setattr(worker_webhooks, "get_settings", lambda: _settings(sqlite_url, receiver))
    receiver.up()
    worker_webhooks.start_webhooks()
    try:
        _wait("the worker's dispatcher", lambda: _cursor(sqlite_url) is not None, 10)
        with session_scope(sqlite_url) as session:
            catalog.upsert_items(session=session, rows=[_result("a")])
        _wait("the event delivered", lambda: receiver.ids() == {"change:1"}, 10)
    finally:
        worker_webhooks.stop_webhooks()
    _wait("the thread stopped", lambda: not [t for t in threading.enumerate() if t.name == "invsort-webhooks"], 10)


@pytest.mark.parametrize(("overrides", "message"), [
    ({"webhook_url": "ftp://host/x"}, "INVSORT_WEBHOOK_URL must be an http:// or https:// URL"),
    ({"webhook_url": "https:///nohost?token=s3cret"}, "INVSORT_WEBHOOK_URL must be an http:// or https:// URL"),
    ({"webhook_url": "https://h/x"}, "INVSORT_WEBHOOK_SECRET must be set when INVSORT_WEBHOOK_URL is"),
    ({"webhook_url": "https://h/x", "webhook_secret": "s3cret-short"}, "INVSORT_WEBHOOK_SECRET must be at least 16"),
    ({"webhook_url": "https://h/x", "webhook_secret": "whsec_s3cret!!"}, "must go on in base64"),
    ({"webhook_events": "item.changed,s3cret"}, "INVSORT_WEBHOOK_EVENTS must be one or more of"),
    ({"webhook_max_backoff_s": 0}, "INVSORT_WEBHOOK_MAX_BACKOFF_S must be above 0 and at most 86400 seconds"),
])
def test_webhook_settings_are_checked(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        build_settings(**overrides)
    assert message in str(info.value)
    if "EVENTS" not in message:
        assert "s3cret" not in str(info.value)


def test_webhook_settings_accepted() -> None:
    s = build_settings(webhook_url=" https://user:pw@erp.example.com:8443/hooks?t=1 ", webhook_secret="x" * 16,
                       webhook_events="job.completed")
    assert (s.webhook_url, s.webhook_events) == ("https://user:pw@erp.example.com:8443/hooks?t=1", ["job.completed"])
    assert webhooks.safe_webhook_url(s.webhook_url) == "https://erp.example.com:8443"
    assert build_settings(webhook_url="", webhook_secret="").webhook_url is None
    assert len(webhook_signing_key("whsec_" + "A" * 24)) == 18
