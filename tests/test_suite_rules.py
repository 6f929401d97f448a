"""The suite's own rules (tests/suite_rules.py), run on small test files through pytest's pytester."""

from __future__ import annotations

import pytest

from tests import suite_rules

SKIPPING = """
import pytest

def test_runs():
    pass

def test_needs_a_server():
    pytest.skip("no server here")

@pytest.mark.cuda
def test_needs_a_gpu():
    pytest.skip("no GPU here")
"""


@pytest.fixture
def ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")


def test_under_ci_a_skip_outside_the_allow_list_fails_the_run_and_says_which_and_why(pytester, ci) -> None:
    """CI=true: one skipped test that no marker or node id allows makes the exit status 1, listed with its reason."""
    pytester.makepyfile(test_skips=SKIPPING)
    result = pytester.runpytest(plugins=[suite_rules])
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(["*skipped under CI=true, which fails the run*",
                                 "test_skips.py::test_needs_a_server: no server here", "*CI_ALLOWED_SKIPS*"])
    assert "test_needs_a_gpu:" not in result.stdout.str()
    result.assert_outcomes(passed=1, skipped=2)


def test_under_ci_the_allowed_skips_alone_pass(pytester, ci) -> None:
    """CI=true: a run whose only skip carries the cuda marker passes, with no refusal section."""
    pytester.makepyfile(test_gpu="import pytest\n\n@pytest.mark.cuda\ndef test_gpu():\n    pytest.skip('no GPU')\n")
    result = pytester.runpytest(plugins=[suite_rules])
    assert result.ret == pytest.ExitCode.OK
    assert "fails the run" not in result.stdout.str()


def test_under_ci_skipif_and_module_level_skips_count_too(pytester, ci) -> None:
    """CI=true: a skipif mark and a whole module skipped at import are refused like pytest.skip in a test."""
    pytester.makepyfile(
        test_mark="import pytest\n\n@pytest.mark.skipif(True, reason='tool missing')\ndef test_a():\n    pass\n",
        test_module="import pytest\n\npytest.skip('module needs X', allow_module_level=True)\n")
    result = pytester.runpytest(plugins=[suite_rules])
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines_random(["test_mark.py::test_a: tool missing", "test_module.py: module needs X"])


def test_under_ci_an_expected_failure_is_not_a_skip(pytester, ci) -> None:
    """CI=true: an xfail test (reported as skipped by pytest's internals) does not fail the run."""
    pytester.makepyfile(test_x="import pytest\n\n@pytest.mark.xfail(reason='known')\ndef test_x():\n    assert False\n")
    result = pytester.runpytest(plugins=[suite_rules])
    assert result.ret == pytest.ExitCode.OK
    result.assert_outcomes(xfailed=1)


def test_a_failing_run_under_ci_keeps_its_failures_and_lists_the_skips(pytester, ci) -> None:
    """CI=true: with a failure and a refused skip the exit status stays 1 and both are reported."""
    pytester.makepyfile(test_both="import pytest\n\ndef test_f():\n    assert False\n\n"
                                  "def test_s():\n    pytest.skip('why')\n")
    result = pytester.runpytest(plugins=[suite_rules])
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(["test_both.py::test_s: why"])
    result.assert_outcomes(failed=1, skipped=1)


def test_outside_ci_skips_are_only_reported(pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without CI the same skips leave the exit status 0: a developer without PostgreSQL or Chromium can run the suite."""
    monkeypatch.delenv("CI", raising=False)
    pytester.makepyfile(test_skips=SKIPPING)
    result = pytester.runpytest(plugins=[suite_rules])
    assert result.ret == pytest.ExitCode.OK
    assert "fails the run" not in result.stdout.str()


def test_a_postgres_test_without_its_marker_stops_collection(pytester) -> None:
    """A test that reaches the postgres_admin fixture (here through postgres_url) without the postgres marker is
    named in a usage error; the marked one is accepted."""
    pytester.makeconftest("import pytest\n\n@pytest.fixture\ndef postgres_admin():\n    return 'url'\n\n"
                          "@pytest.fixture\ndef postgres_url(postgres_admin):\n    return postgres_admin\n")
    pytester.makepyfile(test_pg="import pytest\n\n@pytest.mark.postgres\ndef test_marked(postgres_url):\n    pass\n\n"
                                "def test_unmarked(postgres_url):\n    pass\n")
    result = pytester.runpytest("-m", "not postgres", plugins=[suite_rules])
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*lack its marker*", "*test_pg.py::test_unmarked"])
    assert "test_marked" not in result.stderr.str()


def test_the_allow_list_names_markers_or_node_ids_with_a_reason() -> None:
    """allowed_skip: a cuda-marked test, a listed node id (parametrized too) are allowed; anything else is not."""
    allowed, allowed_skip = suite_rules.CI_ALLOWED_SKIPS, suite_rules.allowed_skip
    listed = next(name for name in allowed if "::" in name)
    assert allowed_skip("tests/test_x.py::test_gpu", {"cuda": 1, "test_gpu": 1}) == allowed["cuda"]
    assert allowed_skip(listed, {}) == allowed[listed]
    assert allowed_skip(f"{listed}[a-b]", {}) == allowed[listed]
    assert allowed_skip("tests/test_x.py::test_db", {"postgres": 1}) is None
    assert all(why.strip() for why in allowed.values())
