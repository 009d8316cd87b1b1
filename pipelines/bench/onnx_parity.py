"""ONNX vs ``clipes segment`` logits at a size that is not a multiple of 32.

Builds a small toy run, trains a resnet18 segmenter for a few steps (random init, no
download; the weights do not matter for parity), exports it twice, once as the bare
segmenter graph (what ``clipes export-onnx`` wrote before it padded inside the graph) and
once with :func:`clip_es.train.onnx_export.export_onnx`, and prints each graph's largest
absolute logit difference from :func:`clip_es.train.segment.predict_logits` on one random
image of ``--height`` x ``--width``.

Usage::

    python pipelines/bench/onnx_parity.py [--height 375] [--width 500] [--work /tmp/onnx_parity]
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--height", type=int, default=375)
    ap.add_argument("--width", type=int, default=500)
    ap.add_argument("--backbone", default="resnet18")
    ap.add_argument("--work", default="/tmp/onnx_parity", help="Folder for the toy data, run and ONNX files.")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    import onnxruntime as ort

    from clip_es.cam.run import CamConfig, generate_cams
    from clip_es.data.toy import make_toy
    from clip_es.train.loop import TrainConfig, train_segmenter
    from clip_es.train.model import BoundSegmenter
    from clip_es.train.onnx_export import export_onnx
    from clip_es.train.segment import load_segmenter, predict_logits

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    run = work / "run"
    if not (run / "segmenter" / "last.pt").is_file():
        root = make_toy(work / "toy", n=6, seed=3, progress=False)
        generate_cams(CamConfig(dataset="toy", root=str(root), split="train", out=str(run), device="cpu", limit=2),
                      progress=False)
        train_segmenter(TrainConfig(run=str(run), labels="gt", steps=3, batch_size=2, crop_size=96,
                                    backbone=args.backbone, device="cpu", warmup=1, save_every=3), progress=False)
    ckpt = run / "segmenter" / "last.pt"
    seg = load_segmenter(ckpt)
    image = np.random.default_rng(0).integers(0, 256, (args.height, args.width, 3), dtype=np.uint8)
    x = np.ascontiguousarray((image.astype(np.float32) / 255).transpose(2, 0, 1)[None])
    ref = predict_logits(seg, image).numpy()
    bare = work / "bare.onnx"
    torch.onnx.export(BoundSegmenter(seg.model, seg.text).eval(), (torch.rand(1, 3, 512, 512),), str(bare),
                      input_names=["image"], output_names=["logits"], opset_version=17, dynamo=False,
                      dynamic_axes={"image": {2: "h", 3: "w"}, "logits": {2: "h", 3: "w"}})
    padded = export_onnx(ckpt, work / "padded.onnx")
    for name, path in (("bare segmenter graph (before)", bare), ("export_onnx graph (pads inside)", padded)):
        got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(["logits"], {"image": x})[0][0]
        print(f"{name:34s} max |onnx - segment| = {np.abs(got - ref).max():.3g}   same labels on "
              f"{100 * (got.argmax(0) == ref.argmax(0)).mean():.2f}% of pixels   ({args.backbone}, "
              f"{args.height}x{args.width})")


if __name__ == "__main__":
    main()
