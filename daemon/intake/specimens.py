"""Which specimen (one slide, one patient sample) a cell image belongs to: the unit of a differential.

In order: the DICOM file's own (``specimen`` in its metadata: the pseudonymized AccessionNumber, else the
StudyInstanceUID, see ``intake.dicom``); a match of ``[lab] specimen_pattern`` (its named group
``specimen``) in the file's name; the path: the sub-folder under the site's folder (``[site] source =
"folder"``: ``drop/hospital-a/BS-123/x.png`` -> ``BS-123``), else the first sub-folder of the drop
folder (``drop/BS-123/x.png``); for a file `ingest` names by its absolute path (outside the drop
folder), the folder that holds it. None when nothing says (a file right in the drop or site folder).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from functools import lru_cache
from pathlib import PurePosixPath
from typing import Any

from stainbridge.daemon.config import LabSettings, SiteSettings

__all__ = ["MAX_SPECIMEN_CHARS", "specimen_of"]

MAX_SPECIMEN_CHARS = 128  # images.specimen


def _clean(text: str | None) -> str | None:
    return " ".join(str(text or "").split())[:MAX_SPECIMEN_CHARS] or None


@lru_cache(maxsize=8)
def _compiled(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern)


def _from_path(site: SiteSettings, source_name: str) -> str | None:
    path = PurePosixPath(source_name)
    folders = path.parts[:-1]
    if path.is_absolute():
        return _clean(folders[-1]) if len(folders) > 1 else None
    below_site = folders[1:] if site.source == "folder" else folders
    return _clean(below_site[0]) if below_site else None


def specimen_of(site: SiteSettings, lab: LabSettings, source_name: str,
                metadata: Mapping[str, Any] | None = None) -> str | None:
    """The specimen of a file by its DICOM metadata, ``[lab] specimen_pattern`` on its name, or its folders."""
    from_dicom = _clean((metadata or {}).get("specimen"))
    if from_dicom:
        return from_dicom
    if lab.specimen_pattern:
        match = _compiled(lab.specimen_pattern).search(PurePosixPath(source_name).name)
        if match and match.group("specimen"):
            return _clean(match.group("specimen"))
    return _from_path(site, source_name)
