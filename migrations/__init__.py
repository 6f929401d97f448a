"""Alembic migrations of the stainbridge schema (`stainbridge db upgrade`; the service runs them on SQLite)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType


def frozen_revision(filename: str) -> ModuleType:
    """Load a revision file of versions/ as a module, to reuse the frozen SQL it holds (e.g. its views).

    Revision files are not importable by name (they start with a digit), and a later revision re-creates
    an earlier one's views from that file's text rather than from a third copy.
    """
    path = Path(__file__).resolve().parent / "versions" / filename
    spec = importlib.util.spec_from_file_location(f"stainbridge_migration_{path.stem}", path)
    if spec is None or spec.loader is None:
        raise FileNotFoundError(f"no migration file {path}; is the stainbridge installation complete?")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
