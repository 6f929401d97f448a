"""Alembic environment, run from code by daemon.schema (there is no alembic.ini).

The URL comes from ``config.attributes["url"]`` (or the ``sqlalchemy.url`` main option);
a caller may also hand in an open connection as ``config.attributes["connection"]``.
"""

from __future__ import annotations

from typing import Any

from alembic import context
from sqlalchemy import event
from sqlalchemy.engine import Connection
from sqlalchemy.pool import NullPool

from stainbridge.daemon.store import NAMING_CONVENTION, Base, make_engine

config = context.config
target_metadata = Base.metadata
# Constraint names in the migrations come from this convention (op.f(...)); keep them in step.
assert target_metadata.naming_convention == NAMING_CONVENTION


def _url() -> str:
    url = config.attributes.get("url") or config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError("no database URL: set config.attributes['url'] (daemon.schema does this)")
    return url


def _configure(**kwargs: object) -> None:
    url = _url()
    context.configure(
        target_metadata=target_metadata,
        # SQLite cannot ALTER most things: later migrations recreate tables in batch mode.
        render_as_batch=url.startswith("sqlite"),
        compare_type=True,
        **kwargs,
    )


def run_migrations_offline() -> None:
    """Emit SQL to stdout (`alembic upgrade --sql`), no database needed."""
    _configure(url=_url(), literal_binds=True, dialect_opts={"paramstyle": "named"})
    with context.begin_transaction():
        context.run_migrations()


def _run(connection: Connection) -> None:
    _configure(connection=connection)
    with context.begin_transaction():
        context.run_migrations()


def _sqlite_connect(dbapi_connection: Any, _record: object) -> None:
    # Batch mode copies and drops tables; foreign keys must be off meanwhile (the pragma is
    # ignored inside a transaction, so it goes here, at connect). And Python's sqlite3 module runs
    # DDL outside any transaction: take transactions over (see _sqlite_begin), or a migration
    # cut short by kill -9 leaves tables without their alembic_version row, and every later start
    # fails with "table images already exists".
    dbapi_connection.execute("PRAGMA foreign_keys=OFF")
    dbapi_connection.isolation_level = None


def _sqlite_begin(connection: Connection) -> None:
    # IMMEDIATE: the write lock before alembic reads the version, so two starting services migrate in turn.
    connection.exec_driver_sql("BEGIN IMMEDIATE")


def run_migrations_online() -> None:
    given = config.attributes.get("connection")
    if given is not None:
        _run(given)
        return
    url = _url()
    engine = make_engine(url, poolclass=NullPool)  # make_engine: SQLite gets WAL, busy_timeout
    if url.startswith("sqlite"):  # each migration and its version row: one SQLite transaction
        event.listen(engine, "connect", _sqlite_connect)
        event.listen(engine, "begin", _sqlite_begin)
    try:
        with engine.connect() as connection:
            _run(connection)
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
