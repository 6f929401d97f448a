"""Start-up of `stainbridge run` before READY=1: the database (waited for while unreachable) and the models.

``connect_and_load`` migrates or checks the database and loads the models; while the database is
unreachable it waits with a growing back-off, says so in ``STATUS=`` and extends systemd's start
timeout, and gives up only on a signal (``StoppedDuringStartup``) or a non-transient error.
``startup_errors`` turns what start-up can raise into one ``StartupError`` whose message says
what to fix.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import sessionmaker
from structlog.stdlib import BoundLogger

from stainbridge.daemon.config import ConfigError, Settings
from stainbridge.daemon.intake.failures import Backoff, error_summary, is_transient
from stainbridge.daemon.intake.watcher import WatcherError
from stainbridge.daemon.schema import DatabaseUnreachable, SchemaError, prepare_database, safe_url
from stainbridge.daemon.service import sdnotify
from stainbridge.daemon.store import make_engine, make_sessionmaker
from stainbridge.daemon.versions.loading import ModelConfigError
from stainbridge.daemon.versions.site_models import SiteModels

STARTUP_BACKOFF_MAX_SECONDS = 30.0  # longest pause between start-up attempts to reach the database


class StartupError(Exception):
    """The service cannot start; the message says what to fix."""


class StoppedDuringStartup(Exception):
    """A signal arrived while start-up was waiting for the database."""


def connect_and_load(settings: Settings, stop: threading.Event,
                     log: BoundLogger) -> tuple[Engine, sessionmaker, SiteModels]:
    """Migrate/check the database and load the models, waiting (with back-off) while it is unreachable.

    Raises StoppedDuringStartup when `stop` is set during a wait; other errors propagate.
    """
    s = settings
    backoff = Backoff(maximum=STARTUP_BACKOFF_MAX_SECONDS)
    while True:
        engine = None
        try:
            prepare_database(s.database_url, default_site=s.site.name)
            engine = make_engine(s.database_url)
            sessions = make_sessionmaker(engine)
            models = SiteModels.start(s, sessions)
            return engine, sessions, models
        except (DatabaseUnreachable, SQLAlchemyError) as exc:
            if engine is not None:
                engine.dispose()
            if isinstance(exc, SQLAlchemyError) and not is_transient(exc):
                raise
            delay = backoff.failed()
            reason = error_summary(exc) if isinstance(exc, SQLAlchemyError) else str(exc)
            log.warning("waiting_for_database", database=safe_url(s.database_url), attempt=backoff.failures,
                        retry_in_s=delay, error=reason)
            # EXTEND_TIMEOUT_USEC: systemd's start timeout must not kill a service that is only waiting.
            sdnotify.notify(f"STATUS=waiting for the database {safe_url(s.database_url)} "
                            f"(attempt {backoff.failures}, next in {delay:.0f} s)\n"
                            f"EXTEND_TIMEOUT_USEC={int((delay + 60) * 1e6)}")
            if stop.wait(delay):
                raise StoppedDuringStartup() from None


@contextmanager
def startup_errors(settings: Settings) -> Iterator[None]:
    """Raise what start-up fails on as a StartupError with a one-line reason and what to fix."""
    try:
        yield
    except (SchemaError, ModelConfigError, WatcherError, ConfigError) as exc:
        raise StartupError(str(exc)) from None
    except OSError as exc:
        raise StartupError(f"cannot use {exc.filename}: {exc.strerror}; fix [paths] or the folder's owner "
                           "(under systemd: the stainbridge user, and ReadWritePaths= in the unit)") from None
    except SQLAlchemyError as exc:
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        raise StartupError(f"database {safe_url(settings.database_url)}: {reason}") from None
