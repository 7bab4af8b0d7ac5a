"""Lean CPU processes: peak memory and wall time of ``invsort sort`` per runtime, and the memory of an idle
``invsort worker`` with a model loaded. Nothing is asserted; it prints the figures (README, "Lean CPU workers").

Run it from the repository root::

    .venv/bin/python -m pipeline.bench.lean --sort examples/images
    .venv/bin/python -m pipeline.bench.lean --worker MODEL.pt --broker redis://127.0.0.1:6379/15

``--sort SOURCE`` runs ``invsort sort SOURCE`` (the bundled model) once per runtime (``--runtimes``, default
onnxruntime, openvino and torch), each in a child process of its own into a fresh SQLite catalog, and reads the
child's peak resident set size from ``wait4``; a first, unmeasured run per runtime warms the file cache.

``--worker MODEL`` starts ``invsort worker -c 1`` per runtime with ``INVSORT_MODEL_PATH=MODEL`` (its ONNX export
beside it: ``invsort export-onnx MODEL`` first), submits the bundled examples so that the pool process loads the
model and sorts them, waits for the job to end, lets the worker idle for ``--idle`` seconds, and reads the RSS,
USS and PSS of the worker's main process and of its pool process (psutil); then stops the worker. It needs
PostgreSQL or SQLite (``--db``, default a scratch SQLite file) and a Redis database of its own (emptied after).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["idle_worker_memory", "main", "sort_figures"]

_ROOT = Path(__file__).resolve().parents[2]
_EXAMPLES = _ROOT / "examples" / "images"
_INVSORT = Path(sys.executable).with_name("invsort")


@dataclass(frozen=True)
class ChildRun:
    """What :func:`run_invsort` measured: exit status, wall and CPU (user + system) seconds, peak RSS in bytes
    (``getrusage``'s ``ru_maxrss`` of the child) and its output (stdout and stderr together)."""

    status: int
    wall_s: float
    cpu_s: float
    peak_rss: int
    output: str


def stop(proc: subprocess.Popen[str] | subprocess.Popen[bytes], timeout_s: float = 60) -> None:
    """Stop a child the way a supervisor does: SIGTERM (a worker finishes its task and exits), then SIGKILL when it
    has not exited within ``timeout_s`` seconds; returns once it has exited."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def run_invsort(args: Sequence[str], env: dict[str, str]) -> ChildRun:
    """``invsort ARGS`` in a child process with ``env`` on top of this one's environment, measured with
    :func:`os.wait4` (the child's own resource usage, nothing of this process)."""
    with tempfile.TemporaryFile() as out:
        began = time.perf_counter()
        child = subprocess.Popen([str(_INVSORT), *args], stdout=out, stderr=subprocess.STDOUT,
                                 env={**os.environ, **env})
        _, status, usage = os.wait4(child.pid, 0)
        seconds = time.perf_counter() - began
        child.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        return ChildRun(child.returncode, seconds, usage.ru_utime + usage.ru_stime, usage.ru_maxrss * 1024,
                        out.read().decode(errors="replace"))


def sort_figures(source: str, runtime: str, tmp: Path) -> tuple[float, int, float]:
    """``(wall seconds, peak RSS bytes, CPU seconds)`` of ``invsort sort SOURCE`` with ``runtime``, warm."""
    env = {"INVSORT_RUNTIME": runtime}
    for attempt in ("warm-up", "measured"):
        run = run_invsort(["sort", source, "--db", f"sqlite:///{tmp}/{runtime}-{attempt}.db", "--no-progress"], env)
        if run.status:
            raise SystemExit(f"invsort sort with {runtime} failed:\n{run.output}")
    return run.wall_s, run.peak_rss, run.cpu_s


def _memory(pid: int) -> tuple[float, float, float]:
    """``(RSS, USS, PSS)`` of a process, in MB."""
    import psutil

    info = psutil.Process(pid).memory_full_info()
    return info.rss / 2**20, info.uss / 2**20, getattr(info, "pss", 0) / 2**20


def idle_worker_memory(model: str, runtime: str, broker: str, db_url: str, idle_s: float
                       ) -> dict[str, tuple[float, float, float]]:
    """Start a one-process worker on ``model``, have it sort the examples, let it idle, and return the
    ``(RSS, USS, PSS)`` MB of its main process (``worker``) and of its pool process (``pool``)."""
    import psutil
    import redis

    client = redis.Redis.from_url(broker)
    if client.dbsize():
        raise SystemExit(f"{broker} is not empty: give the benchmark a Redis database of its own")
    env = {**os.environ, "INVSORT_RUNTIME": runtime, "INVSORT_MODEL_PATH": model, "INVSORT_BROKER_URL": broker,
           "INVSORT_DATABASE_URL": db_url, "INVSORT_METRICS_PORT": "0", "INVSORT_LOCAL_ROOTS": str(_EXAMPLES)}
    subprocess.run([str(_INVSORT), "db", "upgrade"], env=env, check=True, capture_output=True)
    with tempfile.TemporaryFile() as log:
        worker = subprocess.Popen([str(_INVSORT), "worker", "-c", "1", "-n", f"bench-{runtime}@%h"], env=env,
                                  stdout=log, stderr=subprocess.STDOUT)
        try:
            out = subprocess.run([str(_INVSORT), "submit", str(_EXAMPLES), "--wait"], env=env, capture_output=True,
                                 text=True, timeout=600)
            if out.returncode:
                raise SystemExit(f"the job did not end done:\n{out.stdout}{out.stderr}")
            time.sleep(idle_s)
            pool = psutil.Process(worker.pid).children()
            if len(pool) != 1:
                raise SystemExit(f"expected one pool process, found {len(pool)}")
            return {"worker": _memory(worker.pid), "pool": _memory(pool[0].pid)}
        finally:
            stop(worker)
            client.flushdb()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sort", metavar="SOURCE", default=None, help="measure invsort sort SOURCE")
    parser.add_argument("--worker", metavar="MODEL", default=None, help="measure an idle worker with MODEL loaded")
    parser.add_argument("--runtimes", nargs="+", default=["onnxruntime", "openvino", "torch"])
    parser.add_argument("--broker", default=None, help="an empty Redis database of its own (--worker)")
    parser.add_argument("--db", default=None, help="catalog database for --worker [default: a scratch SQLite file]")
    parser.add_argument("--idle", type=float, default=5.0, help="seconds the worker idles before it is measured")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="invsort-lean-") as tmp:
        if args.sort:
            print(f"invsort sort {args.sort}")
            print(f"{'runtime':>12} {'wall s':>7} {'CPU s':>6} {'peak RSS MB':>12}")
            for runtime in args.runtimes:
                seconds, rss, cpu = sort_figures(args.sort, runtime, Path(tmp))
                print(f"{runtime:>12} {seconds:>7.2f} {cpu:>6.2f} {rss / 2**20:>12.0f}", flush=True)
        if args.worker:
            if not args.broker:
                raise SystemExit("--worker needs --broker")
            print(f"invsort worker -c 1, idle with {args.worker} loaded: RSS / USS / PSS MB")
            for runtime in args.runtimes:
                db_url = args.db or f"sqlite:///{tmp}/worker-{runtime}.db"
                figures = idle_worker_memory(args.worker, runtime, args.broker, db_url, args.idle)
                line = "  ".join(f"{name} {rss:.0f} / {uss:.0f} / {pss:.0f}" for name, (rss, uss, pss)
                                 in figures.items())
                print(f"{runtime:>12}  {line}", flush=True)


if __name__ == "__main__":
    main()
