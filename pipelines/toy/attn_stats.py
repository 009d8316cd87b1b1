"""How much of a CLIP's attention stays on the querying patch's own object (the quantity CAA needs).

    python pipelines/toy/attn_stats.py [--model clipes-tiny] [--root runs/toy] [--split val] [--n 60]

For every foreground object of the first ``--n`` images (ground truth at the patch grid,
majority class per patch), the mean over the object's patches of the share of their
attention row that lands on the same object, per block, for the mean over the last ``--last`` blocks (as CAA averages them) and for
the CAA transition matrix (Sinkhorn-balanced, symmetrised, squared). ``area`` is the
object's share of the image: the value a uniform (object-blind) row would give.
``perplexity/N``: exp(row entropy) over the patch count, 1 = uniform attention.
``from_background`` / ``from_other_objects``: the share of the mean attention of background
patches / of the other objects' patches that lands on the object; when these are close to
the object's own share, the mass is saliency (everyone looks at objects), which CAA's
Sinkhorn balancing removes, not grouping.
Diagnostic only: no ground truth ever reaches training.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from clip_es.cam.caa import balance_affinity  # noqa: E402
from clip_es.cam.run import preprocess  # noqa: E402
from clip_es.data.registry import open_dataset  # noqa: E402
from clip_es.model.dense import block_forward, embed  # noqa: E402
from clip_es.model.resolve import load_clip  # noqa: E402


def patch_labels(mask: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """Majority ground-truth class of each patch of a ``grid`` laid over ``mask``."""
    h, w = grid
    H, W = mask.shape
    ys = np.linspace(0, H, h + 1).astype(int)
    xs = np.linspace(0, W, w + 1).astype(int)
    out = np.zeros((h, w), np.int64)
    for i in range(h):
        for j in range(w):
            cell = mask[ys[i]:max(ys[i + 1], ys[i] + 1), xs[j]:max(xs[j + 1], xs[j] + 1)].ravel()
            out[i, j] = np.bincount(cell[cell != 255], minlength=1).argmax() if (cell != 255).any() else 255
    return out.ravel()


def own_share(mat: np.ndarray, lab: np.ndarray, c: int, rows_of: np.ndarray | None = None) -> float:
    """Mean share of the rows of ``rows_of`` patches (default: class ``c``'s) that lands on class ``c``."""
    rows = mat[lab == c if rows_of is None else rows_of]
    return float((rows[:, lab == c].sum(1) / rows.sum(1).clip(1e-12)).mean())


@torch.no_grad()
def measure(model: str, root: Path, split: str, n: int, last: int = 8) -> dict:
    clip = load_clip(model)
    ds = open_dataset("toy", root, split)
    stats: dict[str, list[float]] = {}
    perp = []
    for image_id in ds.ids()[:n]:
        image = ds.load_image(image_id)
        x = preprocess(image, 1.0, clip.patch_size, clip.mean, clip.std)
        tok, grid = embed(clip.visual, x)
        mats = []
        for blk in clip.visual.transformer.resblocks:
            tok, _, probs = block_forward(blk, tok, need_weights=True)
            mats.append(probs[0, 1:, 1:].double())
        lab = patch_labels(ds.load_gt(image_id), grid)
        mean = torch.stack(mats[-last:]).mean(0)  # the blocks CAA averages
        trans = balance_affinity(mean.float()).double()
        named = {f"block{i + 1}": m for i, m in enumerate(mats)} | {"mean": mean, "T": trans}
        p = mean / mean.sum(1, keepdim=True)
        perp.append(float(torch.exp(-(p * p.clamp(min=1e-12).log()).sum(1)).mean()) / p.shape[0])
        objects = [c for c in np.unique(lab) if c not in (0, 255) and (lab == c).sum() >= 2]
        for c in objects:
            stats.setdefault("area", []).append(float((lab == c).mean()))
            for k, m in named.items():
                stats.setdefault(k, []).append(own_share(m.numpy(), lab, c))
            if (lab == 0).any():
                stats.setdefault("from_background", []).append(own_share(mean.numpy(), lab, c, lab == 0))
            others = np.isin(lab, [d for d in objects if d != c])
            if others.any():
                stats.setdefault("from_other_objects", []).append(own_share(mean.numpy(), lab, c, others))
    out = {k: float(np.mean(v)) for k, v in stats.items()}
    out["objects"] = len(stats.get("area", []))
    out["perplexity/N"] = float(np.mean(perp))
    out["enrichment_T"] = out["T"] / out["area"]
    out["enrichment_mean"] = out["mean"] / out["area"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="clipes-tiny", help="clipes-tiny or a checkpoint path")
    ap.add_argument("--root", type=Path, default=ROOT / "runs" / "toy")
    ap.add_argument("--split", default="val")
    ap.add_argument("--n", type=int, default=60, help="images to measure")
    ap.add_argument("--last", type=int, default=8, help="blocks averaged for 'mean' and T (as cam's --caa-blocks)")
    args = ap.parse_args()
    print(json.dumps(measure(args.model, args.root, args.split, args.n, args.last), indent=1))


if __name__ == "__main__":
    main()
