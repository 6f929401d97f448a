"""Settings: defaults, file and environment layering, validation messages, the shipped file."""

from __future__ import annotations

import re
import tomllib
from dataclasses import fields
from pathlib import Path

import pytest

from stainbridge.daemon.config import SECTIONS, ConfigError, load_settings

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "config" / "stainbridge.toml"


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_without_file_or_environment() -> None:
    """With nothing configured, every setting has its documented default and paths follow state."""
    settings = load_settings(environ={})
    assert settings.models.device == "auto"
    assert settings.models.batch_size == 16
    assert settings.models.standardizer == "none"
    assert settings.site.scale == "profile"
    assert settings.retraining.schedule == "0 2 * * *"
    assert settings.logging.format == "auto"
    assert settings.drop_dir == settings.state_dir / "drop"
    assert settings.archive_dir == settings.state_dir / "archive"
    assert settings.database_url == f"sqlite:///{settings.state_dir / 'stainbridge.db'}"
    assert settings.source == "built-in defaults"


def test_file_overrides_defaults(tmp_path: Path) -> None:
    """Values in the TOML file replace the defaults and are converted to their types."""
    config = write(
        tmp_path / "s.toml",
        f'[paths]\nstate = "{tmp_path}/st"\n[models]\nbatch_size = 4\ndevice = "CPU"\n[watch]\npolling = true\n',
    )
    settings = load_settings(config, environ={})
    assert settings.state_dir == tmp_path / "st"
    assert settings.models.batch_size == 4
    assert settings.models.device == "cpu"
    assert settings.watch.polling is True
    assert str(config) in settings.source


def test_environment_overrides_file(tmp_path: Path) -> None:
    """STAINBRIDGE_<SECTION>_<KEY> wins over the file, and $STAINBRIDGE_CONFIG names the file."""
    config = write(tmp_path / "s.toml", "[models]\nbatch_size = 4\n[logging]\nlevel = \"debug\"\n")
    settings = load_settings(
        environ={"STAINBRIDGE_CONFIG": str(config), "STAINBRIDGE_MODELS_BATCH_SIZE": "32",
                 "STAINBRIDGE_DATABASE_URL": "postgresql://u:p@db/x"}
    )
    assert settings.models.batch_size == 32
    assert settings.logging.level == "debug"
    assert settings.database_url == "postgresql+psycopg://u:p@db/x"
    assert settings.source.endswith("environment")


def test_bad_value_names_key_allowed_values_and_source(tmp_path: Path) -> None:
    """A value outside the allowed set raises ConfigError naming the key, the choices and the file."""
    config = write(tmp_path / "s.toml", '[models]\ndevice = "tpu"\n')
    with pytest.raises(ConfigError) as caught:
        load_settings(config, environ={})
    message = str(caught.value)
    assert "[models] device" in message and "'tpu'" in message
    assert "auto, cpu, cuda" in message
    assert str(config) in message


def test_bad_environment_value_names_the_variable() -> None:
    """A bad value from the environment names the variable it came from."""
    with pytest.raises(ConfigError, match="STAINBRIDGE_WATCH_QUIET_SECONDS.*positive"):
        load_settings(environ={"STAINBRIDGE_WATCH_QUIET_SECONDS": "-1"})


def test_short_pseudonym_secret_is_refused() -> None:
    """A pseudonym secret shorter than 16 characters is refused: a guessable key un-pseudonymizes patients."""
    with pytest.raises(ConfigError, match="STAINBRIDGE_SITE_PSEUDONYM_SECRET.*at least 16"):
        load_settings(environ={"STAINBRIDGE_SITE_PSEUDONYM_SECRET": "secret"})
    assert load_settings(environ={"STAINBRIDGE_SITE_PSEUDONYM_SECRET": "x" * 16}).site.pseudonym_secret == "x" * 16


def test_unknown_key_is_rejected(tmp_path: Path) -> None:
    """A misspelt key is an error that lists the known keys, not a silently ignored line."""
    config = write(tmp_path / "s.toml", "[models]\nbatchsize = 4\n")
    with pytest.raises(ConfigError, match=r"unknown key \[models\] batchsize.*batch_size"):
        load_settings(config, environ={})


def test_unknown_section_is_rejected(tmp_path: Path) -> None:
    """An unknown section is an error that lists the known sections."""
    config = write(tmp_path / "s.toml", "[model]\ndevice = \"cpu\"\n")
    with pytest.raises(ConfigError, match=r"unknown section \[model\].*models"):
        load_settings(config, environ={})


def test_missing_file_says_what_to_do(tmp_path: Path) -> None:
    """A --config file that does not exist is a ConfigError that says how to fix it."""
    with pytest.raises(ConfigError, match="does not exist; pass --config FILE"):
        load_settings(tmp_path / "nope.toml", environ={})


def test_shipped_file_loads_to_the_defaults() -> None:
    """config/stainbridge.toml loads and yields exactly the built-in defaults."""
    from_file = load_settings(SHIPPED, environ={})
    builtin = load_settings(environ={})
    assert from_file.effective() == builtin.effective()


def test_shipped_file_documents_every_key() -> None:
    """Every section and key of daemon/config.py appears in the shipped file with its env variable."""
    text = SHIPPED.read_text(encoding="utf-8")
    data = tomllib.loads(text)
    for section, cls in SECTIONS.items():
        assert section in data, f"[{section}] missing from {SHIPPED}"
        for field in fields(cls):
            assert field.name in data[section], f"[{section}] {field.name} missing from {SHIPPED}"
            env = f"STAINBRIDGE_{section.upper()}_{field.name.upper()}"
            assert re.search(rf"env: {env}\b", text), f"{env} not documented in {SHIPPED}"
    assert set(data) == set(SECTIONS)


def test_config_check_rejects_bad_value(run_stainbridge, tmp_path: Path) -> None:
    """`stainbridge config check` exits 1 with one clear line for a bad value, and no traceback."""
    config = write(tmp_path / "s.toml", '[logging]\nformat = "xml"\n')
    result = run_stainbridge("config", "check", "--config", str(config))
    assert result.returncode == 1
    assert "[logging] format = 'xml'" in result.stderr
    assert "auto, json, console" in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


def test_config_check_prints_effective_configuration(run_stainbridge, tmp_path: Path) -> None:
    """`config check --json` prints every section with environment overrides applied."""
    import json

    result = run_stainbridge("--config", str(SHIPPED), "config", "check", "--json",
                             env={"STAINBRIDGE_MODELS_BATCH_SIZE": "8"})
    assert result.returncode == 0, result.stderr
    effective = json.loads(result.stdout)
    assert set(SECTIONS) <= set(effective)
    assert effective["models"]["batch_size"] == 8


CHECKS = [  # (setting as SECTION_KEY, value as the environment gives it, accepted?)
    ("watch_quiet_seconds", "2", True), ("watch_quiet_seconds", "0.5", True), ("watch_quiet_seconds", "0", False),
    ("watch_quiet_seconds", "-1", False), ("watch_quiet_seconds", "inf", False), ("watch_quiet_seconds", "nan", False),
    ("watch_quiet_seconds", "1e309", False), ("watch_quiet_seconds", "true", False),
    ("paths_min_free_mb", "0", True), ("paths_min_free_mb", "500", True), ("paths_min_free_mb", "inf", False),
    ("paths_min_free_mb", "-1", False), ("paths_min_free_mb", "nan", False),
    ("models_batch_size", "16", True), ("models_batch_size", "0", False), ("models_batch_size", "1.5", False),
    ("models_batch_size", "inf", False),
    ("retraining_steps_per_epoch", "0", True), ("retraining_steps_per_epoch", "-1", False),
    ("retraining_held_out_fraction", "0", True), ("retraining_held_out_fraction", "1", True),
    ("retraining_held_out_fraction", "1.1", False), ("retraining_held_out_fraction", "nan", False),
    ("metrics_port", "0", True), ("metrics_port", "65535", True), ("metrics_port", "65536", False),
    ("metrics_port", "-1", False), ("watch_polling", "yes", True), ("watch_polling", "maybe", False),
    ("site_scale", "profile", True), ("site_scale", "1.5", True), ("site_scale", "0", False),
    ("site_scale", "inf", False), ("retraining_schedule", "0 2 * * *", True),
    ("retraining_schedule", "every night", False), ("retraining_schedule", "*/20 * * * * *", True),
    ("retraining_schedule", "61 * * * * *", False), ("models_device", "CUDA", True), ("models_device", "tpu", False),
    ("site_pseudonym_secret", "0123456789abcdef", True), ("site_pseudonym_secret", "hunter2", False),
    ("database_url", "postgresql://lab:hunter2@db/stainbridge", True),
    ("database_url", "mysql://lab:hunter2@db/stainbridge", False),
]


@pytest.mark.parametrize("setting,value,accepted", CHECKS, ids=[f"{k}={v!r}" for k, v, _ in CHECKS])
def test_each_checker_accepts_and_refuses_what_its_setting_means(setting, value, accepted) -> None:
    """One table over the value checkers: finite numbers only where a number is expected (quiet_seconds = inf
    was accepted while min_free_mb = inf was refused), ranges, choices; a refusal never shows a secret."""
    section, key = next((s, k) for s in SECTIONS for k in (f.name for f in fields(SECTIONS[s]))
                        if f"{s}_{k}" == setting)
    environ = {f"STAINBRIDGE_{setting.upper()}": value}
    if accepted:
        load_settings(environ=environ)
        return
    with pytest.raises(ConfigError, match=rf"\[{section}\] {key} = .* is not valid") as refused:
        load_settings(environ=environ)
    assert "hunter2" not in str(refused.value)


@pytest.mark.parametrize("line", ["[watch]\nquiet_seconds = inf", "[paths]\nmin_free_mb = inf",
                                  "[models]\nbatch_size = nan", "[retraining]\ntimeout_minutes = inf"])
def test_toml_infinities_are_refused_like_the_environment_s(tmp_path: Path, line: str) -> None:
    """TOML has inf and nan literals: the file's values go through the same checkers."""
    with pytest.raises(ConfigError, match="is not valid"):
        load_settings(write(tmp_path / "s.toml", line + "\n"), environ={})


def test_config_check_hides_the_database_password(run_stainbridge, tmp_path: Path) -> None:
    """`config check` prints the effective configuration without the database password or the secret."""
    env = {"STAINBRIDGE_DATABASE_URL": "postgresql+psycopg://lab:hunter2@db/stainbridge",
           "STAINBRIDGE_SITE_PSEUDONYM_SECRET": "correct-horse-battery-staple"}
    result = run_stainbridge("config", "check", env=env)
    assert result.returncode == 0, result.stderr
    assert "lab:***@db" in result.stdout and "hunter2" not in result.stdout
    assert "correct-horse" not in result.stdout
