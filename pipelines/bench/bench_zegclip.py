"""Cost of the zegclip segmenter beside the fusion (CNN) one, measured in one run.

    python pipelines/bench/bench_zegclip.py [--repeats 5] [--input-scale 2]

Prints (one CPU thread, medians over repeats):
  1. trainable / total parameters of zegclip (on the bundled clipes-tiny CLIP), fusion (resnet18)
     and the training-free clip family;
  2. training seconds per step (batch 8, 160 px crops as in the toy tables: forward, the family's
     default loss, backward, AdamW step) for zegclip (its default text background of the toy
     world's 6 background words, and the learnt one) and fusion;
  3. ``clipes segment``-path images/s (:func:`clip_es.train.segment.predict_labels`: padding,
     forward, argmax) at 320x320 and at VOC size 500x375 for zegclip and fusion, with the ratio;
  4. a random-weight ViT-B/16 (``open_clip.create_model('ViT-B-16-quickgelu')``, no download)
     under zegclip at 512x512 on the CPU, with VOC's 20 classes and a text background of voc's 25
     words, then a learnt one: images/s and the peak resident memory of that forward (each in a
     fresh subprocess).
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


def zegclip(visual: torch.nn.Module, dim: int, background: str, words: int, input_scale: int = 1) -> ZegClipSegmenter:
    """A zegclip segmenter with a ``text`` background of ``words`` random unit embeddings, or ``learnt``."""
    names = tuple(f"bg{i}" for i in range(words)) if background == "text" else ()
    arch = ZegClipArch(text_dim=dim, heads=decoder_heads(dim), input_scale=input_scale, background=background,
                       background_words=names).validate()
    bg = F.normalize(torch.randn(words, dim, generator=torch.Generator().manual_seed(1)), dim=-1) if names else None
    return ZegClipSegmenter(arch, visual, background_text=bg)


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


def vit_b16_child(repeats: int, background: str) -> None:
    """In a fresh process: zegclip on a random ViT-B/16 at 512x512, images/s and peak RSS."""
    import open_clip

    from clip_es.data.classes import background_words

    torch.set_num_threads(1)
    clip = open_clip.create_model("ViT-B-16-quickgelu")
    model = zegclip(clip.visual, 512, background, len(background_words("voc"))).eval()
    tr, total = params(model)
    text = F.normalize(torch.randn(20, 512), dim=-1)
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
    ap.add_argument("--child", choices=("text", "learnt"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        vit_b16_child(args.repeats, args.child)
        return
    torch.set_num_threads(1)
    torch.manual_seed(0)
    from clip_es.data.toy import TOY_BACKGROUNDS
    from clip_es.model.resolve import load_clip

    tiny = load_clip("clipes-tiny")
    zeg = zegclip(tiny.model.visual, 128, "text", len(TOY_BACKGROUNDS), args.input_scale)
    zeg_learnt = zegclip(load_clip("clipes-tiny").model.visual, 128, "learnt", 0, args.input_scale)
    free = ClipDenseSegmenter(ClipDenseArch(text_dim=128), load_clip("clipes-tiny").model.visual)
    fusion = build_segmenter(SegmenterArch(backbone="resnet18", text_dim=128))
    print(f"zegclip on clipes-tiny at input scale {args.input_scale}")
    print("parameters (trainable / total):")
    for name, m in (("zegclip (clipes-tiny)", zeg), ("fusion (resnet18)", fusion), ("clip (clipes-tiny)", free)):
        tr, total = params(m)
        print(f"  {name:24s} {tr / 1e6:6.3f}M / {total / 1e6:6.3f}M")
    tz, tf = step_seconds(zeg, "focal_dice", args.repeats), step_seconds(fusion, "ce", args.repeats)
    tl = step_seconds(zeg_learnt, "focal_dice", args.repeats)
    print(f"training, batch 8 x 160 px, 1 thread: zegclip {tz:.2f} s/step ({len(TOY_BACKGROUNDS)}-word text "
          f"background; learnt: {tl:.2f} s/step, text / learnt = {tz / tl:.2f}x), fusion {tf:.2f} s/step "
          f"(zegclip / fusion = {tz / tf:.2f}x)")
    segs = {"zegclip": loaded(zeg, 128), "fusion": loaded(fusion, 128), "clip": loaded(free, 128)}
    print("clipes segment path, 1 thread, images/s:")
    for h, w in ((320, 320), (375, 500)):
        r = {k: rate(s, h, w, args.repeats) for k, s in segs.items()}
        print(f"  {w}x{h}: zegclip {r['zegclip']:.1f}  fusion {r['fusion']:.1f}  clip {r['clip']:.1f}  "
              f"(zegclip / fusion = {r['zegclip'] / r['fusion']:.2f}x)")
    vit = {}
    for bg in ("text", "learnt"):
        out = subprocess.run([sys.executable, __file__, "--child", bg, "--repeats", str(max(2, args.repeats // 2))],
                             capture_output=True, text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        vit[bg] = b = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"zegclip on a random ViT-B/16 at 512x512, 20 classes, {bg} background, CPU, 1 thread: "
              f"{b['img_s']:.2f} images/s, peak RSS {b['peak_rss_mb']:.0f} MB (+{b['forward_extra_mb']:.0f} MB "
              f"for the forward), parameters {b['trainable'] / 1e6:.2f}M trainable / {b['total'] / 1e6:.1f}M total")
    print(f"  text (25 voc words) / learnt background, time per image: "
          f"{vit['learnt']['img_s'] / vit['text']['img_s']:.2f}x")


if __name__ == "__main__":
    main()
