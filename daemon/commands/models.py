"""`stainbridge models list | register PATH | promote ID | rollback KIND | history | prune | gate ID`: the registry by hand.

Every version belongs to one site (docs/sites.md); ``--site`` names it (default ``[site] name``).
``register`` loads the file through the inference path (so only a checkpoint that loads can be
registered; the built-in standardizers ``none``, ``reinhard`` and ``macenko`` by name) and records it as a
candidate of the site; ``gate`` runs the promotion gate on a candidate without promoting it (and keeps the verdict on
it: one refused only for too few reviews is shadowed by the service); ``promote`` makes a version active for its site
(no gate: the operator decides); ``rollback`` re-activates the version that served the site before
the active one (from the promotion history, which ``history`` lists); ``prune`` removes old run folders and
unused candidates (``daemon.retraining.retention``). The running service picks up a change between two
batches (``[models] poll_seconds``).
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

SWITCHES = "; a running service switches at its next batch"  # the registry poll (versions.hotswap)


@contextmanager
def database(settings: Settings) -> Iterator[Callable[[], Session]]:
    """A sessionmaker on the configured database (schema prepared as `status` does); disposed after."""
    prepare_database(settings.database_url, default_site=settings.site.name)
    engine = make_engine(settings.database_url)
    try:
        yield make_sessionmaker(engine)
    finally:
        engine.dispose()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    listing = sub.add_parser("list", help="every registered version with its site and state")
    listing.add_argument("--json", action="store_true", help="a JSON list of objects")
    listing.add_argument("--site", default=None, help="only this site's versions")
    register = sub.add_parser("register", help="record a checkpoint as a candidate of a site")
    register.add_argument("path", metavar="PATH")
    register.add_argument("--site", default=None, help="the site it is for (default: [site] name)")
    promote = sub.add_parser("promote", help="make a version the active one of its kind for its site")
    promote.add_argument("id", type=int, metavar="ID")
    promote.add_argument("--reason", default=None, help="why, for the promotion history")
    rollback = sub.add_parser("rollback", help="re-activate the version that served a site before the active one")
    rollback.add_argument("kind", choices=[k.value for k in ModelKind], metavar="KIND")
    rollback.add_argument("--site", default=None, help="the site (default: [site] name)")
    rollback.add_argument("--reason", default=None, help="why, for the promotion history")
    history = sub.add_parser("history", help="every promotion and rollback: when, what, by whom, why")
    history.add_argument("--json", action="store_true", help="a JSON list of objects")
    history.add_argument("--site", default=None, help="only this site's changes")
    prune = sub.add_parser("prune", help="remove run folders and unused candidates older than [retraining] keep_days")
    prune.add_argument("--dry-run", action="store_true", help="only list what would be removed")
    prune.add_argument("--json", action="store_true", help="print what was (or would be) removed as JSON")
    gate = sub.add_parser("gate", help="run the promotion gate on a registered version, without promoting it")
    gate.add_argument("id", type=int, metavar="ID")
    gate.add_argument("--json", action="store_true", help='{"passed", "reason", "checks": [...]}')
    gate.add_argument("--site", default=None, help="compare on this site's reviews and active versions "
                                                   "(default: the version's own site)")


def _register(session: Session, path: Path, site: str) -> registry.ModelVersion:
    from stainbridge.daemon.versions.loading import builtin_sha256
    from stainbridge.models.inference import load_classifier, load_standardizer

    active_clf = registry.active_version(session, ModelKind.classifier, site)
    if str(path) in registry.BUILTIN_STANDARDIZERS:
        if active_clf is None:
            raise registry.RegistryError(f"site {site!r} has no active classifier: a built-in standardizer takes "
                                         "its reference stain from it; start the service once first")
        builtin = load_standardizer(str(path), device="cpu",
                                    classifier=registry.load_version(active_clf, device="cpu"))
        return registry.register_model(session, ModelKind.standardizer, str(path), builtin_sha256(builtin.header),
                                       builtin.header, site=site, state=VersionState.candidate)
    try:
        model = load_classifier(path, device="cpu")
        kind = ModelKind.classifier
    except Exception:  # noqa: BLE001 - not a classifier: try it as a standardizer, which reports its own error
        classifier = registry.load_version(active_clf, device="cpu") if active_clf is not None else None
        model = load_standardizer(str(path), device="cpu", classifier=classifier)
        kind = ModelKind.standardizer
    return registry.register_model(session, kind, str(path.resolve()), model.sha256, model.header, site=site,
                                   state=VersionState.candidate)


def _gate(settings: Settings, sessions: Callable[[], Session], args: argparse.Namespace) -> int:
    """Print the gate's verdict (exit 0 whether it passed or not: it ran); nothing is promoted. The verdict is kept
    on a candidate of the site (``gate_verdict``): one refused only for too few reviews is shadowed by the service."""
    from stainbridge.daemon.retraining.promotion import (  # torch: only for this action
        GateError,
        gate_version,
        record_verdict_of,
    )

    try:
        result = gate_version(settings, sessions, args.id, site=args.site)  # type: ignore[arg-type]
    except GateError as exc:
        print(f"stainbridge models gate: {exc}", file=sys.stderr)
        return 1
    record_verdict_of(sessions, args.id, result, args.site)  # type: ignore[arg-type]
    if args.json:
        print(json.dumps(result.as_json(), indent=2))
        return 0
    print(f"version {args.id}: {'passed' if result.passed else 'refused'}: {result.reason}")
    for c in result.checks:
        interval = f"  difference 95 % [{c.ci_low:+.3f}, {c.ci_high:+.3f}]" if c.ci_low is not None else ""
        print(f"  {c.name:<20} active {c.active:.3f}  candidate {c.candidate:.3f}  on {c.images} cells"
              f"{interval}  {'ok' if c.passed else 'REFUSED'}")
    return 0


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


def _history_lines(events: list[dict]) -> str:
    if not events:
        return "no promotion recorded yet"
    return "\n".join(
        f"{e['time'][:19]}  {e['site']:<14} {e['kind']:<12} {e['action']:<8} "
        f"{e['from_version'] if e['from_version'] is not None else '-'} -> {e['to_version']} ({e['to_name']})  "
        f"by {e['actor']}" + (f": {e['reason']}" if e["reason"] else "") for e in events)


def _prune(settings: Settings, session: Session, *, dry_run: bool, as_json: bool) -> int:
    from stainbridge.daemon.retraining.retention import prune

    removed = prune(settings, session, dry_run=dry_run)
    if not dry_run:
        session.commit()
    if as_json:
        print(json.dumps(removed.as_json(), indent=2))
    else:
        print(removed.summary(dry_run=dry_run))
    return 0


def run(args: argparse.Namespace) -> int:
    name = f"stainbridge models {args.action}"
    try:
        settings = load_settings(args.config)
        with database(settings) as sessions, sessions() as session:
            if args.action == "list":
                versions = [registry.describe(v) for v in registry.list_versions(session)
                            if args.site is None or v.site == args.site]
                if args.json:
                    print(json.dumps(versions, indent=2, default=str))
                for v in [] if args.json else versions:
                    print(f"{v['id']:>4}  {v['site']:<14} {v['kind']:<12} {v['state']:<9} {v['sha256'][:12]}  "
                          f"{v['created_at'][:19]}  "
                          f"{v['name']}" + _profile(v["site_profile"]) + _adapted(v["adaptation"])
                          + (f"  ({v['reason']})" if v["reason"] and v["state"] == "candidate" else ""))
                return 0
            if args.action == "history":
                events = registry.history(session, args.site)
                print(json.dumps(events, indent=2) if args.json else _history_lines(events))
                return 0
            if args.action == "prune":
                return _prune(settings, session, dry_run=args.dry_run, as_json=args.json)
            if args.action == "gate":
                return _gate(settings, sessions, args)
            if args.action == "register":
                path = Path(args.path)
                if not path.is_file() and args.path not in registry.BUILTIN_STANDARDIZERS:
                    print(f"{name}: {path} is not a file (nor a built-in standardizer: "
                          f"{', '.join(registry.BUILTIN_STANDARDIZERS)})", file=sys.stderr)
                    return 2
                version = _register(session, path, args.site or settings.site.name)
                message = (f"registered {version.kind.value} version {version.id} ({version.state.value}) "
                           f"for site {version.site}")
                message += (f"; `stainbridge models gate {version.id}` judges it on reviewed cells, "
                            f"`stainbridge models promote {version.id}` serves it"
                            if version.state is VersionState.candidate else SWITCHES)
            elif args.action == "promote":
                version = registry.promote(session, args.id, reason=args.reason)
                message = (f"version {version.id} ({version.name}) is now the active {version.kind.value} "
                           f"of site {version.site}{SWITCHES}")
            else:
                site = args.site or settings.site.name
                old, new = registry.rollback(session, args.kind, site, reason=args.reason)
                message = (f"rolled back {args.kind} of site {site}: version {old.id} retired, version {new.id} "
                           f"({new.name}) active{SWITCHES}")
            session.commit()
    except (ConfigError, SchemaError, registry.RegistryError) as exc:
        print(f"{name}: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # noqa: BLE001 - a file that does not load is an operator error, not a crash
        print(f"{name}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(message)
    return 0
