"""Shared fixtures: databases on both backends, hermetic settings, the installed CLI.

`database_url` runs a test once on a fresh SQLite file and once on a fresh PostgreSQL
database. PostgreSQL comes from $STAINBRIDGE_TEST_POSTGRES_URL (an admin connection that may
CREATE DATABASE); when no server answers there, those runs are skipped with the reason shown
in pytest's summary (`-ra`), never silently. Under CI (``CI=true``) they fail instead: a CI run
whose database did not start must not pass with half of its tests skipped. The suite's rules (every
PostgreSQL test carries its marker; under CI any other skip outside an allow-list fails the run) are
the plugin tests/suite_rules.py, registered here (beside pytest's own ``pytester``, which its tests use).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from stainbridge.daemon.config import SECTIONS, Settings, env_name, load_settings
from tests import suite_rules
from tests.suite_rules import under_ci

pytest_plugins = ("pytester",)

DEFAULT_POSTGRES_URL = "postgresql+psycopg://stainbridge:stainbridge@127.0.0.1:5432/postgres"
POSTGRES_ENV = "STAINBRIDGE_TEST_POSTGRES_URL"
HOW_TO_START = (
    "start it with `pg_ctlcluster 15 main start` and create the role as .ci/run does "
    f"(or run `bash .ci/run`), or point {POSTGRES_ENV} at a server where the role may CREATE DATABASE"
)


def postgres_admin_url() -> str:
    return os.environ.get(POSTGRES_ENV) or DEFAULT_POSTGRES_URL


def _masked(url: str) -> str:
    return make_url(url).render_as_string(hide_password=True)


def pytest_configure(config: pytest.Config) -> None:
    config.pluginmanager.register(suite_rules, "stainbridge-suite-rules")


@pytest.fixture(autouse=True)
def _hermetic_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A developer's own STAINBRIDGE_* variables (and a machine's /etc/stainbridge) must not leak into the tests."""
    from stainbridge.daemon import config

    for name in list(os.environ):
        if name.startswith("STAINBRIDGE_") and not name.startswith("STAINBRIDGE_TEST_"):
            monkeypatch.delenv(name)
    monkeypatch.setattr(config, "SYSTEM_CONFIG", tmp_path / "no-system-config" / "stainbridge.toml")


@pytest.fixture(scope="session")
def postgres_admin() -> str:
    """The admin URL of a reachable PostgreSQL server, or a visible skip saying how to get one."""
    url = postgres_admin_url()
    engine = create_engine(url, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 3})
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
    except Exception as exc:  # any failure to connect means "no server for these tests"
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        message = f"PostgreSQL not reachable at {_masked(url)} ({reason}); {HOW_TO_START}"
        if under_ci():
            pytest.fail(f"CI=true: {message}", pytrace=False)
        pytest.skip(message)
    finally:
        engine.dispose()
    return url


def _drop_database(admin_url: str, name: str) -> None:
    engine = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as connection:
            connection.execute(
                # our own leftover sessions only: an autovacuum worker (a superuser process we may not signal)
                # can be busy with the fresh database; DROP DATABASE stops those itself
                text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :name "
                     "AND pid <> pg_backend_pid() AND usename = current_user"),
                {"name": name},
            )
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
    finally:
        engine.dispose()


@pytest.fixture
def postgres_url(postgres_admin: str) -> Iterator[str]:
    """URL of a fresh, empty PostgreSQL database, dropped after the test."""
    name = f"stainbridge_test_{uuid.uuid4().hex[:12]}"
    engine = create_engine(postgres_admin, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{name}"'))
    finally:
        engine.dispose()
    try:
        yield make_url(postgres_admin).set(database=name).render_as_string(hide_password=False)
    finally:
        _drop_database(postgres_admin, name)


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """URL of a SQLite file in the test's tmp_path (created on first connect)."""
    return f"sqlite:///{tmp_path / 'stainbridge.db'}"


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest) -> str:
    """An empty database on each backend in turn: a SQLite file, then a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return request.getfixturevalue("sqlite_url")
    return request.getfixturevalue("postgres_url")


SettingsFactory = Callable[..., Settings]


@pytest.fixture
def settings_factory(tmp_path: Path) -> SettingsFactory:
    """Build Settings whose folders all live under tmp_path, through load_settings itself.

    make(database_url=None, config_file=None, **overrides): overrides are SECTION_KEY=value,
    e.g. watch_quiet_seconds=0.1 or models_classifier=str(ckpt); they go through the same
    validation as STAINBRIDGE_<SECTION>_<KEY> variables. The real process environment is not read.
    """
    known = {env_name(section, f): (section, f) for section, cls in SECTIONS.items() for f in cls.__dataclass_fields__}

    def make(database_url: str | None = None, config_file: str | os.PathLike[str] | None = None, **overrides: Any) -> Settings:
        environ = {
            env_name("paths", "state"): str(tmp_path / "state"),
            env_name("paths", "drop"): str(tmp_path / "drop"),
            env_name("paths", "archive"): str(tmp_path / "archive"),
            env_name("paths", "quarantine"): str(tmp_path / "quarantine"),
            env_name("database", "url"): database_url or f"sqlite:///{tmp_path / 'state' / 'stainbridge.db'}",
        }
        for key, value in overrides.items():
            name = f"STAINBRIDGE_{key.upper()}"
            if name not in known:
                raise TypeError(f"settings_factory: unknown setting {key!r}; use SECTION_KEY, e.g. watch_quiet_seconds")
            environ[name] = ("true" if value else "false") if isinstance(value, bool) else str(value)
        return load_settings(config_file, environ=environ)

    return make


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory):
    """A tiny classifier and standardizer checkpoint (tests.daemon_helpers.build_tiny_models), once per session."""
    from tests.daemon_helpers import build_tiny_models

    return build_tiny_models(tmp_path_factory.mktemp("models"))


@pytest.fixture
def make_service(settings_factory: SettingsFactory, tiny_models) -> Iterator[Callable[..., Any]]:
    """Start in-process Services on the tiny models: make(database_url=None, **overrides) -> a started Service.

    The watcher is quick (files ready after 0.05 s, a rescan every 0.2 s, batches of 4); overrides are
    settings_factory's SECTION_KEY=value. A PostgreSQL database is migrated first. All are stopped at teardown.
    """
    from stainbridge.daemon import folders
    from stainbridge.daemon.schema import upgrade_database
    from stainbridge.daemon.service.lifecycle import Service

    made: list[Service] = []

    def make(database_url: str | None = None, **overrides: Any) -> Service:
        if database_url and database_url.startswith("postgresql"):
            upgrade_database(database_url)
        settings = settings_factory(database_url, **{
            "models_classifier": str(tiny_models.classifier), "models_standardizer": str(tiny_models.standardizer),
            "models_device": "cpu", "models_batch_size": 4, "watch_quiet_seconds": 0.05, "watch_rescan_seconds": 0.2,
            "watch_batch_wait_seconds": 0.05, "site_pseudonym_secret": "a-long-enough-test-secret-0123456789",
            **overrides})
        folders.prepare(settings)  # `stainbridge init`
        service = Service(settings)
        service.start()
        made.append(service)
        return service

    yield make
    for service in made:
        if service.heartbeat is not None:
            service.heartbeat.stop()
        service.watcher.stop()
        service.pipeline.close()
        service.engine.dispose()


@pytest.fixture(scope="session")
def stainbridge_exe() -> Path:
    """The installed `stainbridge` console script next to this interpreter."""
    exe = Path(sys.executable).parent / "stainbridge"
    if not exe.exists():
        pytest.fail(f"{exe} is missing; install the package with `{sys.executable} -m pip install -e '.[dev]'`")
    return exe


@pytest.fixture
def run_stainbridge(stainbridge_exe: Path, tmp_path: Path) -> Callable[..., subprocess.CompletedProcess[str]]:
    """Run the real console script: run_stainbridge("db", "upgrade", env={...}) -> CompletedProcess."""

    def run(*args: str, env: dict[str, str] | None = None, timeout: float = 120, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
        base = {k: v for k, v in os.environ.items() if not k.startswith("STAINBRIDGE_")}
        base["STAINBRIDGE_CONFIG"] = ""  # no file unless the test names one (not this machine's /etc/stainbridge)
        base.update(env or {})
        return subprocess.run(
            [str(stainbridge_exe), *args],
            env=base,
            cwd=cwd or tmp_path,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )

    return run


@pytest.fixture
def restore_logging():
    """Code under test configures logging in this process; leave the root logger as it was."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture(scope="session")
def lab(tmp_path_factory: pytest.TempPathFactory):
    """Synthetic reference/incoming images, a tiny trained classifier and a broken standardizer (once per session)."""
    from tests.retraining_helpers import build_lab

    return build_lab(tmp_path_factory.mktemp("lab"))
