"""``stainbridge bench seeds``: several ``bench accuracy`` results (one per seed) as one table.

One training run is one sample. This reads the ``results.json`` of runs that differ only in
``--seed`` and prints, per target lab and method, the mean and the spread (min-max and sample
standard deviation) of the headline balanced accuracy, with the stain Delta E next to it, so a
difference can be read against run-to-run noise::

    stainbridge bench seeds runs/s0-bccd/results.json runs/s1-bccd/results.json ... [--markdown FILE] [--json FILE]

Given several labs (target folders), it also judges each method by its worst lab: per method, the
mean over the labs and the **minimum over the labs** of the per-lab seed means (the lab that gave it,
and each lab's spread beside it), and it names the method whose minimum is the best (``OVER_LABS``
in the JSON, after the per-lab entries). A method is compared only over labs where it was measured.

Runs of one target must share preset, resolution and target folder; a mismatch is an error
rather than a silently mixed mean. Several files of one seed are one run: a later ``--variants``
run that reused the seed's classifier adds its learned rows (the raw and classical rows, recomputed
with the same classifier, must agree with the first file's to within 1e-6, or it is refused).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

__all__ = ["OVER_LABS", "SeedsError", "markdown", "over_labs", "summarize"]

# Setup keys that must agree between the seeds of one target.
MUST_MATCH = ("preset", "resolution_px", "target", "reference")
HEADLINE = "balanced_accuracy_min10"
OVER_LABS = "over_labs"  # the summary's key for the judgement across labs (present with two labs or more)


class SeedsError(Exception):
    """The result files cannot be summarized together."""


def _load(path: Path) -> dict[str, Any]:
    try:
        result = json.loads(path.read_text())
        result["methods"], result["setup"]  # the two keys every bench result has
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SeedsError(f"{path}: not a `stainbridge bench accuracy` results JSON ({exc})") from exc
    return result


def _stats(values: list[float]) -> dict[str, Any]:
    return {"n": len(values), "mean": statistics.fmean(values), "min": min(values), "max": max(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0, "values": values}


def _merge_same_seed(path: Path, into: dict[str, Any], extra: dict[str, Any]) -> None:
    for name, metrics in extra["methods"].items():
        if name not in into["methods"]:
            into["methods"][name] = metrics
        elif abs(metrics["balanced_accuracy_min10"] - into["methods"][name]["balanced_accuracy_min10"]) > 1e-6:
            raise SeedsError(f"{path}: {name} scores {metrics['balanced_accuracy_min10']:.4f} where another run of "
                             f"seed {extra['setup'].get('seed')} scored "
                             f"{into['methods'][name]['balanced_accuracy_min10']:.4f}: not the same classifier")


def summarize(paths: list[Path]) -> dict[str, Any]:
    """{target name: {"setup": ..., "seeds": [...], "methods": {method: {metric: stats}}}}."""
    by_target: dict[str, list[tuple[Path, dict[str, Any]]]] = defaultdict(list)
    for path in paths:
        result = _load(path)
        runs = by_target[Path(result["setup"]["target"]).name]
        same = [r for _, r in runs if r["setup"].get("seed") == result["setup"].get("seed")]
        if same:
            _merge_same_seed(path, same[0], result)
        else:
            runs.append((path, result))
    if OVER_LABS in by_target:
        raise SeedsError(f"a target folder named {OVER_LABS!r} clashes with the summary's key for the labs "
                         "together; rename the folder")
    summary: dict[str, Any] = {}
    for target, runs in sorted(by_target.items()):
        first = runs[0][1]["setup"]
        for path, result in runs[1:]:
            for key in MUST_MATCH:
                if result["setup"].get(key) != first.get(key):
                    raise SeedsError(f"{path}: {key} {result['setup'].get(key)!r} differs from "
                                     f"{runs[0][0]}'s {first.get(key)!r}; summarize runs of one setup only")
        seeds = [r["setup"].get("seed") for _, r in runs]
        methods: dict[str, dict[str, Any]] = {}
        names = [m for m in runs[0][1]["methods"] if all(m in r["methods"] for _, r in runs)]
        for name in names:
            entry = {"balanced_accuracy_min10": _stats([r["methods"][name]["balanced_accuracy_min10"] for _, r in runs])}
            delta_e = [r["methods"][name].get("delta_e") for _, r in runs]
            if all(v is not None for v in delta_e):
                entry["delta_e"] = _stats(delta_e)
            methods[name] = entry
        home = [r["setup"]["classifier"]["reference_metrics"].get("test_accuracy") for _, r in runs]
        summary[target] = {
            "seeds": seeds, "preset": first["preset"], "resolution_px": first["resolution_px"],
            "magnification": [r["setup"]["geometry"].get("magnification") for _, r in runs],
            "reference_test_accuracy": _stats(home) if all(v is not None for v in home) else None,
            "methods": methods,
            "missing": sorted({m for _, r in runs for m in r["methods"]} - set(names)),
        }
    if len(summary) > 1:
        summary[OVER_LABS] = over_labs(summary)
    return summary


def over_labs(per_lab: dict[str, Any]) -> dict[str, Any]:
    """Per method measured on every lab: the mean and the minimum over the labs of its per-lab seed mean,
    the lab of that minimum, and each lab's stats; ``best_minimum``: the method whose worst lab is best."""
    labs = [lab for lab in per_lab if lab != OVER_LABS]
    names = [m for m in per_lab[labs[0]]["methods"] if all(m in per_lab[lab]["methods"] for lab in labs)]
    methods: dict[str, Any] = {}
    for name in names:
        stats = {lab: per_lab[lab]["methods"][name][HEADLINE] for lab in labs}
        worst = min(labs, key=lambda lab: stats[lab]["mean"])
        methods[name] = {"mean": statistics.fmean(s["mean"] for s in stats.values()), "min": stats[worst]["mean"],
                         "worst_lab": worst,
                         "labs": {lab: {k: s[k] for k in ("n", "mean", "std", "min", "max")} for lab, s in stats.items()}}
    best = max(methods, key=lambda m: methods[m]["min"]) if methods else None
    return {"labs": labs, "metric": HEADLINE, "methods": methods, "best_minimum": best,
            "not_on_every_lab": sorted({m for lab in labs for m in per_lab[lab]["methods"]} - set(names))}


def markdown(summary: dict[str, Any]) -> str:
    """Per target: method, balanced accuracy mean +- std (min-max), stain Delta E mean."""
    lines: list[str] = []
    for target, s in summary.items():
        if target == OVER_LABS:
            lines += _over_labs_markdown(s)
            continue
        home = s["reference_test_accuracy"]
        lines += [f"**{target}** (seeds {', '.join(map(str, s['seeds']))}; {s['preset']} preset, "
                  f"{s['resolution_px']} px; magnification {', '.join(f'{m:.3f}' for m in s['magnification'])}"
                  + (f"; PBC home test {home['mean']:.3f} ({home['min']:.3f}-{home['max']:.3f})" if home else "")
                  + ")", "",
                  "| method | balanced acc, mean +- std | min-max | stain Delta E |", "|---|---|---|---|"]
        for name, m in s["methods"].items():
            b = m["balanced_accuracy_min10"]
            de = f"{m['delta_e']['mean']:.1f}" if "delta_e" in m else "-"
            lines.append(f"| {name} | {b['mean']:.3f} +- {b['std']:.3f} | {b['min']:.3f}-{b['max']:.3f} | {de} |")
        if s["missing"]:
            lines.append(f"\nNot in every run (left out): {', '.join(s['missing'])}.")
        lines.append("")
    return "\n".join(lines)


def _over_labs_markdown(o: dict[str, Any]) -> list[str]:
    """Methods by their worst lab: each lab's mean +- std (min-max), the mean and the minimum over the labs."""
    labs = o["labs"]
    title = (f"**Over the labs** ({', '.join(labs)}): each lab's value is its mean over the seeds; methods "
             "sorted by the minimum over the labs")
    lines = [title, "",
             "| method | " + " | ".join(labs) + " | mean over labs | min over labs (lab) |",
             "|---|" + "---|" * (len(labs) + 2)]
    for name, m in sorted(o["methods"].items(), key=lambda item: -item[1]["min"]):
        cells = [f"{s['mean']:.3f} +- {s['std']:.3f} ({s['min']:.3f}-{s['max']:.3f})" for s in m["labs"].values()]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {m['mean']:.3f} | {m['min']:.3f} ({m['worst_lab']}) |")
    if o["best_minimum"]:
        best = o["methods"][o["best_minimum"]]
        lines += ["", (f"Best minimum over the labs: **{o['best_minimum']}**, {best['min']:.3f} "
                       f"(its worst lab: {best['worst_lab']}).")]
    if o["not_on_every_lab"]:
        lines.append(f"\nNot measured on every lab (not compared): {', '.join(o['not_on_every_lab'])}.")
    lines.append("")
    return lines


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("results", nargs="+", type=Path, help="results.json of `bench accuracy` runs, one per seed")
    parser.add_argument("--markdown", type=Path, default=None, help="also write the table here")
    parser.add_argument("--json", type=Path, default=None, help="also write the summary here")


def run(args: argparse.Namespace) -> int:
    try:
        summary = summarize(list(args.results))
    except SeedsError as exc:
        print(f"stainbridge bench seeds: {exc}", file=sys.stderr)
        return 2
    text = markdown(summary)
    print(text)
    if args.markdown:
        args.markdown.write_text(text)
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    return 0
