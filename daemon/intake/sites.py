"""Which site (incoming hospital) a file comes from, as ``[site] source`` says.

``name``: every file is ``[site] name``. ``folder``: the first sub-folder below the drop folder
(``drop/hospital-a/2026/x.png`` -> ``hospital-a``). ``institution``: the DICOM InstitutionName,
known once the file is decoded. ``[site] name`` is the fallback of the last two: a file right in the
drop folder, a file named by an absolute path (``ingest`` of a file outside the drop folder), a
non-DICOM file or one without the tag.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import PurePosixPath
from typing import Any

from stainbridge.daemon.config import SiteSettings
from stainbridge.daemon.config_values import MAX_SITE_CHARS

__all__ = ["site_of_decoded", "site_of_file"]


def _clean(text: str | None) -> str:
    return " ".join(str(text or "").split())[:MAX_SITE_CHARS]


def site_of_file(settings: SiteSettings, source_name: str) -> str:
    """The site a file belongs to by its name (``folder``), else ``[site] name``; for ``institution``
    the fallback until the file is decoded (``site_of_decoded``)."""
    if settings.source == "folder":
        parts = PurePosixPath(source_name).parts
        if len(parts) > 1 and not PurePosixPath(source_name).is_absolute():
            return _clean(parts[0]) or settings.name
    return settings.name


def site_of_decoded(settings: SiteSettings, source_name: str, metadata: Mapping[str, Any]) -> str:
    """The site of a decoded file: its DICOM institution under ``institution``, else ``site_of_file``."""
    if settings.source == "institution":
        return _clean(metadata.get("institution")) or settings.name
    return site_of_file(settings, source_name)
