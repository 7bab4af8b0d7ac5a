"""HTTP API benchmark (``invsort bench api``): ``POST /v1/classify`` with one photo a request, over real HTTP, beside
the embedded pipeline on the same photos, model and machine.

What runs:

1. ``invsort serve`` in a subprocess (this interpreter, this checkout) on a free ``127.0.0.1`` port, with a fresh
   SQLite catalog in a temporary directory (``INVSORT_DATABASE_URL``), the given model, ``INVSORT_DEVICE=cpu`` and
   the caller's other ``INVSORT_*`` settings; the benchmark starts once ``GET /healthz`` answers 200.
2. The photos (the first ``limit`` images of SOURCE in :func:`pipeline.io.sources.iter_source`'s order) are read
   into memory and each encoded once as a ``multipart/form-data`` body with one field ``file``, so the client does
   no file or encoding work while it is timed.
3. **sequential**: one client (an :class:`httpx.Client`, keep-alive) sends ``requests`` requests one after the
   other, cycling through the photos. Latency of a request = wall time (``time.perf_counter``) from just before
   the request is sent to the whole answer read: connection reuse, upload, multipart parsing, decode, queueing,
   forward pass and JSON, as a client sees it. Reported in milliseconds: p50, p95, p99 (linear interpolation,
   :func:`numpy.percentile`), mean, min and max.
4. **concurrent**: ``clients`` in-flight requests at all times (asyncio tasks sharing one :class:`httpx.AsyncClient`
   with ``clients`` connections), one photo each, ``requests`` requests in all. images/s = photos answered /
   seconds from the first request sent to the last answer read; latencies as above (under load).
5. **embedded**: :func:`pipeline.bench.peers.run_bench`'s ``invsort`` peer (``invsort bench run --peer invsort``):
   :func:`pipeline.sorting.sort_source` in its own process on the same photos, model, batch size and CPU, writing
   a fresh SQLite catalog; its images/s is counted from the first image to the last result, set-up excluded. The
   server is stopped before it runs.

Each phase starts with ``warmup`` requests that are not counted (the first forward passes are slower). A request
that is not answered 200 with one result counts as an error and is left out of the figures. The server's memory is
psutil's RSS of its process (and any children), sampled every 0.2 s: idle once it answers (model loaded, before any
request), and the peak.
Its ``/metrics`` are read before and after each phase for the batcher's photos and requests per forward pass.

The client runs on the same machine as the server and takes CPU from it; ``client_cpu_s`` (this process's CPU
time during a phase) says how much. Goals (issue 13): sequential p95 <= :data:`P95_GOAL_MS` ms and 8-client
images/s >= :data:`RATIO_GOAL` x the embedded pipeline's.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import psutil

from pipeline.errors import ConfigError, InvsortError, SourceError
from pipeline.io.sources import iter_source
from pipeline.io.storage import local_path, make_reader

__all__ = ["P95_GOAL_MS", "RATIO_GOAL", "format_api_table", "latency_figures", "multipart_body", "run_api_bench"]

P95_GOAL_MS = 150.0
RATIO_GOAL = 0.8
SERVER_COMMAND = (sys.executable, "-m", "worker.cli", "serve")
STARTUP_TIMEOUT_S = 300.0
REQUEST_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 30.0
_RSS_SAMPLE_S = 0.2
_PORT_TRIES = 3
TIMING = (
    "latency_ms: wall time per request at the client, from just before it is sent to its whole answer read "
    "(percentiles by linear interpolation); images_per_s: photos answered / seconds from the first timed request "
    "sent to the last answer read; warm-up requests excluded; one photo per request; the client runs on the same "
    "machine (client_cpu_s: its CPU time in the phase). embedded: invsort bench's invsort peer (sort_source into a "
    "fresh SQLite file, images/s from the first image to the last result, set-up excluded). server RSS: psutil, "
    "the server process and its children, sampled every 0.2 s."
)


@dataclass(frozen=True)
class Photo:
    """One photo ready to send: its name and the whole ``multipart/form-data`` request body that holds it."""

    name: str
    body: bytes
    content_type: str


def multipart_body(name: str, data: bytes, *, field: str = "file") -> tuple[bytes, str]:
    """``(body, content type)`` of a ``multipart/form-data`` request with ``data`` as file ``name`` in ``field``
    (RFC 7578; a quote in the name is sent as ``%22`` and line breaks are dropped, as browsers do)."""
    boundary = f"invsort-bench-{uuid.uuid4().hex}"
    shown = name.replace("\r", "").replace("\n", "").replace('"', "%22")
    head = (f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{shown}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n").encode()
    return head + data + f"\r\n--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def load_photos(source: str, limit: int | None) -> list[Photo]:
    """The first ``limit`` images of a local folder (:func:`iter_source`'s order, the one ``invsort bench run``
    uses), read and encoded as request bodies.

    Raises:
        SourceError: ``source`` is not a local folder, or it holds no image.
    """
    if "://" in source and not source.startswith("file://"):
        raise SourceError(f"bench api SOURCE must be a local folder, got {source!r}")
    path = local_path(source)
    if not path.is_dir():
        raise SourceError(f"bench api SOURCE must be a local folder of images: {path} is not a directory")
    reader = make_reader(extra_roots=[Path(os.path.realpath(path))])
    photos = []
    for item in islice(iter_source(str(path), reader), limit):
        body, content_type = multipart_body(Path(item.item_id).name, reader.read(item.uri))
        photos.append(Photo(Path(item.item_id).name, body, content_type))
    if not photos:
        raise SourceError(f"no images in {path} (suffixes: see pipeline.io.storage.IMAGE_SUFFIXES)")
    return photos


def latency_figures(seconds: Sequence[float]) -> dict[str, float | None]:
    """``{"p50", "p95", "p99", "mean", "min", "max"}`` in milliseconds (rounded to 0.01) of request durations
    given in seconds; percentiles by linear interpolation (:func:`numpy.percentile`). All None when empty."""
    keys = ("p50", "p95", "p99", "mean", "min", "max")
    if not seconds:
        return dict.fromkeys(keys)
    import numpy as np

    ms = np.asarray(seconds, dtype=np.float64) * 1000.0
    p50, p95, p99 = np.percentile(ms, [50, 95, 99])
    values = (p50, p95, p99, ms.mean(), ms.min(), ms.max())
    return {k: round(float(v), 2) for k, v in zip(keys, values, strict=True)}


# ------------------------------------------------------------------------------------------------ server


class _Server:
    """``invsort serve`` in a subprocess, with a sampler of its memory."""

    def __init__(self, model_spec: str, workdir: Path, say: Callable[[str], None]) -> None:
        self.model_spec, self.workdir, self.say = model_spec, workdir, say
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""
        self.log_path = workdir / "serve.log"
        self.startup_s = 0.0
        self.peak_rss = 0
        self._done = threading.Event()
        self._sampler: threading.Thread | None = None

    def start(self) -> None:
        """Start it and wait until ``/healthz`` answers 200 (a port taken meanwhile: another port, 3 tries).

        Raises:
            InvsortError: the server exited, or did not answer within :data:`STARTUP_TIMEOUT_S`; the message
                holds the end of its log.
        """
        for attempt in range(_PORT_TRIES):
            began = time.perf_counter()
            self._spawn(_free_port())
            if self._wait_healthy():
                self.startup_s = round(time.perf_counter() - began, 2)
                self._sampler = threading.Thread(target=self._sample, name="invsort-bench-rss", daemon=True)
                self._sampler.start()
                return
            if attempt + 1 < _PORT_TRIES and "address already in use" in self.log_tail().lower():
                continue
            break
        raise InvsortError(f"invsort serve did not start:\n{self.log_tail()}")

    def _spawn(self, port: int) -> None:
        root = str(Path(__file__).resolve().parents[2])  # the checkout: pipeline/bench/api.py -> ./
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])),
               "INVSORT_DATABASE_URL": f"sqlite:///{self.workdir / 'catalog.db'}", "INVSORT_DEVICE": "cpu",
               "PYTHONUNBUFFERED": "1"}
        argv = [*SERVER_COMMAND, "--host", "127.0.0.1", "--port", str(port), "--model", self.model_spec]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
        self.url = f"http://127.0.0.1:{port}"
        self.say(f"started invsort serve on {self.url} (pid {self.proc.pid}); waiting for /healthz")

    def _wait_healthy(self) -> bool:
        import httpx

        assert self.proc is not None
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{self.url}/healthz", timeout=5).status_code == 200:
                    return True
            time.sleep(0.2)
        self.stop()
        return False

    def _processes(self) -> list[psutil.Process]:
        assert self.proc is not None
        try:
            me = psutil.Process(self.proc.pid)
            return [me, *me.children(recursive=True)]
        except psutil.Error:
            return []

    def rss(self) -> int:
        """Bytes resident now in the server's process and its children (0 once it has exited)."""
        total = 0
        for process in self._processes():
            with contextlib.suppress(psutil.Error):
                total += process.memory_info().rss
        return total

    def _sample(self) -> None:
        while not self._done.is_set():
            self.peak_rss = max(self.peak_rss, self.rss())
            self._done.wait(_RSS_SAMPLE_S)

    def metrics(self) -> str:
        """``GET /metrics``'s text ("" when it did not answer)."""
        import httpx

        try:
            return httpx.get(f"{self.url}/metrics", timeout=30).text
        except httpx.HTTPError:
            return ""

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.strip().splitlines()[-lines:])

    def stop(self) -> int | None:
        """SIGINT (uvicorn's graceful stop), then SIGKILL after :data:`STOP_TIMEOUT_S`; its exit status."""
        self._done.set()
        if self._sampler is not None:
            self._sampler.join()
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGINT)
        try:
            return self.proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def batch_figures(before: str, after: str) -> dict[str, Any]:
    """The classify batcher's forward passes between two ``/metrics`` texts: ``batches``, ``photos_per_batch``
    and ``requests_per_batch`` (means; None without a batch, or on a server without these metrics)."""
    from prometheus_client.parser import text_string_to_metric_families

    def totals(text: str) -> dict[str, float]:
        out: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name.startswith("invsort_classify_batch_") and sample.name.endswith(("_count", "_sum")):
                    out[sample.name] = sample.value
        return out

    a, b = totals(before), totals(after)

    def delta(name: str) -> float:
        return b.get(name, 0.0) - a.get(name, 0.0)

    batches = delta("invsort_classify_batch_photos_count")
    if batches <= 0:
        return {"batches": 0, "photos_per_batch": None, "requests_per_batch": None}
    return {"batches": int(batches),
            "photos_per_batch": round(delta("invsort_classify_batch_photos_sum") / batches, 2),
            "requests_per_batch": round(delta("invsort_classify_batch_requests_sum") / batches, 2)}


# ------------------------------------------------------------------------------------------------ clients


@dataclass
class _Tally:
    latencies: list[float]
    errors: int = 0
    failed_photos: int = 0
    first_error: str | None = None

    def record(self, status: int, text: str, seconds: float) -> None:
        """One answer: 200 with one result counts (its latency kept), anything else is an error."""
        results = None
        if status == 200:
            with contextlib.suppress(ValueError):
                results = json.loads(text).get("results")
        if not isinstance(results, list) or len(results) != 1:
            self.errors += 1
            self.first_error = self.first_error or f"HTTP {status}: {text[:300]}"
            return
        self.latencies.append(seconds)
        self.failed_photos += results[0].get("status") == "failed"


def _phase(tally: _Tally, seconds: float, cpu_s: float, **extra: Any) -> dict[str, Any]:
    ok = len(tally.latencies)
    return {**extra, "ok": ok, "errors": tally.errors, "failed_photos": tally.failed_photos,
            "first_error": tally.first_error, "seconds": round(seconds, 4),
            "images_per_s": round(ok / seconds, 2) if seconds > 0 and ok else None,
            "latency_ms": latency_figures(tally.latencies), "client_cpu_s": round(cpu_s, 3)}


def run_sequential(url: str, photos: Sequence[Photo], requests: int, warmup: int) -> dict[str, Any]:
    """``warmup`` then ``requests`` requests one after another, one photo each (cycling through ``photos``);
    the phase's figures (see the module's docstring)."""
    import httpx

    endpoint = f"{url}/v1/classify"
    cycle = itertools.cycle(photos)
    with httpx.Client(timeout=REQUEST_TIMEOUT_S) as client:

        def send(photo: Photo) -> tuple[int, str, float]:
            began = time.perf_counter()
            answer = client.post(endpoint, content=photo.body, headers={"content-type": photo.content_type})
            text = answer.text
            return answer.status_code, text, time.perf_counter() - began

        warm = _Tally([])
        for _ in range(warmup):
            warm.record(*send(next(cycle)))
        tally = _Tally([])
        cpu, began = time.process_time(), time.perf_counter()
        for _ in range(requests):
            tally.record(*send(next(cycle)))
        seconds, cpu_s = time.perf_counter() - began, time.process_time() - cpu
    return _phase(tally, seconds, cpu_s, clients=1, requests=requests, warmup=warmup, warmup_errors=warm.errors)


def run_concurrent(url: str, photos: Sequence[Photo], requests: int, clients: int, warmup: int) -> dict[str, Any]:
    """``clients`` requests in flight at all times, ``requests`` in all after ``warmup`` (sent the same way, not
    counted), one photo each; the phase's figures (see the module's docstring)."""
    return asyncio.run(_concurrent(url, photos, requests, clients, warmup))


async def _concurrent(url: str, photos: Sequence[Photo], requests: int, clients: int, warmup: int
                      ) -> dict[str, Any]:
    import httpx

    endpoint = f"{url}/v1/classify"
    cycle = itertools.cycle(photos)
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT_S, limits=limits) as client:

        async def run(count: int, tally: _Tally) -> None:
            left = count

            async def one_client() -> None:
                nonlocal left
                while left > 0:
                    left -= 1  # one event loop: no other task runs between the test and this
                    photo = next(cycle)
                    began = time.perf_counter()
                    answer = await client.post(endpoint, content=photo.body,
                                               headers={"content-type": photo.content_type})
                    tally.record(answer.status_code, answer.text, time.perf_counter() - began)

            await asyncio.gather(*(one_client() for _ in range(clients)))

        warm = _Tally([])
        await run(warmup, warm)
        tally = _Tally([])
        cpu, began = time.process_time(), time.perf_counter()
        await run(requests, tally)
        seconds, cpu_s = time.perf_counter() - began, time.process_time() - cpu
    return _phase(tally, seconds, cpu_s, clients=clients, requests=requests, warmup=warmup,
                  warmup_errors=warm.errors)


# ------------------------------------------------------------------------------------------------ driver


def _embedded(source: str, model_spec: str, limit: int, batch_size: int, say: Callable[[str], None]
              ) -> dict[str, Any]:
    from pipeline.bench.peers import run_bench

    report = run_bench(source, model_spec=model_spec, limit=limit, batch_size=batch_size, peers=("invsort",),
                       on_event=say)
    result: dict[str, Any] = report["peers"].get("invsort_sqlite") or {"status": "error", "reason": "no result"}
    return result


def _machine() -> dict[str, Any]:
    info: dict[str, Any] = {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                            "python": platform.python_version()}
    with contextlib.suppress(OSError, ValueError):
        info["load_avg_1m"] = round(os.getloadavg()[0], 2)
    return info


def _goals(sequential: dict[str, Any], concurrent: dict[str, Any], embedded: dict[str, Any]) -> dict[str, Any]:
    p95 = sequential["latency_ms"]["p95"]
    ours, theirs = concurrent.get("images_per_s"), embedded.get("images_per_s")
    ratio = round(ours / theirs, 3) if ours and theirs and embedded.get("status") == "ok" else None
    return {
        "p95_ms": {"goal": f"sequential p95 <= {P95_GOAL_MS:g} ms", "value": p95,
                   "met": None if p95 is None else p95 <= P95_GOAL_MS},
        "ratio": {"goal": f"{concurrent['clients']} clients >= {RATIO_GOAL:g}x embedded images/s", "value": ratio,
                  "met": None if ratio is None else ratio >= RATIO_GOAL},
    }


@contextlib.contextmanager
def _served(model_spec: str, say: Callable[[str], None]) -> Iterator[_Server]:
    with tempfile.TemporaryDirectory(prefix="invsort-bench-api-") as tmp:
        server = _Server(model_spec, Path(tmp), say)
        try:
            server.start()
            yield server
        finally:
            code = server.stop()
            if code not in (None, 0):
                say(f"invsort serve exited with {code}:\n{server.log_tail()}")


def run_api_bench(
    source: str,
    *,
    model_spec: str,
    requests: int = 500,
    clients: int = 8,
    warmup: int = 20,
    limit: int | None = None,
    batch_size: int = 64,
    on_event: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run the benchmark (see the module's docstring) and return its JSON-ready report.

    Args:
        source: a local folder of photos.
        model_spec: a model file path or ``bundled:NAME``, for the server and the embedded pipeline.
        requests: timed requests per phase (>= 1).
        clients: requests in flight in the concurrent phase (>= 1).
        warmup: requests before each phase, not timed (>= 0).
        limit: use the first ``limit`` photos of ``source`` (None: all).
        batch_size: the embedded pipeline's batch size; give the server's ``INVSORT_BATCH_SIZE``.
        on_event: called with a line of progress text.

    Returns:
        ``source``, ``photos``, ``model`` (as ``/healthz`` names it, with ``arch`` and ``input_size``),
        ``machine``, ``timing``, ``server`` (``url``, ``startup_s``, ``rss_mib_idle`` (started, no request yet),
        ``rss_mib_peak``,
        ``exit_code``), ``sequential`` and ``concurrent`` (``requests``, ``ok``, ``errors``, ``images_per_s``,
        ``latency_ms`` {p50, p95, p99, mean, min, max}, ``client_cpu_s``, ``batching`` {batches,
        photos_per_batch, requests_per_batch}), ``embedded`` (the ``invsort`` peer's figures or its error) and
        ``goals`` (``p95_ms`` and ``ratio``: ``goal``, ``value``, ``met``: True, False or None when unknown).

    Raises:
        ConfigError: a count out of range.
        SourceError: ``source`` is not a local folder of images.
        InvsortError: the server did not start (the message holds the end of its log).
    """
    if requests < 1 or clients < 1 or warmup < 0:
        raise ConfigError(f"bench api needs requests >= 1, clients >= 1, warmup >= 0; got {requests}, {clients}, "
                          f"{warmup}")
    from pipeline.models.modelfile import load_model_file

    say = on_event or (lambda _line: None)
    mf = load_model_file(model_spec)
    photos = load_photos(source, limit)
    size = sum(len(p.body) for p in photos)
    say(f"{len(photos)} photos ({size / 2**20:.1f} MiB as request bodies) from {source}; model {mf.name} "
        f"{mf.version} ({mf.arch}, input {'x'.join(map(str, mf.input_size))})")
    report: dict[str, Any] = {
        "invsort_bench_api": 1, "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "source": source,
        "photos": len(photos), "model": {"spec": model_spec, "name": mf.name, "version": mf.version, "arch": mf.arch,
                                         "input_size": list(mf.input_size)},
        "machine": _machine(), "timing": TIMING, "requests": requests, "clients": clients, "warmup": warmup,
    }
    with _served(model_spec, say) as server:
        health = json.loads(_get(f"{server.url}/healthz"))
        report["model"]["served"] = {"name": health["model"]["name"], "version": health["model"]["version"]}
        report["server"] = {"url": server.url, "startup_s": server.startup_s, "device": "cpu",
                            "rss_mib_idle": round(server.rss() / 2**20, 1)}
        for name, run in (("sequential", lambda: run_sequential(server.url, photos, requests, warmup)),
                          ("concurrent", lambda: run_concurrent(server.url, photos, requests, clients, warmup))):
            say(f"{name}: {warmup} warm-up + {requests} requests" + (f", {clients} in flight" if name != "sequential"
                                                                     else ""))
            before = server.metrics()
            report[name] = run()
            report[name]["batching"] = batch_figures(before, server.metrics())
            say(f"  {name}: {report[name]['images_per_s']} images/s, p95 {report[name]['latency_ms']['p95']} ms, "
                f"{report[name]['errors']} error(s)")
        report["server"]["rss_mib_peak"] = round(max(server.peak_rss, server.rss()) / 2**20, 1)
    report["server"]["exit_code"] = server.proc.returncode if server.proc else None
    say("embedded pipeline (invsort bench run --peer invsort) on the same photos ...")
    report["embedded"] = _embedded(source, model_spec, len(photos), batch_size, say)
    report["goals"] = _goals(report["sequential"], report["concurrent"], report["embedded"])
    return report


def _get(url: str) -> str:
    import httpx

    return httpx.get(url, timeout=30).text


# ------------------------------------------------------------------------------------------------- table


def format_api_table(report: dict[str, Any]) -> str:
    """The report as a fixed-width text table, with the ratio, the server's memory and the goal lines."""

    def cell(v: Any, digits: int = 1) -> str:
        return "-" if v is None else (f"{v:.{digits}f}" if isinstance(v, float) else str(v))

    head = (f"{'phase':<22}{'requests':>9}{'errors':>8}{'images/s':>10}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}"
            f"{'mean ms':>9}{'photos/pass':>13}")
    lines = [head, "-" * len(head)]
    for key, label in (("sequential", "sequential (1 client)"), ("concurrent", f"{report['clients']} clients")):
        r = report[key]
        lat = r["latency_ms"]
        lines.append(f"{label:<22}{r['requests']:>9}{r['errors']:>8}{cell(r['images_per_s']):>10}"
                     f"{cell(lat['p50']):>9}{cell(lat['p95']):>9}{cell(lat['p99']):>9}{cell(lat['mean']):>9}"
                     f"{cell(r['batching']['photos_per_batch'], 2):>13}")
    e = report["embedded"]
    if e.get("status") == "ok":
        lines.append(f"{'embedded pipeline':<22}{e['images']:>9}{'-':>8}{cell(e['images_per_s']):>10}"
                     f"{'-':>9}{'-':>9}{'-':>9}{'-':>9}{'-':>13}")
    else:
        reason = (e.get("reason") or "").strip().splitlines() or [""]
        lines.append(f"{'embedded pipeline':<22}{e.get('status')}: {reason[-1][:100]}")
    goals = report["goals"]
    lines.append(f"ratio {report['clients']} clients / embedded: "
                 + ("-" if goals["ratio"]["value"] is None else f"{goals['ratio']['value']:.2f}x"))
    s = report["server"]
    lines.append(f"server RSS: {cell(s.get('rss_mib_idle'))} MiB idle after start-up, {cell(s.get('rss_mib_peak'))} "
                 f"MiB peak; start-up {s['startup_s']} s")
    lines.append(f"client CPU: {report['sequential']['client_cpu_s']} s sequential, "
                 f"{report['concurrent']['client_cpu_s']} s concurrent (same machine as the server)")
    m = report["model"]
    lines.append(f"model {m['name']} {m['version']} ({m['arch']}, input {'x'.join(map(str, m['input_size']))}), "
                 f"{report['photos']} photos, one a request, {report['warmup']} warm-up requests a phase, "
                 f"{report['machine']['cpu_count']} CPUs, load {report['machine'].get('load_avg_1m', '-')} at start")
    for goal in goals.values():
        verdict = {True: "met", False: "missed", None: "unknown"}[goal["met"]]
        lines.append(f"{goal['goal']}: {verdict} ({cell(goal['value'], 2)})")
    return "\n".join(lines)
