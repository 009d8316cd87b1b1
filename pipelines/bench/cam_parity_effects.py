"""What each of the cam stage's release-parity rules changes in the maps (issue 15, part 1).

    OMP_NUM_THREADS=1 python pipelines/bench/cam_parity_effects.py [--model clipes-tiny] [--n 40]

On held-out toy images (world seed 1, the val split; the bundled clipes-tiny was trained on
seed 1000), fp32, default settings, computes the maps with today's rules and with one rule
put back to what the stage did before (or, for the boxes, to the release's exclusive end),
and prints per rule the maximum absolute difference of the CAM and CAA maps (patch grid,
what the record stores; the upsampled maps cannot differ more) and how many maps differ by
more than 1e-3.

The "before" variants live only in this script:
  resize      OpenCV INTER_CUBIC instead of PIL bicubic;
  threshold   uint8 map with peak 255, pixels above int(0.4 * 255) (a cut at 0.4039);
  float32     balancing, product and min-max of CAA in float32;
  boxes       the release's box end clipped to width-1 / height-1 (drops the last
              row/column of boxes touching the right/bottom border).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from clip_es.cam import caa as caa_mod  # noqa: E402
from clip_es.cam import run as run_mod  # noqa: E402
from clip_es.cam.gradcam import minmax  # noqa: E402
from clip_es.data.registry import open_dataset  # noqa: E402
from clip_es.data.toy import make_toy  # noqa: E402
from clip_es.model.resolve import load_clip  # noqa: E402


def cv2_preprocess(image, scale, patch, mean, std, flip=False):
    H, W = image.shape[:2]
    h, w = max(1, math.ceil(scale * H / patch)) * patch, max(1, math.ceil(scale * W / patch)) * patch
    img = np.ascontiguousarray(image[:, ::-1] if flip else image)
    x = cv2.resize(img, (w, h), interpolation=cv2.INTER_CUBIC).astype(np.float32) / 255.0
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return torch.from_numpy(x).permute(2, 0, 1)[None].contiguous()


def _boxes(binary: np.ndarray, exclusive_border: bool = False) -> np.ndarray:
    out = np.zeros_like(binary)
    if not binary.any():
        return out
    H, W = binary.shape
    contours, _ = cv2.findContours(binary, cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE)
    for c in contours:
        x, y, w, h = cv2.boundingRect(c)
        x1, y1 = (min(x + w, W - 1), min(y + h, H - 1)) if exclusive_border else (x + w, y + h)
        out[y:y1, x:x1] = 1
    return out


def uint8_box_mask(cam, threshold=0.4):
    q = (np.clip(cam, 0, 1) * 255).astype(np.uint8)
    return _boxes((q > int(threshold * int(q.max()))).astype(np.uint8))


def release_box_mask(cam, threshold=0.4):
    cam = np.asarray(cam, np.float64)
    peak = float(cam.max())
    if not peak > 0:
        return np.zeros(cam.shape, np.uint8)
    return _boxes((cam >= threshold * peak).astype(np.uint8), exclusive_border=True)


def float32_balance(attn, iters=3):
    t = attn.float()
    for _ in range(iters):
        t = t / t.sum(-2, keepdim=True).clamp(min=1e-12)
        t = t / t.sum(-1, keepdim=True).clamp(min=1e-12)
    t = (t + t.transpose(-1, -2)) / 2
    return t @ t


def float32_caa(cams, trans, threshold=0.4):
    k, h, w = cams.shape
    out = torch.zeros_like(cams)
    for i in range(k):
        m = torch.from_numpy(caa_mod.box_mask(cams[i].numpy(), threshold)).float().reshape(-1)
        if m.any():
            out[i] = ((trans.float() * m[None]) @ cams[i].reshape(-1).float()).reshape(h, w)
    return minmax(out) if k else out


VARIANTS = {
    "resize (cv2 INTER_CUBIC)": [(run_mod, "preprocess", cv2_preprocess)],
    "threshold (uint8, 0.4039)": [(caa_mod, "box_mask", uint8_box_mask)],
    "float32 CAA": [(run_mod, "balance_affinity", float32_balance), (run_mod, "caa_refine", float32_caa)],
    "release boxes (exclusive end)": [(caa_mod, "box_mask", release_box_mask)],
}
VARIANTS["all three old rules"] = (VARIANTS["resize (cv2 INTER_CUBIC)"] + VARIANTS["threshold (uint8, 0.4039)"]
                                   + VARIANTS["float32 CAA"])


@contextlib.contextmanager
def patched(patches):
    saved = [(mod, name, getattr(mod, name)) for mod, name, _ in patches]
    try:
        for mod, name, fn in patches:
            setattr(mod, name, fn)
        yield
    finally:
        for mod, name, fn in saved:
            setattr(mod, name, fn)


def maps(engine, ds, ids):
    out = {}
    for image_id in ids:
        out[image_id] = engine.compute(ds.load_image(image_id), list(ds.labels(image_id)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="clipes-tiny")
    ap.add_argument("--root", type=Path, default=None, help="held-out toy set (default: made in a temp dir)")
    ap.add_argument("--n", type=int, default=40, help="val images used")
    args = ap.parse_args()
    root = args.root or Path(tempfile.mkdtemp(prefix="parity-")) / "toy"
    if not (root / "ImageSets" / "Segmentation" / "val.txt").is_file():
        make_toy(root, n=200, seed=1, progress=False)
    ds = open_dataset("toy", root, "val")
    ids = ds.ids()[: args.n]
    clip = load_clip(args.model)
    cfg = run_mod.CamConfig(dataset="toy", root=str(root), split="val", out="-", precision="fp32",
                            background="toy")
    engine = run_mod.build_engine(cfg, ds.classes, clip)
    base = maps(engine, ds, ids)
    n_maps = sum(len(c) for c, _ in base.values())
    print(f"{args.model}, {len(ids)} held-out toy images (seed 1, val), {n_maps} class maps, fp32, "
          f"{torch.get_num_threads()} thread(s)")
    print(f"{'variant vs today':<32}{'CAM max|d|':>12}{'CAM maps>1e-3':>15}{'CAA max|d|':>12}{'CAA maps>1e-3':>15}")
    for name, patches in VARIANTS.items():
        with patched(patches):
            other = maps(engine, ds, ids)
        row = []
        for j in (0, 1):
            diffs = [np.abs(base[i][j] - other[i][j]).reshape(len(base[i][j]), -1).max(1) for i in ids
                     if len(base[i][j])]
            d = np.concatenate(diffs)
            row += [float(d.max()), int((d > 1e-3).sum())]
        print(f"{name:<32}{row[0]:>12.2e}{row[1]:>11}/{n_maps:<3}{row[2]:>12.2e}{row[3]:>11}/{n_maps:<3}")


if __name__ == "__main__":
    main()
