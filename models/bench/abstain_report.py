"""The numbers and tables of ``stainbridge bench abstain`` (``models.bench.abstain``): flagged shares,
risk-coverage, calibration error, the separation of other cells by each candidate score, means over seeds."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from stainbridge.models import abstention

__all__ = ["COVERAGE_THRESHOLDS", "auroc", "markdown", "over_seeds", "separation", "summary"]

# Calibrated-confidence thresholds of the risk-coverage table (the checkpoint's own is one row of it too).
COVERAGE_THRESHOLDS = (0.0, 0.5, 0.7, 0.8, 0.9, 0.95)


def _share(flags: Sequence[bool]) -> float:
    return sum(flags) / len(flags) if flags else 0.0


def summary(outcome: dict[str, list[Any]], labels: Sequence[str], confidence_below: float, *,
            known: bool = True) -> dict[str, Any]:
    """One set's flagged share (overall, per reason, per true class) and, for cells of the known classes, the
    accuracy of the cells not flagged, the risk-coverage rows and the calibration error before and after."""
    reasons = outcome["reason"]
    flagged = [r is not None for r in reasons]
    out: dict[str, Any] = {
        "n": len(reasons), "flagged": _share(flagged),
        "by_reason": {r: _share([x == r for x in reasons]) for r in abstention.REASONS},
        "by_class": {c: _share([f for f, label in zip(flagged, labels, strict=True) if label == c])
                     for c in sorted(set(labels))},
    }
    if not known:
        return out
    correct = [p == t for p, t in zip(outcome["label"], labels, strict=True)]
    confidence = [c if c is not None else raw for c, raw in zip(outcome["calibrated"], outcome["confidence"], strict=True)]
    ood = [r == "not_a_known_class" for r in reasons]
    rows = []
    for threshold in sorted({*COVERAGE_THRESHOLDS, confidence_below}):
        kept = [ok for ok, o, c in zip(correct, ood, confidence, strict=True) if not o and c >= threshold]
        rows.append({"confidence_below": threshold, "flagged": 1 - len(kept) / len(correct),
                     "accuracy_unflagged": _share(kept) if kept else None, "checkpoint": threshold == confidence_below})
    right = torch.tensor(correct)
    out.update(accuracy_all=_share(correct),
               accuracy_unflagged=_share([ok for ok, f in zip(correct, flagged, strict=True) if not f]) if not all(flagged) else None,
               ece_before=abstention.calibration_error(torch.tensor(outcome["confidence"]), right),
               ece_after=abstention.calibration_error(torch.tensor(confidence), right),
               risk_coverage=rows)
    return out


def auroc(inside: Tensor, outside: Tensor) -> float:
    """P(score of an outside cell > score of an inside cell), ties counted half (Mann-Whitney)."""
    scores = torch.cat([inside.double(), outside.double()])
    ranks = torch.empty_like(scores)
    order = scores.argsort()
    ranks[order] = torch.arange(1, len(scores) + 1, dtype=torch.float64)
    for value in scores.unique():  # average ranks of ties
        tied = scores == value
        if int(tied.sum()) > 1:
            ranks[tied] = ranks[tied].mean()
    n_in, n_out = len(inside), len(outside)
    return float((ranks[n_in:].sum() - n_out * (n_out + 1) / 2) / (n_in * n_out))


def separation(val: Tensor, test: Tensor, other: Tensor, rate: float) -> dict[str, float]:
    """One OOD score thresholded where ``rate`` of the validation cells lie above it: the shares of test and of
    other cells above, and the AUROC of other against test."""
    threshold = float(torch.quantile(val.double(), 1 - rate))
    return {"threshold": threshold, "test_flagged": float((test > threshold).double().mean()),
            "other_flagged": float((other > threshold).double().mean()), "auroc": auroc(test, other)}


def _stats(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "min": min(values), "max": max(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def _maybe_stats(values: list[float | None]) -> dict[str, float] | None:
    """None when some seed flagged every cell (no accuracy of the rest to average)."""
    return None if None in values else _stats(values)  # type: ignore[arg-type]


def over_seeds(seeds: list[dict[str, Any]], modes: Sequence[str]) -> dict[str, Any]:
    """Mean, min, max and std over seeds of every headline number, per mode."""
    out: dict[str, Any] = {}
    for mode in modes:
        runs = [s[mode] for s in seeds]
        sets = [k for k in runs[0] if k != "alternatives"]
        entry: dict[str, Any] = {"other_flagged": _stats([r["other"]["flagged"] for r in runs]),
                                 "reference_test_flagged": _stats([r["reference_test"]["flagged"] for r in runs])}
        entry["other_by_class"] = {c: _stats([r["other"]["by_class"][c] for r in runs]) for c in runs[0]["other"]["by_class"]}
        for name in sets:
            if "accuracy_all" not in runs[0][name]:
                continue
            entry[name] = {k: _stats([r[name][k] for r in runs]) for k in ("flagged", "accuracy_all", "ece_before", "ece_after")}
            entry[name]["accuracy_unflagged"] = _maybe_stats([r[name]["accuracy_unflagged"] for r in runs])
            entry[name]["risk_coverage"] = [
                {"confidence_below": row["confidence_below"], "checkpoint": row["checkpoint"],
                 "flagged": _stats([r[name]["risk_coverage"][i]["flagged"] for r in runs]),
                 "accuracy_unflagged": _maybe_stats([r[name]["risk_coverage"][i]["accuracy_unflagged"] for r in runs])}
                for i, row in enumerate(runs[0][name]["risk_coverage"])]
        entry["alternatives"] = {m: {k: _stats([r["alternatives"][m][k] for r in runs])
                                     for k in ("test_flagged", "other_flagged", "auroc")}
                                 for m in runs[0]["alternatives"]}
        out[mode] = entry
    return out


def _f(s: dict[str, float] | None) -> str:
    if s is None:
        return "-"
    return f"{s['mean']:.3f} ({s['min']:.3f}-{s['max']:.3f})"


def _threshold_name(row: dict[str, Any]) -> str:
    if row["confidence_below"] == 0:
        return "OOD only"
    return f"< {row['confidence_below']}" + (" (checkpoint)" if row["checkpoint"] else "")


def _coverage_cell(row: dict[str, Any]) -> str:
    accuracy = row["accuracy_unflagged"]
    return f"{row['flagged']['mean']:.2f} / {accuracy['mean']:.3f}" if accuracy else f"{row['flagged']['mean']:.2f} / -"


def markdown(result: dict[str, Any]) -> str:
    """The tables for docs: mean (min-max) over the seeds."""
    setup, summary_ = result["setup"], result["summary"]
    lines = [f"Seeds {', '.join(map(str, setup['seeds']))}; preset {setup['preset']}; through {setup['through']}.", ""]
    for mode, s in summary_.items():
        lines += [f"**{mode}** (mean (min-max) over seeds)", "",
                  f"- other cells flagged: {_f(s['other_flagged'])}; per class: "
                  + ", ".join(f"{c} {_f(v)}" for c, v in s["other_by_class"].items()),
                  f"- reference test cells flagged: {_f(s['reference_test_flagged'])}", "",
                  "| cells | flagged | accuracy, all | accuracy, not flagged | ECE before | ECE after |",
                  "|---|---|---|---|---|---|"]
        for name, e in s.items():
            if isinstance(e, dict) and "accuracy_all" in e:
                lines.append(f"| {name} | {_f(e['flagged'])} | {_f(e['accuracy_all'])} | {_f(e['accuracy_unflagged'])} "
                             f"| {_f(e['ece_before'])} | {_f(e['ece_after'])} |")
        coverage = {name: e["risk_coverage"] for name, e in s.items() if isinstance(e, dict) and "risk_coverage" in e}
        first = next(iter(coverage.values()))
        lines += ["", ("Risk-coverage, share flagged / accuracy of the cells not flagged (mean over seeds; "
                       "not_a_known_class always flagged, and calibrated confidence below the threshold):"), "",
                  "| cells | " + " | ".join(_threshold_name(r) for r in first) + " |", "|---" * (len(first) + 1) + "|"]
        lines += [f"| {name} | " + " | ".join(_coverage_cell(r) for r in rows) + " |" for name, rows in coverage.items()]
        lines += ["", "OOD scores, each thresholded on the checkpoint's share of validation cells:", "",
                  "| score | test flagged | other flagged | AUROC other vs test |", "|---|---|---|---|"]
        for method, m in s["alternatives"].items():
            lines.append(f"| {method} | {_f(m['test_flagged'])} | {_f(m['other_flagged'])} | {_f(m['auroc'])} |")
        lines.append("")
    return "\n".join(lines)
