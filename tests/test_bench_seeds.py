"""`stainbridge bench seeds`: several bench results as mean and spread, mismatches refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from stainbridge.daemon.cli import main


def _result(tmp: Path, seed: int, raw: float, reinhard: float, *, preset: str = "cpu", extra: str = "") -> Path:
    def method(b: float, de: float) -> dict:
        return {"balanced_accuracy_min10": b, "delta_e": de}

    result = {
        "methods": {"raw": method(raw, 20.0), "reinhard": method(reinhard, 3.0)},
        "setup": {"preset": preset, "resolution_px": 64, "target": "/data/bccd", "reference": "/data/pbc",
                  "seed": seed, "geometry": {"magnification": 0.8},
                  "classifier": {"reference_metrics": {"test_accuracy": 0.97 + seed / 100}}},
    }
    if extra:
        result["methods"][extra] = method(0.5 + seed / 10, 4.0)
    path = tmp / f"s{seed}-{preset}{extra}.json"
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


def test_a_later_variants_run_of_a_seed_adds_its_rows(tmp_path: Path) -> None:
    files = [_result(tmp_path, 0, 0.70, 0.60), _result(tmp_path, 1, 0.74, 0.66),
             _result(tmp_path, 0, 0.70, 0.60, extra="colorization"), _result(tmp_path, 1, 0.74, 0.66, extra="colorization")]
    out = tmp_path / "summary.json"
    assert main(["bench", "seeds", *map(str, files), "--json", str(out)]) == 0
    summary = json.loads(out.read_text())["bccd"]
    assert summary["seeds"] == [0, 1]
    assert summary["methods"]["colorization"]["balanced_accuracy_min10"]["mean"] == pytest.approx(0.55)
    assert summary["methods"]["raw"]["balanced_accuracy_min10"]["n"] == 2


def test_a_same_seed_run_with_another_classifier_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    files = [_result(tmp_path, 0, 0.70, 0.60), _result(tmp_path, 0, 0.71, 0.60, extra="colorization")]
    assert main(["bench", "seeds", *map(str, files)]) == 2
    assert "not the same classifier" in capsys.readouterr().err
