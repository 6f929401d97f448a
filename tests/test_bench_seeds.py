"""`stainbridge bench seeds`: several bench results as mean and spread, mismatches refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from stainbridge.daemon.cli import main


def _result(tmp: Path, seed: int, raw: float, reinhard: float, *, preset: str = "cpu", extra: str = "",
            lab: str = "bccd") -> Path:
    def method(b: float, de: float) -> dict:
        return {"balanced_accuracy_min10": b, "delta_e": de}

    result = {
        "methods": {"raw": method(raw, 20.0), "reinhard": method(reinhard, 3.0)},
        "setup": {"preset": preset, "resolution_px": 64, "target": f"/data/{lab}", "reference": "/data/pbc",
                  "seed": seed, "geometry": {"magnification": 0.8},
                  "classifier": {"reference_metrics": {"test_accuracy": 0.97 + seed / 100}}},
    }
    if extra:
        result["methods"][extra] = method(0.5 + seed / 10, 4.0)
    path = tmp / f"s{seed}-{preset}{extra}-{lab}.json"
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


def test_several_labs_judge_each_method_by_its_worst_lab(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Over labs, each method gets the mean and the minimum of its per-lab seed means; the best minimum is named."""
    files = [_result(tmp_path, s, raw, rh, lab="bccd") for s, raw, rh in ((0, 0.90, 0.70), (1, 0.92, 0.72))]
    files += [_result(tmp_path, s, raw, rh, lab="chula") for s, raw, rh in ((0, 0.30, 0.80), (1, 0.34, 0.84))]
    out = tmp_path / "summary.json"
    assert main(["bench", "seeds", *map(str, files), "--json", str(out)]) == 0
    summary = json.loads(out.read_text())
    assert summary["bccd"]["methods"]["raw"]["balanced_accuracy_min10"]["mean"] == pytest.approx(0.91)
    over = summary["over_labs"]
    assert over["labs"] == ["bccd", "chula"]
    raw, reinhard = over["methods"]["raw"], over["methods"]["reinhard"]
    assert raw["mean"] == pytest.approx(0.615) and raw["min"] == pytest.approx(0.32) and raw["worst_lab"] == "chula"
    assert reinhard["min"] == pytest.approx(0.71) and reinhard["worst_lab"] == "bccd"
    assert reinhard["labs"]["chula"]["min"] == pytest.approx(0.80) and reinhard["labs"]["chula"]["max"] == 0.84
    assert over["best_minimum"] == "reinhard"
    printed = capsys.readouterr().out
    assert "| reinhard | 0.710 +- 0.014 (0.700-0.720) | 0.820 +- 0.028 (0.800-0.840) | 0.765 | 0.710 (bccd) |" in printed
    assert "Best minimum over the labs: **reinhard**, 0.710" in printed


def test_one_lab_has_no_judgement_over_labs(tmp_path: Path) -> None:
    """With a single lab the summary keeps its old shape: no over-labs entry."""
    out = tmp_path / "summary.json"
    assert main(["bench", "seeds", str(_result(tmp_path, 0, 0.7, 0.6)), "--json", str(out)]) == 0
    assert list(json.loads(out.read_text())) == ["bccd"]


def test_a_method_missing_on_one_lab_is_not_compared(tmp_path: Path) -> None:
    """A row measured on one lab only is listed as not on every lab, never given a minimum."""
    files = [_result(tmp_path, 0, 0.7, 0.6, lab="bccd", extra="colorization"), _result(tmp_path, 0, 0.5, 0.8, lab="lisc")]
    out = tmp_path / "summary.json"
    assert main(["bench", "seeds", *map(str, files), "--json", str(out)]) == 0
    over = json.loads(out.read_text())["over_labs"]
    assert "colorization" not in over["methods"] and over["not_on_every_lab"] == ["colorization"]
    assert over["best_minimum"] == "reinhard"
