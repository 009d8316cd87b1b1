"""Dense CRF vs PAMR on the same images in one run: speed, agreement, matched threshold (issue 21, item 3).

    OMP_NUM_THREADS=1 python pipelines/bench/bench_refine_methods.py --run RUN [--n 100]
    python pipelines/bench/bench_refine_methods.py --run RUN --device cuda --size voc   # on a GPU machine

``RUN`` is a run folder with a cam stage (``clipes cam ... -o RUN``). The first ``--n`` of
its images are loaded into memory as the refine stage sees them (the image at its working
size, ``[bg, caa]`` normalised), optionally resized to VOC size (``--size voc``: 500x375,
bilinear, so a small toy image costs what a VOC photo would). Then, one method after the
other in this process, each image is refined and turned into its confidence mask
(:func:`~clip_es.refine.crf.labels_from_q`), after a one-image warm-up; decoding and PNG
writes are left out, so the figures are the methods' own. The CRF always runs on the CPU
with ``--threads`` threads (pydensecrf is single-threaded); PAMR on ``--device``.

Printed: images/s of each and their ratio (PAMR over CRF), the pixel agreement of the two
argmaxes, the share of pixels the CRF keeps at ``--conf`` and the PAMR threshold that
keeps the same share on these images (how PAMR's default threshold was chosen: on toy
*train* images, then checked on held-out val images with ``clipes eval``; docs/refine.md).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

VOC_HW = (375, 500)


def load_inputs(run: Path, n: int, size: str) -> list[tuple[str, "object", "object", "object"]]:
    """``[(id, image (H, W, 3) uint8, probs (K+1, H, W) float32, keys (K,))]`` for the first ``n`` cam records."""
    import cv2

    from clip_es.cam.store import load_cam, upsample
    from clip_es.data.image_io import read_image
    from clip_es.data.registry import dataset_of_run
    from clip_es.refine.crf import scores_to_probs, stack_scores
    from clip_es.rundir import RunDir

    rd = RunDir(run)
    ds = dataset_of_run(rd)
    cam_dir = rd.stage_dir("cam")
    ids = [i for i in ds.ids() if (cam_dir / f"{i}.npz").is_file()][:n]
    if not ids:
        raise SystemExit(f"{run}: no cam records; run 'clipes cam -o {run}' first")
    out = []
    for image_id in ids:
        maps = load_cam(cam_dir / f"{image_id}.npz", full_size=False)
        image = read_image(ds.image_path(image_id))
        hw = VOC_HW if size == "voc" else image.shape[:2]
        if image.shape[:2] != hw:
            image = cv2.resize(image, (hw[1], hw[0]), interpolation=cv2.INTER_LINEAR)
        probs = scores_to_probs(stack_scores(upsample(maps.caa, hw)))
        out.append((image_id, image, probs, maps.keys))
    return out


def time_method(name: str, device: str, inputs: list, conf: float) -> tuple[float, list]:
    """Seconds for all images (after a one-image warm-up) and the ``q`` of each."""
    from clip_es.refine.crf import labels_from_q
    from clip_es.refine.methods import get_method
    from clip_es.refine.run import RefineConfig

    method = get_method(name)
    params = getattr(RefineConfig(run="-"), method.params_field)
    _, image, probs, keys = inputs[0]
    method.refine(image, probs, params, device)  # warm-up (torch kernels, CUDA context)
    qs = []
    t = time.perf_counter()
    for _, image, probs, keys in inputs:
        q = method.refine(image, probs, params, device)  # returns a numpy array: synchronised
        labels_from_q(q, keys, conf)
        qs.append(q)
    return time.perf_counter() - t, qs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, required=True, help="run folder with a cam stage")
    ap.add_argument("--n", type=int, default=100, help="images (the first N with cam records)")
    ap.add_argument("--device", default="cpu", help="PAMR's device (the CRF runs on the CPU)")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (torch, OpenCV)")
    ap.add_argument("--size", choices=("native", "voc"), default="native",
                    help="native: images at their working size; voc: resized to 500x375")
    ap.add_argument("--conf", type=float, default=0.95, help="the CRF's confidence threshold")
    args = ap.parse_args()

    import cv2
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    cv2.setNumThreads(args.threads)
    inputs = load_inputs(args.run, args.n, args.size)
    h, w = inputs[0][1].shape[:2]
    labels = np.mean([len(k) for *_, k in inputs])
    print(f"refine methods on {len(inputs)} images of {args.run} ({args.size} size, first {h}x{w}; "
          f"{labels:.1f} labels + background per image); {args.threads} CPU thread(s); CRF on cpu, "
          f"PAMR on {args.device}")
    t_crf, q_crf = time_method("crf", "cpu", inputs, args.conf)
    t_pamr, q_pamr = time_method("pamr", args.device, inputs, args.conf)
    n = len(inputs)
    print(f"crf  cpu: {n / t_crf:9.2f} img/s ({1000 * t_crf / n:.2f} ms/img)")
    print(f"pamr {args.device}: {n / t_pamr:9.2f} img/s ({1000 * t_pamr / n:.2f} ms/img)")
    print(f"ratio pamr/crf: {t_crf / t_pamr:.2f}x")
    agree = sum(int((a.argmax(0) == b.argmax(0)).sum()) for a, b in zip(q_crf, q_pamr))
    total = sum(a[0].size for a in q_crf)
    print(f"argmax agreement crf vs pamr: {100 * agree / total:.2f} % of pixels")
    conf_crf = np.concatenate([q.max(0).ravel() for q in q_crf])
    conf_pamr = np.concatenate([q.max(0).ravel() for q in q_pamr])
    kept = float((conf_crf >= args.conf).mean())
    matched = float(np.quantile(conf_pamr, 1.0 - kept)) if kept > 0 else 1.0
    print(f"crf keeps {100 * kept:.2f} % of pixels at conf {args.conf}; pamr keeps the same share at conf "
          f"{matched:.4f} (pamr at {args.conf}: {100 * float((conf_pamr >= args.conf).mean()):.2f} %)")


if __name__ == "__main__":
    main()
