"""Engines and sessions: one engine per database URL per process.

SQLite connections get WAL journaling, a 30 s busy timeout, enforced foreign keys and real transactions
(SQLAlchemy emits ``BEGIN`` itself, so SELECTs and SAVEPOINTs take part in them). PostgreSQL engines ping
pooled connections before use, so a worker survives a database restart.

After ``fork()`` (Celery prefork workers) the child must not reuse the parent's pooled connections:
:func:`get_engine` notices the new process id and starts afresh, and :func:`dispose_engines` can be called
from a ``worker_process_init`` handler as well.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.orm import Session

from pipeline.settings import normalise_database_url

log = logging.getLogger(__name__)

_lock = threading.Lock()
_engines: dict[str, Engine] = {}
_pid = os.getpid()


def safe_url(url: str | URL) -> str:
    """The URL as a string with its password replaced by ``***``, for messages and logs."""
    return make_url(url).render_as_string(hide_password=True)


def sqlite_path(url: str | URL) -> Path | None:
    """The file of a SQLite URL, or None for other databases and in-memory SQLite."""
    u = make_url(url)
    if u.get_backend_name() != "sqlite":
        return None
    database = u.database or ""
    if database in ("", ":memory:") or database.startswith("file:") or u.query.get("mode") == "memory":
        return None
    return Path(database)


def _sqlite_on_connect(dbapi_connection: Any, _record: Any) -> None:
    # Stop the sqlite3 driver from issuing BEGIN on its own (it skips SELECT, DDL and SAVEPOINT); the "begin"
    # listener below emits it for every transaction instead.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA synchronous=NORMAL")
    finally:
        cursor.close()


def _sqlite_on_begin(conn: Any) -> None:
    conn.exec_driver_sql("BEGIN")


def _create_engine(url: str) -> Engine:
    u = make_url(url)
    if u.get_backend_name() == "sqlite":
        path = sqlite_path(u)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(u, connect_args={"check_same_thread": False})
        event.listen(engine, "connect", _sqlite_on_connect)
        event.listen(engine, "begin", _sqlite_on_begin)
    else:
        engine = create_engine(u, pool_pre_ping=True)
    log.debug("created engine for %s", safe_url(u))
    return engine


def get_engine(url: str) -> Engine:
    """The process's engine for ``url``, created on first use.

    For a SQLite file the parent directory is created if missing. ``postgresql://`` and ``postgres://`` URLs use
    psycopg 3 (:func:`pipeline.settings.normalise_database_url`, done here too, so both spellings share an engine).

    Returns:
        An :class:`~sqlalchemy.Engine`, the same object for the same URL within one process.

    Raises:
        sqlalchemy.exc.ArgumentError: ``url`` is not a valid SQLAlchemy URL.
        sqlalchemy.exc.NoSuchModuleError: the URL names a dialect or driver that is not installed.
    """
    global _pid
    url = normalise_database_url(url)
    with _lock:
        if os.getpid() != _pid:
            # Forked: the pools belong to the parent; drop them without closing the parent's connections.
            for engine in _engines.values():
                engine.dispose(close=False)
            _engines.clear()
            _pid = os.getpid()
        found = _engines.get(url)
        if found is None:
            found = _engines[url] = _create_engine(url)
        return found


def dispose_engines(url: str | None = None) -> None:
    """Close the pooled connections of the cached engines (all, or the one for ``url``) and forget them.

    Call it after ``fork()`` in a child process, and in tests before dropping a database. Engines are created
    again by the next :func:`get_engine`. Returns None.
    """
    with _lock:
        urls = list(_engines) if url is None else [normalise_database_url(url)]
        forked = os.getpid() != _pid
        for u in urls:
            engine = _engines.pop(u, None)
            if engine is not None:
                engine.dispose(close=not forked)


@contextmanager
def session_scope(url: str) -> Iterator[Session]:
    """A :class:`~sqlalchemy.orm.Session` on ``url`` in one transaction.

    Yields:
        The session. On leaving the block normally the transaction is committed; when the block raises, it is
        rolled back and the exception propagates. The session is closed either way. Objects stay readable
        after the commit (``expire_on_commit=False``).

    Raises:
        sqlalchemy.exc.SQLAlchemyError: the commit failed (e.g. a constraint or a lost connection).
    """
    session = Session(get_engine(url), expire_on_commit=False)
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()
