"""``clipes demo``: the whole pipeline on the toy world with the bundled tiny CLIP.

No network, no arguments: make the toy world, run cam -> refine -> train -> eval with
the toy recipe (the same one as ``pipelines/toy.toml``), render a contact sheet, and
report one table: mIoU after CAM, CAA, CRF, of the pseudo masks (with coverage) on the
train split, and of the segmenter on the held-out val split, with each stage's time.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clip_es.errors import ConfigError
from clip_es.threads import threads_from_config

log = logging.getLogger(__name__)

#: The toy recipe (kept equal to pipelines/toy.toml; a test checks it).
TOY_RECIPE: dict[str, Any] = {
    "dataset": {"kind": "toy", "split": "train", "eval_split": "val"},
    "model": {"model": "clipes-tiny"},
    "cam": {"templates": ["a clean origami {}."], "fusion": "sentence", "background": "toy", "scales": [1.0],
            "caa_threshold": 0.4},
    "refine": {"conf": 0.95, "alpha": 1.0},
    "train": {"backbone": "resnet18", "steps": 1000, "batch_size": 8, "crop_size": 160, "lr": 0.001,
              "scale_range": [0.75, 1.5], "seed": 0},
    "eval": {"alpha": 1.0},
}


@dataclass(frozen=True)
class DemoConfig:
    """Options of ``clipes demo``.

    Attributes:
        out: folder for the toy dataset (``OUT/toy``), the run (``OUT/run``) and the sheet.
        n: toy images (the last 20% are the held-out val split).
        seed: toy world seed.
        train_steps: segmenter steps (``None`` = the recipe's).
        device: ``cpu``, ``cuda`` or ``auto``.
        threads: CPU thread budget of every stage (``None``: see :func:`clip_es.threads.default_threads`).
    """

    out: str = "demo"
    n: int = 1000
    seed: int = 1
    train_steps: int | None = None
    device: str = "auto"
    threads: int | None = None


@dataclass
class DemoResult:
    """The demo's table rows, timings and where to look."""

    rows: list[dict[str, Any]]
    seconds: dict[str, float]
    sheet: Path
    run: Path
    total_seconds: float
    extra: dict[str, Any] = field(default_factory=dict)

    def table(self) -> str:
        head = f"{'stage':<14}{'split':<7}{'mIoU':>7}{'coverage':>10}{'precision':>11}{'time':>9}"
        lines = [head, "-" * len(head)]
        for r in self.rows:
            cov = f"{r['coverage'] * 100:9.1f}%" if r.get("coverage") is not None else f"{'':>10}"
            prec = f"{r['precision'] * 100:10.1f}%" if r.get("precision") is not None else f"{'':>11}"
            if r.get("seconds") is not None:
                t = f"{r['seconds']:8.0f}s" + ("*" if r.get("resumed") else "")
            else:
                t = f"{'resumed*':>9}" if r.get("resumed") else f"{'':>9}"
            lines.append(f"{r['stage']:<14}{r['split']:<7}{r['miou'] * 100:7.1f}{cov}{prec}{t}".rstrip())
        lines.append("-" * len(head))
        if any(r.get("resumed") for r in self.rows):
            lines.append("* resumed: outputs already in the run folder; the time is what computing them took")
        lines.append(f"total wall time {self.total_seconds / 60:.1f} min")
        return "\n".join(lines)


def demo_recipe(cfg: DemoConfig) -> dict[str, Any]:
    """The toy recipe with the demo's overrides applied."""
    recipe = copy.deepcopy(TOY_RECIPE)
    recipe["cam"]["device"] = cfg.device
    recipe["train"]["device"] = cfg.device
    if cfg.train_steps is not None:
        recipe["train"]["steps"] = cfg.train_steps
    return recipe


def _toy_ready(root: Path, n: int) -> bool:
    split = root / "ImageSets" / "Segmentation" / "trainval.txt"
    return split.is_file() and len(split.read_text().split()) == n


@threads_from_config
def run_demo(cfg: DemoConfig = DemoConfig(), progress: bool = True, echo=print) -> DemoResult:
    """Run the demo end to end (resumable: finished work in ``cfg.out`` is reused)."""
    from clip_es.data.toy import make_toy
    from clip_es.recipe import run_recipe
    from clip_es.visualize import show_run

    if cfg.n < 10:
        raise ConfigError(f"--n must be at least 10 (val takes 20%), got {cfg.n}")
    out = Path(cfg.out)
    root, run = out / "toy", out / "run"
    t_start = time.perf_counter()
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    if not _toy_ready(root, cfg.n):
        echo(f"[demo] making {cfg.n} toy images in {root}")
        make_toy(root, n=cfg.n, seed=cfg.seed, progress=progress)
    seconds["toy"] = time.perf_counter() - t0

    def on_stage(stage: str, dt: float, res: Any) -> None:
        if hasattr(res, "summary"):
            echo(f"[demo] {res.summary()} ({dt:.0f}s)")
        else:
            echo(f"[demo] {stage} done ({dt:.0f}s)")

    echo("[demo] cam -> refine -> train -> eval with the bundled clipes-tiny")
    results = run_recipe(demo_recipe(cfg), root, run, progress=progress, on_stage=on_stage)
    seconds.update(results["seconds"])
    t0 = time.perf_counter()
    sheet = show_run(run, out / "sheet.png", n=6)
    seconds["show"] = time.perf_counter() - t0
    stages = results["eval"]["stages"]
    rows = []
    compute, resumed = results.get("compute_seconds", {}), results.get("resumed", {})
    for key, label, stage in (("cam", "CAM", "cam"), ("caa", "CAA", None), ("crf", "CRF", "refine"),
                              ("masks", "pseudo masks", None), ("segmenter", "segmenter", "train")):
        if key not in stages:
            continue
        s = stages[key]
        rows.append({"stage": label, "split": s.get("split", "train"), "miou": s["miou"],
                     "coverage": s.get("coverage"), "precision": s.get("precision"),
                     "seconds": compute.get(stage) if stage else None, "resumed": bool(stage and resumed.get(stage))})
    return DemoResult(rows, seconds, sheet, run, time.perf_counter() - t_start, {"eval": stages})
