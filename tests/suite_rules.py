"""The suite's own rules, a pytest plugin (tests/conftest.py loads it; tests/test_suite_rules.py tests it).

- A test that uses the PostgreSQL server (the ``postgres_admin`` fixture, directly or through
  ``postgres_url``) carries the ``postgres`` marker, so that ``-m "not postgres"`` leaves it out:
  collection stops with the names of the tests that lack it.
- Under CI (``CI=true``) a skipped test fails the run unless ``CI_ALLOWED_SKIPS`` names it, by marker
  or by node id, with the reason CI cannot run it: a CI run must not pass with tests that never ran.
  The refused skips are listed in their own section of the summary, each with its reason, and the
  exit status becomes 1.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import pytest

CI_ALLOWED_SKIPS: dict[str, str] = {
    "cuda": "needs a CUDA GPU; CI machines have none",
    "tests/test_bench_throughput.py::test_cuda_requested_without_a_gpu_is_a_clear_error":
        "checks the error for --device cuda where there is no GPU; a machine with one cannot run it",
}
POSTGRES_FIXTURE = "postgres_admin"


def under_ci() -> bool:
    """True when the environment says this is a CI run (.ci/run's runner sets CI=true)."""
    return os.environ.get("CI", "").lower() in ("true", "1", "yes")


def allowed_skip(nodeid: str, keywords: Mapping[str, object]) -> str | None:
    """The allow-list's reason why CI may skip this test (its markers are among ``keywords``), else None."""
    function = nodeid.split("[", 1)[0]  # a parametrized test is allowed by its function's node id
    for name in (nodeid, function):
        if name in CI_ALLOWED_SKIPS:
            return CI_ALLOWED_SKIPS[name]
    return next((why for name, why in CI_ALLOWED_SKIPS.items() if "::" not in name and name in keywords), None)


def skip_reason(report: pytest.TestReport | pytest.CollectReport) -> str:
    """The reason a skipped report gives (pytest keeps it as (path, line, "Skipped: why"))."""
    if isinstance(report.longrepr, tuple):
        return str(report.longrepr[2]).removeprefix("Skipped: ")
    return str(report.longrepr)


class SkipsUnderCI:
    """Collects the skips the allow-list does not name; with any, the run fails and says which and why."""

    def __init__(self) -> None:
        self.refused: list[tuple[str, str]] = []

    def _record(self, report: pytest.TestReport | pytest.CollectReport) -> None:
        keywords = getattr(report, "keywords", {})  # a module skipped at import (a CollectReport) has none
        if report.skipped and not hasattr(report, "wasxfail") and allowed_skip(report.nodeid, keywords) is None:
            self.refused.append((report.nodeid, skip_reason(report)))

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        self._record(report)

    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        self._record(report)

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        if self.refused and session.exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def pytest_terminal_summary(self, terminalreporter) -> None:
        if not self.refused:
            return
        terminalreporter.section("skipped under CI=true, which fails the run", red=True, bold=True)
        for nodeid, reason in self.refused:
            terminalreporter.line(f"{nodeid}: {reason}")
        terminalreporter.line("CI runs every test: make .ci/run install what they need, or add them to "
                              "CI_ALLOWED_SKIPS in tests/suite_rules.py with the reason CI cannot run them")


def pytest_configure(config: pytest.Config) -> None:
    if under_ci():
        config.pluginmanager.register(SkipsUnderCI(), "stainbridge-skips-under-ci")


@pytest.hookimpl(tryfirst=True)  # before -m deselects anything: every collected test is checked
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    unmarked = [item.nodeid for item in items
                if POSTGRES_FIXTURE in getattr(item, "fixturenames", ()) and item.get_closest_marker("postgres") is None]
    if unmarked:
        raise pytest.UsageError("these tests use the PostgreSQL server but lack its marker; add @pytest.mark.postgres "
                                "so that -m 'not postgres' leaves them out:\n  " + "\n  ".join(unmarked))
