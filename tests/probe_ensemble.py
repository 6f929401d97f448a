"""A development probe, not collected by pytest: does averaging the adapted recipes help (the issue's
"ensembles" lever)?

    python tests/probe_ensemble.py --reference ../shared/data/pbc --target ../shared/data/bccd \
        --run runs/s0-bccd [--size 64] [--seed 0]

`--run` is a transductive `bench accuracy` out-dir holding classifier.safetensors,
classifier_im_{raw,reinhard,colour_map}_transductive and standardizer_colour_map_transductive; `--size` and
`--seed` must be the ones that run used (the windows and the split are rebuilt from them). Each recipe
(standardizer, then its adapted classifier) scores the target windows through the service's predict with
the 8-view TTA, as the bench's `*_im_tta` rows; every combination of recipes is then scored on the mean of
their softmax outputs (label-free: an equal-weight average), and so are all six members: the three adapted
recipes and the reference classifier behind each of the three standardizers (``all_six``). Prints one JSON
line of balanced accuracy over the classes with >= 10 images; a single recipe reproduces its bench row.
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch

from stainbridge.models import inference
from stainbridge.models.bench import data as bench_data
from stainbridge.models.bench import learned

RECIPES = ("raw", "reinhard", "colour_map")


def recipe_probabilities(run: str, target01: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per recipe, the [N, C] TTA softmax of its adapted classifier behind its standardizer, and of the
    reference classifier behind it (``<recipe>_unadapted``)."""
    base = inference.load_classifier(f"{run}/classifier.safetensors", device="cpu")
    standardizers = {
        "raw": inference.load_standardizer("none"),
        "reinhard": inference.load_standardizer("reinhard", classifier=base),
        "colour_map": inference.load_standardizer(f"{run}/standardizer_colour_map_transductive.safetensors",
                                                  classifier=base),
    }
    probabilities = {}
    for name in RECIPES:
        adapted = inference.load_classifier(f"{run}/classifier_im_{name}_transductive.safetensors", device="cpu")
        probabilities[name] = learned.score(target01, standardizers[name], adapted)["tta"]
        probabilities[f"{name}_unadapted"] = learned.score(target01, standardizers[name], base)["tta"]
    return probabilities


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reference", required=True)
    parser.add_argument("--target", required=True)
    parser.add_argument("--run", required=True, help="a transductive bench accuracy out-dir")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = bench_data.prepare(args.reference, args.target, size=args.size, seed=args.seed, log=lambda *a: None)
    probabilities = recipe_probabilities(args.run, bench_data.to_float(data.target))
    scores = {}
    for count in range(1, len(RECIPES) + 1):
        for combination in itertools.combinations(RECIPES, count):
            mean = sum(probabilities[name] for name in combination) / count
            metrics = learned.metrics_of(mean, data.target_labels, data.classes)
            scores["+".join(combination)] = round(metrics["balanced_accuracy_min10"], 4)
    mean = sum(probabilities.values()) / len(probabilities)
    scores["all_six"] = round(learned.metrics_of(mean, data.target_labels, data.classes)["balanced_accuracy_min10"], 4)
    print(json.dumps({"run": args.run, "size": args.size, "seed": args.seed, **scores}))


if __name__ == "__main__":
    main()
