"""Where each class's predicted pixels really are: its own object, background, or other objects.

    clipes eval --run R                      # writes R/eval.json (with the confusion matrices)
    python pipelines/toy/leaks.py --run R    # one row per predicted class, per stage

A low IoU can come from missing the object (low recall) or from painting the class onto
pixels that are not it (low precision). This splits the second kind by source, read off
the confusion matrix `clipes eval` stores: on the toy testbed it shows that CAA's losses
are background pixels around the objects (pipelines/toy/RESULTS.md, session 5).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def leak_table(stage: dict) -> list[tuple[str, float, float, float, float]]:
    """``(class, precision, from background, from other objects, recall)`` per foreground class.

    Label 0 of the stage's confusion matrix is background.
    """
    names = stage["confusion"]["labels"]  # label order (per_class may be stored sorted)
    conf = np.asarray(stage["confusion"]["counts"], np.int64)
    rows = []
    for i, name in enumerate(names[1:], 1):
        col, gt = conf[:, i], int(conf[i].sum())
        pred = int(col.sum())
        if pred == 0 and gt == 0:
            continue
        own, bg = int(col[i]), int(col[0])
        rows.append((name, own / max(pred, 1), bg / max(pred, 1), (pred - own - bg) / max(pred, 1), own / max(gt, 1)))
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, required=True, help="run folder that `clipes eval` has scored")
    ap.add_argument("--stage", action="append", default=None, help="only this stage (repeatable; default: all)")
    args = ap.parse_args(argv)
    path = args.run / "eval.json"
    if not path.is_file():
        sys.exit(f"{path}: not found; run `clipes eval --run {args.run}` first")
    stages = json.loads(path.read_text())["stages"]
    for name in args.stage or list(stages):
        if name not in stages or "confusion" not in stages[name]:
            sys.exit(f"{path}: no confusion matrix for stage {name!r}; re-run `clipes eval --run {args.run}`")
        print(f"{name}: share of each class's predicted pixels that are ...")
        print(f"  {'class':<12} {'its own':>8} {'bg':>8} {'others':>8} {'recall':>8}")
        for cls, own, bg, other, rec in leak_table(stages[name]):
            print(f"  {cls:<12} {own:8.2f} {bg:8.2f} {other:8.2f} {rec:8.2f}")


if __name__ == "__main__":
    main()
