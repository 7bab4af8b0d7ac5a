"""Fetching over the network with many GETs in flight (INVSORT_FETCH_CONCURRENCY), measured at a delaying relay
(pipeline/bench/netdelay.py) in front of a real moto S3 server: the pipeline keeps the GETs in flight that the
setting asks for and no more, decodes no more than its decode threads at once, and a bad object still fails alone.
Concurrency is asserted, never speed."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from pipeline.bench.netdelay import DelayProxy
from pipeline.errors import ConfigError
from pipeline.inference.predictor import Predictor, PredictorOptions
from pipeline.inference.streaming import run_pipeline
from pipeline.io.storage import make_reader
from pipeline.models.modelfile import load_model_file
from pipeline.records import Item
from pipeline.settings import build_settings
from tests.images import example_files, truncated_jpeg


@pytest.fixture(scope="module")
def predictor() -> Predictor:
    return Predictor(load_model_file("bundled:fashion_mnist_cnn"), PredictorOptions(device="cpu"))


def _endpoint_port(endpoint: str) -> int:
    return int(endpoint.rsplit(":", 1)[1])


# ------------------------------------------------------------------------------------------- the setting


@pytest.mark.parametrize("value", [0, 1025, -3])
def test_fetch_concurrency_out_of_range_is_refused_with_its_range(value, monkeypatch):
    with pytest.raises(ConfigError, match=rf"INVSORT_FETCH_CONCURRENCY must be between 1 and 1024, got {value}"):
        build_settings(fetch_concurrency=value)
    monkeypatch.setenv("INVSORT_FETCH_CONCURRENCY", str(value))
    with pytest.raises(ConfigError, match="INVSORT_FETCH_CONCURRENCY must be between 1 and 1024"):
        build_settings()


def test_fetch_concurrency_sizes_the_reader_and_its_s3_pool(monkeypatch):
    monkeypatch.setenv("INVSORT_FETCH_CONCURRENCY", "40")
    settings = build_settings(s3_endpoint_url="http://127.0.0.1:9", s3_max_pool_connections=10)
    reader = make_reader(settings)
    assert settings.fetch_concurrency == reader.fetch_concurrency == 40
    assert reader.s3.client.meta.config.max_pool_connections == 40  # a connection for every fetch thread


def test_run_pipeline_refuses_a_fetch_concurrency_below_one(predictor):
    reader = make_reader(build_settings())
    with pytest.raises(ConfigError, match="fetch_concurrency must be >= 1, got 0"):
        run_pipeline([], predictor=predictor, reader=reader, on_batch=list, fetch_concurrency=0)


# ------------------------------------------------------------------------------------------- the relay


class _Echo:
    """A loopback TCP server that sends back what it receives."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)


def _read_exactly(sock: socket.socket, n: int) -> bytes:
    got = b""
    while len(got) < n:
        chunk = sock.recv(n - len(got))
        assert chunk, "the relay closed early"
        got += chunk
    return got


def test_relay_delays_each_way_keeps_order_and_is_a_delay_line_not_a_rate_limit():
    echo = _Echo()
    delay_ms = 50
    with DelayProxy(("127.0.0.1", echo.port), delay_ms=delay_ms) as proxy, \
            socket.create_connection(("127.0.0.1", proxy.port)) as sock:
        sock.sendall(b"hello")
        assert _read_exactly(sock, 5) == b"hello"  # the connection's first exchange (handshake round trip)
        began = time.perf_counter()
        sock.sendall(b"ping")
        assert _read_exactly(sock, 4) == b"ping"
        assert time.perf_counter() - began >= 2 * delay_ms / 1000  # one round trip: a lower bound, never flaky
        # 100 chunks sent apart: all of them are in the line at once, and come back whole and in order.
        chunks = [f"<{i:03d}>".encode() for i in range(100)]
        began = time.perf_counter()
        for c in chunks:
            sock.sendall(c)
            time.sleep(0.001)
        assert _read_exactly(sock, sum(map(len, chunks))) == b"".join(chunks)
        # A relay passing one chunk per delay would take 100 x 50 ms = 5 s; a delay line one round trip more than
        # the sending. The bound is generous: it only tells the two apart.
        assert time.perf_counter() - began < 2.5
        assert proxy.stats.connections == 1 and proxy.stats.peak_busy == 1
    echo.listener.close()


def test_relay_refuses_an_upstream_off_loopback():
    with pytest.raises(ValueError, match="loopback"):
        DelayProxy(("10.0.0.1", 9000), delay_ms=1)


# ------------------------------------------------------------------------------------------- the pipeline


def _photos_in_bucket(client, bucket: str) -> tuple[list[Item], dict[str, str]]:
    """The bundled examples in ``bucket`` plus a truncated JPEG and a key that does not exist: ``(items, the
    reason each bad item must fail with)``."""
    items = []
    for f in example_files():
        key = f"photos/{f.parent.name}/{f.name}"
        client.put_object(Bucket=bucket, Key=key, Body=f.read_bytes())
        items.append(Item(key, f"s3://{bucket}/{key}"))
    client.put_object(Bucket=bucket, Key="photos/cut.jpg", Body=truncated_jpeg())
    items.insert(7, Item("cut", f"s3://{bucket}/photos/cut.jpg"))
    items.insert(30, Item("gone", f"s3://{bucket}/photos/gone.jpg"))
    return items, {"cut": "", "gone": "no such object"}


@pytest.mark.slow
@pytest.mark.parametrize("fetch_concurrency", [16, 2])
def test_s3_behind_a_round_trip_keeps_fetch_concurrency_gets_in_flight(s3_server, s3_bucket, predictor,
                                                                       fetch_concurrency):
    client, bucket = s3_bucket
    items, bad = _photos_in_bucket(client, bucket)
    with DelayProxy(("127.0.0.1", _endpoint_port(s3_server)), delay_ms=10) as proxy:
        settings = build_settings(s3_endpoint_url=proxy.url, fetch_concurrency=fetch_concurrency, decode_workers=2)
        reader = make_reader(settings)
        rows = []
        summary = run_pipeline(items, predictor=predictor, reader=reader, on_batch=rows.extend, batch_size=16,
                               decode_threads=settings.decode_threads, prefetch_batches=2)
        in_flight = proxy.stats.peak_busy
    assert [r.item_id for r in rows] == [it.item_id for it in items]  # every item once, in order
    failed = {r.item_id: r.error for r in rows if r.status == "failed"}
    assert set(failed) == set(bad)  # the truncated JPEG and the missing key fail alone...
    assert bad["gone"] in failed["gone"]
    assert all(r.category for r in rows if r.status != "failed")  # ...and every other photo is sorted
    assert summary.images == len(items)
    # At most one GET in flight per fetch thread, and with 16 threads far more than the 2 decode threads would
    # keep: the latency of each GET is hidden behind the others.
    assert in_flight <= fetch_concurrency
    if fetch_concurrency == 16:
        assert in_flight >= 8


@pytest.mark.slow
def test_sort_source_from_s3_takes_the_setting_from_the_reader(s3_server, s3_bucket, predictor):
    """No fetch_concurrency given to run_pipeline: it is the reader's (INVSORT_FETCH_CONCURRENCY), as in
    'invsort sort' and the Celery tasks, which pass the reader make_reader built."""
    client, bucket = s3_bucket
    items, _ = _photos_in_bucket(client, bucket)
    with DelayProxy(("127.0.0.1", _endpoint_port(s3_server)), delay_ms=10) as proxy:
        reader = make_reader(build_settings(s3_endpoint_url=proxy.url, fetch_concurrency=12))
        rows = []
        run_pipeline(items, predictor=predictor, reader=reader, on_batch=rows.extend, batch_size=32,
                     decode_threads=1)
        assert 6 <= proxy.stats.peak_busy <= 12
    assert len(rows) == len(items)


def test_local_files_are_read_by_the_decode_threads_only(predictor, tmp_path):
    """Local files take no fetch thread: reading from the page cache costs less than a hand-off."""
    items = [Item(f.name, f.as_uri()) for f in example_files()]
    reader = make_reader(build_settings(local_roots=str(example_files()[0].parents[1]), fetch_concurrency=64))
    names: set[str] = set()
    real_read = reader.read

    class Spy:
        fetch_concurrency = 64

        @staticmethod
        def read(uri: str) -> bytes:
            names.add(threading.current_thread().name.rsplit("_", 1)[0])
            return real_read(uri)

    rows = []
    run_pipeline(items, predictor=predictor, reader=Spy(), on_batch=rows.extend, batch_size=8, decode_threads=2)
    assert names == {"invsort-decode"} and len(rows) == len(items)


@pytest.mark.slow
def test_bench_s3_runs_local_and_s3_peers_behind_the_relay(tmp_path):
    """'invsort bench s3' end to end on a few photos (embedded: no broker): every peer sorts every photo, and the
    one behind the relay reports the GETs it saw in flight."""
    from pipeline.bench.s3 import format_s3_table, run_s3_bench
    from tests.images import EXAMPLES

    report = run_s3_bench(str(EXAMPLES), model_spec="bundled:fashion_mnist_cnn", rtts_ms=(0, 20),
                          fetch_concurrencies=(4,), mode="embedded", limit=12)
    runs = {(r["peer"], r["rtt_ms"]): r for r in report["runs"]}
    assert set(runs) == {("local", None), ("s3", 0), ("s3", 20)}
    assert all(r["status"] == "done" and r["images"] == 12 for r in runs.values())
    assert 1 <= runs[("s3", 20)]["peak_gets_in_flight"] <= 4 + 1  # the fetch threads, and the listing's request
    table = format_s3_table(report)
    assert "goal: S3 at 20 ms RTT >= 0.9x local" in table and "embedded path" in table
