"""The Alembic migrations on real SQLite and PostgreSQL: they build exactly the schema of db/models.py."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Column, Integer, MetaData, inspect
from sqlalchemy.engine import make_url

from db import migrate
from db.models import Base
from db.session import dispose_engines, get_engine, session_scope, sqlite_path
from pipeline.errors import ConfigError

TABLES = {"catalog_items", "sorting_jobs", "sorting_job_batches", "leases", "reviews", "catalog_history",
          "webhook_outbox", "webhook_cursor", "catalog_attributes"}


def _schema_diff(url: str, metadata: MetaData = Base.metadata) -> list:
    with get_engine(url).connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        return compare_metadata(context, metadata)


def _tables(url: str) -> set[str]:
    with get_engine(url).connect() as connection:
        return set(inspect(connection).get_table_names())


def test_upgrade_from_empty_to_head(empty_db_url):
    path = sqlite_path(empty_db_url)
    assert migrate.current_revision(empty_db_url) is None
    if path is not None:
        assert not path.exists(), "checking the revision does not create the SQLite file"

    migrate.upgrade(empty_db_url)

    head = migrate.head_revision()
    assert migrate.current_revision(empty_db_url) == head and head >= "0002"
    assert _tables(empty_db_url) == TABLES | {"alembic_version"}
    migrate.ensure_at_head(empty_db_url)
    migrate.upgrade(empty_db_url)  # already at head: nothing to do
    assert migrate.current_revision(empty_db_url) == head


def test_migrated_schema_matches_the_models(db_url):
    assert _schema_diff(db_url) == []


def test_schema_comparison_sees_differences(db_url):
    # Guard against a comparison that can never fail: a model with one more column must show up.
    metadata = MetaData(naming_convention=Base.metadata.naming_convention)
    for table in Base.metadata.sorted_tables:
        table.to_metadata(metadata)
    metadata.tables["sorting_jobs"].append_column(Column("extra", Integer))
    diff = _schema_diff(db_url, metadata)
    assert [(d[0], d[3].name) for d in diff] == [("add_column", "extra")]


def test_downgrade_to_base_and_upgrade_again(empty_db_url):
    migrate.upgrade(empty_db_url)
    migrate.downgrade(empty_db_url, "base")
    assert migrate.current_revision(empty_db_url) is None
    assert _tables(empty_db_url) <= {"alembic_version"}

    migrate.upgrade(empty_db_url)
    assert migrate.current_revision(empty_db_url) == migrate.head_revision()
    assert _schema_diff(empty_db_url) == []


def test_migrations_leave_sqlite_foreign_keys_on(empty_sqlite_url):
    migrate.upgrade(empty_sqlite_url)
    engine = get_engine(empty_sqlite_url)
    for _ in range(engine.pool.size() + 1):  # whichever pooled connection comes next
        with engine.connect() as connection:
            assert connection.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1


def test_ensure_at_head_on_an_empty_database(empty_db_url):
    with pytest.raises(ConfigError, match="invsort db upgrade") as info:
        migrate.ensure_at_head(empty_db_url)
    assert f"revision None, expected {migrate.head_revision()}" in str(info.value)


def test_ensure_at_head_hides_the_password(empty_pg_url):
    url = make_url(empty_pg_url)
    if not url.password:
        url = url.set(password="hunter2")  # the local test server trusts local connections: ignored
    url_s = url.render_as_string(hide_password=False)
    try:
        with pytest.raises(ConfigError) as info:
            migrate.ensure_at_head(url_s)
    finally:
        dispose_engines(url_s)
    assert url.password not in str(info.value) and "***" in str(info.value)


def test_ensure_at_head_on_a_database_from_a_newer_invsort(sqlite_url):
    with session_scope(sqlite_url) as session:
        session.connection().exec_driver_sql("UPDATE alembic_version SET version_num = '9999'")
    with pytest.raises(ConfigError, match="newer invsort"):
        migrate.ensure_at_head(sqlite_url)


def test_0002_upgrades_a_database_with_jobs_and_keeps_them(empty_db_url):
    # A database at 0001 with a finished job: after 0002 its batches are 'done' and the job is unchanged.
    migrate.upgrade(empty_db_url, "0001")
    with session_scope(empty_db_url) as session:
        c = session.connection()
        c.exec_driver_sql(
            "INSERT INTO sorting_jobs (id, source, model_path, model_name, model_version, status, total_items, "
            "total_batches, batches_done, sorted_count, needs_review_count, failed_count, created_at, updated_at) "
            "VALUES ('j1', 's', 'm', 'n', 'v', 'done', 3, 1, 1, 3, 0, 0, '2026-01-01 00:00:00+00:00', "
            "'2026-01-01 00:00:00+00:00')")
        c.exec_driver_sql("INSERT INTO sorting_job_batches (job_id, batch_no, sorted_count, needs_review_count, "
                          "failed_count, updated_at) VALUES ('j1', 0, 3, 0, 0, '2026-01-01 00:00:00+00:00')")
    migrate.upgrade(empty_db_url)
    with session_scope(empty_db_url) as session:
        c = session.connection()
        assert c.exec_driver_sql("SELECT state, attempts FROM sorting_job_batches").all() == [("done", 0)]
        c.exec_driver_sql("UPDATE sorting_jobs SET status = 'cancelled'")
    migrate.downgrade(empty_db_url, "0001")
    with session_scope(empty_db_url) as session:
        assert session.connection().exec_driver_sql("SELECT status FROM sorting_jobs").scalar() == "failed"
