"""Multi-label tag quality against ground truth. Pure functions."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from clip_es.model.zeroshot import mean_average_precision


def tag_metrics(scores: np.ndarray, predicted: Sequence[Sequence[int]], truth: Sequence[Sequence[int]],
                names: Sequence[str] | None = None) -> dict:
    """mAP of the scores, and precision / recall / F1 of the chosen tags over all (image, class) pairs.

    Args:
        scores: ``(n_images, K)`` per-class scores (the ranking mAP reads).
        predicted: per image, the tagged class indices.
        truth: per image, the true class indices.
        names: class names for the per-class AP (default ``0..K-1``).

    Returns:
        ``{"images", "map", "precision", "recall", "f1", "exact", "per_class_ap"}``; ``exact`` is
        the share of images whose tag set is exactly the true one. Fractions in [0, 1].
    """
    n, k = np.asarray(scores).reshape(len(predicted), -1).shape
    pred = np.zeros((n, k), bool)
    gt = np.zeros((n, k), bool)
    for i, (p, t) in enumerate(zip(predicted, truth)):
        pred[i, list(p)] = True
        gt[i, list(t)] = True
    tp = int((pred & gt).sum())
    fp = int((pred & ~gt).sum())
    fn = int((~pred & gt).sum())
    precision = tp / (tp + fp) if tp + fp else float("nan")
    recall = tp / (tp + fn) if tp + fn else float("nan")
    f1 = 2 * precision * recall / (precision + recall) if tp else 0.0
    m, per = mean_average_precision(np.asarray(scores, np.float64).reshape(n, k), gt.astype(np.float64))
    names = list(names) if names is not None else [str(i) for i in range(k)]
    return {"images": n, "map": m, "precision": precision, "recall": recall, "f1": f1,
            "exact": float((pred == gt).all(1).mean()) if n else float("nan"),
            "per_class_ap": dict(zip(names, per))}
