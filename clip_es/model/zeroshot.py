"""Zero-shot multi-label classification quality of a CLIP on a labelled dataset.

The tiny CLIP's headline figure next to its CAM mIoU (SPEC section 6), and a quick
check of any CLIP on a user's dataset before generating masks with it.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from clip_es.model.dense import Pooling, encode_image
from clip_es.model.text import DEFAULT_TEMPLATE, class_embeddings


def mean_average_precision(scores: np.ndarray, gts: np.ndarray) -> tuple[float, list[float | None]]:
    """Mean over classes of average precision.

    Args:
        scores: ``(n_images, n_classes)`` higher = more likely present.
        gts: ``(n_images, n_classes)`` in {0, 1}.

    Returns:
        ``(mAP over classes with at least one positive, per-class AP or None)``.
    """
    aps: list[float | None] = []
    for c in range(scores.shape[1]):
        g = gts[np.argsort(-scores[:, c], kind="stable"), c]
        if g.sum() == 0:
            aps.append(None)
            continue
        precision = np.cumsum(g) / np.arange(1, len(g) + 1)
        aps.append(float((precision * g).sum() / g.sum()))
    valid = [a for a in aps if a is not None]
    return (float(np.mean(valid)) if valid else float("nan")), aps


@torch.no_grad()
def zero_shot_map(clip, dataset, templates: Sequence[str] = (DEFAULT_TEMPLATE,), pooling: Pooling = "mean",
                  fusion: str = "sentence", limit: int | None = None, progress: bool = False) -> dict:
    """Multi-label mAP of the softmax over the dataset's classes, images at native size.

    Returns:
        ``{"map": float, "per_class": {name: AP | None}, "images": n, "pooling": pooling}``.
    """
    from clip_es.cam.run import preprocess

    text = class_embeddings(clip, dataset.classes, templates, fusion)
    ids = dataset.ids()[:limit] if limit else dataset.ids()
    scores, gts = [], []
    for image_id in tqdm(ids, desc=f"zero-shot {pooling}", disable=not progress, unit="img"):
        x = preprocess(dataset.load_image(image_id), 1.0, clip.patch_size, clip.mean, clip.std).to(clip.device)
        img = F.normalize(encode_image(clip.visual, x, pooling), dim=-1)
        scores.append((clip.logit_scale * img @ text.t()).softmax(-1)[0].cpu().numpy())
        g = np.zeros(len(dataset.classes))
        g[list(dataset.labels(image_id))] = 1
        gts.append(g)
    m, per = mean_average_precision(np.stack(scores), np.stack(gts))
    return {"map": m, "per_class": {c.name: a for c, a in zip(dataset.classes, per)}, "images": len(ids),
            "pooling": pooling}
