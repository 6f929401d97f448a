"""`stainbridge report [--since DATE] [--until DATE] [--site SITE] --out FILE.html`: one self-contained HTML page.

Reads the database (aggregates, see daemon/lab/report.py) and the archived images of the few it shows;
it needs neither the models nor a GPU, so it can run while the service works, except with
``--restandardize``, which loads the active models on the CPU to draw the standardized pictures the
service did not save. It creates no database: it reads the one the configuration names, at the
newest schema (as `status` does), and says which one it looked for otherwise.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from datetime import date
from pathlib import Path
from typing import Any

from sqlalchemy.engine import Engine

from stainbridge.daemon.config import ConfigError, LabSettings, Settings, load_settings
from stainbridge.daemon.schema import SchemaError, require_database, safe_url
from stainbridge.daemon.store import make_engine


def parse_date(value: str) -> date:
    """argparse type for YYYY-MM-DD (a UTC calendar day)."""
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a date; write it as YYYY-MM-DD (UTC)") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--since", type=parse_date, metavar="DATE", help="first day included (YYYY-MM-DD, UTC)")
    parser.add_argument("--until", type=parse_date, metavar="DATE", help="last day included (YYYY-MM-DD, UTC)")
    parser.add_argument("--out", required=True, metavar="FILE.html", help="where to write the report")
    parser.add_argument("--site", metavar="SITE", help="only this site's images (default: every site, each in its "
                                                        "own section)")
    parser.add_argument("--restandardize", action="store_true",
                        help="for shown images without a saved standardized copy, standardize them now with the "
                             "active models (loads them on the CPU; a few seconds)")


class RestandardizeError(RuntimeError):
    """--restandardize cannot load or run the active models."""


def restandardize(settings: Settings, engine: Engine, shown: list[Any]) -> dict[int, str]:
    """Standardized thumbnails, made now with the registry's active models on the CPU, for the shown
    images that have no saved copy (image id -> data URI), each by its own site's models; the service's geometry
    ([site] scale) applies."""
    from stainbridge.daemon.lab.render import read_picture, standardized_path, thumbnail_of
    from stainbridge.daemon.store import ModelKind, make_sessionmaker
    from stainbridge.daemon.versions import registry
    from stainbridge.daemon.versions.loading import NetworkCache
    from stainbridge.models.inference import DeviceUnavailable, ModelMismatch, run_batch

    todo = []
    for item in shown:
        original = Path(item.archive_path) if item.archive_path else None
        if original is not None and not standardized_path(original).exists():
            picture = read_picture(original)
            if picture is not None:
                todo.append((item.image_id, picture, item.site or settings.site.name))
    if not todo:
        return {}
    by_site: dict[str, list[tuple[int, Any]]] = {}
    for image_id, picture, site in todo:
        by_site.setdefault(site, []).append((image_id, picture))
    cache = NetworkCache("cpu")
    redone: dict[int, str] = {}
    for site, pictures in by_site.items():
        with make_sessionmaker(engine)() as session:
            clf_version = registry.active_version(session, ModelKind.classifier, site)
            std_version = registry.active_version(session, ModelKind.standardizer, site)
        if clf_version is None or std_version is None:
            raise RestandardizeError(f"site {site} has no active models registered yet; start the service once, "
                                     "or leave out --restandardize")
        try:
            models = cache.pair(clf_version, std_version, site)
            results = run_batch([picture for _, picture in pictures], models.standardizer, models.classifier,
                                scale=settings.site.scale)
        except (registry.RegistryError, ModelMismatch, DeviceUnavailable, OSError, ValueError) as exc:
            raise RestandardizeError(f"cannot standardize with the active models of site {site}: {exc}; "
                                     "leave out --restandardize") from None
        redone.update({image_id: thumbnail_of(result.standardized)
                       for (image_id, _), result in zip(pictures, results, strict=True)})
    return redone


def require_site(database_url: str, site: str) -> None:
    """Raise ConfigError naming the known sites when no image was ever recorded under `site`."""
    from sqlalchemy import select

    from stainbridge.daemon.store import Image

    engine = make_engine(database_url)
    try:
        with engine.connect() as connection:
            known = list(connection.execute(select(Image.site).distinct().order_by(Image.site)).scalars())
    finally:
        engine.dispose()
    if site not in known:
        raise ConfigError(f"--site {site!r}: no image was recorded under that site; known sites: "
                          f"{', '.join(known) or 'none yet'}")


def write_report(database_url: str, out: Path, since: date | None = None, until: date | None = None,
                 settings: Settings | None = None, *, lab: LabSettings | None = None, site: str | None = None) -> Path:
    """Gather, render and write the report atomically; returns the path written. With `settings`, shown
    images without a saved standardized copy are standardized now (see restandardize). `lab`: the specimen
    flags' settings (``[lab]``); `site`: only that site."""
    from stainbridge.daemon.lab.render import render
    from stainbridge.daemon.lab.report import Period, gather

    period = Period.from_dates(since, until)
    engine = make_engine(database_url)
    try:
        data = gather(engine, period, safe_url(database_url), lab=lab, site=site)
        redone = restandardize(settings, engine, data.grid + data.lowest) if settings is not None else {}
    finally:
        engine.dispose()
    out.parent.mkdir(parents=True, exist_ok=True)
    temp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    temp.write_text(render(data, redone), encoding="utf-8")
    os.replace(temp, out)
    return out


def run(args: argparse.Namespace) -> int:
    started = time.monotonic()
    out = Path(args.out).absolute()
    try:
        settings = load_settings(args.config)
        require_database(settings.database_url, settings.source)
        if args.site:
            require_site(settings.database_url, args.site)
        write_report(settings.database_url, out, args.since, args.until,
                     settings if args.restandardize else None, lab=settings.lab, site=args.site)
    except (ConfigError, SchemaError, RestandardizeError) as exc:
        print(f"stainbridge report: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:  # --until before --since
        print(f"stainbridge report: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"stainbridge report: cannot write {out}: {exc.strerror}; choose another --out", file=sys.stderr)
        return 1
    size_kb = out.stat().st_size / 1024
    print(f"report written to {out} ({size_kb:.0f} KiB, {time.monotonic() - started:.1f} s)")
    return 0
