"""Logging: structlog for our events, stdlib loggers (SQLAlchemy, APScheduler, watchdog,
Alembic) routed through the same renderer.

JSON lines when the stream is not a terminal (systemd's journal, files, CI); a coloured
console renderer on a terminal. Timestamps are ISO-8601 UTC. Patient identifiers never
reach the output: :func:`redact_patient_identifiers` masks them in every event.
"""

from __future__ import annotations

import collections
import logging
import re
import sys
import threading
from typing import Any, TextIO

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
FORMATS = ("auto", "json", "console")
REDACTED = "[redacted]"

# Keys are compared after lower-casing and dropping "_", "-", " " and "." so that
# patient_name, PatientName, patient-name and "Patient's Name" all match.
_ALLOWED_PATIENT_KEYS = {"patientpseudonym"}  # already a keyed hash, made for storage and logs
_IDENTIFYING_KEYS = {
    "patientname",
    "patientid",
    "patientbirthdate",
    "patientbirthname",
    "patientaddress",
    "patientsname",
    "patientsbirthdate",
    "patientstelephonenumbers",
    "otherpatientids",
    "otherpatientnames",
    "patientmothersbirthname",
    "referringphysicianname",
}
# A DICOM person name (PN): family^given[^middle^prefix^suffix], e.g. "Doe^John".
_DICOM_PERSON_NAME = re.compile(r"[^\s\^=\"',;:()\[\]{}]+(?:\^[^\s\^=\"',;:()\[\]{}]*)+")

_HANDLER_MARK = "_stainbridge_handler"

# Identifiers of recently decoded files (patient IDs and names), masked wherever they appear in
# free text: exception messages and tracebacks quote header values that no key name gives away.
_RECENT_IDENTIFIERS: collections.OrderedDict[str, None] = collections.OrderedDict()
_RECENT_LIMIT = 1000
_recent_lock = threading.Lock()


def mask_in_free_text(*values: str) -> None:
    """Mask these identifiers (e.g. a DICOM file's PatientID) in every later log line, keys or not."""
    with _recent_lock:
        for value in values:
            value = str(value or "").strip()
            if len(value) >= 3:  # shorter strings would mask ordinary words
                _RECENT_IDENTIFIERS[value] = None
                _RECENT_IDENTIFIERS.move_to_end(value)
        while len(_RECENT_IDENTIFIERS) > _RECENT_LIMIT:
            _RECENT_IDENTIFIERS.popitem(last=False)


def _mask_known(text: str) -> str:
    with _recent_lock:
        known = [v for v in _RECENT_IDENTIFIERS if v in text]
    for value in sorted(known, key=len, reverse=True):
        text = text.replace(value, REDACTED)
    return text


class _DropAlembicChatter(logging.Filter):
    """Alembic announces its dialect on every run; only the migrations it applies matter."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name != "alembic.runtime.migration":
            return True
        return not str(record.msg).startswith(("Context impl", "Will assume"))


def _normalized(key: str) -> str:
    return re.sub(r"[\s_\-.']", "", key).lower()


def _is_identifying(key: Any) -> bool:
    if not isinstance(key, str):
        return False
    name = _normalized(key)
    if name in _ALLOWED_PATIENT_KEYS:
        return False
    return name in _IDENTIFYING_KEYS or name.startswith("patient")


def _mask(value: Any, depth: int = 0) -> Any:
    if isinstance(value, str):
        value = _mask_known(value) if _RECENT_IDENTIFIERS else value
        return _DICOM_PERSON_NAME.sub(REDACTED, value) if "^" in value else value
    if depth < 4 and isinstance(value, dict):
        return {k: REDACTED if _is_identifying(k) else _mask(v, depth + 1) for k, v in value.items()}
    if depth < 4 and isinstance(value, (list, tuple)):
        return type(value)(_mask(v, depth + 1) for v in value)
    return value


def redact_patient_identifiers(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    """Mask patient-identifying keys (any spelling or case) and DICOM person names in values."""
    for key in list(event_dict):
        if _is_identifying(key):
            event_dict[key] = REDACTED
        else:
            event_dict[key] = _mask(event_dict[key])
    return event_dict


def _shared_processors() -> list[Processor]:
    return [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.stdlib.PositionalArgumentsFormatter(),
    ]


def _use_console(fmt: str, stream: TextIO) -> bool:
    if fmt == "console":
        return True
    if fmt == "json":
        return False
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def configure_logging(level: str = "info", fmt: str = "auto", stream: TextIO | None = None) -> None:
    """Route structlog and stdlib logging to `stream` (default stderr); safe to call again."""
    level_name = level.lower()
    if level_name not in LEVELS:
        raise ValueError(f"log level {level!r} is not one of: {', '.join(LEVELS)}")
    if fmt not in FORMATS:
        raise ValueError(f"log format {fmt!r} is not one of: {', '.join(FORMATS)}")
    out = stream if stream is not None else sys.stderr
    console = _use_console(fmt, out)

    # Tracebacks become text before the masking, so that identifiers quoted in them are masked too.
    final: list[Processor] = [structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                              structlog.processors.format_exc_info, redact_patient_identifiers]
    if console:
        final.append(structlog.dev.ConsoleRenderer(colors=bool(getattr(out, "isatty", lambda: False)())))
    else:
        final.append(structlog.processors.JSONRenderer(sort_keys=False))
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*_shared_processors(), structlog.stdlib.ExtraAdder()], processors=final
    )

    handler = logging.StreamHandler(out)
    handler.setFormatter(formatter)
    handler.addFilter(_DropAlembicChatter())
    setattr(handler, _HANDLER_MARK, True)
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, _HANDLER_MARK, False)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(LEVELS[level_name])
    # Chatty libraries: their debug output is noise even when ours is wanted.
    for name in ("watchdog", "sqlalchemy.engine", "sqlalchemy.pool", "PIL", "asyncio"):
        logging.getLogger(name).setLevel(max(LEVELS[level_name], logging.WARNING))
    logging.captureWarnings(True)

    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *_shared_processors(),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.UnicodeDecoder(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        # Not cached: a logger made before configure_logging() still follows the latest call.
        cache_logger_on_first_use=False,
    )


def get_logger(name: str | None = None, **initial: Any) -> structlog.stdlib.BoundLogger:
    """A structlog logger named like its module; bind context with `.bind(...)`."""
    return structlog.get_logger(name, **initial)
