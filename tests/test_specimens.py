"""Where a cell's specimen comes from (daemon/intake/specimens.py) and the `[lab]` settings that steer it."""

from __future__ import annotations

import pytest

from stainbridge.daemon.config import ConfigError, LabSettings, SiteSettings, load_settings
from stainbridge.daemon.intake.decoding import decode_image
from stainbridge.daemon.intake.dicom import PseudonymSecretMissing, pseudonymize
from stainbridge.daemon.intake.specimens import specimen_of
from tests import dicom_factory

SECRET = "test-site-secret"
BY_NAME, BY_FOLDER = SiteSettings(source="name"), SiteSettings(source="folder")
NO_PATTERN = LabSettings()


def _dicom(path, **tags):
    dicom_factory.write_rgb(path, datetime_tags={"AcquisitionDateTime": "20261124083000", **tags})
    return decode_image(path, max_pixels=50_000_000, max_bytes=1 << 26, pseudonym_secret=SECRET)


def test_the_folder_under_the_site_folder_is_the_specimen() -> None:
    """drop/<site>/<specimen>/x.png with sites by folder; drop/<specimen>/x.png otherwise; nothing for loose files."""
    assert specimen_of(BY_FOLDER, NO_PATTERN, "hospital-a/BS-1/2026/x.png") == "BS-1"
    assert specimen_of(BY_FOLDER, NO_PATTERN, "hospital-a/x.png") is None
    assert specimen_of(BY_NAME, NO_PATTERN, "BS-1/x.png") == "BS-1"
    assert specimen_of(BY_NAME, NO_PATTERN, "x.png") is None


def test_a_file_ingested_from_outside_the_drop_folder_takes_its_folder() -> None:
    """`ingest /data/old/BS-9/x.png` (an absolute name): the folder holding the file."""
    assert specimen_of(BY_FOLDER, NO_PATTERN, "/data/old/BS-9/x.png") == "BS-9"


def test_the_configured_pattern_wins_over_the_folder() -> None:
    """[lab] specimen_pattern's group `specimen` in the file name; no match falls back to the folder."""
    lab = LabSettings(specimen_pattern=r"^(?P<specimen>BS-\d+)_")
    assert specimen_of(BY_FOLDER, lab, "hospital-a/day-1/BS-77_004.png") == "BS-77"
    assert specimen_of(BY_FOLDER, lab, "hospital-a/day-1/other.png") == "day-1"


def test_a_dicom_accession_number_becomes_a_pseudonymized_specimen(tmp_path) -> None:
    """AccessionNumber names a patient's order: only its keyed pseudonym is kept, and it wins over the folder."""
    decoded = _dicom(tmp_path / "a.dcm", AccessionNumber="ACC-2026-0042")
    specimen = specimen_of(BY_FOLDER, NO_PATTERN, "hospital-a/BS-1/a.dcm", decoded.metadata)
    assert specimen == "acc-" + pseudonymize("ACC-2026-0042", SECRET)[:16]
    assert "ACC-2026-0042" not in repr(decoded.metadata)


def test_a_dicom_without_accession_number_is_grouped_by_its_study(tmp_path) -> None:
    """No AccessionNumber: the StudyInstanceUID (already stored as images.study_uid)."""
    decoded = _dicom(tmp_path / "a.dcm")
    assert specimen_of(BY_NAME, NO_PATTERN, "a.dcm", decoded.metadata) == f"study-{decoded.metadata['study_uid']}"


def test_a_dicom_accession_number_without_the_secret_is_a_configuration_error(tmp_path) -> None:
    """As for a patient ID: never an unkeyed hash of an identifier."""
    dicom_factory.write_rgb(tmp_path / "a.dcm", patient_id=None,
                            datetime_tags={"AcquisitionDateTime": "20261124083000", "AccessionNumber": "ACC-1"})
    with pytest.raises(PseudonymSecretMissing, match="pseudonym_secret"):
        decode_image(tmp_path / "a.dcm", max_pixels=50_000_000, max_bytes=1 << 26, pseudonym_secret="")


@pytest.mark.parametrize("key,value,message", [
    ("SPECIMEN_PATTERN", "^(BS-\\d+)_", "named group 'specimen'"),
    ("SPECIMEN_PATTERN", "^(?P<specimen>[", "not a regular expression"),
    ("REFERENCE_RANGES", "neutrophil 75-40", "0 <= LOW <= HIGH <= 100"),
    ("REFERENCE_RANGES", "neutrophil", "CLASS LOW-HIGH"),
])
def test_bad_lab_settings_are_refused_with_what_is_allowed(key, value, message) -> None:
    """A pattern without its group, a broken expression or a range that is not LOW-HIGH in percent: a clear error."""
    with pytest.raises(ConfigError, match=message):
        load_settings(environ={f"STAINBRIDGE_LAB_{key}": value})


def test_reference_ranges_read_from_one_line() -> None:
    """"CLASS LOW-HIGH, ..." as the environment or TOML gives it."""
    lab = load_settings(environ={"STAINBRIDGE_LAB_REFERENCE_RANGES": "neutrophil 40-75, lymphocyte 20-45.5"}).lab
    assert lab.reference_ranges == (("neutrophil", 40.0, 75.0), ("lymphocyte", 20.0, 45.5))


def test_the_report_flags_few_cells_flagged_cells_and_a_class_outside_its_range() -> None:
    """Each reason to look again before reporting a specimen, in words."""
    from stainbridge.daemon.lab.specimens import SpecimenRow, flags_of

    row = SpecimenRow("s", "BS-1", counted=80, flagged=2, first_at=None, last_at=None,
                      classes={"neutrophil": (70, 87.5, 1), "lymphocyte": (10, 12.5, 1)})
    lab = LabSettings(min_cells=100, reference_ranges=(("neutrophil", 40, 75), ("lymphocyte", 10, 45),
                                                      ("monocyte", 2, 10)))
    assert flags_of(row, lab) == ["80 cells counted (fewer than 100)", "2 flagged for review",
                                  "neutrophil 87.5 % outside 40-75 %", "monocyte 0.0 % outside 2-10 %"]
