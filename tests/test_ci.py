"""The CI contract: with CI=true an unreachable PostgreSQL fails the run instead of skipping half of it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
UNREACHABLE = "postgresql+psycopg://stainbridge:stainbridge@127.0.0.1:9/postgres"  # the discard port: nothing listens


def run_postgres_tests(ci: str | None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env["STAINBRIDGE_TEST_POSTGRES_URL"] = UNREACHABLE
    if ci is not None:
        env["CI"] = ci
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_store.py", "-k",
         "test_same_content_twice_is_refused and postgres"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )


@pytest.mark.slow
@pytest.mark.parametrize("ci,exit_code,word", [("true", 1, "CI=true: PostgreSQL not reachable"), (None, 0, "skipped")])
def test_unreachable_postgres_fails_under_ci_and_skips_otherwise(ci, exit_code, word):
    """CI=true: the PostgreSQL tests fail with the reason; a developer without a server sees them skipped."""
    result = run_postgres_tests(ci)
    assert result.returncode == exit_code, result.stdout[-2000:]
    assert word in result.stdout


def test_ci_script_does_not_swallow_a_failed_server_start():
    """.ci/run exits when PostgreSQL cannot be started instead of `|| true` and running on."""
    script = (ROOT / ".ci" / "run").read_text()
    assert "|| true" not in script
    assert script.count("exit 1") >= 2
