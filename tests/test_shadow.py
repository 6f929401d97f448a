"""Shadow (issue 23): which candidate a site shadows, which cells, and the gate's verdict that starts it."""

from __future__ import annotations

import hashlib
from types import SimpleNamespace

import pytest

from stainbridge.daemon.retraining import promotion
from stainbridge.daemon.schema import upgrade_database
from stainbridge.daemon.store import GateVerdict, ModelKind, ModelVersion, VersionState, make_engine, make_sessionmaker
from stainbridge.daemon.versions import registry
from stainbridge.daemon.versions.shadow import in_shadow_sample, shadowed_candidates


def _sha(n: int) -> str:
    return hashlib.sha256(str(n).encode()).hexdigest()


def test_the_sample_is_about_the_share_and_the_same_every_time() -> None:
    """A fifth of 5,000 contents is shadowed at share 0.2 (within 2 points), the same cells on a second call (a
    restart), none at 0 and all at 1."""
    shas = [_sha(n) for n in range(5000)]
    chosen = [sha for sha in shas if in_shadow_sample(sha, 0.2)]
    assert abs(len(chosen) / len(shas) - 0.2) < 0.02
    assert chosen == [sha for sha in shas if in_shadow_sample(sha, 0.2)]
    assert not any(in_shadow_sample(sha, 0.0) for sha in shas) and all(in_shadow_sample(sha, 1.0) for sha in shas)
    assert set(chosen) <= {sha for sha in shas if in_shadow_sample(sha, 0.5)}  # a larger share keeps the smaller's cells


@pytest.fixture
def sessions(database_url):
    upgrade_database(database_url)
    engine = make_engine(database_url)
    yield make_sessionmaker(engine)
    engine.dispose()


def _version(session, site: str, kind: str, n: int, *, state: VersionState = VersionState.candidate,
             verdict: GateVerdict | None = None) -> ModelVersion:
    version = ModelVersion(kind=ModelKind(kind), site=site, name=f"v{n}", path=f"/m/{n}", sha256=_sha(n), header={},
                           metrics={}, state=state, gate_verdict=verdict)
    session.add(version)
    session.flush()
    return version


def _shadowed(sessions) -> dict[str, int]:
    with sessions() as session:
        return {site: version.id for site, version in shadowed_candidates(session).items()}


def test_a_site_shadows_its_newest_candidate_only_while_it_awaits_evidence(sessions) -> None:
    """The newest version of a site, a candidate refused for too few reviews, is shadowed; a newer registration
    supersedes it, a promotion or a verdict on evidence ends it; each site has its own."""
    with sessions.begin() as s:
        _version(s, "a", "classifier", 1, state=VersionState.active)
        _version(s, "a", "standardizer", 2, state=VersionState.active)
        first = _version(s, "a", "classifier", 3, verdict=GateVerdict.awaiting_evidence).id
        other = _version(s, "b", "standardizer", 4, verdict=GateVerdict.awaiting_evidence).id
    assert _shadowed(sessions) == {"a": first, "b": other}
    with sessions.begin() as s:
        newer = _version(s, "a", "standardizer", 5).id  # registered, not gated yet: supersedes the first
    assert _shadowed(sessions) == {"b": other}
    with sessions.begin() as s:
        s.get(ModelVersion, newer).gate_verdict = GateVerdict.awaiting_evidence
    assert _shadowed(sessions) == {"a": newer, "b": other}
    with sessions.begin() as s:
        registry.activate(s, s.get(ModelVersion, newer), reason="promoted by hand")
        s.get(ModelVersion, other).gate_verdict = GateVerdict.refused  # decided on evidence
    assert _shadowed(sessions) == {}  # and the older candidate 3 does not come back


def test_the_gate_refusing_for_too_few_reviews_records_awaiting_evidence(settings_factory) -> None:
    """With fewer reviewed cells than min_gate_reviews the verdict is awaiting_evidence, kept on the version with
    its reason; a refusal on other grounds is a plain refusal."""
    settings = settings_factory(retraining_min_gate_reviews=3)
    side = (None, SimpleNamespace(classes=["a", "b"]))
    result = promotion.evaluate(settings, [], side, side, baseline=None, baseline_note="", recent=[])
    assert not result.passed and result.verdict is GateVerdict.awaiting_evidence
    version = ModelVersion(metrics={"training": 1})
    promotion.record_verdict(version, result)
    assert version.gate_verdict is GateVerdict.awaiting_evidence and version.reason.startswith("needs 3 reviewed")
    assert version.metrics["gate"]["verdict"] == "awaiting_evidence" and version.metrics["training"] == 1
    other_classes = (None, SimpleNamespace(classes=["a", "c"]))
    refused = promotion.evaluate(settings, [], side, other_classes, baseline=None, baseline_note="", recent=[])
    assert refused.verdict is GateVerdict.refused


def test_review_export_lists_the_views_disagreements_first_and_once(database_url) -> None:
    """On the lab history (tests/lab_helpers.py) the candidate's disagreement on c.png leads the queue, as the
    candidate_disagreements view says, and c.png (also flagged for low confidence) is listed once."""
    from sqlalchemy import text

    from stainbridge.daemon.commands.review import review_queue
    from tests.lab_helpers import seed_known_history

    seed_known_history(database_url)
    engine = make_engine(database_url)
    try:
        with make_sessionmaker(engine)() as session:
            view = [row[0] for row in session.execute(text("SELECT image_id FROM candidate_disagreements"))]
            queue = [(row["image"], row["tier"]) for row in review_queue(session, 0.6, 10)]
            capped = review_queue(session, 0.6, 10, disagreements_per_site=0)
    finally:
        engine.dispose()
    assert view == [3] and queue == [(3, "candidate_disagrees")]
    assert [(row["image"], row["tier"]) for row in capped] == [(3, "low_confidence")]


def test_a_candidate_left_behind_is_forgotten_unless_something_serves_with_it() -> None:
    """NetworkCache.evict frees a dropped candidate's networks (every night's candidate would pile up in a
    long-running service), but keeps one that now serves (a promoted candidate) and the day-0 recipe's."""
    from stainbridge.daemon.versions.loading import NetworkCache

    cache = NetworkCache("cpu")
    dropped, promoted, its_standardizer = object(), object(), object()
    cache._classifiers.update({"dropped": dropped, "promoted": promoted})
    cache._standardizers.update({("s", "dropped"): its_standardizer, ("s", "promoted"): object()})
    cache.evict((dropped, its_standardizer), keep=())
    cache.evict((promoted,), keep=(promoted,))
    assert set(cache._classifiers) == {"promoted"} and set(cache._standardizers) == {("s", "promoted")}
