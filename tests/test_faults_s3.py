"""S3 faults (pipeline/io/storage.py's retries and TransientError, and the pipeline letting it through): a small HTTP
proxy that each test starts on its own free loopback port, in front of the session's moto server, answers 503
``SlowDown``, 500 ``InternalError`` or a body cut half-way when the test says so, and counts what it served.

Every fault is proved by the proxy's counts (it happened while the job ran), and every job ends in a stated state
within a bound (a thread joined with a timeout), never by how long it took.
"""

from __future__ import annotations

import http.client
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

import pytest
from click.testing import CliRunner
from sqlalchemy import text

from db.catalog import get_job, iter_items
from db.session import session_scope
from pipeline.errors import TransientError
from pipeline.io.storage import S3Storage
from pipeline.settings import build_settings
from pipeline.sorting import sort_source
from tests.fixtures.files import put_objects
from tests.images import example_files
from worker.cli import main

JOB_BOUND_S = 180  # every job here ends well within this; a job still running then is a failure

_HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade"}


@dataclass
class Request:
    method: str
    path: str  # without the query
    query: str

    @property
    def op(self) -> str:
        """``list`` (ListObjectsV2), ``get`` (GetObject of a key) or ``other``."""
        if "list-type=2" in self.query:
            return "list"
        if self.method == "GET" and "/" in self.path.strip("/"):
            return "get"
        return "other"


# what the proxy does with a request: pass it, answer an S3 error (status, code), or cut the body half-way
Action = str | tuple[int, str]


@dataclass
class S3Proxy:
    """An HTTP proxy in front of ``upstream``; ``decide(request)`` says what to do with each request.

    ``served`` counts ``(op, outcome)`` pairs: outcome ``pass``, ``cut`` or the HTTP status of an error answered.
    """

    upstream: str
    decide: Callable[[Request], Action]
    served: Counter[tuple[str, str]] = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)
    url: str = ""

    def count(self, op: str, outcome: str) -> None:
        with self.lock:
            self.served[op, outcome] += 1

    def total(self, outcome: str, op: str | None = None) -> int:
        with self.lock:
            return sum(n for (o, out), n in self.served.items() if out == outcome and op in (None, o))


def _handler(proxy: S3Proxy) -> type[BaseHTTPRequestHandler]:
    up = urlsplit(proxy.upstream)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as S3 does: botocore reuses its pooled connections

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
            pass

        def _relay(self) -> None:
            path, _, query = self.path.partition("?")
            request = Request(self.command, path, query)
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else None
            action = proxy.decide(request)
            if isinstance(action, tuple):
                status, code = action
                proxy.count(request.op, str(status))
                self._send_error(status, code)
                return
            conn = http.client.HTTPConnection(up.hostname or "127.0.0.1", up.port, timeout=60)
            try:
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
            finally:
                conn.close()
            self.send_response(resp.status)
            for k, v in resp.getheaders():
                if k.lower() not in _HOP_BY_HOP and k.lower() != "content-length":
                    self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            # counted before the body goes out: the client may act on the last byte before this thread runs again
            if action == "cut" and len(data) > 1 and self.command != "HEAD":
                proxy.count(request.op, "cut")
                self.wfile.write(data[: len(data) // 2])  # the promised length never arrives: a reset mid-body
                self.wfile.flush()
                self.close_connection = True
                return
            proxy.count(request.op, "pass")
            if self.command != "HEAD":
                self.wfile.write(data)

        def _send_error(self, status: int, code: str) -> None:
            xml = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>injected by the '
                   f"test's proxy</Message><RequestId>{uuid.uuid4().hex}</RequestId></Error>").encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(xml)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(xml)

        do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _relay

    return Handler


@pytest.fixture
def start_proxy(s3_server: str) -> Iterator[Callable[[Callable[[Request], Action]], S3Proxy]]:
    """``start_proxy(decide)``: an :class:`S3Proxy` on a free loopback port, stopped after the test."""
    servers: list[ThreadingHTTPServer] = []

    def start(decide: Callable[[Request], Action]) -> S3Proxy:
        proxy = S3Proxy(s3_server, decide)
        server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(proxy))
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, name="s3-proxy", daemon=True).start()
        servers.append(server)
        proxy.url = f"http://127.0.0.1:{server.server_address[1]}"
        return proxy

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def _photos(client: Any, bucket: str, n: int) -> dict[str, bytes]:
    """``n`` example photos put into ``bucket`` under ``photos/``; ``{uri: bytes}``."""
    files = example_files()[:n]
    objects = {f"photos/{i:02d}_{f.name}": f.read_bytes() for i, f in enumerate(files)}
    put_objects(client, bucket, objects)
    return {f"s3://{bucket}/{k}": v for k, v in objects.items()}


def _run_bounded(fn: Callable[[], Any]) -> Any:
    """``fn()`` in a thread joined within :data:`JOB_BOUND_S`; its result, or what it raised."""
    out: dict[str, Any] = {}

    def target() -> None:
        try:
            out["result"] = fn()
        except BaseException as exc:  # handed to the test
            out["error"] = exc

    thread = threading.Thread(target=target, name="job", daemon=True)
    thread.start()
    thread.join(JOB_BOUND_S)
    assert not thread.is_alive(), f"the job did not end within {JOB_BOUND_S} s"
    if "error" in out:
        raise out["error"]
    return out["result"]


def _rows(url: str, job_id: str) -> list[Any]:
    with session_scope(url) as session:
        return list(iter_items(session=session, job_id=job_id))


# ------------------------------------------------------------------------------------------- storage alone


def test_a_body_cut_half_way_is_asked_for_again(start_proxy, s3_bucket) -> None:
    client, bucket = s3_bucket
    data = b"x" * 50_000
    client.put_object(Bucket=bucket, Key="big.bin", Body=data)
    cuts = iter([True])

    def decide(r: Request) -> Action:
        return "cut" if r.op == "get" and next(cuts, False) else "pass"

    proxy = start_proxy(decide)
    storage = S3Storage(endpoint_url=proxy.url)
    assert storage.read(f"s3://{bucket}/big.bin") == data
    assert proxy.served == Counter({("get", "cut"): 1, ("get", "pass"): 1})


def test_5xx_still_failing_after_the_retries_is_a_transient_error(start_proxy, s3_bucket) -> None:
    client, bucket = s3_bucket
    client.put_object(Bucket=bucket, Key="a.png", Body=b"png")
    proxy = start_proxy(lambda r: (500, "InternalError"))
    storage = S3Storage(endpoint_url=proxy.url, max_attempts=3)
    with pytest.raises(TransientError, match=r"GetObject on s3://.*/a.png failed 3 time\(s\): InternalError") as info:
        storage.read(f"s3://{bucket}/a.png")
    assert isinstance(info.value, OSError)
    assert proxy.served == Counter({("get", "500"): 3})  # botocore's standard mode asked 3 times
    with pytest.raises(TransientError, match="ListObjectsV2"):
        list(storage.list(f"s3://{bucket}/"))


# --------------------------------------------------------------------------------------------- the pipeline


@pytest.mark.slow  # a 10 s outage, then the retries' backoff: ~15-40 s
def test_a_10_s_slowdown_outage_is_ridden_out_and_the_job_ends_done(start_proxy, s3_bucket, pg_url) -> None:
    """S3 answers 503 SlowDown to everything for 10 s from the job's first GetObject, then recovers: botocore's
    retries (the default settings) carry every read through; no item fails, one row per item."""
    client, bucket = s3_bucket
    photos = _photos(client, bucket, 12)
    window: list[float] = []
    lock = threading.Lock()

    def decide(r: Request) -> Action:
        with lock:
            if r.op == "get" and not window:
                window.append(time.monotonic() + 10.0)  # the outage starts with the job's first read
            in_outage = bool(window) and time.monotonic() < window[0]
        return (503, "SlowDown") if in_outage else "pass"

    proxy = start_proxy(decide)
    settings = build_settings(database_url=pg_url, s3_endpoint_url=proxy.url, batch_size=4)
    assert (settings.s3_retry_mode, settings.s3_max_attempts) == ("standard", 10)  # the defaults ride it out
    outcome = _run_bounded(lambda: sort_source(f"s3://{bucket}/photos/", settings=settings))

    assert proxy.total("503", "get") >= 2  # the outage overlapped the job's reads...
    assert proxy.total("pass", "get") == len(photos)  # ...and each photo was then read once, in full
    assert proxy.total("pass", "list") >= 1
    s = outcome.summary
    assert (s.images, s.failed) == (len(photos), 0)
    rows = _rows(pg_url, outcome.job_id)
    assert sorted(r.item_id for r in rows) == sorted(photos)  # exactly one row per item
    assert {r.status for r in rows} <= {"sorted", "needs_review"}
    with session_scope(pg_url) as session:
        job = get_job(session=session, job_id=outcome.job_id)
    assert job is not None and job.status == "done" and job.failed_count == 0
    print(f"503s served: {proxy.total('503')} ({proxy.total('503', 'get')} to GetObject); served {proxy.served}")


def test_a_missing_key_fails_only_its_item(s3_server, s3_bucket, pg_url, tmp_path) -> None:
    """A 4xx answer (NoSuchKey) is the item's fault: a failed row for it, the rest sorted, the job done."""
    client, bucket = s3_bucket
    photos = _photos(client, bucket, 3)
    missing = f"s3://{bucket}/photos/not-there.png"
    manifest = tmp_path / "m.csv"
    manifest.write_text("item_id,image_uri\n" + "".join(f"{u},{u}\n" for u in [*photos, missing]))
    settings = build_settings(database_url=pg_url, s3_endpoint_url=s3_server, batch_size=4)
    outcome = _run_bounded(lambda: sort_source(str(manifest), settings=settings))
    rows = {r.item_id: r for r in _rows(pg_url, outcome.job_id)}
    assert set(rows) == {*photos, missing}
    assert rows[missing].status == "failed" and rows[missing].error == f"no such object: {missing}"
    assert all(rows[u].status in ("sorted", "needs_review") for u in photos)
    with session_scope(pg_url) as session:
        job = get_job(session=session, job_id=outcome.job_id)
    assert job is not None and job.status == "done" and job.failed_count == 1


def test_a_transient_error_leaves_the_pipeline_and_fails_the_embedded_job(start_proxy, s3_bucket, pg_url) -> None:
    """S3 answers 500 to every GetObject but the first batch's two, for good: the first batch's rows are
    written, then the TransientError leaves sort_source (no failed row), and the job is failed with it.

    The fault is chosen by key, not by the order of the GETs: the fetch threads read the prefetched batches'
    objects concurrently, in no fixed order."""
    client, bucket = s3_bucket
    photos = _photos(client, bucket, 6)
    first_batch = {uri.split("/", 3)[3] for uri in sorted(photos)[:2]}  # the keys, as the proxy sees them

    def decide(r: Request) -> Action:
        key = r.path.strip("/").split("/", 1)[-1]
        return (500, "InternalError") if r.op == "get" and key not in first_batch else "pass"

    proxy = start_proxy(decide)
    settings = build_settings(database_url=pg_url, s3_endpoint_url=proxy.url, batch_size=2, decode_workers=1,
                              s3_max_attempts=2)
    with pytest.raises(TransientError, match="InternalError"):
        _run_bounded(lambda: sort_source(f"s3://{bucket}/photos/", settings=settings))
    assert proxy.total("500", "get") >= 2  # the fault happened: both attempts of a read answered 500
    with session_scope(pg_url) as session:
        job_id = session.execute(text("SELECT id FROM sorting_jobs WHERE source = :s"),
                                 {"s": f"s3://{bucket}/photos/"}).scalar_one()
        job = get_job(session=session, job_id=job_id)
    assert job is not None and job.status == "failed" and "InternalError" in (job.error or "")
    rows = _rows(pg_url, job_id)
    assert sorted(r.item_id for r in rows) == sorted(photos)[:2]  # the first batch stays; nothing became a failed row
    assert all(r.status != "failed" for r in rows)


def test_sort_with_s3_unavailable_is_one_line(start_proxy, s3_bucket, tmp_path) -> None:
    client, bucket = s3_bucket
    _photos(client, bucket, 2)
    proxy = start_proxy(lambda r: (503, "SlowDown") if r.op == "get" else "pass")
    env = {"INVSORT_S3_ENDPOINT_URL": proxy.url, "INVSORT_S3_MAX_ATTEMPTS": "1"}
    args = ["sort", f"s3://{bucket}/photos/", "--db", f"sqlite:///{tmp_path}/c.db", "--no-progress"]
    result = CliRunner().invoke(main, args, env=env, catch_exceptions=False)
    assert result.exit_code == 1 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: S3 GetObject on s3://"), result.stderr
    assert "SlowDown (HTTP 503)" in lines[0] and "retry later" in lines[0]
    assert proxy.total("503", "get") >= 1
