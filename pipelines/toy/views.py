"""The toy world as the tiny-CLIP recipe sees it: views (crops) and boxes, with their labels.

A view is a crop of a scene (or the whole scene) resized to a training size; a box is a
rectangle on a view's patch grid. Both are labelled by the caption writer's rule
(:func:`visible_labels`), decided from the generator's own object layout, the way a person
writing captions would look at the crop: objects clearly visible are present, slivers are
neither present nor absent (left out of the loss). No pixel-level target is produced.
"""

from __future__ import annotations

import numpy as np

from clip_es.data.toy import TOY_BACKGROUNDS, TOY_CLASSES, caption_for

#: The words the recipe's prompts name: the classes, then the backgrounds.
WORDS = list(TOY_CLASSES) + list(TOY_BACKGROUNDS)


def visible_labels(mask: np.ndarray, box: tuple[int, int, int, int], background: int,
                   totals: np.ndarray | None = None):
    """Labels of the objects clearly visible in ``mask[y0:y1, x0:x1]`` (the caption writer's rule).

    An object counts as present when at least 40% of it, or 15% of the box, is inside;
    a sliver (over 5% of it or 2% of the box) is ignored (-1); else absent. Background
    likewise by its share of the box. ``totals`` (per-class pixel counts of the whole mask)
    may be passed when one mask is judged for many boxes. Returns
    ``(labels (len(WORDS),), names, bg_name)``.
    """
    y0, x0, y1, x1 = box
    cm = mask[y0:y1, x0:x1]
    area = max(1, cm.size)
    if totals is None:
        totals = np.bincount(mask.ravel(), minlength=len(TOY_CLASSES) + 1)
    inside_all = np.bincount(cm.ravel(), minlength=len(TOY_CLASSES) + 1)
    labels = np.zeros(len(WORDS), np.float32)
    names = []
    for c in range(1, len(TOY_CLASSES) + 1):
        total, inside = int(totals[c]), int(inside_all[c])
        if total == 0:
            continue
        if inside >= 0.4 * total or inside >= 0.15 * area:
            labels[c - 1] = 1
            names.append(TOY_CLASSES[c - 1])
        elif inside > 0.05 * total or inside > 0.02 * area:
            labels[c - 1] = -1  # a sliver: neither present nor absent
    bg_share = float(inside_all[0]) / area
    bgi = len(TOY_CLASSES) + background
    if bg_share >= 0.15:
        labels[bgi] = 1
    elif bg_share > 0.02:
        labels[bgi] = -1
    return labels, names, (TOY_BACKGROUNDS[background] if labels[bgi] == 1 else None)


def sample_view(scene, rng: np.random.Generator, size: tuple[int, int], full_p: float):
    """A crop (or the whole image) of a scene resized to ``size``, with its labels.

    Returns ``(image (h, w, 3) uint8, labels (len(WORDS),) float in {0, 1, -1=ignore}, caption,
    (y0, x0, y1, x1, flipped))``; the last item says where the view sits in the scene.
    """
    import cv2

    img, mask = scene.image, scene.mask
    H, W = mask.shape
    if rng.random() < full_p:
        y0, x0, y1, x1 = 0, 0, H, W
    else:
        th, tw = size
        frac = rng.uniform(0.3, 0.9)
        ch = int(round(min(H, W * th / tw) * frac))
        cw = int(round(ch * tw / th))
        ch, cw = max(16, min(ch, H)), max(16, min(cw, W))
        y0 = int(rng.integers(0, H - ch + 1))
        x0 = int(rng.integers(0, W - cw + 1))
        y1, x1 = y0 + ch, x0 + cw
    crop = img[y0:y1, x0:x1]
    labels, names, bg_name = visible_labels(mask, (y0, x0, y1, x1), scene.background)
    out = cv2.resize(crop, (size[1], size[0]), interpolation=cv2.INTER_AREA if crop.shape[0] > size[0]
                     else cv2.INTER_CUBIC)
    flipped = bool(rng.random() < 0.5)
    if flipped:
        out = out[:, ::-1]
    return np.ascontiguousarray(out), labels, caption_for(names, bg_name, rng), (y0, x0, y1, x1, flipped)


def sample_regions(scene, geom, grid: tuple[int, int], rng: np.random.Generator, n: int):
    """``n`` random boxes on a view's patch grid, with the labels of what is visible in each.

    The boxes are crops judged by the same rule as :func:`sample_view`'s, but their
    features are pooled from the whole view's forward pass, so tokens inside a box are
    asked not to carry classes that are only outside it. Returns ``(weights (n, gh*gw),
    labels (n, len(WORDS)))``; a box's weights average its patches.
    """
    y0, x0, y1, x1, flipped = geom
    gh, gw = grid
    sy, sx = (y1 - y0) / gh, (x1 - x0) / gw
    weights = np.zeros((n, gh * gw), np.float32)
    labels = np.zeros((n, len(WORDS)), np.float32)
    totals = np.bincount(scene.mask.ravel(), minlength=len(TOY_CLASSES) + 1)
    for r in range(n):
        bh = int(rng.integers(max(1, gh // 4), gh + 1))
        bw = int(rng.integers(max(1, gw // 4), gw + 1))
        py = int(rng.integers(0, gh - bh + 1))
        px = int(rng.integers(0, gw - bw + 1))
        cell = np.zeros((gh, gw), np.float32)
        cell[py:py + bh, px:px + bw] = 1.0 / (bh * bw)
        weights[r] = cell.ravel()
        if flipped:  # view column px is scene column x1 - px * sx
            ax0, ax1 = x1 - (px + bw) * sx, x1 - px * sx
        else:
            ax0, ax1 = x0 + px * sx, x0 + (px + bw) * sx
        box = (int(round(y0 + py * sy)), int(round(ax0)), int(round(y0 + (py + bh) * sy)), int(round(ax1)))
        labels[r] = visible_labels(scene.mask, box, scene.background, totals)[0]
    return weights, labels
