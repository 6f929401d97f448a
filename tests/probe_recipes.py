"""A development probe, not collected by pytest: averages of recipes, and label-free choices among them,
judged by the worst lab (issue 22's "ensemble" and "label-free choice per site" levers).

    python tests/probe_recipes.py runs/base-s0-bccd runs/base-s1-bccd ... runs/base-s2-chula [--json FILE]

Each argument is a transductive ``bench accuracy`` out-dir with its ``probabilities.safetensors`` (every
row's softmax on the target images). Runs are grouped by lab (the target folder's name) and seed. For the
candidate recipes (``CANDIDATES``: the label-free TTA rows) and their equal-weight averages
(``ENSEMBLES``), it prints each lab's balanced accuracy over the classes with >= 10 images, mean over the
seeds, and the minimum over the labs.

The label-free choice: per lab and seed, each candidate gets a score computed from the softmax outputs
of that site alone, no label read:

- ``confidence``: mean max probability; ``entropy``: minus the mean prediction entropy;
- ``agreement``: how often the recipe's class is the class of the average of every candidate;
- ``snd``: soft neighbourhood density (Saito et al. 2021, "Tune it the right way"): the entropy of each
  image's softmax-weighted similarity to the other images (cosine of the L2-normalized probability
  vectors, temperature 0.05), averaged; a dense, well-clustered output scores high.

A rule "take the candidate with the highest score" is then scored by the balanced accuracy of what it
took (``choice`` rows), against the best candidate with labels (``oracle``). Leave one lab out: the
criterion is chosen on the other labs (the one whose worst lab is best there) and applied to the one
left out; ``ranking`` reports Spearman's rho between each criterion's scores and the true accuracies per
lab and seed.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

import torch
from torch import Tensor

from stainbridge.models import checkpoint
from stainbridge.models.bench import learned

CANDIDATES = ("raw_tta", "reinhard_tta", "macenko_tta", "colour_map_tta", "raw_im_tta", "reinhard_im_tta",
              "colour_map_im_tta")
ENSEMBLES = {
    "avg(raw_im, reinhard_im)": ("raw_im_tta", "reinhard_im_tta"),
    "avg(reinhard_im, colour_map_im)": ("reinhard_im_tta", "colour_map_im_tta"),
    "avg(raw_im, reinhard_im, colour_map_im)": ("raw_im_tta", "reinhard_im_tta", "colour_map_im_tta"),
    "avg(reinhard, reinhard_im)": ("reinhard_tta", "reinhard_im_tta"),
    "avg(six)": ("raw_tta", "reinhard_tta", "colour_map_tta", "raw_im_tta", "reinhard_im_tta", "colour_map_im_tta"),
}
CRITERIA = ("confidence", "entropy", "agreement", "snd")


def soft_neighbourhood_density(probs: Tensor, temperature: float = 0.05) -> float:
    """SND (Saito et al. 2021) on the softmax outputs: mean entropy of each image's softmax over its
    similarities to the others; higher means denser neighbourhoods."""
    z = torch.nn.functional.normalize(probs.double(), dim=1)
    similarity = z @ z.T
    similarity.fill_diagonal_(float("-inf"))
    p = (similarity / temperature).softmax(1)
    return float(-(p * torch.log(p + 1e-12)).sum(1).mean())


def criteria(candidates: dict[str, Tensor]) -> dict[str, dict[str, float]]:
    """Per criterion, per candidate, the label-free score (higher = chosen)."""
    consensus = sum(candidates.values()).argmax(1)
    scores: dict[str, dict[str, float]] = {c: {} for c in CRITERIA}
    for name, p in candidates.items():
        scores["confidence"][name] = float(p.max(1).values.mean())
        scores["entropy"][name] = float((p * torch.log(p + 1e-12)).sum(1).mean())
        scores["agreement"][name] = float((p.argmax(1) == consensus).double().mean())
        scores["snd"][name] = soft_neighbourhood_density(p)
    return scores


def spearman(a: list[float], b: list[float]) -> float:
    def ranks(v: list[float]) -> list[float]:
        order = sorted(range(len(v)), key=v.__getitem__)
        r = [0.0] * len(v)
        for rank, i in enumerate(order):
            r[i] = float(rank)
        return r

    ra, rb = ranks(a), ranks(b)
    ma, mb = statistics.fmean(ra), statistics.fmean(rb)
    num = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    den = (sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb)) ** 0.5
    return num / den if den else 0.0


def load_run(folder: Path) -> tuple[str, int, dict[str, Tensor], Tensor, list[str]]:
    tensors, header = checkpoint.load_checkpoint(folder / "probabilities.safetensors")
    labels = tensors.pop("target_labels")
    return Path(header["target"]).name, int(header["seed"]), tensors, labels, header["classes"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    accuracy: dict[str, dict[str, dict[int, float]]] = defaultdict(lambda: defaultdict(dict))  # row -> lab -> seed
    scores: dict[str, dict[int, dict[str, dict[str, float]]]] = defaultdict(dict)  # lab -> seed -> criterion
    for folder in args.runs:
        lab, seed, probs, labels, classes = load_run(folder)
        rows = {name: probs[name] for name in CANDIDATES if name in probs}
        rows.update({e: sum(probs[m] for m in members) / len(members) for e, members in ENSEMBLES.items()
                     if all(m in probs for m in members)})
        for name, p in rows.items():
            accuracy[name][lab][seed] = learned.metrics_of(p, labels, classes)["balanced_accuracy_min10"]
        scores[lab][seed] = criteria({name: probs[name] for name in CANDIDATES if name in probs})
    labs = sorted(scores)

    def chosen(criterion: str, lab: str, seed: int) -> str:
        s = scores[lab][seed][criterion]
        return max(s, key=s.__getitem__)

    for criterion in CRITERIA:
        for lab in labs:
            for seed in scores[lab]:
                accuracy[f"choice by {criterion}"][lab][seed] = accuracy[chosen(criterion, lab, seed)][lab][seed]
    for lab in labs:
        for seed in scores[lab]:
            accuracy["oracle (best candidate, labels)"][lab][seed] = max(accuracy[c][lab][seed] for c in CANDIDATES
                                                                         if seed in accuracy[c][lab])

    def lab_mean(row: str, lab: str) -> float:
        return statistics.fmean(accuracy[row][lab].values())

    # leave one lab out: pick the criterion whose worst other lab is best, apply it to the lab left out
    for left_out in labs:
        others = [lab for lab in labs if lab != left_out] or labs
        best = max(CRITERIA, key=lambda c: min(lab_mean(f"choice by {c}", lab) for lab in others))
        for seed in scores[left_out]:
            accuracy["choice, criterion chosen without this lab"][left_out][seed] = \
                accuracy[f"choice by {best}"][left_out][seed]
        print(f"left out {left_out}: criterion chosen on {', '.join(others)}: {best}")

    table = {}
    print("| row | " + " | ".join(labs) + " | mean | min |")
    print("|---|" + "---|" * (len(labs) + 2))
    for row, per_lab in accuracy.items():
        if not all(lab in per_lab for lab in labs):
            continue
        cells = {lab: list(per_lab[lab].values()) for lab in labs}
        means = {lab: statistics.fmean(v) for lab, v in cells.items()}
        spread = {lab: statistics.stdev(v) if len(v) > 1 else 0.0 for lab, v in cells.items()}
        table[row] = {"labs": {lab: {"mean": means[lab], "std": spread[lab], "values": cells[lab]} for lab in labs},
                      "mean": statistics.fmean(means.values()), "min": min(means.values())}
        print(f"| {row} | " + " | ".join(f"{means[lab]:.3f} +- {spread[lab]:.3f}" for lab in labs)
              + f" | {table[row]['mean']:.3f} | {table[row]['min']:.3f} |")
    ranking = {c: {f"{lab}/s{seed}": spearman([scores[lab][seed][c][n] for n in scores[lab][seed][c]],
                                               [accuracy[n][lab][seed] for n in scores[lab][seed][c]])
                   for lab in labs for seed in scores[lab]} for c in CRITERIA}
    picks = {c: {f"{lab}/s{seed}": chosen(c, lab, seed) for lab in labs for seed in scores[lab]} for c in CRITERIA}
    for c in CRITERIA:
        print(f"{c}: rho " + ", ".join(f"{k} {v:+.2f}" for k, v in ranking[c].items()))
        print("  picks " + ", ".join(f"{k} {v}" for k, v in picks[c].items()))
    if args.json:
        args.json.write_text(json.dumps({"rows": table, "spearman": ranking, "picks": picks,
                                         "scores": scores}, indent=2))


if __name__ == "__main__":
    main()
