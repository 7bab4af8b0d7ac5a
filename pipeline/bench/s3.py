"""invsort fetching from S3 across a network's round trip, against the same photos read from local files.

What runs (``invsort bench s3 SOURCE ...``), every part in a process of its own on this machine:

- an S3 API: moto's S3 app (``moto[server]``) under uvicorn on ``127.0.0.1``, HTTP/1.1 with keep-alive as S3 is
  (moto's own ``moto_server`` closes the connection after every answer, which would add a round trip to each GET);
  the photos of SOURCE are uploaded into a bucket, keys their paths below SOURCE;
- for each round trip asked for above 0 ms, a delaying relay in front of it (:mod:`pipeline.bench.netdelay`:
  half the round trip added to every chunk each way, one round trip for each new connection);
- the peers, one after the other: ``local`` (SOURCE read from local files), and ``s3`` at each round trip and
  each fetch concurrency (``INVSORT_FETCH_CONCURRENCY``); ``--repeat`` runs the whole list again, in order.

Each peer is measured on the queued path (``--mode queued``, the default): ``invsort worker -c PROCESSES`` against
a Redis database of its own and a fresh SQLite catalog (or ``--db-url``), a warm-up job first (the pool processes
load the model and open their connections), then ``invsort submit SOURCE --wait``; images/s is the job's images
over the time from its first batch claimed by the worker to the job done (the first ``sorting_job_batches.started_at``
and ``jobs.finished_at``).
``--mode embedded`` runs ``invsort sort SOURCE`` instead and reads its own images/s (first image to last row).

The S3 server and the relays share the machine's cores with the worker: the report gives the CPU seconds the S3
server spent in each run, the share of the machine a real, remote S3 would not take.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pipeline.bench.lean import stop
from pipeline.io.storage import IMAGE_SUFFIXES

__all__ = ["BUCKET", "format_s3_table", "run_s3_bench", "serve_s3"]

BUCKET = "invsort-bench"
LOOPBACK = "127.0.0.1"
FAKE_AWS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
_INVSORT = Path(sys.executable).with_name("invsort")
_LISTENING = re.compile(r"listening on 127\.0\.0\.1:(\d+)")
_JOB = re.compile(r"^job (\S+): ", re.M)
_SORTED = re.compile(r"sorted (\d+) images in ([\d.]+) s \(([\d.]+) images/s\)")


def serve_s3(port: int = 0) -> None:
    """Serve moto's S3 API on ``127.0.0.1:port`` (0: a free port) until terminated; print ``listening on
    127.0.0.1:PORT`` once it accepts connections. uvicorn answers HTTP/1.1 with keep-alive; moto's app runs in its
    WSGI thread pool."""
    import socket

    import uvicorn
    from moto.server import create_backend_app

    # IPPROTO_TCP named: asyncio sets TCP_NODELAY only on sockets that say so, and without it an answer's body
    # waits behind its headers for the client's delayed ACK (40 ms on Linux).
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((LOOPBACK, port))
    sock.listen(1024)
    print(f"listening on {LOOPBACK}:{sock.getsockname()[1]}", flush=True)
    config = uvicorn.Config(create_backend_app("s3"), interface="wsgi", log_level="warning", access_log=False,
                            timeout_keep_alive=60)
    uvicorn.Server(config).run(sockets=[sock])


@contextmanager
def _child(args: Sequence[str], what: str) -> Iterator[tuple[subprocess.Popen[str], int]]:
    """A child process that prints ``listening on 127.0.0.1:PORT``: ``(process, port)``; terminated afterwards."""
    proc = subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **FAKE_AWS})
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        m = _LISTENING.search(line)
        if not m:
            proc.kill()
            raise RuntimeError(f"{what} did not start: {line}{proc.communicate()[1][-2000:]}")
        yield proc, int(m.group(1))
    finally:
        stop(proc, timeout_s=10)


def _photos(source: Path, limit: int | None) -> list[Path]:
    files = sorted(p for p in source.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                   and not any(part.startswith(".") for part in p.relative_to(source).parts))
    return files[:limit] if limit else files


def _upload(endpoint: str, source: Path, photos: list[Path]) -> None:
    """Put ``photos`` into :data:`BUCKET` at ``endpoint``, keys their paths below ``source``."""
    from concurrent.futures import ThreadPoolExecutor

    import boto3.session
    import botocore.config

    client = boto3.session.Session(**{k.lower(): v for k, v in FAKE_AWS.items() if k != "AWS_DEFAULT_REGION"},
                                   region_name=FAKE_AWS["AWS_DEFAULT_REGION"]).client(
        "s3", endpoint_url=endpoint, config=botocore.config.Config(max_pool_connections=16))
    client.create_bucket(Bucket=BUCKET)
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda p: client.put_object(Bucket=BUCKET, Key=p.relative_to(source).as_posix(),
                                                  Body=p.read_bytes()), photos))
    client.close()


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (its threads included)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _tree_cpu_s(pid: int) -> float:
    """CPU seconds of process ``pid`` and its children (a worker and its pool processes)."""
    import psutil

    procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    return sum(_cpu_s(p.pid) for p in procs if p.is_running())


def _run(args: Sequence[str], env: dict[str, str], timeout_s: float = 1800) -> str:
    out = subprocess.run([str(_INVSORT), *args], env=env, capture_output=True, text=True, timeout=timeout_s)
    if out.returncode:
        raise RuntimeError(f"invsort {' '.join(args)} exited {out.returncode}:\n{out.stdout}{out.stderr[-3000:]}")
    return out.stdout


def _job_figures(db_url: str, job_id: str) -> dict[str, Any]:
    from sqlalchemy import func, select

    from db.catalog import get_job
    from db.models import SortingJobBatch as JobBatch
    from db.session import session_scope

    with session_scope(db_url) as session:
        job = get_job(session=session, job_id=job_id)
        first = session.execute(select(func.min(JobBatch.started_at)).where(JobBatch.job_id == job_id)).scalar()
    assert job is not None and first is not None and job.finished_at is not None, job
    seconds = (job.finished_at - first).total_seconds()  # the job's started_at is its first batch *recorded*
    return {"status": job.status, "images": job.processed, "sorted": job.sorted_count,
            "needs_review": job.needs_review_count, "failed": job.failed_count, "seconds": seconds,
            "images_per_s": job.processed / seconds if seconds > 0 else 0.0}


def _queued(source_uri: str, env: dict[str, str], *, processes: int, broker: str, db_url: str,
            warmup: int) -> dict[str, Any]:
    """One measured job on the queued path: start a worker, a warm-up job, the measured job; stop the worker."""
    import redis

    client = redis.Redis.from_url(broker)
    env = {**env, "INVSORT_BROKER_URL": broker, "INVSORT_DATABASE_URL": db_url}
    _run(["db", "upgrade"], env)
    with tempfile.TemporaryFile() as log:
        worker = subprocess.Popen([str(_INVSORT), "worker", "-c", str(processes), "-n", f"bench-s3-{os.getpid()}@%h"],
                                  env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            _run(["submit", source_uri, "--wait", "--limit", str(warmup)], env)
            cpu = _tree_cpu_s(worker.pid)
            out = _run(["submit", source_uri, "--wait"], env)
            cpu = _tree_cpu_s(worker.pid) - cpu
            m = _JOB.search(out)
            assert m, out
            figures = _job_figures(db_url, m.group(1))
            return figures | {"worker_cpu_ms_per_image": round(1000 * cpu / max(1, figures["images"]), 2)}
        except BaseException:
            log.seek(0)
            sys.stderr.write(log.read().decode(errors="replace")[-4000:])
            raise
        finally:
            stop(worker)
            client.flushdb()


def _embedded(source_uri: str, env: dict[str, str], db_url: str) -> dict[str, Any]:
    """One ``invsort sort`` of ``source_uri`` into ``db_url``: its own figures (first image to last row)."""
    out = _run(["sort", source_uri, "--db", db_url, "--no-progress"], env)
    m = _SORTED.search(out)
    assert m, out
    return {"status": "done", "images": int(m.group(1)), "seconds": float(m.group(2)),
            "images_per_s": float(m.group(3))}


def run_s3_bench(
    source: str,
    *,
    model_spec: str,
    rtts_ms: Sequence[float] = (0.0, 20.0),
    fetch_concurrencies: Sequence[int] = (32,),
    mode: str = "queued",
    processes: int = 1,
    broker: str | None = None,
    db_url: str | None = None,
    limit: int | None = None,
    repeat: int = 1,
    warmup: int = 128,
    on_event: Callable[[str], None] = lambda line: None,
) -> dict[str, Any]:
    """Measure ``local`` and ``s3`` peers (see the module docstring); return the report (JSON-able).

    Args:
        source: a local folder of photos.
        model_spec: the model every peer runs (a path or ``bundled:NAME``).
        rtts_ms: round trips to S3, ms; 0 is the server direct, no relay.
        fetch_concurrencies: ``INVSORT_FETCH_CONCURRENCY`` values, each an ``s3`` peer at every round trip.
        mode: ``queued`` (a Celery worker) or ``embedded`` (``invsort sort``).
        processes: the worker's pool processes (``-c``), queued mode.
        broker: a Redis database of the benchmark's own (it must be empty; emptied after each run): queued mode.
        db_url: the catalog (every run's job lands in it); None: a fresh SQLite file per run.
        limit: the first N photos (stable order).
        repeat: runs of the whole list of peers, one after the other.
        warmup: images of the warm-up job before each measured queued job.

    Raises:
        ValueError: an unknown mode, no broker in queued mode, a non-empty broker database, or no photos.
        RuntimeError: a child process failed (its output in the message).
    """
    if mode not in ("queued", "embedded"):
        raise ValueError(f"unknown mode {mode!r}; valid: queued, embedded")
    if mode == "queued":
        import redis

        if not broker:
            raise ValueError("the queued mode needs a Redis database of its own: --broker redis://HOST:PORT/N")
        if redis.Redis.from_url(broker).dbsize():
            raise ValueError(f"{broker} is not empty: give the benchmark a Redis database of its own")
    root = Path(os.path.realpath(source))
    photos = _photos(root, limit)
    if not photos:
        raise ValueError(f"no photos under {source}")
    with tempfile.TemporaryDirectory(prefix="invsort-bench-s3-") as tmp:
        aws = Path(tmp, "aws")
        aws.mkdir()
        base = {k: v for k, v in os.environ.items()
                if not k.startswith(("INVSORT_", "AWS_"))} | FAKE_AWS | {
            "AWS_CONFIG_FILE": str(aws / "config"), "AWS_SHARED_CREDENTIALS_FILE": str(aws / "credentials"),
            "INVSORT_MODEL_PATH": model_spec, "INVSORT_LOCAL_ROOTS": str(root), "INVSORT_METRICS_PORT": "0"}
        local_uri = str(root)
        if limit:  # a manifest of the first N photos, read by every peer in the same order
            local_uri = str(Path(tmp, "local.csv"))
            Path(local_uri).write_text("item_id,image_uri\n" + "".join(
                f"{p.relative_to(root).as_posix()},{p.as_uri()}\n" for p in photos))
        report: dict[str, Any] = {"source": source, "images": len(photos), "model": model_spec, "mode": mode,
                                  "processes": processes, "rtts_ms": list(rtts_ms), "cpus": os.cpu_count(),
                                  "fetch_concurrencies": list(fetch_concurrencies), "runs": []}
        with _child(["-m", "pipeline.bench.s3", "serve"], "the S3 server") as (server, port):
            on_event(f"S3 server (moto under uvicorn) on 127.0.0.1:{port}; uploading {len(photos)} photos")
            _upload(f"http://{LOOPBACK}:{port}", root, photos)
            s3_uri = f"s3://{BUCKET}/"
            if limit:
                s3_uri = str(Path(tmp, "s3.csv"))
                Path(s3_uri).write_text("item_id,image_uri\n" + "".join(
                    f"{p.relative_to(root).as_posix()},s3://{BUCKET}/{p.relative_to(root).as_posix()}\n"
                    for p in photos))
            peers: list[tuple[str, float | None, int | None]] = [("local", None, None)]
            peers += [("s3", rtt, fc) for rtt in rtts_ms for fc in fetch_concurrencies]
            for turn in range(repeat):
                for n, (kind, rtt, fc) in enumerate(peers):
                    where = f"{tmp}/catalog-{turn}-{n}.db"
                    url = db_url or f"sqlite:///{where}"
                    env = dict(base)
                    if fc is not None:
                        env["INVSORT_FETCH_CONCURRENCY"] = str(fc)
                    run = _measure(kind, rtt, env, port, mode=mode, processes=processes, broker=broker, db_url=url,
                                   local_uri=local_uri, s3_uri=s3_uri, warmup=min(warmup, len(photos)),
                                   server_pid=server.pid)
                    run |= {"peer": kind, "rtt_ms": rtt, "fetch_concurrency": fc, "turn": turn,
                            "load_1min": os.getloadavg()[0]}
                    report["runs"].append(run)
                    on_event(_line(run))
                    Path(where).unlink(missing_ok=True)
    return report


def _measure(kind: str, rtt: float | None, env: dict[str, str], port: int, *, mode: str, processes: int,
             broker: str | None, db_url: str, local_uri: str, s3_uri: str, warmup: int,
             server_pid: int) -> dict[str, Any]:
    """One peer's run; for S3 behind a relay for ``rtt`` > 0."""
    def go(source_uri: str) -> dict[str, Any]:
        cpu = _cpu_s(server_pid)
        if mode == "queued":
            assert broker is not None
            figures = _queued(source_uri, env, processes=processes, broker=broker, db_url=db_url, warmup=warmup)
        else:
            figures = _embedded(source_uri, env, db_url)
        return figures | {"s3_server_cpu_s": round(_cpu_s(server_pid) - cpu, 2)}

    if kind == "local":
        return go(local_uri)
    if not rtt:
        env["INVSORT_S3_ENDPOINT_URL"] = f"http://{LOOPBACK}:{port}"
        return go(s3_uri)
    args = ["-m", "pipeline.bench.netdelay", "--upstream", f"{LOOPBACK}:{port}", "--delay-ms", str(rtt / 2)]
    with _child(args, "the delaying relay") as (relay, relay_port):
        env["INVSORT_S3_ENDPOINT_URL"] = f"http://{LOOPBACK}:{relay_port}"
        figures = go(s3_uri)
        relay.send_signal(signal.SIGTERM)
        out, _ = relay.communicate(timeout=10)
    stats = json.loads(out.strip().splitlines()[-1])
    return figures | {"peak_gets_in_flight": stats["peak_busy"], "connections": stats["connections"]}


def _line(run: dict[str, Any]) -> str:
    where = "local files" if run["peer"] == "local" else (
        f"S3, {run['rtt_ms']:g} ms RTT, fetch concurrency {run['fetch_concurrency']}")
    extra = f", at most {run['peak_gets_in_flight']} GETs in flight" if "peak_gets_in_flight" in run else ""
    cpu = f"worker {run['worker_cpu_ms_per_image']} CPU ms/image, " if "worker_cpu_ms_per_image" in run else ""
    return (f"{where}: {run['images']} images, {run['images_per_s']:.1f} images/s ({run['status']}; {cpu}"
            f"S3 server {run['s3_server_cpu_s']} CPU s{extra}; load {run['load_1min']:.2f})")


def format_s3_table(report: dict[str, Any]) -> str:
    """The report as a table: each peer's images/s (runs in order), the median, and the ratio to local."""
    from statistics import median

    keyed: dict[tuple[str, float | None, int | None], list[dict[str, Any]]] = {}
    for run in report["runs"]:
        keyed.setdefault((run["peer"], run["rtt_ms"], run["fetch_concurrency"]), []).append(run)
    local = median(r["images_per_s"] for r in keyed.get(("local", None, None), [])) if (
        "local", None, None) in keyed else None
    lines = [f"{'peer':<14} {'RTT ms':>7} {'fetch conc.':>11} {'images/s (each run)':>28} {'median':>8} "
             f"{'/ local':>8} {'worker CPU ms/img':>17} {'S3 srv CPU s':>12} {'GETs in flight':>14}", "-" * 128]
    for (peer, rtt, fc), runs in keyed.items():
        rates = [r["images_per_s"] for r in runs]
        mid = median(rates)
        ratio = f"{mid / local:.2f}x" if local else "-"
        inflight = max((r.get("peak_gets_in_flight", 0) for r in runs), default=0) or "-"
        worker_cpu = f"{median(r['worker_cpu_ms_per_image'] for r in runs):.2f}" if all(
            "worker_cpu_ms_per_image" in r for r in runs) else "-"
        lines.append(f"{peer:<14} {'-' if rtt is None else f'{rtt:g}':>7} {fc or '-':>11} "
                     f"{', '.join(f'{x:.1f}' for x in rates):>28} {mid:>8.1f} {ratio:>8} {worker_cpu:>17} "
                     f"{median(r['s3_server_cpu_s'] for r in runs):>12.2f} {inflight!s:>14}")
    lines.append(f"{report['images']} images of {report['source']}, model {report['model']}, {report['mode']} path"
                 + (f" (invsort worker -c {report['processes']})" if report["mode"] == "queued" else "")
                 + f", {report['cpus']} CPUs; images/s from the job's first batch claimed to the job done"
                 if report["mode"] == "queued" else
                 f"{report['images']} images of {report['source']}, model {report['model']}, embedded path "
                 f"(invsort sort), {report['cpus']} CPUs; images/s from the first image to the last row")
    lines.append("goal: S3 at 20 ms RTT >= 0.9x local")
    return "\n".join(lines)


if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"]:
        serve_s3(int(sys.argv[2]) if len(sys.argv) > 2 else 0)
    else:
        raise SystemExit("usage: python -m pipeline.bench.s3 serve [PORT]  (the benchmark: invsort bench s3)")
