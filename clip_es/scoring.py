"""Scoring: confusion matrix, IoU and the accumulation of a stage's predictions against GT.

A pure layer: numpy in, numbers out. It imports no stage, so the stages (``cam.prompts``,
``refine``) and ``clipes eval`` (:mod:`clip_es.evaluate`, which reads the stages' outputs)
all build on it without importing one another.

Label maps are ``(H, W)`` uint8: 0 = background, ``k + 1`` = class ``k``, 255 = no
prediction / ignored. mIoU is the mean over background + classes of ``TP / (TP + FP + FN)``
on pixels whose ground truth is not 255; classes absent from both GT and prediction are
left out.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
from tqdm import tqdm

from clip_es.errors import DatasetError

log = logging.getLogger(__name__)


@dataclass
class StagePredictions:
    """What an evaluator returns: the dataset it predicts on and ``(id, pred)`` pairs."""

    dataset: Any
    items: Iterator[tuple[str, np.ndarray]]
    extra: dict[str, Any] = field(default_factory=dict)


def confusion_matrix(gt: np.ndarray, pred: np.ndarray, n: int) -> np.ndarray:
    """``(n, n)`` counts ``[gt, pred]`` over pixels where neither is 255.

    Args:
        gt, pred: ``(H, W)`` integer label maps of the same shape.
        n: number of labels (background + classes).
    """
    if gt.shape != pred.shape:
        raise DatasetError(f"prediction {pred.shape} and ground truth {gt.shape} differ in size")
    valid = (gt != 255) & (pred != 255) & (gt < n) & (pred < n)
    idx = gt[valid].astype(np.int64) * n + pred[valid].astype(np.int64)
    return np.bincount(idx, minlength=n * n).reshape(n, n)


def iou_report(conf: np.ndarray, names: list[str]) -> dict[str, Any]:
    """Per-class IoU (``None`` where undefined) and mIoU from a confusion matrix."""
    tp = np.diag(conf).astype(np.float64)
    denom = conf.sum(0) + conf.sum(1) - tp
    per = {name: (float(tp[i] / denom[i]) if denom[i] > 0 else None) for i, name in enumerate(names)}
    vals = [v for v in per.values() if v is not None]
    return {"miou": float(np.mean(vals)) if vals else float("nan"), "per_class": per,
            "pixel_acc": float(tp.sum() / max(conf.sum(), 1))}


def seen_unseen(per_class: dict[str, float | None], unseen: list[str] | tuple[str, ...],
                seen_background: bool = True) -> dict[str, Any]:
    """Zero-shot summary of a per-class IoU report.

    ``seen`` is the mean IoU over the seen classes, with background counted among them when
    ``seen_background`` (the VOC-21 convention) or left out (``False``: the seen object classes only,
    as ZegCLIP's VOC tables report seen mIoU; ZegCLIP also ignores background pixels in training and
    evaluation, which these per-class IoUs, from a prediction that includes background, do not);
    ``unseen`` the mean over the unseen classes, ``hiou`` their harmonic mean ``2 S U / (S + U)``
    (NaN when either is undefined, 0 when both are 0). Classes whose IoU is undefined (absent from GT
    and prediction) are left out of the means.

    Raises:
        DatasetError: an unseen name that is not a class of the report.
    """
    bad = [u for u in unseen if u not in per_class or u == "background"]
    if bad:
        raise DatasetError(f"--unseen {', '.join(bad)}: not a class; valid: "
                           f"{', '.join(n for n in per_class if n != 'background')}")
    s_vals = [v for n, v in per_class.items() if n not in unseen and v is not None
              and (seen_background or n != "background")]
    u_vals = [v for n, v in per_class.items() if n in unseen and v is not None]
    s = float(np.mean(s_vals)) if s_vals else float("nan")
    u = float(np.mean(u_vals)) if u_vals else float("nan")
    h = 2 * s * u / (s + u) if s + u > 0 else (0.0 if s == u == 0 else float("nan"))
    return {"seen": s, "unseen": u, "hiou": float(h), "unseen_classes": list(unseen),
            "background_counted": "with the seen classes" if seen_background else "no"}


def scores_to_labels(keys: np.ndarray, maps: np.ndarray, alpha: float = 1.0) -> np.ndarray:
    """Argmax of ``[bg, maps]`` with ``bg = (1 - max maps) ** alpha``, mapped to label ids.

    Args:
        keys: ``(K,)`` 0-based class indices.
        maps: ``(K, H, W)`` scores in [0, 1].

    Returns:
        ``(H, W)`` uint8: 0 background, ``keys[k] + 1`` otherwise.
    """
    if len(keys) == 0:
        return np.zeros(maps.shape[1:], np.uint8)
    bg = (1.0 - maps.max(0)) ** alpha
    stack = np.concatenate([bg[None], maps], 0)
    lut = np.concatenate([[0], np.asarray(keys) + 1]).astype(np.uint8)
    return lut[stack.argmax(0)]


def score_predictions(preds: StagePredictions, limit: int | None = None, desc: str = "eval",
                      progress: bool = False) -> dict[str, Any]:
    """Accumulate the confusion matrix of ``preds`` against the dataset's ground truth.

    Images without ground truth (a folder dataset where only some images have a mask) are
    skipped: ``images`` counts the images scored, ``images_without_gt`` the ones skipped.
    ``limit`` bounds the predictions read (the first ``limit``, with or without GT).

    Returns:
        ``{"miou", "per_class", "pixel_acc", "confusion", "images", "images_without_gt",
        [coverage, precision]}`` plus ``preds.extra``.

    Raises:
        DatasetError: there were predictions but none of their images has ground truth.
    """
    ds = preds.dataset
    names = ["background"] + [c.name for c in ds.classes]
    n = len(names)
    conf = np.zeros((n, n), np.int64)
    valid_px = predicted_px = 0
    seen = scored = 0
    for image_id, pred in tqdm(preds.items, desc=desc, disable=not progress, unit="img"):
        seen += 1
        gt = ds.load_gt(image_id)
        if gt is not None:
            conf += confusion_matrix(gt, pred, n)
            gv = gt != 255
            valid_px += int(gv.sum())
            predicted_px += int((gv & (pred != 255)).sum())
            scored += 1
        if limit and seen >= limit:
            break
    if seen and not scored:
        raise DatasetError(f"none of the {seen} images evaluated has ground truth in {ds.root}; eval needs GT "
                           "masks (for a folder dataset: ROOT/masks/<id>.png)")
    if scored < seen:
        log.warning("%s: %d of %d images have no ground truth; scored the other %d", desc, seen - scored, seen,
                    scored)
    rep = iou_report(conf, names)
    rep["confusion"] = {"labels": names, "counts": conf.tolist()}  # counts[gt][pred], pixels
    rep["images"] = scored
    rep["images_without_gt"] = seen - scored
    if predicted_px < valid_px:
        rep["coverage"] = predicted_px / max(valid_px, 1)
        rep["precision"] = float(np.diag(conf).sum() / max(conf.sum(), 1))
    rep.update(preds.extra)
    return rep
