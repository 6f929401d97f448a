"""Health of `stainbridge run`: the database check and the systemd watchdog thread.

``Service.healthy`` combines the checks (watcher thread, loop heartbeat, database, files moving);
``watchdog_loop`` sends ``WATCHDOG=1`` only while all of them pass, and ``STATUS=`` once per
change of what is failing, so that systemd restarts a service that is alive but stuck.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError
from structlog.stdlib import BoundLogger

from stainbridge.daemon.service import sdnotify


def database_answers(engine: Engine | None) -> bool:
    """The database answers ``SELECT 1`` (False without an engine or on any database error)."""
    if engine is None:
        return False
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
    except SQLAlchemyError:
        return False
    return True


def watchdog_loop(stop: threading.Event, interval: float, checks: Callable[[float], dict[str, bool]],
                  trouble: Callable[[], str | None], log: BoundLogger) -> None:
    """Until `stop`: every interval/3, ``WATCHDOG=1`` if ``checks(interval)`` all pass, else say why."""
    last_status = ""
    while not stop.wait(interval / 3):
        results = checks(interval)
        if all(results.values()):
            sdnotify.notify("WATCHDOG=1")
        else:
            failing = [k for k, v in results.items() if not v]
            log.warning("unhealthy", **{k: False for k in failing}, trouble=trouble())
            status = f"STATUS=unhealthy ({', '.join(failing)}): {trouble() or 'see the log'}"
            if status != last_status:  # once per change, not every ping interval
                sdnotify.notify(status)
                last_status = status
