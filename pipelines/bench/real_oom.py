"""A real out-of-memory error in the cam stage, and its recovery (gpu_check.sh's ``real-oom`` step).

    python pipelines/bench/real_oom.py --device cuda          # on a GPU
    python pipelines/bench/real_oom.py --device cpu --dry-run # the same flow on the CPU, OOM simulated

On CUDA: a random-weight ViT-B/16 (``ViT-B-16-quickgelu``, no download) on same-size
``--size`` photos. One image is run alone first, and its peak GPU memory sets the batch: as
many images as it takes to need 1.3x the GPU's free memory. The stage runs that batch
(``clipes cam --batch-size B``), the allocator runs out of memory for real, the stage frees
the batch and retries its images one at a time; then a second run at batch 1 gives the
reference. Prints one line: the batch, the memory figures, how many out-of-memory errors the
stage caught (counted, not changed: ``is_out_of_memory`` is observed), and the largest
difference between the two runs' records. Exit 1 unless at least one real OOM was caught,
every image was written and the records equal the batch-1 run's (within 1e-5).

``--dry-run`` (CPU): the bundled clipes-tiny, a batch of 4, and the OOM raised by a stand-in
for the attention (where the largest allocation is): a CPU has no allocator limit to exhaust
without endangering the machine; everything after the error is the real path.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "pipelines" / "bench"))

from bench_cam_stage import make_images, save_vit  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--size", default="1000x1000", help="HxW of the images (below --max-side 1024)")
    ap.add_argument("--dry-run", action="store_true", help="CPU: clipes-tiny, batch 4, the OOM simulated")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    import numpy as np
    import torch

    from clip_es.cam import run as cam_run
    from clip_es.cam.run import CamConfig, generate_cams
    from clip_es.cam.store import load_cam
    from clip_es.model import dense
    from clip_es.model.resolve import load_clip

    torch.set_num_threads(args.threads)
    h, w = (int(v) for v in args.size.split("x"))
    tmp = Path(tempfile.mkdtemp(prefix="real-oom-"))
    cuda = args.device.startswith("cuda")
    if args.dry_run or not cuda:
        model, weights = "clipes-tiny", None
        h, w = min(h, 96), min(w, 128)
    else:
        model, weights = "ViT-B-16-quickgelu", tmp / "vit.pt"
        save_vit(weights)
    clip = load_clip(model, str(weights) if weights else None, device=args.device)
    make_images(tmp / "one", 1, (h, w))

    def cfg(root: Path, out: str, batch: int) -> CamConfig:
        return CamConfig(dataset="folder", root=str(root), split="labels", out=str(tmp / out), model=model,
                         pretrained=str(weights) if weights else None, background="voc", device=args.device,
                         precision="fp32", batch_size=batch, threads=args.threads)

    free = total = peak = None
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        assert generate_cams(cfg(tmp / "one", "probe", 1), clip=clip, progress=False).ok
        peak = torch.cuda.max_memory_allocated() - base
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info()
        batch = max(2, math.ceil(1.3 * free / max(peak, 1)))
    else:
        batch = 4
    make_images(tmp / "data", batch, (h, w))

    caught: list[str] = []
    real_check = cam_run.is_out_of_memory

    def observed(e: BaseException) -> bool:
        hit = real_check(e)
        if hit:
            caught.append(type(e).__name__)
        return hit

    cam_run.is_out_of_memory = observed
    real_attention = dense.explicit_attention
    if not cuda:
        def attention(q, k, v, attn_mask=None):  # the stand-in: a batch does not fit, one image does
            if q.shape[0] > 1:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated on the CPU)")
            return real_attention(q, k, v, attn_mask)

        dense.explicit_attention = attention
    t = time.perf_counter()
    res = generate_cams(cfg(tmp / "data", "oom", batch), clip=clip, progress=False)
    t_oom = time.perf_counter() - t
    dense.explicit_attention = real_attention
    cam_run.is_out_of_memory = real_check
    t = time.perf_counter()
    ref = generate_cams(cfg(tmp / "data", "ref", 1), clip=clip, progress=False)
    t_ref = time.perf_counter() - t

    diff = 0.0
    same_keys = True
    for p in sorted((tmp / "ref" / "cam").glob("*.npz")):
        a, b = load_cam(tmp / "oom" / "cam" / p.name), load_cam(p)
        same_keys &= bool(np.array_equal(a.keys, b.keys))
        diff = max(diff, float(np.abs(a.cam - b.cam).max()), float(np.abs(a.caa - b.caa).max()))
    mem = (f"one image peaks at {peak / 2**30:.2f} GB, {free / 2**30:.1f} of {total / 2**30:.1f} GB free"
           if cuda else "simulated on the CPU")
    ok = bool(caught) and res.ok and res.done == batch and ref.done == batch and same_keys and diff <= 1e-5
    print(f"real-oom: {'ok' if ok else 'FAILED'}: batch {batch} of {h}x{w} ({mem}): {len(caught)} OOM caught "
          f"({', '.join(sorted(set(caught))) or 'none'}), {res.done}/{batch} written one by one in {t_oom:.1f} s "
          f"(batch-1 run {t_ref:.1f} s); vs batch 1: keys {'same' if same_keys else 'DIFFER'}, max |diff| {diff:.1e}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
