"""Parameter count and CPU throughput of the segmenter vs a ViT-B/16 CLIP image encoder.

Both are measured in the same process, same threads, same input size (default 512x512,
batch 1, fp32, ``torch.no_grad``), with random weights (speed does not depend on them):

* the segmenter (default: resnet18 backbone, width 128, 2 fusion blocks, 20 VOC classes
  with 512-d text), plus its no-fusion ablation and any other ``--backbone``;
* open_clip ``ViT-B-16`` image tower (``pretrained=None``) built for the input size
  (position embeddings for a 32x32 grid at 512 px), i.e. what CLIP-ES's cam stage runs
  forward per image and scale (the cam stage also back-propagates through one block and
  computes attention affinities, so its real cost is higher than this forward).

Usage::

    python pipelines/bench/bench_segmenter.py [--size 512] [--repeats 5] [--threads N]
        [--backbone resnet18 --backbone mobilenetv3_large_100]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F


def images_per_s(fn, x: torch.Tensor, repeats: int, warmup: int = 1) -> tuple[float, float]:
    """Images/s of ``fn(x)``: ``(wall clock, CPU time)``, each from the median of ``repeats`` calls.

    The CPU-time rate (process CPU seconds, all threads) does not depend on other jobs
    sharing the machine; with ``--threads 1`` it is the single-core throughput.
    """
    with torch.no_grad():
        for _ in range(warmup):
            fn(x)
        wall, cpu = [], []
        for _ in range(repeats):
            t, c = time.perf_counter(), time.process_time()
            fn(x)
            wall.append(time.perf_counter() - t)
            cpu.append(time.process_time() - c)
    wall.sort()
    cpu.sort()
    return x.shape[0] / wall[len(wall) // 2], x.shape[0] / cpu[len(cpu) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--classes", type=int, default=20)
    ap.add_argument("--backbone", action="append", default=None, help="timm backbone(s); default resnet18")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import open_clip

    from clip_es.train.model import SegmenterArch, build_segmenter, count_parameters

    torch.manual_seed(0)
    x = torch.rand(1, 3, args.size, args.size)
    text = F.normalize(torch.randn(args.classes, 512), dim=-1)

    clip = open_clip.create_model("ViT-B-16", pretrained=None, force_image_size=args.size).visual.eval()
    rows = [("CLIP ViT-B/16 image encoder", count_parameters(clip),
             images_per_s(clip, (x - 0.45) / 0.27, args.repeats))]
    for bb in args.backbone or ["resnet18"]:
        for blocks in (2, 0):
            model = build_segmenter(SegmenterArch(backbone=bb, text_dim=512, fusion_blocks=blocks)).eval()
            name = f"segmenter {bb}, " + (f"{blocks} fusion blocks" if blocks else "no fusion")
            rows.append((name, count_parameters(model), images_per_s(lambda v: model(v, text), x, args.repeats)))

    print(f"input {args.size}x{args.size}, batch 1, fp32, CPU, {torch.get_num_threads()} threads, "
          f"median of {args.repeats}; img/s by wall clock and by process CPU time")
    print(f"{'model':<52} {'params (M)':>10} {'x fewer':>8} {'img/s wall':>11} {'speed-up':>9} "
          f"{'img/s cpu':>10} {'speed-up':>9}")
    ref_p, (ref_w, ref_c) = rows[0][1], rows[0][2]
    for name, p, (w, c) in rows:
        print(f"{name:<52} {p / 1e6:>10.2f} {ref_p / p:>7.1f}x {w:>11.2f} {w / ref_w:>8.1f}x {c:>10.2f} "
              f"{c / ref_c:>8.1f}x")


if __name__ == "__main__":
    main()
