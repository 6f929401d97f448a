"""Which site a file belongs to ([site] source) and the [site] settings that say it."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from stainbridge.daemon.config import ConfigError
from stainbridge.daemon.intake.sites import site_of_decoded, site_of_file
from stainbridge.daemon.intake.watcher import iter_candidates
from stainbridge.daemon.store import Image, ModelVersion, Prediction, Site
from tests import dicom_factory
from tests.daemon_helpers import write_cell


def test_folder_source_takes_the_first_sub_folder_and_falls_back_to_the_name(settings_factory) -> None:
    """drop/hospital-a/2026/x.png belongs to hospital-a; a file right in the drop folder, or outside it, to [site] name."""
    site = settings_factory(site_source="folder", site_name="home").site
    assert site_of_file(site, "hospital-a/2026/x.png") == "hospital-a"
    assert site_of_file(site, "x.png") == "home"
    assert site_of_file(site, "/elsewhere/hospital-a/x.png") == "home"


def test_institution_source_reads_the_dicom_tag_once_decoded(settings_factory) -> None:
    """Under "institution" the DICOM InstitutionName decides; a file without it (or not DICOM) is [site] name's."""
    site = settings_factory(site_source="institution", site_name="home").site
    assert site_of_file(site, "hospital-a/x.dcm") == "home"  # not decoded yet: the fallback
    assert site_of_decoded(site, "x.dcm", {"institution": "  Hospital   Clinic "}) == "Hospital Clinic"
    assert site_of_decoded(site, "x.png", {}) == "home"


def test_name_source_puts_every_file_in_one_site(settings_factory) -> None:
    """The default: sub-folders and tags are ignored."""
    site = settings_factory(site_name="home").site
    assert site.source == "name"
    assert site_of_decoded(site, "hospital-a/x.dcm", {"institution": "Clinic"}) == "home"


def test_recipes_come_as_a_list_or_one_comma_separated_variable(settings_factory) -> None:
    """STAINBRIDGE_SITE_RECIPES="reinhard, Macenko + /m/c.safetensors": built-in names normalized, duplicates dropped."""
    site = settings_factory(site_recipes="reinhard, Macenko + /m/c.safetensors, reinhard").site
    assert site.recipes == ("reinhard", "macenko + /m/c.safetensors")
    assert settings_factory().site.recipes == ("none", "reinhard", "macenko")
    assert settings_factory().site.validation_reviews == 50


@pytest.mark.parametrize(("key", "value", "message"), [
    ("site_recipes", "reinhard + ", "STANDARDIZER or STANDARDIZER \\+ CLASSIFIER"),
    ("site_source", "path", "allowed values: name, folder, institution"),
    ("site_validation_reviews", "0", "positive, finite int"),
    ("site_name", "x" * 129, "at most 128 characters"),
])
def test_bad_site_settings_are_refused_with_what_is_allowed(settings_factory, key, value, message) -> None:
    """Each [site] key names what it accepts."""
    with pytest.raises(ConfigError, match=message):
        settings_factory(**{key: value})


def test_a_batch_of_two_sites_is_served_by_each_site_s_models_sharing_one_checkpoint(make_service) -> None:
    """Under "institution" a DICOM file and a PNG in one batch are recorded under their sites, each prediction
    names its own site's versions, and the day-0 checkpoint both sites use is loaded once."""
    service = make_service(site_source="institution", site_name="home")
    drop = service.settings.drop_dir
    dicom_factory.write_rgb(drop / "a.dcm")
    write_cell(drop / "b.png", seed=3)
    report = service.pipeline.process(list(iter_candidates([drop])))
    assert report.done == 2
    with service.pipeline.sessions() as session:
        rows = session.execute(
            select(Image.source_name, Image.site, ModelVersion.site)
            .join(Prediction, Prediction.image_id == Image.id)
            .join(ModelVersion, ModelVersion.id == Prediction.classifier_version_id).order_by(Image.source_name)).all()
        sites = set(session.scalars(select(Site.name)))
    institution = dicom_factory.INSTITUTION
    assert [tuple(r) for r in rows] == [("a.dcm", institution, institution), ("b.png", "home", "home")]
    assert sites == {"home", institution}
    loaded = service.pipeline.models.loaded
    assert loaded[institution].classifier is loaded["home"].classifier
    assert loaded[institution].classifier_version_id != loaded["home"].classifier_version_id
