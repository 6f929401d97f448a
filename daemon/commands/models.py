"""`stainbridge models list [--json] | register PATH | promote ID | rollback KIND`: the registry by hand.

``register`` loads the file through the inference path (so only a checkpoint that loads can be
registered) and records it as a candidate; ``promote`` makes a version active (no gate: the
operator decides); ``rollback`` re-activates the version that served before the active one.
The running service picks up the change between two batches (``[models] poll_seconds``).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy.orm import Session

from stainbridge.daemon.config import ConfigError, Settings, load_settings
from stainbridge.daemon.schema import SchemaError, prepare_database
from stainbridge.daemon.store import ModelKind, VersionState, make_engine, make_sessionmaker
from stainbridge.daemon.versions import registry


@contextmanager
def database(settings: Settings) -> Iterator[Callable[[], Session]]:
    """A sessionmaker on the configured database (schema prepared as `status` does); disposed after."""
    prepare_database(settings.database_url)
    engine = make_engine(settings.database_url)
    try:
        yield make_sessionmaker(engine)
    finally:
        engine.dispose()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    listing = sub.add_parser("list", help="every registered version with its state")
    listing.add_argument("--json", action="store_true", help="a JSON list of objects")
    sub.add_parser("register", help="record a checkpoint as a candidate").add_argument("path", metavar="PATH")
    sub.add_parser("promote", help="make a version the active one of its kind").add_argument("id", type=int, metavar="ID")
    sub.add_parser("rollback", help="re-activate the version that served before the active one").add_argument(
        "kind", choices=[k.value for k in ModelKind], metavar="KIND")


def _register(session: Session, settings: Settings, path: Path) -> registry.ModelVersion:
    from stainbridge.models.inference import load_classifier, load_standardizer

    active_clf = registry.active_version(session, ModelKind.classifier)
    try:
        model = load_classifier(path, device="cpu")
        kind = ModelKind.classifier
    except Exception:  # noqa: BLE001 - not a classifier: try it as a standardizer, which reports its own error
        classifier = registry.load_version(active_clf, device="cpu") if active_clf is not None else None
        model = load_standardizer(str(path), device="cpu", classifier=classifier)
        kind = ModelKind.standardizer
    return registry.register_model(session, kind, str(path.resolve()), model.sha256, model.header,
                                   state=VersionState.candidate)


def _profile(profile: dict | None) -> str:
    """The site profile in one word for the listing: its magnification (and how it was estimated)."""
    if not isinstance(profile, dict) or profile.get("magnification") is None:
        return ""
    method = f", {profile['method']}" if profile.get("method") else ""
    return f"  [site x{float(profile['magnification']):.3g}{method}]"


def _adapted(adaptation: dict | None) -> str:
    """A classifier adapted without labels, in a few words: to how many of the site's images."""
    if not adaptation:
        return ""
    images = (adaptation.get("source") or {}).get("images")
    return f"  [adapted to {images} unlabeled site images]"


def run(args: argparse.Namespace) -> int:
    name = f"stainbridge models {args.action}"
    try:
        settings = load_settings(args.config)
        with database(settings) as sessions, sessions() as session:
            if args.action == "list":
                versions = [registry.describe(v) for v in registry.list_versions(session)]
                if args.json:
                    print(json.dumps(versions, indent=2, default=str))
                for v in [] if args.json else versions:
                    print(f"{v['id']:>4}  {v['kind']:<12} {v['state']:<9} {v['sha256'][:12]}  {v['created_at'][:19]}  "
                          f"{v['name']}" + _profile(v["site_profile"]) + _adapted(v["adaptation"])
                          + (f"  ({v['reason']})" if v["reason"] and v["state"] == "candidate" else ""))
                return 0
            if args.action == "register":
                path = Path(args.path)
                if not path.is_file():
                    print(f"{name}: {path} is not a file", file=sys.stderr)
                    return 2
                version = _register(session, settings, path)
                message = f"registered {version.kind.value} version {version.id} ({version.state.value})"
            elif args.action == "promote":
                version = registry.promote(session, args.id)
                message = f"version {version.id} ({version.name}) is now the active {version.kind.value}"
            else:
                old, new = registry.rollback(session, args.kind)
                message = f"rolled back {args.kind}: version {old.id} retired, version {new.id} ({new.name}) active"
            session.commit()
    except (ConfigError, SchemaError, registry.RegistryError) as exc:
        print(f"{name}: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # noqa: BLE001 - a file that does not load is an operator error, not a crash
        print(f"{name}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(message + "; a running service switches at its next batch")
    return 0
