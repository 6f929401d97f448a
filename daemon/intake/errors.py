"""The named errors of intake: each decides quarantine (with `.reason`) versus configuration."""

from __future__ import annotations


class IntakeError(Exception):
    """A file cannot be taken in; `.reason` is a short code stored with the quarantined file."""

    reason = "unreadable"

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason

    @property
    def message(self) -> str:
        return str(self)


class UnreadableImage(IntakeError):
    """The file claims a supported format but its content is broken (corrupt, truncated, empty)."""

    reason = "corrupt"


class UnsupportedFormat(IntakeError):
    """The content is not one of PNG, JPEG, TIFF, BMP or single-frame DICOM."""

    reason = "unsupported_format"


class RefusedFile(IntakeError):
    """The file is refused before reading: symlink, hard link, not a regular file, too large."""

    reason = "refused"
