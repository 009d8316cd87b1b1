"""Measure a tiny-CLIP checkpoint the way issue 8 asks, in one command.

    python pipelines/toy/eval_tiny_clip.py [--model clipes-tiny] [--root runs/toy] [--split val]

Makes the held-out toy set if missing (`clipes toy make --n 1000 --seed 1`; val = its
last 200 images, never seen by the recipe), then prints:
  * zero-shot multi-label mAP (softmax over the 8 classes) with both poolings;
  * `clipes cam` + `clipes eval` with default settings: per-class IoU, CAM and CAA mIoU;
  * the checkpoint's size.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from clip_es.cam.run import CamConfig, generate_cams  # noqa: E402
from clip_es.data.registry import open_dataset  # noqa: E402
from clip_es.data.toy import make_toy  # noqa: E402
from clip_es.evaluate import EvalOptions, evaluate_run, format_report  # noqa: E402
from clip_es.model.resolve import load_clip  # noqa: E402
from clip_es.model.tiny import TINY_CHECKPOINT  # noqa: E402
from clip_es.model.zeroshot import zero_shot_map  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="clipes-tiny", help="clipes-tiny or a checkpoint path")
    ap.add_argument("--root", type=Path, default=ROOT / "runs" / "toy", help="held-out toy dataset folder")
    ap.add_argument("--split", default="val")
    ap.add_argument("--out", type=Path, default=None, help="run folder for the cam stage (default: a temp dir)")
    ap.add_argument("--limit", type=int, default=None, help="only the first N images (quick comparisons)")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures as JSON")
    args = ap.parse_args()
    if not (args.root / "ImageSets" / "Segmentation" / f"{args.split}.txt").is_file():
        make_toy(args.root, n=1000, seed=1)
    clip = load_clip(args.model)
    ds = open_dataset("toy", args.root, args.split)
    maps = {p: zero_shot_map(clip, ds, pooling=p, limit=args.limit)["map"] for p in ("mean", "cls")}
    out = args.out or Path(tempfile.mkdtemp(prefix="tinyeval-"))
    generate_cams(CamConfig(dataset="toy", root=str(args.root), split=args.split, out=str(out), model=args.model,
                            limit=args.limit),
                  clip=clip, progress=False)
    rep = evaluate_run(out, EvalOptions(stages=("cam", "caa")), progress=False)
    print(format_report(rep))
    size = (TINY_CHECKPOINT if clip.source.startswith("bundled:") else Path(clip.source)).stat().st_size
    fg = {k: v for k, v in rep["stages"]["cam"]["per_class"].items() if k != "background" and v is not None}
    figures = {"model": args.model, "images": len(ds.ids()[:args.limit]), "map_mean_pooling": maps["mean"],
               "map_cls_pooling": maps["cls"], "cam_miou": rep["stages"]["cam"]["miou"],
               "caa_miou": rep["stages"]["caa"]["miou"], "worst_class_cam": min(fg.items(), key=lambda kv: kv[1]),
               "checkpoint_mb": size / 2**20}
    print(json.dumps(figures, indent=1))
    if args.json:
        args.json.write_text(json.dumps({"figures": figures, "eval": rep}, indent=1))


if __name__ == "__main__":
    main()
