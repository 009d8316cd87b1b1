"""Benchmark: refine-stage speed, one worker vs a process pool, on toy images.

    python pipelines/bench/bench_refine.py --n 100 --workers 2
    python pipelines/bench/bench_refine.py --n 10            # a quick check that it works

Makes ``--n`` toy images, runs the cam stage on them (``--model``: default the bundled
``clipes-tiny`` when its weights exist, else a seeded random tiny CLIP built here; the
maps' quality does not matter for speed), then times ``refine`` into two copies of that
run: ``--workers 1`` and ``--workers N``. Prints the speed-up (target >= 1.7x with 2
workers on 2 idle cores), the end-to-end refine time per megapixel, the pure
``dense_crf`` time per megapixel, and checks that both runs wrote byte-identical files.
Timings are only meaningful on an otherwise idle machine; the script says when the load
average suggests it is not.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def _model(arg: str | None, work: Path) -> str:
    """The ``--model`` value for the cam stage."""
    from clip_es.model.tiny import TINY_CHECKPOINT, TINY_NAME, TinyClipConfig, build_tiny_clip

    if arg:
        return arg
    if TINY_CHECKPOINT.is_file():
        return TINY_NAME
    import torch

    torch.manual_seed(0)
    model = build_tiny_clip(TinyClipConfig(embed_dim=64, image_size=64, vision_width=64, vision_layers=3,
                                           text_width=64, text_layers=1))
    path = work / "random-tiny-clip.pt"
    torch.save({k: v for k, v in model.state_dict().items() if k != "attn_mask"}, path)
    print(f"note: {TINY_NAME} weights not found; using a random tiny CLIP ({path})")
    return str(path)


def _outputs(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted((run / "refine").glob("*/*.png"))}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=100, help="toy images (default 100)")
    ap.add_argument("--workers", type=int, default=2, help="pool size to compare with 1 worker (default 2)")
    ap.add_argument("--model", default=None, help="CLIP for the cam stage (default clipes-tiny if present)")
    ap.add_argument("--seed", type=int, default=7, help="toy world seed")
    ap.add_argument("--crf-images", type=int, default=20, help="images for the pure dense_crf timing")
    ap.add_argument("--out", type=Path, default=None, help="keep the work folder here (default: a temp folder)")
    ap.add_argument("--json", type=Path, default=None, help="also write the results as JSON here")
    args = ap.parse_args(argv)

    import numpy as np
    import torch

    from clip_es.cam.run import CamConfig, generate_cams
    from clip_es.cam.store import load_cam
    from clip_es.data.image_io import image_size
    from clip_es.data.toy import make_toy
    from clip_es.evaluate import dataset_of_run
    from clip_es.refine.crf import CrfParams, dense_crf, scores_to_probs, stack_scores
    from clip_es.refine.run import RefineConfig, refine_masks
    from clip_es.rundir import RunDir

    torch.set_num_threads(1)
    work = args.out or Path(tempfile.mkdtemp(prefix="bench_refine_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        root = make_toy(work / "toy", n=args.n, seed=args.seed, val_fraction=0.0, progress=False)
        cam_run = work / "cam_run"
        if not (cam_run / "cam").is_dir() or len(list((cam_run / "cam").glob("*.npz"))) < args.n:
            t = time.perf_counter()
            res = generate_cams(CamConfig(dataset="toy", root=str(root), split="train", out=str(cam_run),
                                          model=_model(args.model, work), device="cpu"), progress=False)
            print(f"{res.summary()} in {time.perf_counter() - t:.1f}s")

        ds = dataset_of_run(RunDir(cam_run))
        ids = ds.ids()
        mpix = sum(float(np.prod(image_size(ds.image_path(i)))) for i in ids) / 1e6

        load = os.getloadavg()[0]
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        times = {}
        runs = {}
        for w in (1, args.workers):
            run = work / f"run_w{w}"
            shutil.rmtree(run, ignore_errors=True)
            shutil.copytree(cam_run, run)
            t = time.perf_counter()
            res = refine_masks(RefineConfig(run=str(run), workers=w, save_conf=True), progress=False)
            times[w] = time.perf_counter() - t
            runs[w] = run
            if not res.ok:
                raise SystemExit(f"refine failed on {len(res.failed)} images: {res.failed}")
        identical = _outputs(runs[1]) == _outputs(runs[args.workers])

        # pure CRF timing (no file I/O), on the first images
        crf_px, crf_t = 0, 0.0
        for i in ids[: args.crf_images]:
            maps = load_cam(cam_run / "cam" / f"{i}.npz")
            image = ds.load_image(i)
            probs = scores_to_probs(stack_scores(maps.caa))
            t = time.perf_counter()
            dense_crf(image, probs, CrfParams())
            crf_t += time.perf_counter() - t
            crf_px += image.shape[0] * image.shape[1]

        out = {"images": len(ids), "megapixels": round(mpix, 4), "workers": args.workers,
               "seconds_w1": round(times[1], 3), f"seconds_w{args.workers}": round(times[args.workers], 3),
               "speedup": round(times[1] / times[args.workers], 3),
               "refine_s_per_mpix_w1": round(times[1] / mpix, 3),
               "dense_crf_s_per_mpix": round(crf_t / (crf_px / 1e6), 3),
               "identical_outputs": identical, "load_avg_1min_before": round(load, 2), "cores": cores}
        print(f"refine on {len(ids)} toy images ({mpix:.2f} MP):")
        print(f"  workers=1: {times[1]:.2f}s   workers={args.workers}: {times[args.workers]:.2f}s   "
              f"speed-up {out['speedup']:.2f}x (target >= 1.7x with 2 workers on 2 idle cores)")
        print(f"  refine (end to end, 1 worker): {out['refine_s_per_mpix_w1']:.2f} s/MP   "
              f"dense_crf alone: {out['dense_crf_s_per_mpix']:.2f} s/MP")
        print(f"  outputs identical across worker counts: {identical}")
        if load > 0.5 * (cores or 1):
            print(f"  warning: load average was {load:.1f} on {cores} cores before timing; "
                  "the speed-up is not reliable on a busy machine")
        if args.json:
            args.json.write_text(json.dumps(out, indent=2))
        if not identical:
            raise SystemExit("outputs differ between worker counts")
        return out
    finally:
        if args.out is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
