"""Settings: the one place that holds every default.

Loading order, later wins: built-in defaults < TOML file (``--config FILE`` or
``$STAINBRIDGE_CONFIG``) < environment variables ``STAINBRIDGE_<SECTION>_<KEY>``.
Every value is validated here; a bad one raises :class:`ConfigError` naming the key,
where it came from and what is allowed.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

ENV_PREFIX = "STAINBRIDGE_"
CONFIG_ENV = "STAINBRIDGE_CONFIG"
DEVICES = ("auto", "cpu", "cuda")
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("auto", "json", "console")
STANDARDIZER_BUILTINS = ("none", "reinhard", "macenko")


class ConfigError(ValueError):
    """A setting is missing, unknown or has a value outside what is allowed."""


def _default_state_dir() -> str:
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(base, "stainbridge")


@dataclass(frozen=True)
class PathsSettings:
    state: Path = Path(_default_state_dir())
    drop: Path | None = None  # default: <state>/drop
    archive: Path | None = None  # default: <state>/archive
    quarantine: Path | None = None  # default: <state>/quarantine
    min_free_mb: float = 500.0  # no new files while a volume written to has less free (0: off)


@dataclass(frozen=True)
class DatabaseSettings:
    url: str = ""  # default: sqlite:///<state>/stainbridge.db


@dataclass(frozen=True)
class ModelsSettings:
    standardizer: str = "none"
    classifier: str = ""
    device: str = "auto"
    batch_size: int = 16
    max_inflight_pixels: int = 100_000_000  # decoded pixels a batch holds at once (memory cap)
    poll_seconds: float = 10.0  # how often the running service looks for a newly promoted version
    tta: bool = True  # average the classifier over the 8 turns and flips (8x classifier cost)


@dataclass(frozen=True)
class SiteSettings:
    name: str = "default"
    # Geometry: "profile" uses the magnification in the standardizer's site profile (estimated
    # without labels when it was trained); a number sets the magnification by hand; "auto" zooms
    # each frame by its stained-cell fraction.
    scale: str = "profile"
    pseudonym_secret: str = ""


@dataclass(frozen=True)
class WatchSettings:
    polling: bool = False
    rescan_seconds: float = 60.0
    quiet_seconds: float = 2.0
    batch_wait_seconds: float = 0.5
    max_file_mb: float = 200.0
    max_pixels: int = 50_000_000
    save_standardized: bool = False


@dataclass(frozen=True)
class RetrainingSettings:
    enabled: bool = False
    schedule: str = "0 2 * * *"
    min_new_images: int = 200
    reference: Path | None = None  # labeled reference-hospital folder (one sub-folder per class)
    window_days: int = 30  # recent archived images considered by the job
    max_images: int = 2000  # at most this many of them (the newest)
    held_out_fraction: float = 0.2  # of those, kept out of training for the gate's label-free checks
    preset: str = "colour"  # `stainbridge train cyclegan --preset`
    epochs: int = 2
    steps_per_epoch: int = 0  # 0: one pass over the data per epoch
    device: str = "auto"
    nice: int = 10  # priority decrease of the training subprocess
    timeout_minutes: float = 240.0
    margin: float = 0.02  # a candidate may be at most this much worse than the active version on each check
    min_reviews: int = 30  # reviewed images needed before reviewed accuracy is part of the gate
    max_gate_images: int = 200  # images per gate check (reference split, held-out recent images)
    review_below: float = 0.6  # `review export` lists predictions less confident than this


@dataclass(frozen=True)
class MetricsSettings:
    port: int = 0  # Prometheus endpoint of `stainbridge run`; 0: off
    address: str = "127.0.0.1"


@dataclass(frozen=True)
class LoggingSettings:
    level: str = "info"
    format: str = "auto"


@dataclass(frozen=True)
class Settings:
    paths: PathsSettings = field(default_factory=PathsSettings)
    database: DatabaseSettings = field(default_factory=DatabaseSettings)
    models: ModelsSettings = field(default_factory=ModelsSettings)
    site: SiteSettings = field(default_factory=SiteSettings)
    watch: WatchSettings = field(default_factory=WatchSettings)
    retraining: RetrainingSettings = field(default_factory=RetrainingSettings)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    logging: LoggingSettings = field(default_factory=LoggingSettings)
    source: str = "built-in defaults"

    @property
    def state_dir(self) -> Path:
        return self.paths.state

    @property
    def drop_dir(self) -> Path:
        return self.paths.drop or self.paths.state / "drop"

    @property
    def archive_dir(self) -> Path:
        return self.paths.archive or self.paths.state / "archive"

    @property
    def quarantine_dir(self) -> Path:
        return self.paths.quarantine or self.paths.state / "quarantine"

    @property
    def database_url(self) -> str:
        return self.database.url or f"sqlite:///{self.paths.state / 'stainbridge.db'}"

    def effective(self) -> dict[str, dict[str, Any]]:
        """Every setting after defaults are filled in, as plain values (for `config check`)."""
        out: dict[str, dict[str, Any]] = {}
        for section in SECTIONS:
            values = {f.name: getattr(getattr(self, section), f.name) for f in fields(SECTIONS[section])}
            out[section] = {k: str(v) if isinstance(v, Path) else v for k, v in values.items()}
        out["paths"].update(
            drop=str(self.drop_dir), archive=str(self.archive_dir), quarantine=str(self.quarantine_dir)
        )
        out["database"]["url"] = self.database_url
        if out["site"]["pseudonym_secret"]:
            out["site"]["pseudonym_secret"] = "<set>"
        return out


SECTIONS: dict[str, type] = {
    "paths": PathsSettings,
    "database": DatabaseSettings,
    "models": ModelsSettings,
    "site": SiteSettings,
    "watch": WatchSettings,
    "retraining": RetrainingSettings,
    "metrics": MetricsSettings,
    "logging": LoggingSettings,
}


def _choice(*allowed: str) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        text = str(value).strip().lower()
        if text not in allowed:
            raise ValueError(f"allowed values: {', '.join(allowed)}")
        return text

    return check


def _positive(kind: type) -> Callable[[Any], Any]:
    def check(value: Any) -> Any:
        if isinstance(value, bool):
            raise ValueError(f"expected a positive {kind.__name__}")
        try:
            number = kind(value)
        except (TypeError, ValueError):
            raise ValueError(f"expected a positive {kind.__name__}") from None
        if kind is int and isinstance(value, float) and not value.is_integer():
            raise ValueError("expected a positive int")
        if number <= 0:
            raise ValueError(f"expected a positive {kind.__name__}")
        return number

    return check


def _fraction(value: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError("expected a number between 0 and 1") from None
    if isinstance(value, bool) or not 0.0 <= number <= 1.0:
        raise ValueError("expected a number between 0 and 1")
    return number


def _non_negative_int(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError("expected an integer >= 0")
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ValueError("expected an integer >= 0") from None
    if number < 0 or (isinstance(value, float) and not value.is_integer()):
        raise ValueError("expected an integer >= 0")
    return number


def _non_negative_float(value: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError("expected a number >= 0") from None
    if isinstance(value, bool) or not number >= 0.0 or number == float("inf"):
        raise ValueError("expected a number >= 0")
    return number


def _port(value: Any) -> int:
    number = _non_negative_int(value)
    if number > 65535:
        raise ValueError("expected a TCP port (1-65535), or 0 for off")
    return number


def _boolean(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError("allowed values: true, false")


def _path_or_none(value: Any) -> Path | None:
    text = str(value).strip()
    return Path(text).expanduser().absolute() if text else None


def _state_path(value: Any) -> Path:
    # Empty means the default, so the documented config file can spell every key out.
    text = str(value).strip()
    return Path(text).expanduser().absolute() if text else PathsSettings().state


def _text(value: Any) -> str:
    if not isinstance(value, (str, int, float)) or isinstance(value, bool):
        raise ValueError("expected a string")
    return str(value).strip()


MIN_PSEUDONYM_SECRET_CHARS = 16


def _pseudonym_secret(value: Any) -> str:
    secret = _text(value)
    if secret and len(secret) < MIN_PSEUDONYM_SECRET_CHARS:
        raise ValueError(f"a pseudonym secret of {len(secret)} characters is guessable; use at least "
                         f"{MIN_PSEUDONYM_SECRET_CHARS} random characters (e.g. `openssl rand -hex 32`), "
                         "and keep it stable: changing it changes every pseudonym")
    return secret


def _database_url(value: Any) -> str:
    url = _text(value)
    if url and not url.startswith(("sqlite://", "postgresql://", "postgresql+psycopg://")):
        raise ValueError("expected sqlite:///FILE or postgresql+psycopg://USER:PASS@HOST/DB")
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url[len("postgresql://") :]
    return url


def _standardizer(value: Any) -> str:
    text = _text(value)
    if not text:
        raise ValueError(f"expected a checkpoint file or one of: {', '.join(STANDARDIZER_BUILTINS)}")
    return text if text.lower() not in STANDARDIZER_BUILTINS else text.lower()


def _scale(value: Any) -> str:
    text = str(value).strip().lower()
    if text in ("profile", "auto"):
        return text
    try:
        number = float(text)
    except ValueError:
        raise ValueError("allowed values: profile, auto, or a positive number (1.0 = no rescaling)") from None
    if not 0.05 <= number <= 20:
        raise ValueError("allowed values: profile, auto, or a number between 0.05 and 20")
    return repr(number)


def _cron(value: Any) -> str:
    from apscheduler.triggers.cron import CronTrigger

    text = _text(value)
    try:
        CronTrigger.from_crontab(text)
    except ValueError as exc:
        raise ValueError(f"expected a crontab expression such as '0 2 * * *' ({exc})") from None
    return text


VALIDATORS: dict[tuple[str, str], Callable[[Any], Any]] = {
    ("paths", "state"): _state_path,
    ("paths", "drop"): _path_or_none,
    ("paths", "archive"): _path_or_none,
    ("paths", "quarantine"): _path_or_none,
    ("paths", "min_free_mb"): _non_negative_float,
    ("database", "url"): _database_url,
    ("models", "standardizer"): _standardizer,
    ("models", "classifier"): _text,
    ("models", "device"): _choice(*DEVICES),
    ("models", "batch_size"): _positive(int),
    ("models", "max_inflight_pixels"): _positive(int),
    ("models", "poll_seconds"): _positive(float),
    ("models", "tta"): _boolean,
    ("site", "name"): _text,
    ("site", "scale"): _scale,
    ("site", "pseudonym_secret"): _pseudonym_secret,
    ("watch", "polling"): _boolean,
    ("watch", "rescan_seconds"): _positive(float),
    ("watch", "quiet_seconds"): _positive(float),
    ("watch", "batch_wait_seconds"): _positive(float),
    ("watch", "max_file_mb"): _positive(float),
    ("watch", "max_pixels"): _positive(int),
    ("watch", "save_standardized"): _boolean,
    ("retraining", "enabled"): _boolean,
    ("retraining", "schedule"): _cron,
    ("retraining", "min_new_images"): _positive(int),
    ("retraining", "reference"): _path_or_none,
    ("retraining", "window_days"): _positive(int),
    ("retraining", "max_images"): _positive(int),
    ("retraining", "held_out_fraction"): _fraction,
    ("retraining", "preset"): _choice("colour", "tiny", "full"),
    ("retraining", "epochs"): _positive(int),
    ("retraining", "steps_per_epoch"): _non_negative_int,
    ("retraining", "device"): _choice(*DEVICES),
    ("retraining", "nice"): _non_negative_int,
    ("retraining", "timeout_minutes"): _positive(float),
    ("retraining", "margin"): _fraction,
    ("retraining", "min_reviews"): _positive(int),
    ("retraining", "max_gate_images"): _positive(int),
    ("retraining", "review_below"): _fraction,
    ("metrics", "port"): _port,
    ("metrics", "address"): _text,
    ("logging", "level"): _choice(*LOG_LEVELS),
    ("logging", "format"): _choice(*LOG_FORMATS),
}


def env_name(section: str, key: str) -> str:
    return f"{ENV_PREFIX}{section.upper()}_{key.upper()}"


def _read_file(path: Path) -> dict[str, dict[str, Any]]:
    try:
        with path.open("rb") as handle:
            data = tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"configuration file {path} does not exist; pass --config FILE or unset {CONFIG_ENV}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"configuration file {path} is not valid TOML: {exc}") from None
    for section, values in data.items():
        if section not in SECTIONS:
            raise ConfigError(f"{path}: unknown section [{section}]; known sections: {', '.join(SECTIONS)}")
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: '{section}' must be a [{section}] table")
    return data


def load_settings(config_file: str | os.PathLike[str] | None = None, environ: dict[str, str] | None = None) -> Settings:
    """Build the effective settings: defaults, then the file, then the environment."""
    env = os.environ if environ is None else environ
    chosen = config_file or env.get(CONFIG_ENV) or None
    file_values = _read_file(Path(chosen)) if chosen else {}
    sources: list[str] = ["built-in defaults"] + ([str(chosen)] if chosen else [])

    sections: dict[str, Any] = {}
    for section, cls in SECTIONS.items():
        given = dict(file_values.get(section, {}))
        known = {f.name for f in fields(cls)}
        for key in given:
            if key not in known:
                raise ConfigError(f"{chosen}: unknown key [{section}] {key}; known keys: {', '.join(sorted(known))}")
        origin = {key: f"{chosen}" for key in given}
        for key in known:
            name = env_name(section, key)
            if name in env:
                given[key] = env[name]
                origin[key] = f"environment variable {name}"
                if "environment" not in sources:
                    sources.append("environment")
        values = {}
        for key, raw in given.items():
            try:
                values[key] = VALIDATORS[(section, key)](raw)
            except ValueError as exc:
                raise ConfigError(f"[{section}] {key} = {raw!r} (from {origin[key]}) is not valid: {exc}") from None
        sections[section] = cls(**values)
    return Settings(**sections, source=" < ".join(sources))
