"""``invsort submit`` of large manifests: wall time, the submitting process's peak memory, and what the queued job
holds in Redis. Nothing is asserted; it prints the figures (README, "Million-item jobs").

Run it from the repository root, with a Redis database of its own (it must be empty; it is emptied after each run)::

    .venv/bin/python -m pipeline.bench.submit --rows 10000 100000 1000000 --broker redis://127.0.0.1:6379/15
    .venv/bin/python -m pipeline.bench.submit --rows 1000000 --broker redis://127.0.0.1:6379/15 \\
        --db postgresql://postgres@127.0.0.1:5432/bench   # an empty database of your own

For each row count it writes a CSV manifest (``item_id,image_uri``, relative image paths: ``submit`` does not read
the images), migrates a fresh catalog (SQLite in a scratch folder unless ``--db`` is given), and runs
``invsort submit MANIFEST`` in a child process, reading the child's peak resident set size from ``wait4``. Then,
while the job waits (no worker runs), it reads the Redis queue: its length (one message per batch of
``INVSORT_ITEMS_PER_TASK`` items), its bytes (``MEMORY USAGE``, exact), the first message's size, and the server's
``used_memory`` before and after (all databases: other users of the server move it).
"""

from __future__ import annotations

import argparse
import tempfile
from dataclasses import dataclass
from pathlib import Path

from pipeline.bench.lean import run_invsort

__all__ = ["SubmitFigures", "main", "run_submit", "write_manifest"]

QUEUE = "invsort"  # worker.app's task_default_queue


@dataclass
class SubmitFigures:
    rows: int
    seconds: float  # wall
    cpu_seconds: float  # user + system: what the wall time would be on an idle machine, roughly
    peak_rss: int  # bytes
    messages: int
    queue_bytes: int
    message_bytes: int
    used_memory_delta: int


def write_manifest(path: Path, rows: int) -> Path:
    """A CSV manifest of ``rows`` items with relative image paths (the images need not exist)."""
    with path.open("w", encoding="utf-8") as f:
        f.write("item_id,image_uri\n")
        for start in range(0, rows, 100_000):
            f.write("".join(f"sku-{i:09d},img/{i % 1000:03d}/{i:09d}.jpg\n"
                            for i in range(start, min(rows, start + 100_000))))
    return path


def run_submit(manifest: Path, rows: int, db_url: str, broker: str) -> SubmitFigures:
    """Submit ``manifest`` into ``db_url`` and ``broker`` (an empty Redis database, emptied afterwards)."""
    import redis

    client = redis.Redis.from_url(broker)
    if client.dbsize():
        raise SystemExit(f"{broker} is not empty: give the benchmark a Redis database of its own")
    env = {"INVSORT_DATABASE_URL": db_url, "INVSORT_BROKER_URL": broker}
    upgrade = run_invsort(["db", "upgrade"], env)
    if upgrade.status:
        raise SystemExit(f"invsort db upgrade failed:\n{upgrade.output}")
    before = int(client.info("memory")["used_memory"])
    try:
        run = run_invsort(["submit", str(manifest), "--model", "bundled:fashion_mnist_cnn"], env)
        if run.status:
            raise SystemExit(f"invsort submit failed:\n{run.output}")
        after = int(client.info("memory")["used_memory"])
        first = client.lindex(QUEUE, 0)
        return SubmitFigures(rows=rows, seconds=run.wall_s, cpu_seconds=run.cpu_s, peak_rss=run.peak_rss,
                             messages=int(client.llen(QUEUE)),
                             queue_bytes=int(client.memory_usage(QUEUE, samples=0) or 0),
                             message_bytes=len(first) if isinstance(first, bytes) else 0,
                             used_memory_delta=after - before)
    finally:
        client.flushdb()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--broker", required=True, help="an empty Redis database of its own, e.g. redis://HOST/15")
    parser.add_argument("--db", default=None, help="an empty catalog database of its own [default: a fresh SQLite "
                        "file per run]")
    args = parser.parse_args(argv)
    print(f"{'rows':>9} {'submit s':>9} {'CPU s':>6} {'peak RSS MB':>12} {'messages':>9} {'queue MB':>9} {'msg B':>6} "
          f"{'Redis used_memory +MB':>22}")
    with tempfile.TemporaryDirectory(prefix="invsort-submit-") as tmp:
        for rows in args.rows:
            manifest = write_manifest(Path(tmp) / f"m{rows}.csv", rows)
            db_url = args.db or f"sqlite:///{tmp}/catalog{rows}.db"
            f = run_submit(manifest, rows, db_url, args.broker)
            print(f"{f.rows:>9} {f.seconds:>9.1f} {f.cpu_seconds:>6.1f} {f.peak_rss / 2**20:>12.0f} {f.messages:>9} "
                  f"{f.queue_bytes / 2**20:>9.2f} {f.message_bytes:>6} {f.used_memory_delta / 2**20:>22.2f}",
                  flush=True)
            if args.db is None:
                Path(f"{tmp}/catalog{rows}.db").unlink(missing_ok=True)


if __name__ == "__main__":
    main()
