"""``review.csv``: the exported images, least sure first, with a picture of each mask.

Columns: ``image`` (file name), ``id``, ``labels`` (classes in the pseudo mask,
``;``-separated), ``unsure_share`` (fraction of unsure pixels), ``lowest_class_confidence``
and ``lowest_class`` (see :class:`~clip_es.export.common.ImageStats`; empty without
confidence maps), ``score`` (the sort key: the lowest class confidence, or ``1 -
unsure_share``), ``overlay`` (the mask over the image, a path relative to the CSV).

A png, labelstudio or fiftyone export writes ``OUT/review.csv`` and ``OUT/overlays/``; coco
and cvat (zip or folder, kept as the tool reads it) write them beside OUT:
``<name>.review.csv`` and ``<name>.overlays/``.
"""

from __future__ import annotations

import csv
import io
import logging
import os
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from clip_es.errors import ClipEsError
from clip_es.export.common import ImageStats, RunImages, least_sure_key
from clip_es.rundir import atomic_write_bytes

log = logging.getLogger(__name__)

COLUMNS = ("image", "id", "labels", "unsure_share", "lowest_class_confidence", "lowest_class", "score", "overlay")


def review_paths(out: Path, folder: bool) -> tuple[Path, Path]:
    """``(review.csv, overlays folder)`` of an export written to ``out``."""
    if folder:
        return out / "review.csv", out / "overlays"
    return out.with_name(out.stem + ".review.csv"), out.with_name(out.stem + ".overlays")


def overlay_jpeg(image: np.ndarray, mask: np.ndarray, quality: int = 85) -> bytes:
    """JPEG bytes of ``mask`` (``(H, W)`` labels, unsure hatched) over ``image`` (``(H, W, 3)`` RGB)."""
    from clip_es.draw import mask_overlay

    ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(mask_overlay(image, mask, 0.5, grey=False)[..., ::-1]),
                           [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:  # pragma: no cover - OpenCV encodes any uint8 3-channel array
        raise ValueError("overlay could not be encoded")
    return buf.tobytes()


def write_review(rimgs: RunImages, stats: list[ImageStats], csv_path: Path, overlay_dir: Path | None,
                 progress: bool = True) -> Path:
    """Write ``csv_path`` (rows least sure first) and, unless ``overlay_dir`` is ``None``, one overlay per image.

    An image that cannot be read (the dataset moved) gets no overlay and an empty cell, with a warning.
    """
    from clip_es.data.image_io import read_image

    rows = sorted(stats, key=least_sure_key)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(COLUMNS)
    missing = 0
    if overlay_dir is not None:
        overlay_dir.mkdir(parents=True, exist_ok=True)
    for s in tqdm(rows, desc="review overlays", unit="img", disable=not progress or overlay_dir is None):
        rel = ""
        if overlay_dir is not None:
            path = rimgs.image_path(s.image_id)
            try:
                if path is None:
                    raise FileNotFoundError(s.image_id)
                target = overlay_dir / f"{s.image_id}.jpg"
                atomic_write_bytes(target, overlay_jpeg(read_image(path), rimgs.mask(s.image_id)), fsync=False)
                rel = os.path.relpath(target, csv_path.parent)
            except (ClipEsError, FileNotFoundError, ValueError):
                missing += 1
        w.writerow([rimgs.file_name(s.image_id), s.image_id, ";".join(s.labels), f"{s.unsure_share:.4f}",
                    "" if s.lowest_conf is None else f"{s.lowest_conf:.4f}", s.lowest_class or "",
                    f"{s.score:.4f}", rel])
    if missing:
        log.warning("%d image(s) could not be read for their overlay (the dataset moved?); review.csv leaves "
                    "their overlay empty", missing)
    atomic_write_bytes(csv_path, buf.getvalue().encode("utf-8"))
    return csv_path
