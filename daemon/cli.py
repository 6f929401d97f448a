"""`stainbridge` command line: parse, load settings, configure logging, hand over.

Each command lives in its own module exposing ``add_arguments(parser)`` and
``run(args) -> int``; that module is imported only when its command is invoked (or asked
for ``--help``), so one command's heavy imports never slow down another. ``db`` and
``config`` are built in here. Every command accepts ``--config FILE`` before or after
its name (else ``$STAINBRIDGE_CONFIG``, else ``/etc/stainbridge/stainbridge.toml`` if it exists,
else the built-in defaults).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from importlib.metadata import PackageNotFoundError, version
from types import ModuleType
from typing import Any, Callable, Sequence

from stainbridge.daemon.config import CONFIG_ENV, SYSTEM_CONFIG, ConfigError, Settings, load_settings

PROG = "stainbridge"

# Command path -> module with add_arguments(parser) and run(args) -> int.
COMMANDS: dict[tuple[str, ...], str] = {
    ("synth",): "stainbridge.models.imaging.synthetic",
    ("train", "classifier"): "stainbridge.models.training.classifier",
    ("train", "cyclegan"): "stainbridge.models.training.cyclegan",
    ("train", "finetune"): "stainbridge.models.training.finetune",
    ("train", "adapt"): "stainbridge.models.training.adapt",
    ("eval",): "stainbridge.models.bench.evaluate",
    ("bench", "accuracy"): "stainbridge.models.bench.accuracy",
    ("bench", "throughput"): "stainbridge.models.bench.throughput",
    ("bench", "seeds"): "stainbridge.models.bench.seeds",
    ("train", "colorization"): "stainbridge.models.training.colorization",
    ("train", "site-profile"): "stainbridge.models.training.site_profile",
    ("train", "calibrate"): "stainbridge.models.training.calibrate",
    ("bench", "abstain"): "stainbridge.models.bench.abstain",
    ("site-profile",): "stainbridge.models.bench.site_profile",
    ("run",): "stainbridge.daemon.service.lifecycle",
    ("init",): "stainbridge.daemon.commands.init",
    ("backup",): "stainbridge.daemon.commands.backup",
    ("restore",): "stainbridge.daemon.commands.restore",
    ("ingest",): "stainbridge.daemon.commands.ingest",
    ("status",): "stainbridge.daemon.commands.status",
    ("demo",): "stainbridge.daemon.commands.demo",
    ("models",): "stainbridge.daemon.commands.models",
    ("retrain",): "stainbridge.daemon.commands.retrain",
    ("review",): "stainbridge.daemon.commands.review",
    ("reprocess",): "stainbridge.daemon.commands.reprocess",
    ("report",): "stainbridge.daemon.commands.report",
    ("export",): "stainbridge.daemon.commands.export",
    ("sites",): "stainbridge.daemon.commands.sites",
}

HELP: dict[tuple[str, ...], str] = {
    ("synth",): "write a synthetic labeled cell-image folder",
    ("train",): "train a model",
    ("train", "classifier"): "train the ResNet classifier on a labeled folder",
    ("train", "cyclegan"): "train the CycleGAN stain standardizer on two unlabeled folders",
    ("train", "finetune"): "fine-tune a classifier on reviewed incoming images (and reference ones)",
    ("train", "adapt"): "adapt a classifier to a hospital's unlabeled images (information maximization)",
    ("train", "colorization"): "train the ColorizationGAN standardizer (pix2pix L -> ab) on reference images only",
    ("train", "site-profile"): "write a classical standardizer (reinhard...) with a site profile estimated from unlabeled images",
    ("train", "calibrate"): "fit a classifier's calibrated confidence and out-of-distribution score (a new checkpoint)",
    ("eval",): "evaluate a classifier (and standardizer) on a labeled folder",
    ("bench",): "benchmarks",
    ("bench", "accuracy"): "cross-hospital accuracy of every standardization method",
    ("bench", "throughput"): "images per second through standardizer and classifier",
    ("bench", "seeds"): "mean and spread of several `bench accuracy` runs (one per seed)",
    ("bench", "abstain"): "cells flagged for review: other cell types against reference cells, risk-coverage per lab",
    ("site-profile",): "estimate a site's magnification from its unlabeled images (red-cell diameters)",
    ("run",): "run the service in the foreground (systemd runs this)",
    ("init",): "create and check the configured folders and the database (once, at install)",
    ("backup",): "back up the database, the registered checkpoints and the configuration (sha256-listed)",
    ("restore",): "restore a backup after checking every sha256 (stop the service first)",
    ("ingest",): "run the pipeline once over files or folders",
    ("status",): "show queue, model versions and recent results",
    ("demo",): "end-to-end demonstration on synthetic data",
    ("models",): "list, register, gate, promote and roll back model versions",
    ("retrain",): "run the retraining job now",
    ("review",): "import or export expert-confirmed labels",
    ("reprocess",): "classify stored images again with the active models",
    ("report",): "write a self-contained HTML report of results (pictures, counts, accuracy, failures)",
    ("export",): "stream results as CSV or JSON",
    ("sites",): "each site's validation state; `sites validate SITE` chooses its recipe on reviewed cells",
    ("db",): "database schema (Alembic)",
    ("db", "upgrade"): "migrate the database to the newest schema",
    ("db", "current"): "print the database's schema revision",
    ("config",): "configuration",
    ("config", "check"): "validate and print the effective configuration",
}

# Planned commands that this version does not ship yet.
NOT_YET: dict[str, str] = {}

HELP.update({(name,): f"{text} (not available yet)" for name, text in NOT_YET.items()})

_GROUPS = sorted({path[0] for path in [*COMMANDS, ("db", "upgrade"), ("config", "check")] if len(path) > 1})


class CommandNotAvailable(Exception):
    """The command is part of the interface but not built into this version."""


def _version() -> str:
    try:
        return version("stainbridge")
    except PackageNotFoundError:
        return "unknown (not installed; run pip install -e .)"


def _common() -> argparse.ArgumentParser:
    # SUPPRESS: a sub-command's absent --config must not overwrite one given before it.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config",
        metavar="FILE",
        default=argparse.SUPPRESS,
        help=f"TOML configuration file (default: ${CONFIG_ENV}, else {SYSTEM_CONFIG} if it exists, "
             "else built-in defaults)",
    )
    return common


def _requested_path(argv: Sequence[str]) -> tuple[str, ...]:
    """The command words in argv, skipping global options (used before the full parse)."""
    words: list[str] = []
    skip = False
    for token in argv:
        if skip:
            skip = False
            continue
        if token == "--config":
            skip = True
            continue
        if token.startswith("-"):
            continue
        words.append(token)
        if len(words) == 2 or words[0] not in _GROUPS:
            break
    return tuple(words)


def _load_command(path: tuple[str, ...]) -> ModuleType:
    module_name = COMMANDS[path]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name == module_name:
            raise CommandNotAvailable(" ".join(path)) from None
        raise
    if not (callable(getattr(module, "add_arguments", None)) and callable(getattr(module, "run", None))):
        raise TypeError(f"{module_name} must define add_arguments(parser) and run(args) to serve `{PROG} {' '.join(path)}`")
    return module


def build_parser(selected: tuple[str, ...] = ()) -> tuple[argparse.ArgumentParser, ModuleType | None]:
    """The full parser; only the selected command's module is imported to add its arguments."""
    common = _common()
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Standardize blood-smear cell images to the reference stain, classify them, record results in SQL.",
    )
    parser.add_argument("--config", metavar="FILE", default=None, help=f"TOML configuration file (default: ${CONFIG_ENV}, else {SYSTEM_CONFIG} if it exists)")
    parser.add_argument("--version", action="version", version=f"{PROG} {_version()}")
    top = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    groups: dict[str, argparse._SubParsersAction] = {}
    selected_module: ModuleType | None = None

    def add(path: tuple[str, ...], description: str | None = None) -> argparse.ArgumentParser:
        if len(path) == 1:
            return top.add_parser(path[0], parents=[common], help=HELP.get(path), description=description)
        if path[0] not in groups:
            group = top.add_parser(path[0], parents=[common], help=HELP.get(path[:1]))
            groups[path[0]] = group.add_subparsers(dest="subcommand", metavar="SUBCOMMAND", required=True)
        return groups[path[0]].add_parser(path[1], parents=[common], help=HELP.get(path))

    for path in COMMANDS:
        sub = add(path)
        sub.set_defaults(command_path=path)
        if path == selected:
            selected_module = _load_command(path)
            selected_module.add_arguments(sub)

    add(("db", "upgrade")).set_defaults(command_path=("db", "upgrade"), handler=_db_upgrade)
    add(("db", "current")).set_defaults(command_path=("db", "current"), handler=_db_current)
    check = add(("config", "check"))
    check.add_argument("--json", action="store_true", help="print JSON instead of TOML")
    check.set_defaults(command_path=("config", "check"), handler=_config_check)
    for name, text in NOT_YET.items():
        add((name,), description=f"{text} (not available yet in this version)").set_defaults(command_path=(name,))
    return parser, selected_module


def _settings(args: argparse.Namespace) -> Settings:
    return load_settings(args.config)


def _configure_logging(settings: Settings | None) -> None:
    from stainbridge.daemon.logs import configure_logging

    if settings is None:
        configure_logging()
    else:
        configure_logging(settings.logging.level, settings.logging.format)


def _db_upgrade(args: argparse.Namespace) -> int:
    from stainbridge.daemon.schema import SchemaError, current_revision, safe_url, upgrade_database

    settings = _settings(args)
    _configure_logging(settings)
    try:
        upgrade_database(settings.database_url, default_site=settings.site.name)
        revision = current_revision(settings.database_url)
    except SchemaError as exc:
        print(f"{PROG}: database error: {exc}", file=sys.stderr)
        return 1
    print(f"{safe_url(settings.database_url)} is at revision {revision} (head)")
    return 0


def _db_current(args: argparse.Namespace) -> int:
    from stainbridge.daemon.schema import SchemaError, current_revision, head_revision, require_existing

    settings = _settings(args)
    _configure_logging(settings)
    try:
        require_existing(settings.database_url, settings.source)  # reading must not create it
        current = current_revision(settings.database_url)
        head = head_revision()
    except SchemaError as exc:
        print(f"{PROG}: database error: {exc}", file=sys.stderr)
        return 1
    print(current or "none")
    if current != head:
        print(f"{PROG}: the newest revision is {head}; run `{PROG} db upgrade`", file=sys.stderr)
    return 0


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value))


def render_toml(effective: dict[str, dict[str, Any]]) -> str:
    lines: list[str] = []
    for section, values in effective.items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            lines.append(f"# {key} is not set" if value is None else f"{key} = {_toml_value(value)}")
        lines.append("")
    return "\n".join(lines)


def _config_check(args: argparse.Namespace) -> int:
    settings = _settings(args)
    effective = settings.effective()
    if args.json:
        print(json.dumps({"source": settings.source, **effective}, indent=2, default=str))
    else:
        print(f"# effective configuration ({settings.source})")
        print(render_toml(effective), end="")
    print(f"{PROG}: configuration is valid ({settings.source})", file=sys.stderr)
    return 0


def _dispatch(args: argparse.Namespace, module: ModuleType | None) -> int:
    handler: Callable[[argparse.Namespace], int] | None = getattr(args, "handler", None)
    if handler is not None:
        return handler(args)
    assert module is not None, "the selected command's module was loaded while parsing"
    if COMMANDS[args.command_path].startswith("stainbridge.daemon."):
        _configure_logging(_settings(args))
    else:
        # models/ commands do not need the configuration; a broken file must not stop them.
        try:
            settings: Settings | None = _settings(args)
        except ConfigError:
            settings = None
        _configure_logging(settings)
    return int(module.run(args) or 0)


def _passive_openmp() -> None:
    """Idle OpenMP threads sleep instead of spinning, unless the environment says otherwise.

    Spinning threads take the CPU from decoding, hashing, SQLite and every other process on a
    shared machine. Measured on the 2-core development CPU (load average 7): a width-16 ResNet-18
    batch ran at 11 images/s with the default (active) wait and 145 images/s with PASSIVE;
    `bench throughput --preset cpu` measured the service at 7.9 -> 13.4 images/s (loaded) and
    21.9 -> 32.9 (quiet). libgomp reads the variable once, when torch is first imported, so this
    runs before any command module is loaded.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `stainbridge` console script; returns the exit code."""
    _passive_openmp()
    argv = list(sys.argv[1:] if argv is None else argv)
    selected = _requested_path(argv)
    if selected and selected[0] in NOT_YET:
        print(f"{PROG} {selected[0]}: not available yet in this version", file=sys.stderr)
        return 2
    try:
        parser, module = build_parser(selected if selected in COMMANDS else ())
        args = parser.parse_args(argv)
        return _dispatch(args, module)
    except CommandNotAvailable as exc:
        print(f"{PROG} {exc}: not available yet in this version", file=sys.stderr)
        return 2
    except ConfigError as exc:
        print(f"{PROG}: configuration error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # Output piped into `head` and the like: stop quietly, as other command-line tools do.
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - keeps interpreter shutdown from failing again
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
