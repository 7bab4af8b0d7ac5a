"""The contract view ``catalog_current`` (db/contract.py, migration 0005) on real SQLite and PostgreSQL: its columns
and types are frozen per version here, so that they never change without a new version of the view.

To change the view: bump ``CATALOG_CURRENT_VERSION`` in db/contract.py, add a migration that re-creates the view,
and add the new version to ``FROZEN`` below (keep the earlier ones). Never edit a frozen version.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlalchemy import inspect, text
from sqlalchemy.engine import Connection
from sqlalchemy.types import NullType

from db import catalog, reviews
from db.contract import (
    CATALOG_CURRENT,
    CATALOG_CURRENT_VERSION,
    CONTRACT_VIEWS,
    create_view_sql,
    view_comment,
)
from db.session import session_scope
from pipeline.records import AttributeResult, ItemResult

ROOT = Path(__file__).resolve().parents[1]

# version -> view -> the view's columns, and each column's type as each database reports it (SQLite: none for a
# computed column).
FROZEN: dict[int, dict[str, dict[str, tuple[tuple[str, str], ...]]]] = {
    1: {
        "catalog_current": {
            "postgresql": (
                ("item_id", "TEXT"),
                ("category", "VARCHAR(255)"),
                ("status", "VARCHAR(16)"),
                ("confidence", "DOUBLE PRECISION"),
                ("reviewed", "BOOLEAN"),
                ("model_version", "VARCHAR(64)"),
                ("updated_at", "TIMESTAMP WITH TIME ZONE"),
            ),
            "sqlite": (
                ("item_id", ""),
                ("category", "VARCHAR(255)"),
                ("status", "VARCHAR(16)"),
                ("confidence", "FLOAT"),
                ("reviewed", ""),
                ("model_version", "VARCHAR(64)"),
                ("updated_at", "DATETIME"),
            ),
        },
    },
    2: {
        "catalog_current": {
            "postgresql": (
                ("item_id", "TEXT"),
                ("category", "VARCHAR(255)"),
                ("status", "VARCHAR(16)"),
                ("confidence", "DOUBLE PRECISION"),
                ("reviewed", "BOOLEAN"),
                ("model_version", "VARCHAR(64)"),
                ("updated_at", "TIMESTAMP WITH TIME ZONE"),
                ("attributes", "JSON"),
            ),
            "sqlite": (
                ("item_id", ""),
                ("category", "VARCHAR(255)"),
                ("status", "VARCHAR(16)"),
                ("confidence", "FLOAT"),
                ("reviewed", ""),
                ("model_version", "VARCHAR(64)"),
                ("updated_at", "DATETIME"),
                ("attributes", ""),
            ),
        },
        "catalog_current_attributes": {
            "postgresql": (
                ("item_id", "TEXT"),
                ("attribute", "VARCHAR(64)"),
                ("value", "VARCHAR(255)"),
                ("confidence", "DOUBLE PRECISION"),
                ("status", "VARCHAR(16)"),
                ("model_version", "VARCHAR(64)"),
                ("updated_at", "TIMESTAMP WITH TIME ZONE"),
            ),
            "sqlite": (
                ("item_id", ""),
                ("attribute", "VARCHAR(64)"),
                ("value", "VARCHAR(255)"),
                ("confidence", "FLOAT"),
                ("status", "VARCHAR(16)"),
                ("model_version", "VARCHAR(64)"),
                ("updated_at", "DATETIME"),
            ),
        },
    },
}
HOW = ("bump CATALOG_CURRENT_VERSION in db/contract.py, add a migration that re-creates the views, and freeze the "
       "new version's columns in FROZEN in tests/test_contract.py")


def contract_problems(version: int, view: str, columns: tuple[tuple[str, str], ...],
                      found: dict[str, tuple[tuple[str, str], ...]]) -> list[str]:
    """What breaks the contract: ``columns`` (``view``'s names and PostgreSQL types in db/contract.py) and ``found``
    (each database's view as the inspector reads it) against the frozen ``version``."""
    frozen = FROZEN.get(version, {}).get(view)
    if frozen is None:
        return [f"{view} version {version} is not frozen: {HOW}"]
    problems = []
    expected = tuple((name, _pg_type(type_)) for name, type_ in columns)
    if expected != frozen["postgresql"]:
        problems.append(f"db/contract.py lists other columns than {view} version {version} "
                        f"({expected} != {frozen['postgresql']}): the columns changed without a new version; {HOW}")
    for dialect, found_columns in found.items():
        if found_columns != frozen[dialect]:
            problems.append(f"the {view} view the migrations build on {dialect} has other columns than version "
                            f"{version} ({found_columns} != {frozen[dialect]}): a migration changed the view without "
                            f"a new version; {HOW}")
    return problems


def _pg_type(documented: str) -> str:
    """The type of db/contract.py's documentation as PostgreSQL's inspector names it."""
    return {"timestamptz": "TIMESTAMP WITH TIME ZONE"}.get(documented, documented.upper())


def _view_columns(connection: Connection, view: str) -> tuple[tuple[str, str], ...]:
    dialect = connection.dialect
    return tuple(
        (c["name"], "" if isinstance(c["type"], NullType) else c["type"].compile(dialect=dialect))
        for c in inspect(connection).get_columns(view)
    )


def _contract_columns(view: str) -> tuple[tuple[str, str], ...]:
    return tuple((c.name, c.pg_type) for c in CONTRACT_VIEWS[view])


def _definition(connection: Connection, view: str) -> str:
    if connection.dialect.name == "postgresql":
        return connection.execute(text(f"SELECT pg_get_viewdef('{view}'::regclass)")).scalar_one()
    return connection.execute(text(f"SELECT sql FROM sqlite_master WHERE name = '{view}'")).scalar_one()


@pytest.mark.parametrize("view", list(CONTRACT_VIEWS))
def test_the_view_the_migrations_build_is_the_frozen_version(db_session, view):
    connection = db_session.connection()
    found = {connection.dialect.name: _view_columns(connection, view)}
    assert contract_problems(CATALOG_CURRENT_VERSION, view, _contract_columns(view), found) == []


@pytest.mark.parametrize("view", list(CONTRACT_VIEWS))
def test_db_contract_defines_the_view_the_migrations_build(db_session, view):
    # The SELECT of db/contract.py and the frozen copy in the latest migration that made the view must agree.
    connection = db_session.connection()
    migrated, columns = _definition(connection, view), _view_columns(connection, view)
    connection.execute(text(f"DROP VIEW {view}"))
    for statement in create_view_sql(connection.dialect.name, view):
        connection.execute(text(statement))
    assert (_definition(connection, view), _view_columns(connection, view)) == (migrated, columns), (
        f"db/contract.py's {view} differs from the view the migrations build: add a migration that re-creates it; "
        f"if its columns change, {HOW}")


@pytest.mark.parametrize("view", list(CONTRACT_VIEWS))
def test_postgresql_names_the_version_in_the_views_comment(pg_session, view):
    comment = pg_session.execute(text(f"SELECT obj_description('{view}'::regclass, 'pg_class')")).scalar()
    assert comment == view_comment(CATALOG_CURRENT_VERSION)


def test_the_checks_see_a_changed_view():
    # Guard against checks that can never fail: a column more, a type changed, a version bumped but not frozen.
    view = CATALOG_CURRENT
    columns = _contract_columns(view)
    frozen = FROZEN[CATALOG_CURRENT_VERSION][view]
    assert contract_problems(CATALOG_CURRENT_VERSION, view, columns, dict(frozen)) == []
    more = (*columns, ("brand", "varchar(255)"))
    (problem,) = contract_problems(CATALOG_CURRENT_VERSION, view, more, {})
    assert "changed without a new version" in problem and "bump CATALOG_CURRENT_VERSION" in problem
    retyped = {"sqlite": (frozen["sqlite"][0], ("category", "TEXT"), *frozen["sqlite"][2:])}
    (problem,) = contract_problems(CATALOG_CURRENT_VERSION, view, columns, retyped)
    assert "a migration changed the view without a new version" in problem
    (problem,) = contract_problems(CATALOG_CURRENT_VERSION + 1, view, columns, {})
    assert f"version {CATALOG_CURRENT_VERSION + 1} is not frozen" in problem
    # version 1 stays frozen as it was: the earlier view's columns are the first seven of this one's
    assert FROZEN[1][view]["postgresql"] == FROZEN[2][view]["postgresql"][:7]


def test_upgrading_from_version_1_keeps_the_rows_and_downgrading_gives_version_1_back(tmp_path):
    from db.migrate import downgrade, upgrade
    from db.session import get_engine

    url = f"sqlite:///{tmp_path / 'v1.db'}"
    upgrade(url, "0006")
    with session_scope(url) as session:
        catalog.upsert_items(session=session, rows=[ItemResult(item_id="a", image_uri="a", status="sorted",
                                                               category="Bag", confidence=0.9, topk=[["Bag", 0.9]],
                                                               model_name="m", model_version="v1")])
    upgrade(url)
    with get_engine(url).connect() as connection:
        assert connection.execute(text("SELECT item_id, category, attributes FROM catalog_current")).all() == [
            ("a", "Bag", "{}")]
    downgrade(url, "0006")
    with get_engine(url).connect() as connection:
        assert [c for c, _ in _view_columns(connection, CATALOG_CURRENT)] == [
            c for c, _ in FROZEN[1][CATALOG_CURRENT]["sqlite"]]
        assert not inspect(connection).has_table("catalog_attributes")


def test_catalog_current_is_one_row_per_item_with_its_whole_id(db_session):
    long_id = "file:///photos/" + "d/" * 600 + "x.jpg"
    rows = [ItemResult(item_id=i, image_uri=i, status=s, category=c, confidence=p, topk=[[c, p]] if c else [],
                       error=None if c else "broken", model_name="m", model_version="v7", job_id="job-1")
            for i, s, c, p in [(long_id, "sorted", "Bag", 0.9), ("b", "needs_review", "Coat", 0.3),
                               ("c", "failed", None, None)]]
    catalog.upsert_items(session=db_session, rows=rows)
    reviews.record_review(session=db_session, item_id="b", category="Sandal", reviewer="ana")
    got = db_session.execute(text(
        "SELECT item_id, category, status, confidence, reviewed, model_version FROM catalog_current ORDER BY status"
    )).all()
    assert [tuple(r) for r in got] == [
        ("c", None, "failed", None, False, "v7"),
        ("b", "Sandal", "reviewed", None, True, "v7"),
        (long_id, "Bag", "sorted", 0.9, False, "v7"),
    ]


def test_attributes_show_in_both_views_and_a_review_leaves_them(db_session):
    long_id = "file:///photos/" + "d/" * 600 + "y.jpg"

    def toe(value, confidence, status="sorted"):
        return AttributeResult(attribute="toe", status=status, value=value, confidence=confidence,
                               topk=[[value, confidence]], model_name="t", model_version="t1")

    rows = [
        ItemResult(item_id=long_id, image_uri=long_id, status="sorted", category="Sandal", confidence=0.9,
                   topk=[["Sandal", 0.9]], model_name="m", model_version="v7",
                   attributes=[toe("open_toe", 0.97), AttributeResult(attribute="material", status="needs_review",
                                                                      value="leather", confidence=0.4)]),
        ItemResult(item_id="b", image_uri="b", status="needs_review", category="Boot", confidence=0.5,
                   topk=[["Boot", 0.5]], model_name="m", model_version="v7", attributes=[toe("closed", 0.8)]),
        ItemResult(item_id="c", image_uri="c", status="sorted", category="Shoe", confidence=0.9,
                   topk=[["Shoe", 0.9]], model_name="m", model_version="v7"),
    ]
    catalog.upsert_items(session=db_session, rows=rows)
    reviews.record_review(session=db_session, item_id="b", category="Shoe", reviewer="ana")
    got = db_session.execute(text("SELECT item_id, category, attributes FROM catalog_current "
                                  "ORDER BY category, item_id")).all()

    def parsed(value):  # json on PostgreSQL (psycopg parses it), text on SQLite
        return value if isinstance(value, dict) else json.loads(value)

    assert [(i, c, parsed(a)) for i, c, a in got] == [
        (long_id, "Sandal", {"material": "leather", "toe": "open_toe"}),
        ("b", "Shoe", {"toe": "closed"}),
        ("c", "Shoe", {}),
    ]
    got = db_session.execute(text("SELECT item_id, attribute, value, confidence, status, model_version "
                                  "FROM catalog_current_attributes ORDER BY value")).all()
    assert [tuple(r) for r in got] == [
        ("b", "toe", "closed", 0.8, "sorted", "t1"),
        (long_id, "material", "leather", 0.4, "needs_review", None),
        (long_id, "toe", "open_toe", 0.97, "sorted", "t1"),
    ]
    # a later sort replaces the attribute and leaves the others; the reviewed item's attribute is re-sorted too
    catalog.upsert_items(session=db_session, rows=[
        ItemResult(item_id="b", image_uri="b", status="sorted", category="Boot", confidence=0.99, model_name="m",
                   model_version="v8", attributes=[toe("open_toe", 0.6, "needs_review")])])
    got = db_session.execute(text("SELECT c.category, c.status, a.value, a.status FROM catalog_current c "
                                  "JOIN catalog_current_attributes a ON a.item_id = c.item_id "
                                  "WHERE c.item_id = 'b'")).all()
    assert [tuple(r) for r in got] == [("Shoe", "reviewed", "open_toe", "needs_review")]


def test_the_readme_documents_the_contract():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Warehouse systems: the contract", 1)[1].split("\n## ", 1)[0]
    assert f"version {CATALOG_CURRENT_VERSION}" in section
    for view, columns in CONTRACT_VIEWS.items():
        assert f"`{view}`" in section
        for column in columns:
            assert f"| `{column.name}` | {column.pg_type} |" in section, f"README: no row for {view}.{column.name}"
    for needed in ("invsort changes", "GET /v1/changes", "INVSORT_HISTORY_RETENTION_DAYS", "invsort db prune-history"):
        assert needed in section
