"""Time per step of the clipes-tiny recipe against a baseline recipe, measured in one run.

    python pipelines/toy/bench_recipe_step.py [--steps 40] [--rounds 2] [--against REV]

The shared 2-core machine is noisy, so absolute minutes from one full run are not
comparable across days. This runs short trainings of both recipes, alternating
(A, B, A, B, ...), and prints the seconds per step of each and their ratio. The first
``--skip`` steps of every short run (allocator warm-up) are left out.

Default comparison: the shipped recipe (its attention terms need the explicit attention
softmax in every block) against run 4's (``--region-ml 0 --attn-region 0 --attn-consistency 0``).
With ``--against REV`` the baseline is instead the recipe script as committed at git revision
REV, run with its own defaults: the same recipe before and after an implementation change
(the view sampling it imports, ``pipelines/toy/views.py``, is the working tree's).
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BASELINE = ["--region-ml", "0", "--attn-region", "0", "--attn-consistency", "0"]


def _recipe(path: Path = HERE / "train_tiny_clip.py", name: str = "train_tiny_clip"):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _recipe_at(rev: str, folder: Path):
    """The recipe script as committed at git revision ``rev``, loaded from a copy in ``folder``."""
    rel = (HERE / "train_tiny_clip.py").relative_to(HERE.parents[1]).as_posix()
    try:
        text = subprocess.run(["git", "show", f"{rev}:{rel}"], cwd=HERE, check=True, capture_output=True,
                              text=True).stdout
    except subprocess.CalledProcessError as e:
        raise SystemExit(f"--against {rev}: git cannot show {rel} there ({e.stderr.strip()})") from None
    path = folder / "train_tiny_clip_baseline.py"
    path.write_text(text)
    return _recipe(path, "train_tiny_clip_baseline")


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
    ap.add_argument("--against", metavar="REV", default=None,
                    help="baseline = the recipe script at this git revision with its defaults (e.g. HEAD~1), "
                         "instead of run 4's flags on the current script")
    args = ap.parse_args()
    if args.steps <= args.skip:
        ap.error("--steps must exceed --skip")
    recipe = _recipe()
    with tempfile.TemporaryDirectory() as tmp:
        if args.against:
            baseline, base_flags, base_name = _recipe_at(args.against, Path(tmp)), [], f"recipe at {args.against}"
        else:
            baseline, base_flags, base_name = recipe, BASELINE, "run-4 recipe (no box terms)"
        shipped, base = [], []
        for _ in range(args.rounds):
            base.append(time_steps(baseline, base_flags, args.steps, args.skip, args.threads))
            shipped.append(time_steps(recipe, [], args.steps, args.skip, args.threads))
    b, s = sum(base) / len(base), sum(shipped) / len(shipped)
    width = max(len(base_name), len("shipped recipe (defaults)")) + 1
    print(f"{base_name + ':':<{width}} {b:.3f} s/step  {[round(x, 3) for x in base]}")
    print(f"{'shipped recipe (defaults):':<{width}} {s:.3f} s/step  {[round(x, 3) for x in shipped]}")
    print(f"ratio shipped / baseline: {s / b:.2f}x per step")


if __name__ == "__main__":
    main()
