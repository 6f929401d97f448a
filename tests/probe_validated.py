"""Development probe: `bench accuracy --reviews N`'s `validated` row, computed from finished runs.

A `bench accuracy` run keeps every row's softmax on the target in ``probabilities.safetensors``;
``models.bench.validated.validated_rows`` (the very code `--reviews N` runs) is applied to it for
several review draws (``--draws``: the arrival order of slides, hence which cells are reviewed),
without training or scoring anything again::

    python tests/probe_validated.py RUN_DIR [RUN_DIR ...] [--reviews 50] [--draws 0 1 2]

It prints one line per run and draw: the recipe chosen on the reviewed cells, its balanced accuracy
on them (bootstrap 95 % interval), and the chosen and the day-0 recipe on the cells not reviewed
(balanced accuracy over classes with >= 10 cells, the bench's headline).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from stainbridge.models.bench.validated import validated_rows
from stainbridge.models.checkpoint import load_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="bench accuracy --out-dir folders")
    parser.add_argument("--reviews", type=int, default=50)
    parser.add_argument("--draws", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    print("run | draw | chosen recipe | on the reviews [95 % interval] | chosen, not reviewed | day-0, not reviewed "
          "| cells scored")
    for run in args.runs:
        state, header = load_checkpoint(run / "probabilities.safetensors")
        labels = state.pop("target_labels").long()
        paths = [str(Path(header["target"]) / name) for name in header["target_files"]]
        outputs = {name: (probs.float(), torch.zeros(0)) for name, probs in state.items()}
        for draw in args.draws:
            row = validated_rows(outputs, labels, header["classes"], paths, reviews=args.reviews,
                                 seed=draw)["validated"]
            score = row["review_score"]
            print(f"{run.name} | {draw} | {row['recipe']} | {score['balanced_accuracy']:.3f} "
                  f"[{score['ci_low']:.2f}-{score['ci_high']:.2f}] | {row['balanced_accuracy_min10']:.3f} | "
                  f"{row['day0']['balanced_accuracy_min10']:.3f} ({row['day0']['recipe']}) | {row['scored_cells']}")


if __name__ == "__main__":
    main()
