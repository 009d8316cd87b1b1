"""Pure drawing shared by ``clipes show`` and ``clipes segment --overlay``: the display
palette and the heatmap / label-map overlays (arrays in, ``(H, W, 3)`` uint8 RGB out).

Imports no stage, so the segmenter can draw overlays without importing the contact sheet.
"""

from __future__ import annotations

import cv2
import numpy as np

from clip_es.refine.crf import IGNORE

#: Hand-picked, mutually distinct colours for the first label ids (after the well-known
#: "20 distinct colours" list, dark entries dropped or lightened).
_DISTINCT = ((230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (170, 80, 230),
             (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 170, 170), (220, 190, 255),
             (190, 130, 60), (255, 250, 200), (170, 255, 195), (255, 215, 180))


def _lab(rgb: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(np.asarray(rgb, np.uint8).reshape(-1, 1, 3), cv2.COLOR_RGB2LAB).reshape(-1, 3).astype(
        np.float32)


def display_palette(neighbour_gap: float = 50.0) -> np.ndarray:
    """``(256, 3)`` uint8 RGB colours for drawing labels: vivid, and far apart where it matters.

    For display only (the mask PNGs keep the VOC palette, whose dark and grey entries
    vanish on a photo and whose neighbours can look alike). Ids 1-16 are a hand-picked
    distinct set; every later id takes, among saturated candidate colours, the one
    farthest (in CIELAB, roughly perceptual) from all colours given so far, provided it
    is at least ``neighbour_gap`` Lab units from the previous id's colour, so classes
    ``k`` and ``k + 1`` never look alike. With 80 classes (COCO) any two colours are at
    least 23 Lab units apart, neighbours at least 33. 0 is black (not drawn), 255 white (ignore).
    """
    hues = np.arange(0, 180, 3)
    cands = np.concatenate([
        cv2.cvtColor(np.stack([hues, np.full_like(hues, sat), np.full_like(hues, val)], 1).astype(np.uint8)[:, None],
                     cv2.COLOR_HSV2RGB)[:, 0]
        for sat in (150, 200, 255) for val in (170, 215, 255)])
    lab = _lab(cands)
    chosen = [np.asarray(c, np.uint8) for c in _DISTINCT]
    have = _lab(np.stack(chosen))
    dist = np.min(np.linalg.norm(lab[:, None] - have[None], axis=2), axis=1)
    last = have[-1]
    while len(chosen) < 254:
        far_from_last = np.linalg.norm(lab - last, axis=1) >= neighbour_gap
        i = int(np.argmax(np.where(far_from_last, dist, -1.0) if far_from_last.any() else dist))
        chosen.append(cands[i])
        dist = np.minimum(dist, np.linalg.norm(lab - lab[i], axis=1))
        last = lab[i]
    pal = np.zeros((256, 3), np.uint8)
    pal[1:255] = np.stack(chosen)
    pal[255] = (255, 255, 255)
    return pal


PALETTE = display_palette()


def grey_base(image: np.ndarray) -> np.ndarray:
    g = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY).astype(np.float32)
    return np.repeat((g * 0.45 + 30)[..., None], 3, axis=2)


def heatmap_overlay(image: np.ndarray, score: np.ndarray, weight: float = 0.6) -> np.ndarray:
    """Jet heatmap of ``score`` (``(H, W)`` in [0, 1]) blended over ``image`` (``(H, W, 3)`` uint8)."""
    s = np.rint(np.clip(score, 0.0, 1.0) * 255).astype(np.uint8)
    heat = cv2.applyColorMap(s, cv2.COLORMAP_JET)[..., ::-1].astype(np.float32)
    out = (1 - weight) * image.astype(np.float32) + weight * heat
    return np.clip(out, 0, 255).astype(np.uint8)


def mask_overlay(image: np.ndarray, mask: np.ndarray, weight: float = 0.65, grey: bool = True) -> np.ndarray:
    """Label map in the display palette (:func:`display_palette`) over ``image``; outlines; 255 hatched.

    Args:
        image: ``(H, W, 3)`` uint8 RGB.
        mask: ``(H, W)`` uint8 label ids (0 background, 255 ignore).
        weight: opacity of the label colours.
        grey: blend over a dimmed grey copy of the image (the contact sheet) instead of its colours.
    """
    base = grey_base(image) if grey else image.astype(np.float32)
    colours = PALETTE[mask].astype(np.float32)
    fg = (mask != 0)[..., None]
    out = np.where(fg, (1 - weight) * base + weight * colours, base)
    ign = mask == IGNORE
    if ign.any():
        yy, xx = np.mgrid[: mask.shape[0], : mask.shape[1]]
        stripes = ((xx + yy) // 3) % 2 == 0
        out[ign & stripes] = (1 - weight) * base[ign & stripes] + weight * np.asarray((255, 255, 255), np.float32)
    out = np.clip(out, 0, 255).astype(np.uint8)
    for label in np.unique(mask):
        if label in (0, IGNORE):
            continue
        contours, _ = cv2.findContours((mask == label).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        c = tuple(int(v) for v in np.clip(PALETTE[label].astype(int) + 70, 0, 255))
        cv2.drawContours(out, contours, -1, c, 1, cv2.LINE_AA)
    return out
