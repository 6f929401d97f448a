"""What a failure means: retry later (transient) or quarantine the file (content).

The service never stops for one file. Every error that reaches the loop is sorted here:

- **transient**: the database is unreachable or refuses writes for a while (``OperationalError``,
  ``InterfaceError``, ``InternalError``, pool timeouts), the models cannot run (``InferenceUnavailable``:
  CUDA out of memory, a driver error), the configuration lacks something a file needs
  (``ConfigError``), or memory ran out (``MemoryError``: retried in smaller batches, then alone;
  a file that runs out of memory alone ``MAX_ATTEMPTS`` times is quarantined as ``memory``, which
  ``reprocess --status failed`` retries). The file stays in the drop folder, its claim is
  released, the service waits with a growing pause and reports itself unhealthy until work moves again.
- **content**: anything else raised while handling one file (a name the database rejects, a
  value it cannot store, a decoder bug, an ``OSError`` while reading). The file gets a bounded
  number of attempts (``MAX_ATTEMPTS``), alone, and is then quarantined with its reason.

Text that comes from a file (decoder messages, DICOM values, file names) goes through
:func:`storable_text` before it is stored: no NUL bytes, no unpaired surrogates, bounded length.
"""

from __future__ import annotations

import hashlib
import os
import re

from sqlalchemy.exc import DBAPIError, DisconnectionError, InterfaceError, InternalError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from stainbridge.daemon.config import ConfigError

MAX_ATTEMPTS = 3  # a file that breaks its batch this many times, alone, is quarantined
SOURCE_NAME_LIMIT = 512  # images.source_name is String(512)
BACKOFF_FIRST_SECONDS = 1.0
BACKOFF_MAX_SECONDS = 60.0


class InferenceUnavailable(RuntimeError):
    """The models fail on a known-good probe image too: the GPU or driver is broken, not the file."""


class PoisonFile(RuntimeError):
    """A file broke its batch MAX_ATTEMPTS times on its own; it is quarantined with this reason."""


def is_transient(exc: BaseException) -> bool:
    """True when retrying later can succeed without anyone touching the file."""
    if isinstance(exc, (InferenceUnavailable, ConfigError, DisconnectionError, PoolTimeoutError, MemoryError)):
        return True
    if isinstance(exc, (OperationalError, InterfaceError, InternalError)):
        return True
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    return False


def storable_text(text: str, limit: int = 4000) -> str:
    """`text` as the database can store it: NUL and other controls shown as escapes, valid UTF-8, bounded."""
    try:  # undecodable bytes of a file name (surrogate escapes) come back as \xc9
        text = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    text = re.sub(r"[\x00-\x08\x0b-\x1f\x7f]", lambda m: f"\\x{ord(m.group()):02x}", text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def text_of_name(name: str | bytes) -> str:
    """A file name as valid UTF-8 text without control characters, the same text for the same name.

    Non-UTF-8 bytes (Latin-1 names from Windows shares) appear as ``\\xc9`` escapes; control
    characters (a newline) likewise. Files are archived under this text, so that the path stored
    in ``archive_path`` opens them.
    """
    raw = os.fsencode(name) if isinstance(name, str) else name
    text = raw.decode("utf-8", "backslashreplace")
    return re.sub(r"[\x00-\x1f\x7f]", lambda m: f"\\x{ord(m.group()):02x}", text)


def storable_source_name(name: str) -> str:
    """A file's source name as stored in ``images.source_name``: always the same for the same file.

    Its text as `text_of_name` gives it. Names longer than the column keep their start and end
    around a short hash of the whole, so that two long names never collide.
    """
    raw = os.fsencode(name) if isinstance(name, str) else name
    text = text_of_name(raw)
    if len(text) <= SOURCE_NAME_LIMIT:
        return text
    digest = hashlib.sha256(raw).hexdigest()[:16]
    keep = (SOURCE_NAME_LIMIT - len(digest) - 4) // 2
    return f"{text[:keep]}…{digest}…{text[-keep:]}"


def error_summary(exc: BaseException) -> str:
    """A short, storable description of an unexpected error: its class and first line."""
    first = (str(exc).strip().splitlines() or [""])[0]
    orig = getattr(exc, "orig", None)
    if orig is not None:
        first = (str(orig).strip().splitlines() or [""])[0]
    return storable_text(f"{type(exc).__name__}: {first}" if first else type(exc).__name__, 500)


class Backoff:
    """A pause that doubles after each failure, from BACKOFF_FIRST_SECONDS up to BACKOFF_MAX_SECONDS."""

    def __init__(self, first: float = BACKOFF_FIRST_SECONDS, maximum: float = BACKOFF_MAX_SECONDS) -> None:
        self.first, self.maximum = first, maximum
        self.failures = 0

    def failed(self) -> float:
        """Record a failure; the seconds to wait before the next try."""
        self.failures += 1
        return min(self.maximum, self.first * 2 ** (self.failures - 1))

    def succeeded(self) -> None:
        self.failures = 0

    @property
    def failing(self) -> bool:
        return self.failures > 0
