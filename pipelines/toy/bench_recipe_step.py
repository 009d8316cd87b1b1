"""Time per step of the clipes-tiny recipe against a baseline recipe, measured in one run.

    python pipelines/toy/bench_recipe_step.py [--steps 40] [--rounds 2]

The shared 2-core machine is noisy, so absolute minutes from one full run are not
comparable across days. This runs short trainings of both recipes, alternating
(A, B, A, B, ...), and prints the seconds per step of each and their ratio. The first
``--skip`` steps of every short run (allocator warm-up) are left out.

Default comparison: the shipped recipe (its attention terms need the explicit attention
softmax in every block) against run 4's (``--region-ml 0 --attn-region 0 --attn-consistency 0``).
"""

from __future__ import annotations

import argparse
import importlib.util
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BASELINE = ["--region-ml", "0", "--attn-region", "0", "--attn-consistency", "0"]


def _recipe():
    spec = importlib.util.spec_from_file_location("train_tiny_clip", HERE / "train_tiny_clip.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def time_steps(recipe, extra: list[str], steps: int, skip: int, threads: int) -> float:
    """Seconds per step over steps ``skip..steps`` of a short run with ``extra`` flags."""
    stamps: list[float] = []
    real_step = recipe.torch.optim.AdamW.step

    def stamped(self, *a, **k):
        out = real_step(self, *a, **k)
        stamps.append(time.perf_counter())
        return out

    recipe.torch.optim.AdamW.step = stamped
    try:
        with tempfile.TemporaryDirectory() as out:
            recipe.main(["--out", out, "--steps", str(steps), "--scenes", "300", "--held", "8",
                         "--eval-every", str(10 * steps), "--threads", str(threads)] + extra)
    finally:
        recipe.torch.optim.AdamW.step = real_step
    return (stamps[-1] - stamps[skip - 1]) / (len(stamps) - skip)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=40, help="steps per short run")
    ap.add_argument("--skip", type=int, default=5, help="warm-up steps left out of each timing")
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds of both recipes")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if args.steps <= args.skip:
        ap.error("--steps must exceed --skip")
    recipe = _recipe()
    shipped, base = [], []
    for _ in range(args.rounds):
        base.append(time_steps(recipe, BASELINE, args.steps, args.skip, args.threads))
        shipped.append(time_steps(recipe, [], args.steps, args.skip, args.threads))
    b, s = sum(base) / len(base), sum(shipped) / len(shipped)
    print(f"run-4 recipe (no box terms): {b:.3f} s/step  {[round(x, 3) for x in base]}")
    print(f"shipped recipe (defaults):   {s:.3f} s/step  {[round(x, 3) for x in shipped]}")
    print(f"ratio shipped / run-4: {s / b:.2f}x per step")


if __name__ == "__main__":
    main()
