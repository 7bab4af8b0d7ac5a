"""Schema migrations (Alembic), configured in code: no ``alembic.ini``, no particular working directory.

``invsort db upgrade`` calls :func:`upgrade`; workers and the embedded pipeline call :func:`ensure_at_head` at
start-up so that they never write into a schema they do not know.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

import migrations
from db.session import get_engine, safe_url, sqlite_path
from pipeline.errors import ConfigError

SCRIPT_LOCATION = Path(migrations.__file__).resolve().parent


def _config(url: str | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(SCRIPT_LOCATION))
    if url is not None:
        # ConfigParser interpolation: a literal '%' (URL-encoded password) must be doubled.
        cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def _run(url: str, revision: str, *, down: bool) -> None:
    engine = get_engine(url)  # creates the parent directory of a SQLite file
    with engine.connect() as connection:
        cfg = _config(url)
        # env.py runs the migrations on this connection, in one transaction that it commits.
        cfg.attributes["connection"] = connection
        if down:
            command.downgrade(cfg, revision)
        else:
            command.upgrade(cfg, revision)


def upgrade(url: str, revision: str = "head") -> None:
    """Migrate the database at ``url`` up to ``revision`` (default: the newest), in one transaction.

    For a SQLite file, the file and its parent directory are created if missing. Returns None.

    Raises:
        alembic.util.exc.CommandError: ``revision`` is unknown.
        sqlalchemy.exc.OperationalError: the database cannot be reached.
    """
    _run(url, revision, down=False)


def downgrade(url: str, revision: str) -> None:
    """Migrate the database at ``url`` down to ``revision`` (``"base"``: no invsort tables). Returns None.

    Raises:
        alembic.util.exc.CommandError: ``revision`` is unknown.
        sqlalchemy.exc.OperationalError: the database cannot be reached.
    """
    _run(url, revision, down=True)


def head_revision() -> str:
    """The newest revision among the migration scripts shipped with invsort.

    Returns:
        The revision id, e.g. ``"0001"``.

    Raises:
        alembic.util.exc.CommandError: the scripts have more than one head.
    """
    head = ScriptDirectory.from_config(_config()).get_current_head()
    if head is None:  # pragma: no cover - the package always ships migrations
        raise ConfigError(f"no migration scripts found in {SCRIPT_LOCATION}")
    return head


def current_revision(url: str) -> str | None:
    """The revision the database at ``url`` is at.

    Returns:
        The revision id, or None for a database that has never been migrated (no ``alembic_version`` table,
        or a SQLite file that does not exist, which is not created by this check).

    Raises:
        sqlalchemy.exc.OperationalError: the database cannot be reached.
    """
    path = sqlite_path(url)
    if path is not None and not path.exists():
        return None
    with get_engine(url).connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def ensure_at_head(url: str) -> None:
    """Check that the database at ``url`` has the newest schema. Returns None.

    Raises:
        ConfigError: the database is at another revision (or none); the message says to run
            ``invsort db upgrade``, or to upgrade invsort itself if the database is newer than this code.
        sqlalchemy.exc.OperationalError: the database cannot be reached.
    """
    current = current_revision(url)
    head = head_revision()
    if current == head:
        return
    if current is not None:
        script = ScriptDirectory.from_config(_config())
        if current not in {rev.revision for rev in script.walk_revisions()}:
            raise ConfigError(
                f"database {safe_url(url)} is at revision {current}, which this version of invsort does not "
                f"know (expected {head}): the database was migrated by a newer invsort; upgrade invsort"
            )
    raise ConfigError(
        f"database {safe_url(url)} is at revision {current}, expected {head}: run 'invsort db upgrade'"
    )
