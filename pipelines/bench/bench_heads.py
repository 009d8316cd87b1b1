"""The lightweight-segmentation table: heads (plain, denseclip, fusion) x CNN backbones on one run.

One command trains every cell on the run's pseudo masks, scores it on the held-out split
(``clipes eval``'s segmenter evaluator: val mIoU against ground truth), then, in the same
process and only after every training, measures each (backbone, head)'s cost:

* trainable parameters;
* GFLOPs of one forward at 512x512 with the run's classes (``torch.utils.flop_counter.FlopCounterMode``,
  which counts a multiply-add as 2 FLOPs);
* images/s of :func:`clip_es.train.segment.predict_labels` (the per-image call of ``clipes segment``:
  pad, forward, argmax; file reading and PNG writing left out) on a 500x375 image, one thread,
  the models timed round-robin (each round times every model once) so drifts of a shared
  machine spread over all of them.

Every cell trains with the same steps, batch, crop, scale range, LR schedule and labels; cells
run one at a time in the order seed 0 of every backbone first, then the extra seeds, so a
stopped grid still has one seed of everything. Resumable: results go to ``RUN/bench_heads.json``
after each cell, finished cells are skipped, a cell stopped mid-training resumes from its
``last.pt``. The markdown table is (re)written at the end.

Usage (the table in README / pipelines/toy/HEADS.md)::

    OMP_NUM_THREADS=1 python pipelines/bench/bench_heads.py --run RUN --steps 300 \\
        --backbone resnet18 --backbone mobilenetv3_large_100 --seeds resnet18=2 --out pipelines/toy/HEADS.md
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

HEAD_ORDER = ("plain", "denseclip", "fusion")
RESULTS = "bench_heads.json"


def cell_name(backbone: str, head: str, seed: int, steps: int) -> str:
    return f"heads{steps}_{backbone}_{head}_s{seed}"


def grid(backbones: list[str], heads: list[str], seeds: dict[str, int]) -> list[tuple[str, str, int]]:
    """``(backbone, head, seed)`` cells: seed 0 of every backbone first, then the extra seeds."""
    top = max(seeds.get(b, 1) for b in backbones)
    return [(b, h, s) for s in range(top) for b in backbones if s < seeds.get(b, 1) for h in heads]


def train_cell(args: argparse.Namespace, backbone: str, head: str, seed: int) -> dict[str, Any]:
    from clip_es.evaluate import EvalOptions, evaluate_run
    from clip_es.train.loop import TrainConfig, train_segmenter

    name = cell_name(backbone, head, seed, args.steps)
    resume = (Path(args.run) / name / "last.pt").is_file()
    cfg = TrainConfig(run=args.run, name=name, labels="refine", steps=args.steps, batch_size=args.batch_size,
                      crop_size=args.crop_size, lr=args.lr, scale_range=(0.75, 1.5), backbone=backbone, head=head,
                      seed=seed, device="cpu", threads=1, resume=resume)
    t = time.perf_counter()
    res = train_segmenter(cfg, progress=args.progress)
    train_s = time.perf_counter() - t
    report = evaluate_run(args.run, EvalOptions(stages=(name,)), progress=args.progress)
    miou = float(report["stages"][name]["miou"])
    print(f"{name}: val mIoU {100 * miou:.1f}, last loss {res.last_loss:.4f}, train {train_s:.0f} s", flush=True)
    return {"backbone": backbone, "head": head, "seed": seed, "steps": args.steps, "miou": miou,
            "train_s": round(train_s, 1), "last_loss": res.last_loss}


def measure_costs(args: argparse.Namespace, cells: list[tuple[str, str]]) -> dict[str, dict[str, float]]:
    """Parameters, GFLOPs at 512x512 and round-robin images/s at 500x375 of the seed-0 checkpoints."""
    from torch.utils.flop_counter import FlopCounterMode

    from clip_es.train.segment import load_segmenter, predict_labels

    torch.set_num_threads(1)
    segs = {}
    out: dict[str, dict[str, float]] = {}
    for backbone, head in cells:
        key = f"{backbone}/{head}"
        seg = load_segmenter(Path(args.run) / cell_name(backbone, head, 0, args.steps) / "last.pt")
        segs[key] = seg
        trainable = sum(p.numel() for p in seg.model.parameters()) - sum(
            v.numel() for k, v in seg.model.state_dict().items()
            if any(k.startswith(f) for f in seg.model.frozen_prefixes))
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            seg.model(torch.rand(1, 3, 512, 512), seg.text)
        out[key] = {"params": int(trainable), "gflops": fc.get_total_flops() / 1e9, "classes": len(seg.classes)}
    image = np.random.default_rng(0).integers(0, 256, (375, 500, 3), dtype=np.uint8)
    for seg in segs.values():  # warm-up
        predict_labels(seg, image)
    spent = {k: 0.0 for k in segs}
    for _ in range(args.speed_rounds):
        for key, seg in segs.items():
            t = time.perf_counter()
            for _ in range(args.speed_images):
                predict_labels(seg, image)
            spent[key] += time.perf_counter() - t
    for key in segs:
        out[key]["images_per_s"] = args.speed_rounds * args.speed_images / spent[key]
        print(f"{key}: {out[key]['params'] / 1e6:.2f} M, {out[key]['gflops']:.1f} GFLOPs, "
              f"{out[key]['images_per_s']:.2f} img/s", flush=True)
    return out


def table(results: dict[str, Any], backbones: list[str], heads: list[str], args: argparse.Namespace) -> str:
    cells, costs = results["cells"], results.get("costs", {})
    n_classes = next((c["classes"] for c in costs.values()), "the run's")
    lines = [f"Toy world (`{args.run}`), pseudo masks = refine, {args.steps} steps, batch {args.batch_size}, "
             f"crop {args.crop_size}, scale 0.75-1.5, lr {args.lr:g} (warm-up then cosine), random-init backbones, "
             "val mIoU on 200 held-out images against ground truth. Cost columns: one process after all trainings; "
             f"GFLOPs of one 512x512 forward with {n_classes} classes (FlopCounterMode, multiply-add = 2); images/s of "
             "`predict_labels` (the `clipes segment` per-image call) at 500x375, 1 thread, round-robin "
             f"({args.speed_rounds} rounds x {args.speed_images} images per model).", "",
             "| backbone | head | val mIoU | seeds | trainable params | GFLOPs @512 | img/s @500x375, 1 thread |",
             "|---|---|---|---|---|---|---|"]
    for b in backbones:
        for h in heads:
            runs = sorted((c for c in cells.values() if c["backbone"] == b and c["head"] == h), key=lambda c: c["seed"])
            if not runs:
                continue
            vals = [100 * c["miou"] for c in runs]
            mean = statistics.fmean(vals)
            spread = f" ± {(max(vals) - min(vals)) / 2:.1f}" if len(vals) > 1 else ""
            cost = costs.get(f"{b}/{h}")
            cost_cols = (f"{cost['params'] / 1e6:.2f} M | {cost['gflops']:.1f} | {cost['images_per_s']:.2f}"
                         if cost else "- | - | -")
            lines.append(f"| {b} | {h} | {mean:.1f}{spread} | {', '.join(f'{v:.1f}' for v in vals)} | {cost_cols} |")
    lines.append("")
    lines.append("± = half the range over seeds (min to max / 2); seeds column = each seed's mIoU.")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="run folder with cam + refine (each cell trains RUN/heads_*)")
    ap.add_argument("--backbone", action="append", default=None, help="timm backbones (default resnet18, "
                    "mobilenetv3_large_100, efficientnet_b0)")
    ap.add_argument("--head", action="append", default=None, help=f"heads (default {', '.join(HEAD_ORDER)})")
    ap.add_argument("--seeds", action="append", default=[], help="BACKBONE=N seeds (default 1; resnet18=2)")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--crop-size", type=int, default=160)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--speed-rounds", type=int, default=5)
    ap.add_argument("--speed-images", type=int, default=3)
    ap.add_argument("--remeasure", action="store_true", help="measure the cost columns again")
    ap.add_argument("--train-only", action="store_true", help="train and score the cells, measure no costs yet")
    ap.add_argument("--out", default=None, help="markdown file for the table (default: print only)")
    ap.add_argument("--progress", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    backbones = args.backbone or ["resnet18", "mobilenetv3_large_100", "efficientnet_b0"]
    heads = args.head or list(HEAD_ORDER)
    seeds = {"resnet18": 2}
    for s in args.seeds:
        b, n = s.split("=")
        seeds[b] = int(n)
    path = Path(args.run) / RESULTS
    results: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {"cells": {}}
    for b, h, s in grid(backbones, heads, seeds):
        name = cell_name(b, h, s, args.steps)
        done = results["cells"].get(name)
        if done and done["steps"] == args.steps:
            print(f"{name}: done (val mIoU {100 * done['miou']:.1f}), skipped", flush=True)
            continue
        results["cells"][name] = train_cell(args, b, h, s)
        results.pop("costs", None)  # cost columns are measured after all trainings
        path.write_text(json.dumps(results, indent=1))
    if args.train_only:
        return
    if args.remeasure or not results.get("costs"):
        results["costs"] = measure_costs(args, [(b, h) for b in backbones for h in heads])
        path.write_text(json.dumps(results, indent=1))
    md = table(results, backbones, heads, args)
    print(md)
    if args.out:
        Path(args.out).write_text(md)


if __name__ == "__main__":
    main()
