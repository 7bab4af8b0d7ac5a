"""Alembic environment of invsort.

The database comes from, in order: a connection handed over in ``config.attributes['connection']`` (what
:mod:`db.migrate` does), the config's ``sqlalchemy.url``, or ``INVSORT_DATABASE_URL`` via
:func:`pipeline.settings.get_settings`.

On SQLite, migrations run in batch mode (table copies instead of ALTER) inside one real transaction, with
foreign keys switched off meanwhile: otherwise re-creating a referenced table would cascade-delete the rows
that refer to it. ``PRAGMA foreign_key_check`` runs before the commit. On PostgreSQL an advisory lock keeps
two concurrent upgrades from running at once.
"""

from __future__ import annotations

from logging.config import fileConfig

from alembic import context
from sqlalchemy import Connection, text
from sqlalchemy.engine import make_url

from db.models import Base, UTCDateTime

config = context.config
target_metadata = Base.metadata

# An arbitrary constant key for pg_advisory_xact_lock: "invsort" as a number.
_PG_MIGRATION_LOCK = 0x696E76736F7274

if config.config_file_name is not None:
    fileConfig(config.config_file_name, disable_existing_loggers=False)


def _url() -> str:
    url = config.get_main_option("sqlalchemy.url")
    if url:
        return url
    from pipeline.settings import get_settings

    return get_settings().database_url


def _render_item(type_: str, obj: object, autogen_context: object) -> str | bool:
    """Autogenerate writes the model's UTCDateTime as the plain column type it stands for."""
    if type_ == "type" and isinstance(obj, UTCDateTime):
        return "sa.DateTime(timezone=True)"
    return False


def _configure(**kwargs: object) -> None:
    context.configure(target_metadata=target_metadata, compare_type=True, render_item=_render_item, **kwargs)


def run_migrations_offline() -> None:
    """Emit the migration SQL as a script (``alembic upgrade --sql``) instead of running it."""
    url = _url()
    _configure(
        url=url,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
        render_as_batch=make_url(url).get_backend_name() == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()


def _sqlite_pragma(connection: Connection, sql: str) -> list[tuple[object, ...]]:
    # Straight to the driver: going through SQLAlchemy would BEGIN first, and these pragmas are no-ops inside
    # a transaction.
    cursor = connection.connection.driver_connection.cursor()
    try:
        cursor.execute(sql)
        return cursor.fetchall()
    finally:
        cursor.close()


def _run(connection: Connection) -> None:
    dialect = connection.dialect.name
    sqlite = dialect == "sqlite"
    fk_off = sqlite and not connection.in_transaction()
    if fk_off:
        _sqlite_pragma(connection, "PRAGMA foreign_keys=OFF")
    try:
        # transactional_ddl also on SQLite: db.session has SQLAlchemy emit BEGIN, so DDL is transactional.
        _configure(connection=connection, render_as_batch=sqlite, transactional_ddl=True)
        with context.begin_transaction():
            if dialect == "postgresql":
                connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_MIGRATION_LOCK})
            context.run_migrations()
            if fk_off:
                broken = connection.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
                if broken:
                    raise RuntimeError(f"migration left rows with broken foreign keys: {broken[:10]}")
    finally:
        if fk_off:
            if connection.in_transaction():
                connection.rollback()
            _sqlite_pragma(connection, "PRAGMA foreign_keys=ON")
            if _sqlite_pragma(connection, "PRAGMA foreign_keys") != [(1,)]:
                connection.invalidate()  # never hand a connection without foreign keys back to the pool


def run_migrations_online() -> None:
    """Run the migrations on the handed-over connection, or on a connection to the configured URL."""
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    from db.session import get_engine

    with get_engine(_url()).connect() as connection:
        _run(connection)


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
