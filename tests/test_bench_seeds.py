"""`stainbridge bench seeds`: several bench results as mean and spread, mismatches refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from stainbridge.daemon.cli import main


def _result(tmp: Path, seed: int, raw: float, reinhard: float, *, preset: str = "cpu") -> Path:
    def method(b: float, de: float) -> dict:
        return {"balanced_accuracy_min10": b, "delta_e": de}

    result = {
        "methods": {"raw": method(raw, 20.0), "reinhard": method(reinhard, 3.0)},
        "setup": {"preset": preset, "resolution_px": 64, "target": "/data/bccd", "reference": "/data/pbc",
                  "seed": seed, "geometry": {"magnification": 0.8},
                  "classifier": {"reference_metrics": {"test_accuracy": 0.97 + seed / 100}}},
    }
    path = tmp / f"s{seed}-{preset}.json"
    path.write_text(json.dumps(result))
    return path


def test_seeds_give_mean_and_spread_per_method(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    files = [_result(tmp_path, 0, 0.70, 0.60), _result(tmp_path, 1, 0.74, 0.66), _result(tmp_path, 2, 0.72, 0.63)]
    out = tmp_path / "summary.json"
    assert main(["bench", "seeds", *map(str, files), "--json", str(out), "--markdown", str(tmp_path / "s.md")]) == 0
    summary = json.loads(out.read_text())["bccd"]
    raw = summary["methods"]["raw"]["balanced_accuracy_min10"]
    assert raw["n"] == 3 and raw["mean"] == pytest.approx(0.72) and raw["min"] == 0.70 and raw["max"] == 0.74
    assert raw["std"] == pytest.approx(0.02)
    assert summary["methods"]["reinhard"]["delta_e"]["mean"] == pytest.approx(3.0)
    assert summary["reference_test_accuracy"]["mean"] == pytest.approx(0.98)
    printed = capsys.readouterr().out
    assert "| raw | 0.720 +- 0.020 | 0.700-0.740 | 20.0 |" in printed


def test_runs_of_different_setups_are_not_averaged(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    files = [_result(tmp_path, 0, 0.7, 0.6), _result(tmp_path, 1, 0.7, 0.6, preset="tiny")]
    assert main(["bench", "seeds", *map(str, files)]) == 2
    assert "preset" in capsys.readouterr().err
