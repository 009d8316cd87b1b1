"""Benchmark the cam stage with a ViT-B/16-sized CLIP (random weights) at VOC-like sizes.

    python pipelines/bench/bench_cam.py [--device cpu] [--repeats 3] [--threads 2] [--size 375x500] [--no-peak]

Prints, each measured in this one run (medians over repeats):
  1. batched multi-target GradCAM vs per-target loops on a 3-label image, with the
     maximum absolute difference of the maps (must be <= 1e-4). Two loop baselines:
     "shared-forward loop" (one forward of the last block, one backward per class) and
     "full loop" (what a per-class GradCAM call does: the whole forward and a backward
     for every class);
  1b. the last block alone (its forward and the targets' gradients, the frozen blocks run
     once before): the closed-form ``analytic`` gradients (the default) vs autograd's
     ``batched`` backward, ratio and maximum absolute difference of the maps (<= 1e-5);
  2. the whole cam stage for one image (GradCAM + CAA) vs a plain no-grad forward of the
     same image (the floor);
  3. peak resident memory of the cam stage at 512x512 (measured in a fresh subprocess).
  4. images/s of the cam stage under autocast (the frozen blocks in reduced precision; the
     last block and the gradients in fp32, as the stage does), with the maps' largest
     difference from fp32: fp16 and bf16 on CUDA, and on any device those of --autocast
     (e.g. ``--device cpu --autocast bf16``, what gpu_check.sh's dry run does).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from clip_es.cam.caa import balance_affinity, caa_refine  # noqa: E402
from clip_es.cam.gradcam import softmax_gradcam  # noqa: E402
from clip_es.model import dense  # noqa: E402


def vit_b16():
    import open_clip

    torch.manual_seed(0)
    m = open_clip.create_model("ViT-B-16", pretrained=None).eval()
    for p in m.parameters():
        p.requires_grad_(False)
    return m


def timed(fn, repeats: int, sync=lambda: None) -> float:
    fn()  # warm-up
    sync()
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def cam_stage(visual, x, text, k, scale, mode="auto"):
    with torch.no_grad():
        d = dense.dense_forward(visual, x, attn_blocks=8)
    g = softmax_gradcam(visual, d.penultimate, d.grid, text, k, scale, mode=mode)
    aff = (d.attn_sum[0] + g.attn_last) / (d.attn_count + 1)
    return g.cam, caa_refine(g.cam, balance_affinity(aff), 0.4)


def gradcam_only(visual, x, text, k, scale, mode):
    with torch.no_grad():
        d = dense.dense_forward(visual, x, attn_blocks=0)
    return softmax_gradcam(visual, d.penultimate, d.grid, text, k, scale, mode=mode).cam


def full_loop(visual, x, text, k, scale):
    """Per-class GradCAM the usual way: whole forward + backward for each class."""
    cams = []
    for i in range(k):
        with torch.no_grad():
            d = dense.dense_forward(visual, x, attn_blocks=0)
        cams.append(softmax_gradcam(visual, d.penultimate, d.grid, text, k, scale, mode="loop").cam[i])
    return torch.stack(cams)


def peak_memory_child(size: int) -> None:
    torch.set_num_threads(2)
    m = vit_b16()
    x = torch.randn(1, 3, size, size)
    text = F.normalize(torch.randn(28, 512), dim=-1)
    cam_stage(m.visual, x, text, 3, 100.0)
    print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--size", default="375x500", help="HxW of the test image (VOC-like)")
    ap.add_argument("--no-peak", action="store_true", help="skip [3], the peak-memory subprocess (CPU only)")
    ap.add_argument("--autocast", default=None,
                    help="comma-separated dtypes for [4] (fp16,bf16); default fp16,bf16 on cuda, none on cpu")
    ap.add_argument("--peak-child", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.peak_child:
        peak_memory_child(args.peak_child)
        return
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    sync = (lambda: torch.cuda.synchronize()) if dev.type == "cuda" else (lambda: None)
    m = vit_b16().to(dev)
    visual = m.visual
    H, W = (int(v) for v in args.size.split("x"))
    h, w = -(-H // 16) * 16, -(-W // 16) * 16
    x = torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(1)).to(dev)
    k = 3
    text = F.normalize(torch.randn(k + 25, 512, generator=torch.Generator().manual_seed(2)), dim=-1).to(dev)
    scale = 100.0
    print(f"ViT-B/16 random weights, image {H}x{W} -> {h}x{w} ({h // 16 * w // 16} tokens), {k} targets, "
          f"25 background words, device {dev}, {torch.get_num_threads()} threads, median of {args.repeats}")

    a = gradcam_only(visual, x, text, k, scale, "batched")
    b = gradcam_only(visual, x, text, k, scale, "loop")
    c = full_loop(visual, x, text, k, scale)
    diff = max(float((a - b).abs().max()), float((a - c).abs().max()))
    t_batched = timed(lambda: gradcam_only(visual, x, text, k, scale, "batched"), args.repeats, sync)
    t_loop = timed(lambda: gradcam_only(visual, x, text, k, scale, "loop"), args.repeats, sync)
    t_full = timed(lambda: full_loop(visual, x, text, k, scale), args.repeats, sync)
    print(f"[1] GradCAM batched {t_batched:.3f}s | shared-forward loop {t_loop:.3f}s "
          f"(ratio {t_loop / t_batched:.2f}x) | full per-class loop {t_full:.3f}s (ratio {t_full / t_batched:.2f}x)"
          f" | max |diff| {diff:.2e}  (targets: >= 1.5x, <= 1e-4)")

    with torch.no_grad():
        d = dense.dense_forward(visual, x, attn_blocks=0)

    def last_block(mode):
        return softmax_gradcam(visual, d.penultimate, d.grid, text, k, scale, mode=mode).cam

    diff_a = float((last_block("analytic") - last_block("batched")).abs().max())
    t_an = timed(lambda: last_block("analytic"), args.repeats, sync)
    t_bt = timed(lambda: last_block("batched"), args.repeats, sync)
    print(f"[1b] last block + gradients: analytic {t_an:.3f}s | autograd batched {t_bt:.3f}s "
          f"(ratio {t_bt / t_an:.2f}x) | max |diff| {diff_a:.2e}  (target: <= 1e-5)")

    def plain():
        with torch.no_grad():
            return dense.encode_image(visual, x, "mean")

    t_plain = timed(plain, args.repeats, sync)
    t_stage = timed(lambda: cam_stage(visual, x, text, k, scale), args.repeats, sync)
    print(f"[2] cam stage (GradCAM + CAA) {t_stage:.3f}s vs plain no-grad forward {t_plain:.3f}s: "
          f"ratio {t_stage / t_plain:.2f}  (target <= 1.3)")

    if dev.type == "cpu" and not args.no_peak:
        out = subprocess.run([sys.executable, __file__, "--peak-child", "512"], capture_output=True, text=True,
                             check=True)
        peak = json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_mb"]
        print(f"[3] peak resident memory, cam stage at 512x512: {peak / 1024:.2f} GB  (target <= 2.5 GB)")
    names = args.autocast if args.autocast is not None else ("fp16,bf16" if dev.type == "cuda" else "")
    dtypes = {"fp16": torch.float16, "bf16": torch.bfloat16}
    where = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    ref = cam_stage(visual, x, text, k, scale)[1]
    for name in filter(None, names.split(",")):
        if name not in dtypes:
            raise SystemExit(f"--autocast: unknown dtype {name!r} (valid: fp16, bf16)")
        with torch.autocast(dev.type, dtype=dtypes[name]):
            t = timed(lambda: cam_stage(visual, x, text, k, scale), max(args.repeats, 10 if dev.type == "cuda" else 1),
                      sync)
            got = cam_stage(visual, x, text, k, scale)[1]
        print(f"[4] cam stage on {where} with {name} autocast: {1 / t:.1f} images/s | "
              f"max |diff| of the CAA maps vs fp32 {float((got.float() - ref.float()).abs().max()):.2e}")


if __name__ == "__main__":
    main()
