"""The `stainbridge` console script: db commands, lazy command modules, clear errors."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from stainbridge.daemon import cli
from stainbridge.daemon.schema import head_revision

pytestmark = pytest.mark.usefixtures("restore_logging")


@pytest.mark.slow
def test_db_upgrade_twice_then_current_prints_head(run_stainbridge, tmp_path: Path) -> None:
    """`db upgrade` on an empty SQLite file works twice; `db current` then prints the head revision."""
    env = {"STAINBRIDGE_DATABASE_URL": f"sqlite:///{tmp_path / 'fresh.db'}", "STAINBRIDGE_LOGGING_FORMAT": "json"}
    for _ in range(2):
        result = run_stainbridge("db", "upgrade", env=env)
        assert result.returncode == 0, result.stderr
        assert f"revision {head_revision()}" in result.stdout
    current = run_stainbridge("db", "current", env=env)
    assert current.returncode == 0, current.stderr
    assert current.stdout.strip() == head_revision()


def test_db_current_on_empty_database_says_none(run_stainbridge, tmp_path: Path) -> None:
    """`db current` on a never-migrated database prints none and says how to upgrade."""
    (tmp_path / "e.db").touch()  # an empty SQLite file: a database that was never migrated
    result = run_stainbridge("db", "current", env={"STAINBRIDGE_DATABASE_URL": f"sqlite:///{tmp_path / 'e.db'}"})
    assert result.returncode == 0
    assert result.stdout.strip() == "none"
    assert "stainbridge db upgrade" in result.stderr


def test_config_accepted_after_the_subcommand(run_stainbridge, tmp_path: Path) -> None:
    """`--config FILE` works after the command words as well as before them."""
    db = tmp_path / "from-file.db"
    config = tmp_path / "s.toml"
    config.write_text(f'[database]\nurl = "sqlite:///{db}"\n')
    result = run_stainbridge("db", "upgrade", "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert db.exists()


def test_unreachable_database_is_one_clear_line(run_stainbridge) -> None:
    """A database that cannot be reached gives exit 1 and a message, not a traceback."""
    result = run_stainbridge("db", "current", env={"STAINBRIDGE_DATABASE_URL": "postgresql://u:secret@127.0.0.1:9/x"})
    assert result.returncode == 1
    assert "cannot open the database" in result.stderr
    assert "secret" not in result.stderr
    assert "Traceback" not in result.stderr


def test_planned_commands_say_not_available(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """A command listed in NOT_YET (planned, not shipped) exits 2 and says so."""
    monkeypatch.setitem(cli.NOT_YET, "planned", "a command of a later version")
    assert cli.main(["planned"]) == 2
    assert "stainbridge planned: not available yet in this version" in capsys.readouterr().err


def test_unbuilt_command_module_exits_2(run_stainbridge, monkeypatch: pytest.MonkeyPatch) -> None:
    """A command whose module is not installed exits 2 with a message naming the command."""
    monkeypatch.setitem(cli.COMMANDS, ("demo",), "stainbridge.daemon.no_such_module_for_test")
    assert cli.main(["demo"]) == 2


@pytest.mark.parametrize("command, option", [("report", "--out"), ("export", "--format")])
def test_report_and_export_are_shipped(run_stainbridge, command: str, option: str) -> None:
    """`report` and `export` are real commands now: their help lists their options."""
    result = run_stainbridge(command, "--help")
    assert result.returncode == 0, result.stderr
    assert option in result.stdout and "--since" in result.stdout


def test_missing_module_message(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """The not-available message names the full command path."""
    monkeypatch.setitem(cli.COMMANDS, ("bench", "throughput"), "stainbridge.models.no_such_bench_for_test")
    assert cli.main(["bench", "throughput", "--help"]) == 2
    assert "stainbridge bench throughput: not available yet in this version" in capsys.readouterr().err


def test_broken_import_inside_a_command_is_not_hidden(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A command module that fails to import one of its own dependencies raises, not 'not available'."""
    (tmp_path / "sb_broken_cmd.py").write_text("import sb_dependency_that_does_not_exist\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(cli.COMMANDS, ("demo",), "sb_broken_cmd")
    with pytest.raises(ModuleNotFoundError):
        cli.main(["demo"])


def test_command_module_gets_arguments_and_global_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A command module adds its own arguments, sees args.config, and its return code is the exit code."""
    (tmp_path / "sb_fake_cmd.py").write_text(
        "seen = {}\n"
        "def add_arguments(parser):\n    parser.add_argument('--out', required=True)\n"
        "def run(args):\n    seen.update(out=args.out, config=args.config)\n    return 3\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(cli.COMMANDS, ("synth",), "sb_fake_cmd")
    config = tmp_path / "c.toml"
    config.write_text("")
    assert cli.main(["--config", str(config), "synth", "--out", "x"]) == 3
    assert sys.modules["sb_fake_cmd"].seen == {"out": "x", "config": str(config)}
    assert cli.main(["synth", "--out", "y", "--config", str(config)]) == 3
    assert sys.modules["sb_fake_cmd"].seen == {"out": "y", "config": str(config)}


def test_import_is_lazy() -> None:
    """Importing the CLI and parsing one command imports no other command's module."""
    import subprocess

    code = (
        "import sys; from stainbridge.daemon import cli; cli.build_parser(('db', 'upgrade'));"
        "print(sorted(m for m in cli.COMMANDS.values() if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_version(run_stainbridge) -> None:
    """`stainbridge --version` prints the package version."""
    result = run_stainbridge("--version")
    assert result.returncode == 0
    assert result.stdout.startswith("stainbridge ")
