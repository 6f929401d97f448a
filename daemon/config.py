"""Settings: the one place that holds every default.

Loading order, later wins: built-in defaults < TOML file < environment variables
``STAINBRIDGE_<SECTION>_<KEY>``. The file is the first of: ``--config FILE``, ``$STAINBRIDGE_CONFIG``
(set but empty: no file), ``/etc/stainbridge/stainbridge.toml`` if it exists (``SYSTEM_CONFIG``: what
the systemd unit runs with, so that an operator's `stainbridge status` reads the service's database).
Every value is validated here (each key's checker is in ``config_values``); a bad one raises
:class:`ConfigError` naming the key, where it came from and what is allowed, without echoing secrets.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from stainbridge.daemon import config_values as check

ENV_PREFIX = "STAINBRIDGE_"
CONFIG_ENV = "STAINBRIDGE_CONFIG"
SYSTEM_CONFIG = Path("/etc/stainbridge/stainbridge.toml")  # used when neither --config nor $STAINBRIDGE_CONFIG says
DEVICES = ("auto", "cpu", "cuda")
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("auto", "json", "console")


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


SITE_SOURCES = ("name", "folder", "institution")


@dataclass(frozen=True)
class SiteSettings:
    # Which hospital a file comes from: "name" (every file is [site] name), "folder" (the first
    # sub-folder below the drop folder) or "institution" (the DICOM InstitutionName); [site] name is
    # the fallback of the last two (a file right in the drop folder, a file without the tag).
    source: str = "name"
    name: str = "default"
    validation_reviews: int = 50  # reviewed cells before `sites validate` scores a site's recipes
    # Recipes a site's validation compares with the day-0 one ([models]): "STANDARDIZER" (in front of
    # the [models] classifier) or "STANDARDIZER + CLASSIFIER" (two checkpoint files, or a built-in name).
    recipes: tuple[str, ...] = ("none", "reinhard", "macenko")
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
    held_out_fraction: float = 0.2  # of those, kept out of training for the gate's guards
    preset: str = "colour"  # `stainbridge train cyclegan --preset`
    epochs: int = 2
    steps_per_epoch: int = 0  # 0: one pass over the data per epoch
    device: str = "auto"
    nice: int = 10  # priority decrease of the training subprocess
    timeout_minutes: float = 240.0
    margin: float = 0.02  # the gate's 95 % lower bound of (candidate - active) balanced accuracy must be above -margin
    min_reviews: int = 30  # reviewed images needed before the job fine-tunes the classifier on them
    min_gate_reviews: int = 50  # reviewed cells, not trained on, the gate needs before it can promote anything
    max_gate_images: int = 200  # cells per gate comparison (reviewed cells, recent cells for the guards)
    review_below: float = 0.6  # `review export` lists, after the flagged cells, predictions less confident than this
    # Share of new cells a candidate awaiting evidence also scores (shadow predictions, never results); 0: off
    shadow_share: float = 0.2
    keep_days: int = 30  # run folders (PNG copies of reviewed images) and unused candidates older than this go


@dataclass(frozen=True)
class LabSettings:
    # A regular expression with a named group `specimen`, searched in each file's name (not its folders):
    # r"^(?P<specimen>[A-Z]{2}\d+)_" makes "BS123_004.png" specimen "BS123". Empty: specimens come from DICOM
    # (accession number, else study) or from the sub-folder under the site's folder (docs/lab.md, "Specimens").
    specimen_pattern: str = ""
    min_cells: int = 100  # a specimen with fewer cells counted is flagged in the report
    # Per-class percentage ranges; a specimen outside one is flagged: "neutrophil 40-75, lymphocyte 20-45".
    reference_ranges: tuple[tuple[str, float, float], ...] = ()
    # Drift (docs/lab.md "Drift"): a site's baseline is the weeks up to its validation, else its first
    # drift_baseline_weeks weeks; a later week whose class share (or share flagged) moved more than
    # drift_share_points percentage points, or whose mean confidence fell more than drift_confidence_drop, alerts.
    drift_baseline_weeks: int = 4
    drift_share_points: float = 15.0
    drift_confidence_drop: float = 0.1
    # ... or whose background or nucleus stain (mean L*a*b* of the received images) lies more than this CIE76 Delta E
    # from the baseline's: 10 is above a stable lab's 30-cell-week noise and below every other lab's shift (docs/lab.md).
    drift_stain_delta_e: float = 10.0


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
    lab: LabSettings = field(default_factory=LabSettings)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    logging: LoggingSettings = field(default_factory=LoggingSettings)
    source: str = "built-in defaults"
    config_file: Path | None = None  # the TOML file read, if any (`stainbridge backup` keeps a copy)

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
            out[section] = {k: str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v
                            for k, v in values.items()}
        out["paths"].update(
            drop=str(self.drop_dir), archive=str(self.archive_dir), quarantine=str(self.quarantine_dir)
        )
        out["database"]["url"] = hide_password(self.database_url)
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
    "lab": LabSettings,
    "metrics": MetricsSettings,
    "logging": LoggingSettings,
}


def _state_path(value: Any) -> Path:
    # Empty means the default, so the documented config file can spell every key out.
    text = str(value).strip()
    return Path(text).expanduser().absolute() if text else PathsSettings().state


VALIDATORS: dict[tuple[str, str], Callable[[Any], Any]] = {
    ("paths", "state"): _state_path,
    ("paths", "drop"): check.path_or_none,
    ("paths", "archive"): check.path_or_none,
    ("paths", "quarantine"): check.path_or_none,
    ("paths", "min_free_mb"): check.non_negative_float,
    ("database", "url"): check.database_url,
    ("models", "standardizer"): check.standardizer,
    ("models", "classifier"): check.string,
    ("models", "device"): check.choice(*DEVICES),
    ("models", "batch_size"): check.positive(int),
    ("models", "max_inflight_pixels"): check.positive(int),
    ("models", "poll_seconds"): check.positive(float),
    ("models", "tta"): check.boolean,
    ("site", "source"): check.choice(*SITE_SOURCES),
    ("site", "name"): check.site_name,
    ("site", "validation_reviews"): check.positive(int),
    ("site", "recipes"): check.recipes,
    ("site", "scale"): check.scale,
    ("site", "pseudonym_secret"): check.pseudonym_secret,
    ("watch", "polling"): check.boolean,
    ("watch", "rescan_seconds"): check.positive(float),
    ("watch", "quiet_seconds"): check.positive(float),
    ("watch", "batch_wait_seconds"): check.positive(float),
    ("watch", "max_file_mb"): check.positive(float),
    ("watch", "max_pixels"): check.positive(int),
    ("watch", "save_standardized"): check.boolean,
    ("retraining", "enabled"): check.boolean,
    ("retraining", "schedule"): check.cron,
    ("retraining", "min_new_images"): check.positive(int),
    ("retraining", "reference"): check.path_or_none,
    ("retraining", "window_days"): check.positive(int),
    ("retraining", "max_images"): check.positive(int),
    ("retraining", "held_out_fraction"): check.fraction,
    ("retraining", "preset"): check.choice("colour", "tiny", "full"),
    ("retraining", "epochs"): check.positive(int),
    ("retraining", "steps_per_epoch"): check.non_negative_int,
    ("retraining", "device"): check.choice(*DEVICES),
    ("retraining", "nice"): check.non_negative_int,
    ("retraining", "timeout_minutes"): check.positive(float),
    ("retraining", "margin"): check.fraction,
    ("retraining", "min_reviews"): check.positive(int),
    ("retraining", "min_gate_reviews"): check.positive(int),
    ("retraining", "max_gate_images"): check.positive(int),
    ("retraining", "review_below"): check.fraction,
    ("retraining", "shadow_share"): check.fraction,
    ("retraining", "keep_days"): check.positive(int),
    ("lab", "specimen_pattern"): check.specimen_pattern,
    ("lab", "min_cells"): check.positive(int),
    ("lab", "reference_ranges"): check.reference_ranges,
    ("lab", "drift_baseline_weeks"): check.positive(int),
    ("lab", "drift_share_points"): check.positive(float),
    ("lab", "drift_confidence_drop"): check.fraction,
    ("lab", "drift_stain_delta_e"): check.positive(float),
    ("metrics", "port"): check.port,
    ("metrics", "address"): check.string,
    ("logging", "level"): check.choice(*LOG_LEVELS),
    ("logging", "format"): check.choice(*LOG_FORMATS),
}


SECRET_KEYS = {("site", "pseudonym_secret")}  # never shown in messages, whatever their value


def hide_password(url: str) -> str:
    """A database URL with its password replaced by ``***`` (for messages, `config check` and logs)."""
    return re.sub(r"^([A-Za-z0-9+.-]+://[^/@:]*:)[^/]*@", r"\1***@", url)


def shown_value(section: str, key: str, raw: Any) -> str:
    """A raw setting as an error message may show it: secrets hidden, a database URL without its password."""
    if (section, key) in SECRET_KEYS:
        return f"<hidden, {len(str(raw))} characters>"
    if (section, key) == ("database", "url"):
        return repr(hide_password(str(raw)))
    return repr(raw)


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
    if config_file:
        chosen = config_file
    elif CONFIG_ENV in env:
        chosen = env[CONFIG_ENV] or None
    else:
        chosen = str(SYSTEM_CONFIG) if SYSTEM_CONFIG.is_file() else None
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
                raise ConfigError(f"[{section}] {key} = {shown_value(section, key, raw)} (from {origin[key]}) "
                                  f"is not valid: {exc}") from None
        sections[section] = cls(**values)
    return Settings(**sections, source=" < ".join(sources), config_file=Path(chosen).absolute() if chosen else None)
