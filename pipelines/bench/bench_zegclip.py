"""Cost of the zegclip segmenter beside the fusion (CNN) one, measured in one run.

    python pipelines/bench/bench_zegclip.py [--repeats 5] [--input-scale 2]

Prints (one CPU thread, medians over repeats):
  1. trainable / total parameters of zegclip (on the bundled clipes-tiny CLIP), fusion (resnet18)
     and the training-free clip family;
  2. training seconds per step (batch 8, 160 px crops as in the toy tables: forward, the family's
     default loss, backward, AdamW step) for zegclip and fusion;
  3. ``clipes segment``-path images/s (:func:`clip_es.train.segment.predict_labels`: padding,
     forward, argmax) at 320x320 and at VOC size 500x375 for zegclip and fusion, with the ratio;
  4. a random-weight ViT-B/16 (``open_clip.create_model('ViT-B-16-quickgelu')``, no download)
     under zegclip at 512x512 on the CPU: images/s and the peak resident memory of that forward
     (measured in a fresh subprocess).
``--input-scale``: the clipes-tiny zegclip's (``clipes train`` resolves 2 on the toy world's images);
the ViT-B/16 stays at 1 (VOC-sized images resolve 1). Weights are random: speed and memory do not
depend on them.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from clip_es.data.base import ClassSpec  # noqa: E402
from clip_es.train.clipdense import ClipDenseArch, ClipDenseSegmenter  # noqa: E402
from clip_es.train.model import SegmenterArch, build_segmenter  # noqa: E402
from clip_es.train.segment import LoadedSegmenter, predict_labels  # noqa: E402
from clip_es.train.zegclip import ZegClipArch, ZegClipSegmenter, decoder_heads  # noqa: E402

CLASSES = [ClassSpec(n) for n in ("ball", "star", "heart", "ring", "boat", "kite", "flower", "fish")]


def params(m: torch.nn.Module) -> tuple[int, int]:
    return sum(p.numel() for p in m.parameters() if p.requires_grad), sum(p.numel() for p in m.parameters())


def loaded(model: torch.nn.Module, dim: int) -> LoadedSegmenter:
    text = F.normalize(torch.randn(len(CLASSES), dim, generator=torch.Generator().manual_seed(0)), dim=-1)
    for p in model.parameters():
        p.requires_grad_(False)
    return LoadedSegmenter(model.eval(), text, CLASSES, {}, "", 0, "cpu")


def rate(seg: LoadedSegmenter, h: int, w: int, repeats: int) -> float:
    image = np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)
    predict_labels(seg, image)  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        predict_labels(seg, image)
        times.append(time.perf_counter() - t0)
    return 1.0 / statistics.median(times)


def step_seconds(model: torch.nn.Module, loss_name: str, repeats: int) -> float:
    """Median seconds of one training step on a random batch of 8 160 px crops."""
    from clip_es.train.losses import get_loss

    loss_fn = get_loss(loss_name)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(8, 3, 160, 160, generator=gen)
    y = torch.randint(0, 9, (8, 160, 160), generator=gen)
    text = F.normalize(torch.randn(8, 128, generator=gen), dim=-1)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()
    times = []
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        loss = loss_fn(model(x, text), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i:  # the first step warms up
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def vit_b16_child(repeats: int) -> None:
    """In a fresh process: zegclip on a random ViT-B/16 at 512x512, images/s and peak RSS."""
    import open_clip

    torch.set_num_threads(1)
    clip = open_clip.create_model("ViT-B-16-quickgelu")
    model = ZegClipSegmenter(ZegClipArch(text_dim=512, heads=decoder_heads(512)), clip.visual).eval()
    tr, total = params(model)
    text = F.normalize(torch.randn(8, 512), dim=-1)
    x = torch.rand(1, 3, 512, 512)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with torch.no_grad():
        model(x, text)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(x, text)
            times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"img_s": 1.0 / statistics.median(times), "peak_rss_mb": peak / 1024,
                      "forward_extra_mb": (peak - base) / 1024, "trainable": tr, "total": total}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--input-scale", type=int, default=2, help="the clipes-tiny zegclip's input scale")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        vit_b16_child(args.repeats)
        return
    torch.set_num_threads(1)
    torch.manual_seed(0)
    from clip_es.model.resolve import load_clip

    tiny = load_clip("clipes-tiny")
    zeg = ZegClipSegmenter(ZegClipArch(text_dim=128, heads=decoder_heads(128), input_scale=args.input_scale),
                           tiny.model.visual)
    free = ClipDenseSegmenter(ClipDenseArch(text_dim=128), load_clip("clipes-tiny").model.visual)
    fusion = build_segmenter(SegmenterArch(backbone="resnet18", text_dim=128))
    print(f"zegclip on clipes-tiny at input scale {args.input_scale}")
    print("parameters (trainable / total):")
    for name, m in (("zegclip (clipes-tiny)", zeg), ("fusion (resnet18)", fusion), ("clip (clipes-tiny)", free)):
        tr, total = params(m)
        print(f"  {name:24s} {tr / 1e6:6.3f}M / {total / 1e6:6.3f}M")
    tz, tf = step_seconds(zeg, "focal_dice", args.repeats), step_seconds(fusion, "ce", args.repeats)
    print(f"training, batch 8 x 160 px, 1 thread: zegclip {tz:.2f} s/step, fusion {tf:.2f} s/step "
          f"(zegclip / fusion = {tz / tf:.2f}x)")
    segs = {"zegclip": loaded(zeg, 128), "fusion": loaded(fusion, 128), "clip": loaded(free, 128)}
    print("clipes segment path, 1 thread, images/s:")
    for h, w in ((320, 320), (375, 500)):
        r = {k: rate(s, h, w, args.repeats) for k, s in segs.items()}
        print(f"  {w}x{h}: zegclip {r['zegclip']:.1f}  fusion {r['fusion']:.1f}  clip {r['clip']:.1f}  "
              f"(zegclip / fusion = {r['zegclip'] / r['fusion']:.2f}x)")
    out = subprocess.run([sys.executable, __file__, "--child", "--repeats", str(max(2, args.repeats // 2))],
                         capture_output=True, text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    b = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"zegclip on a random ViT-B/16 at 512x512, CPU, 1 thread: {b['img_s']:.2f} images/s, peak RSS "
          f"{b['peak_rss_mb']:.0f} MB (+{b['forward_extra_mb']:.0f} MB for the forward), parameters "
          f"{b['trainable'] / 1e6:.2f}M trainable / {b['total'] / 1e6:.1f}M total")


if __name__ == "__main__":
    main()
