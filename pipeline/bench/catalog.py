"""How fast the catalog takes results: :func:`db.catalog.upsert_items` measured alone, without images or a model.

Run it on the database the workers write to (``invsort bench catalog URL --rows 100000``): it works
in a scratch schema (PostgreSQL) or a scratch file (SQLite) that it removes afterwards, so the user's tables are
never read or written.
"""

from __future__ import annotations

import logging
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import func, select, text
from sqlalchemy.engine import make_url

from db.catalog import upsert_items
from db.migrate import upgrade
from db.models import CatalogItem
from db.session import dispose_engines, get_engine, safe_url, session_scope, sqlite_path
from pipeline.errors import ConfigError, InvsortError
from pipeline.records import ItemResult
from pipeline.settings import normalise_database_url

__all__ = ["bench_upserts", "make_rows"]

log = logging.getLogger(__name__)

# Ten Fashion-MNIST-like class names: the top-k JSON of a real row names five of them.
_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


def make_rows(n: int, *, job_id: str, seed: int = 0) -> list[ItemResult]:
    """``n`` realistic catalog rows with distinct ids, as the worker writes them.

    ``item_id`` and ``image_uri`` are ~60-character ``s3://`` URIs, ``topk`` has 5 entries, one row in 50 is
    ``failed`` with an error and no category, one in 10 ``needs_review``; ``seed`` varies the predictions
    (not the ids), so calling it twice with different seeds gives new values for the same items.
    """
    rows = []
    for i in range(n):
        uri = f"s3://invsort-prod-photos/catalog/2024/11/{i:08d}-{(i * 2654435761) % 2**32:08x}.jpg"
        k = (i + seed) % len(_CLASSES)
        if i % 50 == 49:
            rows.append(
                ItemResult(
                    item_id=uri,
                    image_uri=uri,
                    status="failed",
                    error="cannot decode image: truncated JPEG",
                    model_name="fashion_mnist_cnn",
                    model_version=f"v{seed}",
                    job_id=job_id,
                )
            )
            continue
        p = 0.35 + ((i * 7 + seed) % 60) / 100
        rest = (1.0 - p) / 4
        topk: list[list[str | float]] = [[_CLASSES[k], p]]
        topk += [[_CLASSES[(k + j) % len(_CLASSES)], rest / j] for j in range(1, 5)]
        rows.append(
            ItemResult(
                item_id=uri,
                image_uri=uri,
                status="needs_review" if i % 10 == 3 else "sorted",
                category=_CLASSES[k],
                confidence=p,
                topk=topk,
                model_name="fashion_mnist_cnn",
                model_version=f"v{seed}",
                job_id=job_id,
            )
        )
    return rows


@contextmanager
def scratch_database(url: str) -> Iterator[str]:
    """A migrated, empty scratch database next to ``url``'s, removed on exit.

    PostgreSQL: a new schema ``invsort_bench_<hex>`` in the same database, used through ``search_path``, then
    dropped with everything in it. SQLite: a file in a new temporary directory (beside the given file, so the
    same disk is measured), then deleted.

    Raises:
        ConfigError: ``url`` is neither SQLite nor PostgreSQL.
        sqlalchemy.exc.OperationalError: the database cannot be reached.
    """
    u = make_url(normalise_database_url(url))
    backend = u.get_backend_name()
    if backend == "sqlite":
        path = sqlite_path(u)
        parent = path.parent if path is not None and path.parent.is_dir() else None
        with tempfile.TemporaryDirectory(prefix="invsort-bench-", dir=parent) as tmp:
            scratch = f"sqlite:///{Path(tmp) / 'bench.db'}"
            try:
                upgrade(scratch)
                yield scratch
            finally:
                dispose_engines(scratch)
        return
    if backend != "postgresql":
        raise ConfigError(f"unsupported database {safe_url(url)}: use a SQLite or PostgreSQL URL")

    schema = f"invsort_bench_{uuid.uuid4().hex[:12]}"
    engine = get_engine(url)
    quoted = engine.dialect.identifier_preparer.quote_identifier(schema)
    options = " ".join(filter(None, [u.query.get("options"), f"-csearch_path={schema}"]))  # type: ignore[list-item]
    scratch = u.update_query_dict({"options": options}).render_as_string(hide_password=False)
    with engine.begin() as conn:
        conn.execute(text(f"CREATE SCHEMA {quoted}"))
    try:
        upgrade(scratch)
        yield scratch
    finally:
        dispose_engines(scratch)
        with engine.begin() as conn:
            conn.execute(text(f"DROP SCHEMA IF EXISTS {quoted} CASCADE"))


def _upsert_all(url: str, rows: Sequence[ItemResult], batch_size: int) -> float:
    """Seconds to upsert ``rows`` in batches of ``batch_size``, one committed transaction per batch."""
    start = time.perf_counter()
    for i in range(0, len(rows), batch_size):
        with session_scope(url) as session:
            upsert_items(session=session, rows=rows[i : i + batch_size])
    return time.perf_counter() - start


def bench_upserts(url: str, *, rows: int = 100_000, batch_size: int = 256) -> dict[str, Any]:
    """Rows per second of :func:`db.catalog.upsert_items` on the database at ``url``, measured alone.

    Writes ``rows`` realistic rows (see :func:`make_rows`) in batches of ``batch_size``, each batch in its own
    committed transaction like a worker's, twice: into an empty table (``fresh``), then the same ids again with
    new values (``reupsert``: every row conflicts and is updated). Runs in a scratch schema (PostgreSQL) or
    scratch file (SQLite) that is migrated first and removed afterwards; the tables at ``url`` are not touched.
    Rows are built before the clock starts.

    Returns:
        ``{"backend", "rows", "batch_size", "fresh_s", "fresh_rows_per_s", "reupsert_s",
        "reupsert_rows_per_s"}``: seconds of wall time and rows per second of each pass.

    Raises:
        ValueError: ``rows`` or ``batch_size`` is below 1.
        InvsortError: ``url`` is neither SQLite nor PostgreSQL, or the table does not hold ``rows`` rows after
            a pass.
        sqlalchemy.exc.OperationalError: the database cannot be reached.
    """
    if rows < 1 or batch_size < 1:
        raise ValueError(f"rows and batch_size must be at least 1, got rows={rows}, batch_size={batch_size}")
    with scratch_database(url) as scratch:  # refuses a URL it cannot use before any row is built
        job_id = str(uuid.uuid4())
        first, second = make_rows(rows, job_id=job_id, seed=0), make_rows(rows, job_id=job_id, seed=1)
        with session_scope(scratch) as session:  # connect (and warm the pool) before the clock starts
            session.execute(text("SELECT 1"))
        fresh_s = _upsert_all(scratch, first, batch_size)
        reupsert_s = _upsert_all(scratch, second, batch_size)
        with session_scope(scratch) as session:
            stored = session.scalar(select(func.count()).select_from(CatalogItem))
            stale = session.scalar(
                select(func.count()).select_from(CatalogItem).where(CatalogItem.model_version != "v1")
            )
    if stored != rows or stale:
        raise InvsortError(f"benchmark table holds {stored} rows ({stale} not re-upserted), expected {rows}")
    return {
        "backend": make_url(normalise_database_url(url)).get_backend_name(),
        "rows": rows,
        "batch_size": batch_size,
        "fresh_s": round(fresh_s, 6),
        "fresh_rows_per_s": round(rows / fresh_s),
        "reupsert_s": round(reupsert_s, 6),
        "reupsert_rows_per_s": round(rows / reupsert_s),
    }
