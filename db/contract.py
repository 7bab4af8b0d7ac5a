"""The stable interface of the catalog for other systems (warehouses, ERPs, reports): the SQL views
``catalog_current`` (one row per item) and ``catalog_current_attributes`` (one row per item and attribute other than
the category), and their version.

The tables behind it may change with any release; the view's columns do not change within a version. Changing
them (adding one included) makes a new version, in three steps that ``tests/test_contract.py`` enforces:

1. change :func:`view_select` / :data:`CONTRACT_VIEWS` here and bump
   :data:`CATALOG_CURRENT_VERSION`;
2. add a migration that drops the view and creates it again with a frozen copy of the new SELECT and the new
   comment (a migration never imports this module: it must build the same view whatever the code is later);
3. freeze the new version's columns and types in ``tests/test_contract.py`` (earlier versions stay there).

A migration that re-creates ``catalog_items`` (SQLite batch mode copies the table) or changes the type of a column
the view reads must drop the view first and create it again afterwards: both databases refuse otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "CATALOG_CURRENT",
    "CATALOG_CURRENT_ATTRIBUTES",
    "CATALOG_CURRENT_COLUMNS",
    "CATALOG_CURRENT_VERSION",
    "CONTRACT_VIEWS",
    "ContractColumn",
    "create_view_sql",
    "view_comment",
    "view_select",
]

CATALOG_CURRENT = "catalog_current"
CATALOG_CURRENT_ATTRIBUTES = "catalog_current_attributes"
#: The version of both views: they change together.
CATALOG_CURRENT_VERSION = 2


@dataclass(frozen=True, slots=True)
class ContractColumn:
    """One column of a view: its name, its type on PostgreSQL (SQLite reports no type for computed ones) and
    what it means (the README's table)."""

    name: str
    pg_type: str
    meaning: str


CATALOG_CURRENT_COLUMNS: tuple[ContractColumn, ...] = (
    ContractColumn("item_id", "text", "the item's whole id (manifest id or image URI), however long; unique"),
    ContractColumn("category", "varchar(255)", "the category: the model's top-1, or a person's decision when "
                   "`reviewed` (null: failed, or a person said not a product / unknown)"),
    ContractColumn("status", "varchar(16)", "sorted, needs_review, failed or reviewed"),
    ContractColumn("confidence", "double precision", "the model's top-1 probability, 0..1; null when failed or "
                   "reviewed"),
    ContractColumn("reviewed", "boolean", "a person decided the category (status = reviewed); 0/1 on SQLite"),
    ContractColumn("model_version", "varchar(64)", "the version of the model that sorted the item"),
    ContractColumn("updated_at", "timestamptz", "when the row last changed (UTC)"),
    ContractColumn("attributes", "json", "the item's other attributes as one JSON object, "
                   "`{\"toe\": \"open_toe\", ...}` (a value is null where its model failed on the photo); `{}` "
                   "when none; text on SQLite. Details per attribute: `catalog_current_attributes`"),
)

CATALOG_CURRENT_ATTRIBUTES_COLUMNS: tuple[ContractColumn, ...] = (
    ContractColumn("item_id", "text", "the item's whole id, as in `catalog_current`"),
    ContractColumn("attribute", "varchar(64)", "the attribute's name (`toe`, `material`, ...): what its model file "
                   "says it predicts"),
    ContractColumn("value", "varchar(255)", "the attribute model's top-1 (null: it failed on the photo)"),
    ContractColumn("confidence", "double precision", "its probability, 0..1; null when failed"),
    ContractColumn("status", "varchar(16)", "sorted, needs_review (below the attribute model's review threshold, "
                   "or not a kind of photo it knows) or failed"),
    ContractColumn("model_version", "varchar(64)", "the version of the attribute's model"),
    ContractColumn("updated_at", "timestamptz", "when the attribute was last written (UTC)"),
)

#: Each view's columns (the README's tables; tests/test_contract.py freezes them per version).
CONTRACT_VIEWS: dict[str, tuple[ContractColumn, ...]] = {
    CATALOG_CURRENT: CATALOG_CURRENT_COLUMNS,
    CATALOG_CURRENT_ATTRIBUTES: CATALOG_CURRENT_ATTRIBUTES_COLUMNS,
}

# The attributes object of an item: json_object_agg on PostgreSQL, json_group_object on SQLite, in name order.
_ATTRIBUTES = {
    "postgresql": (
        "coalesce((SELECT json_object_agg(a.attribute, a.value ORDER BY a.attribute) FROM catalog_attributes a "
        "WHERE a.item_id = catalog_items.item_id), '{}'::json)"
    ),
    "sqlite": (
        "(SELECT json_group_object(a.attribute, a.value) FROM (SELECT attribute, value FROM catalog_attributes "
        "WHERE item_id = catalog_items.item_id ORDER BY attribute) a)"
    ),
}


def view_select(view: str, dialect: str) -> str:
    """The query of ``view`` (:data:`CATALOG_CURRENT` or :data:`CATALOG_CURRENT_ATTRIBUTES`) on ``dialect``
    (``postgresql``; anything else gets SQLite's).

    Raises:
        KeyError: another view.
    """
    if view == CATALOG_CURRENT:
        attributes = _ATTRIBUTES["postgresql" if dialect == "postgresql" else "sqlite"]
        return ("SELECT coalesce(item_id_full, item_id) AS item_id, category, status, confidence, "
                "status = 'reviewed' AS reviewed, model_version, updated_at, "
                f"{attributes} AS attributes FROM catalog_items")
    if view == CATALOG_CURRENT_ATTRIBUTES:
        return ("SELECT coalesce(i.item_id_full, a.item_id) AS item_id, a.attribute, a.value, a.confidence, "
                "a.status, a.model_version, a.updated_at FROM catalog_attributes a "
                "JOIN catalog_items i ON i.item_id = a.item_id")
    raise KeyError(view)


def create_view_sql(dialect: str, view: str = CATALOG_CURRENT) -> list[str]:
    """The statements that create the current version of ``view`` on ``dialect`` (``postgresql`` or ``sqlite``):
    the view and, on PostgreSQL, a comment naming its version (what ``\\dv+`` shows a consumer)."""
    statements = [f"CREATE VIEW {view} AS {view_select(view, dialect)}"]
    if dialect == "postgresql":
        statements.append(f"COMMENT ON VIEW {view} IS '{view_comment(CATALOG_CURRENT_VERSION)}'")
    return statements


def view_comment(version: int) -> str:
    """The PostgreSQL comment of version ``version`` of the views."""
    return f"invsort catalog contract, version {version} (README: Warehouse systems: the contract)"
