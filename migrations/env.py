"""Alembic environment, run from code by daemon.schema (there is no alembic.ini).

The URL comes from ``config.attributes["url"]`` (or the ``sqlalchemy.url`` main option);
a caller may also hand in an open connection as ``config.attributes["connection"]``.
"""

from __future__ import annotations

from alembic import context
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


def _include_name(name: str | None, type_: str, _parent: object) -> bool:
    # APScheduler keeps its job table in the same database (daemon/scheduler.py); it is not ours.
    return not (type_ == "table" and name == "apscheduler_jobs")


def _configure(**kwargs: object) -> None:
    url = _url()
    context.configure(
        target_metadata=target_metadata,
        # SQLite cannot ALTER most things: later migrations recreate tables in batch mode.
        render_as_batch=url.startswith("sqlite"),
        compare_type=True,
        include_name=_include_name,
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


def run_migrations_online() -> None:
    given = config.attributes.get("connection")
    if given is not None:
        _run(given)
        return
    url = _url()
    engine = make_engine(url, poolclass=NullPool)  # make_engine: SQLite gets WAL, busy_timeout
    try:
        with engine.connect() as connection:
            if url.startswith("sqlite"):
                # Batch mode copies and drops tables; foreign keys must be off meanwhile
                # (this pragma is ignored inside a transaction, so it goes first).
                connection.exec_driver_sql("PRAGMA foreign_keys=OFF")
                connection.commit()
            _run(connection)
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
