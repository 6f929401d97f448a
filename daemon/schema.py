"""Database schema management: Alembic, run from code (`stainbridge db upgrade | db current`).

The Alembic configuration is built here; the scripts live in the installed ``migrations``
package, so the commands work from any directory and from an installed wheel.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError
from sqlalchemy.pool import NullPool

from stainbridge.daemon.store import make_engine


class SchemaError(RuntimeError):
    """A migration could not be applied or the schema version could not be read."""


class DatabaseUnavailable(SchemaError):
    """The database named by the URL cannot be reached or opened."""


class DatabaseUnreachable(DatabaseUnavailable):
    """The URL is usable but the server does not answer now (down, restarting, network): worth waiting for."""


def safe_url(url: str) -> str:
    """The URL with its password hidden, for messages and logs."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<unparseable database URL>"


def alembic_config(url: str, *, default_site: str | None = None) -> Config:
    """An Alembic Config built in code: scripts from the `migrations` package, this URL.

    ``default_site`` (``[site] name``): the site that model versions from before sites existed
    belong to (migration 0008); without it, the site most images were recorded under."""
    from stainbridge import migrations

    cfg = Config()
    cfg.set_main_option("script_location", str(Path(migrations.__file__).resolve().parent))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    cfg.attributes["url"] = url
    if default_site:
        cfg.attributes["default_site"] = default_site
    return cfg


def head_revision() -> str:
    """The newest revision the installed code knows about."""
    head = ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()
    if head is None:
        raise SchemaError("the migrations package holds no revisions; the installation is incomplete")
    return head


def _engine(url: str) -> Engine:
    try:
        return make_engine(url, poolclass=NullPool)
    except (ArgumentError, ImportError, OSError) as exc:
        raise DatabaseUnavailable(f"database URL {safe_url(url)} is not usable: {exc}") from None


def _check_reachable(engine: Engine, url: str) -> None:
    try:
        with engine.connect():
            pass
    except SQLAlchemyError as exc:
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        raise DatabaseUnreachable(
            f"cannot open the database at {safe_url(url)}: {reason}; check [database] url "
            "(or STAINBRIDGE_DATABASE_URL) and that the server is running"
        ) from None


def upgrade_database(url: str, revision: str = "head", *, default_site: str | None = None) -> None:
    """Bring the database at `url` to `revision` (a no-op when it is already there)."""
    _run_alembic(command.upgrade, "migrating", url, revision, default_site)


def downgrade_database(url: str, revision: str, *, default_site: str | None = None) -> None:
    """Take the database at `url` back to `revision` ("base" removes every table)."""
    _run_alembic(command.downgrade, "downgrading", url, revision, default_site)


def _run_alembic(action: Callable[[Config, str], None], verb: str, url: str, revision: str,
                 default_site: str | None) -> None:
    engine = _engine(url)
    try:
        _check_reachable(engine, url)
    finally:
        engine.dispose()
    try:
        action(alembic_config(url, default_site=default_site), revision)
    except SQLAlchemyError as exc:
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        raise SchemaError(f"{verb} {safe_url(url)} to {revision} failed: {reason}") from exc


def current_revision(url: str) -> str | None:
    """The revision the database is at, or None when it has never been migrated."""
    engine = _engine(url)
    try:
        _check_reachable(engine, url)
        with engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()
    except SQLAlchemyError as exc:
        raise SchemaError(f"reading the schema version of {safe_url(url)} failed: {exc}") from exc
    finally:
        engine.dispose()


class DatabaseNotReady(SchemaError):
    """The database schema is missing or older than this code, and we may not migrate it."""


class DatabaseMissing(DatabaseUnavailable):
    """A command that only reads found no database where the configuration says it is."""


def sqlite_file(url: str) -> Path | None:
    """The file of a SQLite URL (None for other databases and in-memory SQLite)."""
    if not url.startswith("sqlite"):
        return None
    path = make_url(url).database
    return Path(path).absolute() if path and path != ":memory:" else None


def require_existing(url: str, source: str = "") -> None:
    """Raise DatabaseMissing unless the SQLite file exists (connecting would create it and its folder).

    `source`: where the settings came from, so that the message says which configuration pointed here."""
    path = sqlite_file(url)
    if path is not None and not path.is_file():
        where = f" (configuration: {source})" if source else ""
        raise DatabaseMissing(
            f"no database at {path}{where}; nothing was created. Pass the service's configuration with "
            "--config FILE (or set STAINBRIDGE_CONFIG), or run `stainbridge init` to create a new one")


def require_database(url: str, source: str = "") -> None:
    """For commands that only read: the database must exist and be at the newest schema; nothing is created
    or migrated (DatabaseMissing, DatabaseUnreachable or DatabaseNotReady say which database was looked for)."""
    require_existing(url, source)
    current, head = current_revision(url), head_revision()
    if current != head:
        raise DatabaseNotReady(
            f"the database {safe_url(url)} is at revision {current or 'none (empty database)'}, this code needs "
            f"{head}; run `stainbridge db upgrade` (with the same --config) first")


def prepare_database(url: str, *, default_site: str | None = None) -> None:
    """SQLite: run the migrations (embedded default). PostgreSQL: refuse unless at head.

    On a shared PostgreSQL server several workers start at once, and schema changes are an
    operator's decision, so the service only checks the revision there. Raises SchemaError
    (DatabaseUnavailable, DatabaseNotReady) with a message that says what to do.
    """
    if url.startswith("sqlite"):
        upgrade_database(url, default_site=default_site)
        return
    current, head = current_revision(url), head_revision()
    if current != head:
        raise DatabaseNotReady(
            f"database schema is at revision {current or 'none (empty database)'}, this code needs {head}; "
            "run `stainbridge db upgrade` (with the same --config) and start again"
        )
