"""How each setting's raw value (TOML or environment text) is checked and converted.

Each checker returns the value in its settings type or raises ValueError saying what is allowed;
``config.load_settings`` adds which key it was and where it came from.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from apscheduler.triggers.cron import CronTrigger

STANDARDIZER_BUILTINS = ("none", "reinhard", "macenko")


def choice(*allowed: str) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        text = str(value).strip().lower()
        if text not in allowed:
            raise ValueError(f"allowed values: {', '.join(allowed)}")
        return text

    return check


def _number(value: Any, kind: type, expected: str, within: Callable[[Any], bool]) -> Any:
    """``kind(value)`` if it is a number (not a bool, no fraction for int) that ``within`` accepts."""
    if isinstance(value, bool):
        raise ValueError(expected)
    try:
        number = kind(value)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(expected) from None
    if kind is int and isinstance(value, float) and not value.is_integer():
        raise ValueError(expected)
    if not within(number):  # comparisons with NaN are false, so NaN is refused here too
        raise ValueError(expected)
    return number


def positive(kind: type) -> Callable[[Any], Any]:
    def check(value: Any) -> Any:  # finite: "inf" seconds, images or MiB means a setting that never acts
        return _number(value, kind, f"expected a positive, finite {kind.__name__}", lambda n: 0 < n < float("inf"))

    return check


def fraction(value: Any) -> float:
    return _number(value, float, "expected a number between 0 and 1", lambda n: 0.0 <= n <= 1.0)


def non_negative_int(value: Any) -> int:
    return _number(value, int, "expected an integer >= 0", lambda n: n >= 0)


def non_negative_float(value: Any) -> float:
    return _number(value, float, "expected a number >= 0", lambda n: 0.0 <= n < float("inf"))


def port(value: Any) -> int:
    number = non_negative_int(value)
    if number > 65535:
        raise ValueError("expected a TCP port (1-65535), or 0 for off")
    return number


def boolean(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError("allowed values: true, false")


def path_or_none(value: Any) -> Path | None:
    text = str(value).strip()
    return Path(text).expanduser().absolute() if text else None


def string(value: Any) -> str:
    if not isinstance(value, (str, int, float)) or isinstance(value, bool):
        raise ValueError("expected a string")
    return str(value).strip()


MIN_PSEUDONYM_SECRET_CHARS = 16


def pseudonym_secret(value: Any) -> str:
    secret = string(value)
    if secret and len(secret) < MIN_PSEUDONYM_SECRET_CHARS:
        raise ValueError(f"a pseudonym secret of {len(secret)} characters is guessable; use at least "
                         f"{MIN_PSEUDONYM_SECRET_CHARS} random characters (e.g. `openssl rand -hex 32`), "
                         "and keep it stable: changing it changes every pseudonym")
    return secret


def database_url(value: Any) -> str:
    url = string(value)
    if url and not url.startswith(("sqlite://", "postgresql://", "postgresql+psycopg://")):
        raise ValueError("expected sqlite:///FILE or postgresql+psycopg://USER:PASS@HOST/DB")
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url[len("postgresql://") :]
    return url


def standardizer(value: Any) -> str:
    text = string(value)
    if not text:
        raise ValueError(f"expected a checkpoint file or one of: {', '.join(STANDARDIZER_BUILTINS)}")
    return text if text.lower() not in STANDARDIZER_BUILTINS else text.lower()


MAX_SITE_CHARS = 128  # images.site, model_versions.site, sites.name


def site_name(value: Any) -> str:
    text = string(value)
    if not text:
        raise ValueError("expected a site name (the hospital or laboratory), e.g. 'hospital-a'")
    if len(text) > MAX_SITE_CHARS:
        raise ValueError(f"a site name has at most {MAX_SITE_CHARS} characters")
    return text


RECIPE_JOIN = " + "


def recipes(value: Any) -> tuple[str, ...]:
    """A list of recipes (TOML array, or one comma-separated string from the environment): each
    "STANDARDIZER" or "STANDARDIZER + CLASSIFIER"."""
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)):
        raise ValueError('expected a list such as ["reinhard", "macenko + /models/classifier-macenko.safetensors"]')  # noqa: TRY004
    out = []
    for item in items:
        parts = [part.strip() for part in string(item).split(RECIPE_JOIN.strip())]
        if not 1 <= len(parts) <= 2 or not all(parts):
            raise ValueError(f"recipe {item!r}: expected STANDARDIZER or STANDARDIZER + CLASSIFIER")
        out.append(RECIPE_JOIN.join([standardizer(parts[0]), *parts[1:]]))
    return tuple(dict.fromkeys(out))


def scale(value: Any) -> str:
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


def schedule_trigger(text: str) -> CronTrigger:
    """The cron trigger of ``[retraining] schedule``: five crontab fields (minute hour day month weekday), or
    six with a leading seconds field (``*/20 * * * * *``), for a job due seconds from now (tests, trying it out)."""
    from apscheduler.triggers.cron import CronTrigger

    fields = text.split()
    if len(fields) == 6:
        second, minute, hour, day, month, day_of_week = fields
        return CronTrigger(second=second, minute=minute, hour=hour, day=day, month=month, day_of_week=day_of_week)
    return CronTrigger.from_crontab(text)


def cron(value: Any) -> str:
    text = string(value)
    try:
        schedule_trigger(text)
    except ValueError as exc:
        raise ValueError(f"expected a crontab expression such as '0 2 * * *' (or six fields, the first one "
                         f"seconds: '*/20 * * * * *') ({exc})") from None
    return text


def specimen_pattern(value: Any) -> str:
    """A regular expression with a named group ``specimen`` (empty: none)."""
    text = string(value)
    if not text:
        return text
    try:
        compiled = re.compile(text)
    except re.error as exc:
        raise ValueError(f"not a regular expression ({exc})") from None
    if "specimen" not in compiled.groupindex:
        raise ValueError(r"the expression needs a named group 'specimen', e.g. ^(?P<specimen>[A-Z]+\d+)_")
    return text


def reference_ranges(value: Any) -> tuple[tuple[str, float, float], ...]:
    """Per-class percentage ranges: "neutrophil 40-75, lymphocyte 20-45" (or a TOML array of such items)."""
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)):
        raise ValueError('expected "CLASS LOW-HIGH, ..." such as "neutrophil 40-75, lymphocyte 20-45"')  # noqa: TRY004
    ranges: dict[str, tuple[float, float]] = {}
    for item in items:
        text = string(item)
        if not text:
            continue
        name, _, bounds = text.rpartition(" ")
        low, _, high = bounds.partition("-")
        try:
            low_value, high_value = float(low), float(high)
        except ValueError:
            raise ValueError(f"{text!r}: expected CLASS LOW-HIGH in percent, e.g. 'neutrophil 40-75'") from None
        if not name.strip() or not 0 <= low_value <= high_value <= 100:
            raise ValueError(f"{text!r}: expected CLASS LOW-HIGH with 0 <= LOW <= HIGH <= 100")
        ranges[name.strip()] = (low_value, high_value)
    return tuple((name, low, high) for name, (low, high) in ranges.items())
