"""stainbridge bench abstain: which cells the service flags for review, measured on real cells.

    stainbridge bench abstain --reference DIR --other DIR --target DIR [DIR ...] [--seeds 0 1 2]
        [--preset tiny|cpu|full] [--standardizers none reinhard] [--modes tta plain] [--out-dir DIR]
        [--json FILE] [--markdown FILE] [--threads N] [--device auto|cpu|cuda]

Per seed, the benchmark's reference classifier (``models.bench.training``, as ``bench accuracy`` trains
it: the preset's network and size, stain augmentation, calibrated at the end; reused from
``<out-dir>/s<seed>/classifier.safetensors`` when one fits, and calibrated there first if it predates
calibration) scores, through the service's own ``inference.run_batch`` (geometry, standardizer,
classifier, 8-view TTA as ``[models] tta``, the flag and its reason):

- the reference's held-out test split and ``--other``, reference-lab cells of classes outside the five
  (``../shared/data/pbc_other``): the share of each flagged (targets: >= 0.90 of the other cells
  against <= 0.05 of the test cells);
- each ``--target`` lab (labels for scoring only; its magnification estimated without labels as the
  site profile does), behind each ``--standardizers`` entry: the accuracy of the cells not flagged
  against the share flagged, at the checkpoint's thresholds and along a risk-coverage table of
  calibrated-confidence thresholds;
- the expected calibration error before (the plain softmax) and after temperature scaling on every set.

It also scores the other cells against the test cells with the scores the flag could have used
(max softmax, energy, the Mahalanobis distance, the relative one it uses, the k-nearest-neighbour
distance), each thresholded as the checkpoint is, on the same share of validation cells, with the
AUROC of each: the measurement behind the choice.
Results: ``--json`` (per seed and the mean, min and max over seeds) and ``--markdown``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from stainbridge.models import abstention, checkpoint, inference
from stainbridge.models.bench import abstain_report as report
from stainbridge.models.bench import data as bench_data
from stainbridge.models.bench import learned
from stainbridge.models.bench import training as bench_train
from stainbridge.models.bench.accuracy import PRESETS
from stainbridge.models.imaging import classical, data, site_geometry
from stainbridge.models.training import calibrate
from stainbridge.models.training import runtime as tu

__all__ = ["add_arguments", "main", "run"]

BATCH = 64
MODES = ("tta", "plain")


def _log(msg: str) -> None:
    print(f"[bench abstain] {msg}", file=sys.stderr, flush=True)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--reference", required=True, help="labeled reference-lab folder (the classifier trains here)")
    parser.add_argument("--other", required=True,
                        help="reference-lab cells of classes outside the reference's, one sub-folder per class")
    parser.add_argument("--target", required=True, nargs="+", help="labeled folders of other labs (labels score only)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="one classifier per seed (default 0)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu", help="the bench accuracy preset to train")
    parser.add_argument("--standardizers", nargs="+", default=["none", "reinhard"],
                        choices=("none", *inference.CLASSICAL_STANDARDIZERS),
                        help="in front of the classifier on the target labs (default none reinhard)")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES),
                        help="tta: the 8-view mean, as the service by default ([models] tta); plain: one view")
    parser.add_argument("--out-dir", default="runs/bench-abstain", help="classifiers per seed (s<seed>/), reused")
    parser.add_argument("--json", default=None, help="results JSON (default <out-dir>/abstain.json)")
    parser.add_argument("--markdown", default=None, help="tables (default <out-dir>/abstain.md)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Flagged cells on real data", add_help=add_help)
    add_arguments(parser)
    return parser


# --------------------------------------------------------------------------- the classifier of one seed


def _classifier(opts: argparse.Namespace, seed: int, device: torch.device) -> tuple[Path, bench_data.BenchData]:
    """The seed's calibrated reference classifier file (trained, reused, or reused and calibrated) and its data."""
    preset = PRESETS[opts.preset]
    d = bench_data.prepare(opts.reference, opts.target[0], size=preset["size"], window_fraction=preset["window_fraction"],
                           seed=seed, log=_log)
    folder = Path(opts.out_dir) / f"s{seed}"
    path = folder / "classifier.safetensors"
    loaded = bench_train.load_reference_classifier(path, d, device)
    if loaded is None:
        _log(f"training the seed {seed} reference classifier ({preset['arch']}, {preset['size']} px)")
        bench_train.train_reference_classifier(
            d, path, arch=preset["arch"], epochs=preset["epochs"], batch_size=preset["batch_size"], lr=preset["lr"],
            strength=learned.STAIN_STRENGTH, seed=seed, reference_root=opts.reference, device=device, log=_log)
        return path, d
    model, header = loaded
    if header.get("abstention"):
        return path, d
    calibrated = folder / "classifier_calibrated.safetensors"
    if not calibrated.exists():
        _log(f"{path} predates calibration: fitting it on the seed's split -> {calibrated.name}")
        state, _ = checkpoint.load_checkpoint(path)
        tensors, record = bench_train.calibrate_reference_classifier(model, header, d, device)
        state, new = calibrate.with_abstention(state, header, tensors, record)
        new["training_data"] = {**new["training_data"], "calibrated_from": header["sha256"]}
        checkpoint.save_checkpoint(calibrated, state, tu.jsonable(new))
        Path(f"{calibrated}.split.json").write_bytes(Path(f"{path}.split.json").read_bytes())
    return calibrated, d


# --------------------------------------------------------------------------- scoring through run_batch


def _score_files(paths: Sequence[Path], standardizer: inference.Standardizer, clf: inference.Classifier, *,
                 scale: str, tta: bool) -> dict[str, Any]:
    """Each file through ``inference.run_batch``: label, confidence, calibrated confidence, OOD score, reason."""
    out: dict[str, list[Any]] = {"label": [], "confidence": [], "calibrated": [], "ood": [], "reason": []}
    for start in range(0, len(paths), BATCH):
        images = [data.load_rgb(p) for p in paths[start:start + BATCH]]
        for r in inference.run_batch(images, standardizer, clf, scale=scale, tta=tta):
            out["label"].append(r.label)
            out["confidence"].append(r.confidence)
            out["calibrated"].append(r.calibrated_confidence)
            out["ood"].append(r.ood_score)
            out["reason"].append(r.review_reason)
    return out


def _outputs(clf: inference.Classifier, paths: Sequence[Path], *, tta: bool) -> tuple[Tensor, Tensor]:
    """(logits [V,N,C], features [V,N,D]) of reference-lab files (magnification 1, no standardizer)."""
    geometry = inference.resolve_geometry(clf, None, scale="1.0")
    logits, features = [], []
    for batch in calibrate.image_batches(list(paths), geometry, BATCH):
        z, f = inference.view_outputs(clf, batch, tta=tta)
        logits.append(z)
        features.append(f)
    return torch.cat(logits, 1), torch.cat(features, 1)


def _alternatives(clf: inference.Classifier, sets: dict[str, Sequence[Path]], *, tta: bool) -> dict[str, Any]:
    """The scores the OOD flag could use, of the other cells against the test cells, each thresholded on the
    checkpoint's share of validation cells: max softmax, energy (Liu et al. 2020), the Mahalanobis distance to
    the nearest class (Lee et al. 2018), the relative one the checkpoint uses (Ren et al. 2021), and the
    distance to the 10th nearest training cell of L2-normalized features (Sun et al. 2022)."""
    train = torch.nn.functional.normalize(_outputs(clf, sets["train"], tta=False)[1][0].double(), dim=1)
    density = clf.abstention.density
    scores: dict[str, dict[str, Tensor]] = {}
    for name in ("val", "test", "other"):
        z, f = _outputs(clf, sets[name], tta=tta)
        mean = f.double().mean(0)
        scores[name] = {"max_softmax": -abstention.tempered_probabilities(z, 1.0).max(1).values,
                        "energy": -torch.logsumexp(z.double(), dim=2).mean(0),
                        "mahalanobis": density.class_distance(mean),
                        "relative_mahalanobis": density.score(mean),
                        "knn10": torch.cdist(torch.nn.functional.normalize(mean, dim=1), train).topk(
                            10, largest=False).values[:, -1]}
    rate = float(clf.abstention.record["ood_val_rate"])
    return {method: report.separation(scores["val"][method], scores["test"][method], scores["other"][method], rate)
            for method in scores["val"]}


def _seed_results(opts: argparse.Namespace, seed: int, device: torch.device) -> dict[str, Any]:
    path, d = _classifier(opts, seed, device)
    clf = inference.load_classifier(path, device=str(device))
    _log(f"seed {seed}: {path.name} ({clf.abstention.describe()})")
    reference = Path(opts.reference)
    index = {c: i for i, c in enumerate(clf.classes)}
    test = [reference / rel for rel in d.manifest["test"]]
    test_labels = [Path(rel).parts[0] for rel in d.manifest["test"]]
    other = data.list_labeled(opts.other)
    none = inference.load_standardizer("none")
    targets = {}
    for folder in opts.target:
        items = data.list_labeled(folder)
        unknown = sorted({label for _, label in items} - set(index))
        if unknown:
            raise bench_data.BenchDataError(f"{folder} has classes {unknown} the classifier does not know")
        profile = site_geometry.estimate_site_profile([p for p, _ in items], clf.header["geometry"])
        targets[Path(folder).name] = (items, profile)
    result: dict[str, Any] = {"seed": seed, "classifier": {"path": str(path), "sha256": clf.sha256,
                                                           "abstention": clf.abstention.record,
                                                           "reference_metrics": clf.header.get("metrics", {})},
                              "magnification": {name: p["magnification"] for name, (_, p) in targets.items()}}
    for mode in opts.modes:
        tta = mode == "tta"
        started = time.monotonic()
        scored = {"reference_test": report.summary(_score_files(test, none, clf, scale="1.0", tta=tta), test_labels,
                                                   clf.abstention.confidence_below),
                  "other": report.summary(_score_files([p for p, _ in other], none, clf, scale="1.0", tta=tta),
                                          [c for _, c in other], clf.abstention.confidence_below, known=False)}
        for name, (items, profile) in targets.items():
            for spec in opts.standardizers:
                standardizer = inference.load_standardizer(spec, classifier=clf)
                outcome = _score_files([p for p, _ in items], standardizer, clf, scale=str(profile["magnification"]),
                                       tta=tta)
                scored[f"{name}/{spec}"] = report.summary(outcome, [c for _, c in items], clf.abstention.confidence_below)
        sets = {split: [reference / rel for rel in d.manifest[split]] for split in ("train", "val")}
        scored["alternatives"] = _alternatives(clf, {**sets, "test": test, "other": [p for p, _ in other]}, tta=tta)
        result[mode] = scored
        _log(f"seed {seed} {mode}: other flagged {scored['other']['flagged']:.3f}, reference test flagged "
             f"{scored['reference_test']['flagged']:.3f} ({time.monotonic() - started:.0f} s)")
    return result


def main(args: argparse.Namespace) -> dict[str, Any]:
    started = time.monotonic()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = inference.resolve_device(args.device)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    seeds = [_seed_results(args, seed, device) for seed in args.seeds]
    result = {"setup": {"reference": str(Path(args.reference).resolve()), "other": str(Path(args.other).resolve()),
                        "targets": [str(Path(t).resolve()) for t in args.target], "preset": args.preset,
                        "standardizers": args.standardizers, "modes": args.modes, "seeds": args.seeds,
                        "through": "models.inference.run_batch (the service's path)",
                        "seconds": round(time.monotonic() - started, 1)},
              "seeds": seeds, "summary": report.over_seeds(seeds, args.modes)}
    json_path = Path(args.json or out_dir / "abstain.json")
    tu.write_json(json_path, result)
    md_path = Path(args.markdown or out_dir / "abstain.md")
    md_path.write_text(report.markdown(result))
    _log(f"wrote {json_path} and {md_path} in {result['setup']['seconds']} s")
    print(json.dumps({mode: {k: result["summary"][mode][k] for k in ("other_flagged", "reference_test_flagged")}
                      for mode in args.modes}))
    return result


def run(args: argparse.Namespace) -> int:
    try:
        main(args)
    except (bench_data.BenchDataError, site_geometry.GeometryEstimateError, checkpoint.CheckpointError,
            calibrate.CalibrationError, classical.BaselineError, inference.ModelMismatch, data.DataError,
            OSError) as exc:
        print(f"stainbridge bench abstain: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(run(get_args_parser().parse_args()))
