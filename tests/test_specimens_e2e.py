"""Specimens through the real service (docs/lab.md, "Specimens: the differential per slide").

`stainbridge run` receives two sites by drop sub-folder, each with two specimens in sub-folders under the site's
folder, plus a file right in a site's folder (no specimen). `specimen_differentials` must hold one row per
specimen and class with percentages summing to 100, and the report's specimen tables and `export` must say
the same.
"""

from __future__ import annotations

import csv
import io
import re
import subprocess
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest

from stainbridge.models.abstention import MODES
from stainbridge.models.checkpoint import load_checkpoint, save_checkpoint
from tests.daemon_helpers import (
    CLASSES,
    STAINBRIDGE,
    Daemon,
    TinyModels,
    build_tiny_models,
    query,
    subprocess_env,
    wait_for,
    write_cell,
    write_config,
)

pytestmark = pytest.mark.slow
LAYOUT = {("hospital-a", "BS-101"): 5, ("hospital-a", "BS-102"): 3, ("hospital-b", "BS-201"): 4,
          ("hospital-b", "BS-202"): 2}


def _counting_models(folder: Path) -> TinyModels:
    """The tiny models with a calibration that flags no cell (random weights are never confident): every cell is
    counted, so the percentages are those of every cell (the view's flagged cells: tests/test_lab_views.py)."""
    tiny = build_tiny_models(folder)
    state, header = load_checkpoint(tiny.classifier)
    header["abstention"] = {"modes": {mode: {"temperature": 1.0} for mode in MODES}, "confidence_below": 0.001}
    counting = folder / "counting.safetensors"
    return replace(tiny, classifier=counting, classifier_sha256=save_checkpoint(counting, state, header))


def _stainbridge(config: Path, *args: str) -> str:
    done = subprocess.run([str(STAINBRIDGE), "--config", str(config), *args], env=subprocess_env(),
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, f"stainbridge {' '.join(args)}: {done.stderr[-3000:]}"
    return done.stdout


def test_specimen_folders_of_two_sites_give_differentials_that_report_and_export_agree_on(tmp_path) -> None:
    """Files in specimen sub-folders of two sites -> one view row per specimen and class, percentages summing to
    100 -> the report's specimen tables and `export` count the same cells."""
    url = f"sqlite:///{tmp_path / 'state' / 'stainbridge.db'}"
    config = write_config(tmp_path / "stainbridge.toml", tmp_path, url, _counting_models(tmp_path / "models"),
                          site={"name": "home", "source": "folder"}, lab={"min_cells": 4})
    drop = tmp_path / "drop"
    daemon = Daemon(config, tmp_path).start()
    try:
        seed = 0
        for (site, specimen), n in LAYOUT.items():
            for i in range(n):
                seed += 1
                write_cell(drop / site / specimen / f"cell-{i}.png", seed=seed, label=CLASSES[seed % len(CLASSES)])
        write_cell(drop / "hospital-a" / "loose.png", seed=99)
        total = sum(LAYOUT.values()) + 1
        wait_for(lambda: query(url, "SELECT count(*) FROM images WHERE status = 'done'")[0][0] == total, 180,
                 "every file classified")
    finally:
        assert daemon.stop() == 0
        daemon.close()

    assert query(url, "SELECT specimen FROM images WHERE source_name = 'hospital-a/loose.png'") == [(None,)]
    view = query(url, "SELECT site, specimen, label, cells, percent, flagged, cells_counted, cells_flagged "
                      "FROM specimen_differentials ORDER BY site, specimen, label")
    specimens = {(site, specimen) for site, specimen, *_ in view}
    assert specimens == set(LAYOUT)
    for key, n in LAYOUT.items():
        rows = [r for r in view if (r[0], r[1]) == key]
        assert {(r[6], r[7]) for r in rows} == {(n, 0)}  # cells counted, flagged: every cell, on every class row
        assert sum(r[3] for r in rows) == n and sum(r[4] for r in rows) == pytest.approx(100.0)

    exported = list(csv.DictReader(io.StringIO(_stainbridge(config, "export", "--format", "csv"))))
    from_export = Counter((r["site"], r["specimen"], r["label"]) for r in exported
                          if r["specimen"] and r["status"] == "done" and r["needs_review"] != "True")
    assert from_export == Counter({(site, specimen, label): cells for site, specimen, label, cells, *_ in view
                                   if cells})

    report = tmp_path / "report.html"
    _stainbridge(config, "report", "--out", str(report))
    html = report.read_text(encoding="utf-8")
    for site, specimen, label, cells, percent, *_ in view:
        if percent is None:
            continue
        row = re.search(rf'<table class="specimens" data-site="{site}">.*?<tr data-specimen="{specimen}">(.*?)</tr>',
                        html, re.DOTALL)
        assert row, f"no report row for {site}/{specimen}"
        cell = re.search(rf'data-label="{label}">([^<]*)</td>', row.group(1))
        assert cell and cell.group(1) == f"{percent:.1f} ({cells})", (site, specimen, label)
    for specimen, n in (("BS-102", 3), ("BS-202", 2)):  # fewer than [lab] min_cells
        row = re.search(rf'<tr data-specimen="{specimen}">(.*?)</tr>', html, re.DOTALL).group(1)
        assert f"{n} cells counted (fewer than 4)" in row
    assert "cells counted (fewer than" not in re.search(r'<tr data-specimen="BS-101">(.*?)</tr>', html, re.DOTALL).group(1)

    only_b = tmp_path / "report-b.html"
    _stainbridge(config, "report", "--site", "hospital-b", "--out", str(only_b))
    html_b = only_b.read_text(encoding="utf-8")
    assert 'data-site="hospital-b"' in html_b and 'data-site="hospital-a"' not in html_b
