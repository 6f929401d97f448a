"""The model registry: states, one active version per kind in the database, sha256 on every load, the CLI."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError

from stainbridge.daemon import cli
from stainbridge.daemon.schema import upgrade_database
from stainbridge.daemon.store import ModelKind, VersionState, make_engine, make_sessionmaker
from stainbridge.daemon.versions import registry
from tests.daemon_helpers import build_tiny_models
from tests.retraining_helpers import EventRecorder


@pytest.fixture
def sessions(database_url):
    upgrade_database(database_url)
    engine = make_engine(database_url)
    yield make_sessionmaker(engine)
    engine.dispose()


INSERT_VERSION = ("INSERT INTO model_versions (kind, site, name, path, sha256, header, metrics, state, created_at) "
                  "VALUES (:kind, :site, :n, '/m', :n, '{}', '{}', :state, CURRENT_TIMESTAMP)")


def test_the_database_allows_one_active_version_per_kind_and_site(sessions) -> None:
    """Each site has its own active classifier and standardizer; other states are unlimited."""
    rows = [("classifier", "a", "active"), ("classifier", "a", "retired"), ("standardizer", "a", "active"),
            ("classifier", "b", "active"), ("standardizer", "b", "active"), ("standardizer", "b", "candidate")]
    with sessions.begin() as session:
        for n, (kind, site, state) in enumerate(rows):
            session.execute(text(INSERT_VERSION), {"kind": kind, "site": site, "n": f"v{n}", "state": state})


def test_the_database_refuses_two_active_versions_of_one_kind_for_one_site(sessions) -> None:
    """A second active classifier for one site is refused by the partial unique index, not only by code."""
    with sessions.begin() as session:
        session.execute(text(INSERT_VERSION), {"kind": "classifier", "site": "a", "n": "v1", "state": "active"})
    with pytest.raises(IntegrityError), sessions.begin() as session:
        session.execute(text(INSERT_VERSION), {"kind": "classifier", "site": "a", "n": "v2", "state": "active"})


def test_promote_and_rollback_walk_the_history(sessions) -> None:
    """Promote retires the old active version; rollback re-activates the one before it, then the one before that."""
    with sessions.begin() as s:
        a = registry.register_model(s, ModelKind.standardizer, "none", "a" * 64, {}, site="x")
        b = registry.register_model(s, ModelKind.standardizer, "reinhard", "b" * 64, {}, site="x",
                                    state=VersionState.candidate)
        c = registry.register_model(s, ModelKind.standardizer, "macenko", "c" * 64, {}, site="x",
                                    state=VersionState.candidate)
        other = registry.register_model(s, ModelKind.standardizer, "none", "a" * 64, {}, site="y")
        assert (a.state, b.state) == (VersionState.active, VersionState.candidate)
        registry.promote(s, b.id)
        registry.promote(s, c.id)
        assert [v.id for v in registry.active_versions(s, "x")] == [c.id]
        assert (a.state, b.state) == (VersionState.retired, VersionState.retired)
        assert registry.rollback(s, ModelKind.standardizer, "x")[1].id == b.id
        assert registry.rollback(s, ModelKind.standardizer, "x")[1].id == a.id
        with pytest.raises(registry.RegistryError, match="no earlier standardizer"):
            registry.rollback(s, ModelKind.standardizer, "x")
        assert other.state is VersionState.active  # another site's versions are never touched


def test_a_changed_file_is_refused_on_load_and_at_start_up(sqlite_url, tmp_path, monkeypatch) -> None:
    """Bytes changed at a registered path: loading refuses with `checkpoint_changed`, start-up does not register them."""
    upgrade_database(sqlite_url)
    engine = make_engine(sqlite_url)
    sessions = make_sessionmaker(engine)
    tiny = build_tiny_models(tmp_path / "m")
    with sessions.begin() as s:
        version = registry.register_model(s, ModelKind.standardizer, str(tiny.standardizer), tiny.standardizer_sha256, {},
                                          site="x")
    tiny.standardizer.write_bytes(tiny.classifier.read_bytes())  # same path, other bytes
    recorder = EventRecorder()
    monkeypatch.setattr(registry, "log", recorder)
    with pytest.raises(registry.RegistryError, match="has changed since it was registered"):
        registry.load_version(version, device="cpu")
    with sessions.begin() as s:
        assert registry.register_configured(s, ModelKind.standardizer, str(tiny.standardizer), "f" * 64, {},
                                            site="x") is None
        assert len(registry.list_versions(s)) == 1
    assert recorder.names() == ["checkpoint_changed", "checkpoint_changed"]
    engine.dispose()


@pytest.mark.slow
def test_models_commands(sqlite_url, tmp_path, monkeypatch, capsys, restore_logging) -> None:
    """`models register` adds a candidate, `promote` activates it, `list --json` shows states, `rollback` undoes it."""
    tiny = build_tiny_models(tmp_path / "m")
    monkeypatch.setenv("STAINBRIDGE_DATABASE_URL", sqlite_url)
    monkeypatch.setenv("STAINBRIDGE_PATHS_STATE", str(tmp_path / "state"))
    upgrade_database(sqlite_url)
    engine = make_engine(sqlite_url)
    with make_sessionmaker(engine).begin() as s:
        registry.register_model(s, ModelKind.classifier, str(tiny.classifier), tiny.classifier_sha256, {"classes": []},
                                site="default")
        registry.register_model(s, ModelKind.standardizer, "none", "0" * 64, {}, site="default")
    engine.dispose()
    capsys.readouterr()
    assert cli.main(["models", "register", str(tiny.standardizer)]) == 0
    assert capsys.readouterr().out.strip().endswith(  # a candidate: the service does not switch to it
        "(candidate) for site default; `stainbridge models gate 3` judges it on reviewed cells, "
        "`stainbridge models promote 3` serves it")
    assert cli.main(["models", "promote", "3"]) == 0
    assert capsys.readouterr().out.strip().endswith("a running service switches at its next batch")
    assert cli.main(["models", "list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert {k for v in listed for k in v} >= {"id", "kind", "site", "name", "state", "sha256", "created_at", "metrics"}
    assert [(v["id"], v["kind"], v["state"]) for v in listed] == [
        (1, "classifier", "active"), (2, "standardizer", "retired"), (3, "standardizer", "active")]
    assert listed[2]["sha256"] == tiny.standardizer_sha256
    assert cli.main(["models", "rollback", "standardizer"]) == 0
    assert cli.main(["models", "promote", "99"]) == 1
    assert "no model version 99" in capsys.readouterr().err


def _builtin_versions(url: str, count: int) -> None:
    """Versions 1..count of the default site's standardizer (built-ins: no file to check), version 1 active."""
    upgrade_database(url)
    engine = make_engine(url)
    with make_sessionmaker(engine).begin() as s:
        for n in range(1, count + 1):
            registry.register_model(s, ModelKind.standardizer, ("none", "reinhard", "macenko")[n % 3], f"{n}" * 64, {},
                                    site="default", state=VersionState.active if n == 1 else VersionState.candidate)
    engine.dispose()


def test_rollback_returns_to_the_version_active_before_the_current_one(sqlite_url, tmp_path, monkeypatch,
                                                                      capsys) -> None:
    """Promote 4, roll back (to 1), promote 5, roll back: version 1 serves again, not 4 (promoted more recently)."""
    monkeypatch.setenv("STAINBRIDGE_DATABASE_URL", sqlite_url)
    monkeypatch.setenv("STAINBRIDGE_PATHS_STATE", str(tmp_path / "state"))
    _builtin_versions(sqlite_url, 5)
    assert cli.main(["models", "promote", "4"]) == 0
    assert cli.main(["models", "rollback", "standardizer"]) == 0
    assert cli.main(["models", "promote", "5"]) == 0
    assert cli.main(["models", "rollback", "standardizer"]) == 0
    capsys.readouterr()
    assert cli.main(["models", "list", "--json"]) == 0
    assert [v["id"] for v in json.loads(capsys.readouterr().out) if v["state"] == "active"] == [1]


def test_models_history_lists_promotions_and_rollbacks_with_actor_and_reason(sqlite_url, tmp_path, monkeypatch,
                                                                            capsys) -> None:
    """`models history --json` has every change in order: action, from, to, actor, reason, time."""
    monkeypatch.setenv("STAINBRIDGE_DATABASE_URL", sqlite_url)
    monkeypatch.setenv("STAINBRIDGE_PATHS_STATE", str(tmp_path / "state"))
    _builtin_versions(sqlite_url, 2)
    assert cli.main(["models", "promote", "2", "--reason", "new stain lot"]) == 0
    assert cli.main(["models", "rollback", "standardizer"]) == 0
    capsys.readouterr()
    assert cli.main(["models", "history", "--json", "--site", "default"]) == 0
    events = json.loads(capsys.readouterr().out)
    assert [(e["action"], e["from_version"], e["to_version"]) for e in events] == [
        ("promote", None, 1), ("promote", 1, 2), ("rollback", 2, 1)]
    assert events[0]["actor"] == "configuration" and events[1]["reason"] == "new stain lot"
    assert events[1]["actor"].endswith("(command line)") and events[2]["reason"] == "rolled back from version 2"
    assert all(e["time"] for e in events)
    assert cli.main(["models", "history"]) == 0
    assert "rollback 2 -> 1" in capsys.readouterr().out
    assert cli.main(["models", "history", "--site", "elsewhere"]) == 0
    assert capsys.readouterr().out.strip() == "no promotion recorded yet"


def test_versions_the_nightly_job_made_have_names_that_tell_them_apart(sessions) -> None:
    """Two retrained classifiers (same file name in their run folders) are named by kind, method, run, site, date."""
    header = {"architecture": "resnet18"}
    with sessions.begin() as s:
        names = [registry.register_model(s, ModelKind.classifier, f"/state/retraining/run-{run}/classifier.safetensors",
                                         f"{run}" * 64, header, site="lab-a", state=VersionState.candidate,
                                         training_run_id=run).name for run in (3, 4)]
        by_hand = registry.register_model(s, ModelKind.classifier, "/m/clf-site.safetensors", "f" * 64, header,
                                          site="lab-a", state=VersionState.candidate).name
    today = registry.utcnow().strftime("%Y-%m-%d")
    assert names == [f"classifier resnet18 run 3 lab-a {today}", f"classifier resnet18 run 4 lab-a {today}"]
    assert by_hand == "clf-site (resnet18)"  # a file registered by hand keeps the name the operator gave it
