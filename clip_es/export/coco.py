"""COCO: one JSON file in COCO layout (``images``, ``categories``, ``annotations``).

Export: one RLE segmentation per (image, class present in its mask), encoded with
``pycocotools.mask.encode``. Category ids are the source dataset's (the manifest's
``category_ids``: COCO ids for COCO, ``1..K`` otherwise). Unsure pixels (255) belong to no
annotation; background is not exported. Each annotation carries a ``score``: the mean
confidence over its region when the run saved confidence maps, else 1.0.
Image entries: ``file_name`` is the image's real file name with its extension
(``chien café.jpg``, ``000000000089.jpg``); ``id`` is an integer, COCO's own id for COCO
runs and ``1..N`` in dataset order otherwise; ``source_id`` is the run's image id (the file
stem, the name of its mask PNG), an extra field COCO readers ignore. CVAT ("COCO 1.0") and
Label Studio read this file as it is.

Import (``clipes import-masks --format coco``): any COCO file whose categories are named
as the run's classes (ids may differ: names are matched); segmentations as RLE (compressed
or not) or polygons; ``width``/``height`` must be the image's. COCO cannot say "unsure", so a
pixel covered by no annotation is background, except where the pseudo mask was unsure: that
pixel stays unsure (ignored in training; nobody settled it). Paint it with a class, or with a
category named ``unsure``, to settle it; where annotations overlap, the later one wins. (The
reader returns a masked array, uncovered pixels masked; the import fills them.)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from tqdm import tqdm

from clip_es.errors import ConfigError, MaskImportError, RunDirError
from clip_es.export.common import ExportResult, RunImages, open_run, region_score, values_from_names
from clip_es.refine.crf import IGNORE
from clip_es.rundir import atomic_write_bytes


def mask_to_annotations(mask: np.ndarray, category_ids: list[int], conf: np.ndarray | None = None
                        ) -> list[dict[str, Any]]:
    """COCO annotations (without ``id``/``image_id``) of one pseudo mask.

    Args:
        mask: ``(H, W)`` uint8, 0 bg, ``k + 1`` class ``k``, 255 ignore.
        category_ids: ``category_ids[k]`` is class ``k``'s id in the source dataset.
        conf: ``(H, W)`` uint8 confidence (``round(conf * 255)``) or ``None``.

    Returns:
        One dict per class present: ``category_id``, ``segmentation`` (RLE, ``counts`` as
        str), ``area``, ``bbox`` (``[x, y, w, h]``), ``score``, ``iscrowd`` (0).
    """
    from pycocotools import mask as mask_utils

    out = []
    for label in np.unique(mask):
        if label == 0 or label == IGNORE:
            continue
        if label > len(category_ids):
            raise RunDirError(f"mask value {int(label)} is outside 1..{len(category_ids)} (the run's classes)")
        region = mask == label
        rle = mask_utils.encode(np.asfortranarray(region.astype(np.uint8)))
        score = region_score(conf, region)
        out.append({"category_id": category_ids[int(label) - 1],
                    "segmentation": {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")},
                    "area": int(mask_utils.area(rle)), "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                    "score": 1.0 if score is None else score, "iscrowd": 0})
    return out


def write(rimgs: RunImages, ids: list[str], out: Path, progress: bool = True) -> ExportResult:
    """Write the pseudo masks of images ``ids`` as one COCO JSON file ``out`` (see the module doc)."""
    _parent(out)
    images, anns = [], []
    for image_id in tqdm(sorted(ids, key=lambda i: rimgs.entries[i][0]), desc="export coco", unit="img",
                         disable=not progress):
        mask, conf = rimgs.mask(image_id), rimgs.conf(image_id)
        h, w = mask.shape
        src, file_name = rimgs.entries[image_id]
        images.append({"id": src, "file_name": file_name, "width": int(w), "height": int(h),
                       "source_id": image_id})
        for a in mask_to_annotations(mask, rimgs.category_ids, conf):
            anns.append({"id": len(anns) + 1, "image_id": src, **a})
    doc = {"info": {"description": f"clipes pseudo masks of {rimgs.run.path.resolve()}", "ignore_label": IGNORE},
           "images": images,
           "categories": [{"id": c, "name": n} for c, n in zip(rimgs.category_ids, rimgs.classes)],
           "annotations": anns}
    atomic_write_bytes(out, json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode("utf-8"))
    return ExportResult(str(out), len(images), len(anns))


def export_coco(run: str | Path, out: str | Path, progress: bool = True) -> ExportResult:
    """Write every pseudo mask of ``run`` as a COCO-layout JSON file (see the module doc).

    Raises:
        RunDirError: no refine outputs, or an inconsistent manifest.
        ConfigError: ``out`` is a folder or cannot be created.
    """
    rimgs = open_run(run)
    return write(rimgs, rimgs.ids, Path(out), progress)


def _parent(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create folder {path.parent} for --out: {e.strerror}") from e
    if path.is_dir():
        raise ConfigError(f"--out {path} is a folder; this export writes one file (e.g. {path}/masks.json)")


# ----------------------------------------------------------------------------- import
def load_json(path: Path) -> Any:
    """Parse a JSON file, refusing a truncated or malformed one in one line.

    Raises:
        MaskImportError: not a file, not UTF-8, or not valid JSON.
    """
    if not path.is_file():
        raise MaskImportError(f"--from {path}: not a file; pass the JSON file the tool exported")
    try:
        return json.loads(path.read_bytes().decode("utf-8-sig"))
    except UnicodeDecodeError as e:
        raise MaskImportError(f"{path}: not UTF-8 text ({e.reason}); pass the JSON file the tool exported") from e
    except json.JSONDecodeError as e:
        raise MaskImportError(f"{path}: not valid JSON at line {e.lineno} column {e.colno} ({e.msg}); a truncated "
                              "or edited file? export it again from the tool") from e


def read(src: Path, values: dict[str, int]) -> Iterator[tuple[str, str, np.ndarray]]:
    """``(image reference, where, (H, W) uint8 mask)`` for each image of a COCO file.

    Args:
        src: the COCO JSON file.
        values: name -> label value (:meth:`RunImages.label_values`).

    Raises:
        MaskImportError: malformed file, unknown category name or id, bad segmentation.
    """
    from pycocotools import mask as mask_utils

    doc = load_json(src)
    if not isinstance(doc, dict) or not isinstance(doc.get("images"), list):
        raise MaskImportError(f"{src}: not a COCO file (no 'images' list)")
    try:
        cats = values_from_names({int(c["id"]): str(c["name"]) for c in doc.get("categories", [])}, values,
                                 f"{src} categories")
        by_image: dict[int, list[dict]] = {}
        for a in doc.get("annotations", []):
            by_image.setdefault(int(a["image_id"]), []).append(a)
        for im in doc["images"]:
            h, w, ref = int(im["height"]), int(im["width"]), str(im["file_name"])
            where = f"{src} image {ref!r}"
            mask = np.zeros((h, w), np.uint8)
            covered = np.zeros((h, w), bool)
            for a in by_image.get(int(im["id"]), []):
                if int(a["category_id"]) not in cats:
                    raise MaskImportError(f"{where}: annotation {a.get('id')} has category_id {a['category_id']}, "
                                          "which 'categories' does not declare")
                seg = a["segmentation"]
                if isinstance(seg, list):  # polygons
                    rle = mask_utils.merge(mask_utils.frPyObjects(seg, h, w))
                elif isinstance(seg.get("counts"), list):  # uncompressed RLE
                    rle = mask_utils.frPyObjects(seg, *seg["size"])
                else:
                    rle = seg
                if [int(s) for s in rle["size"]] != [h, w]:
                    raise MaskImportError(f"{where}: annotation {a.get('id')} is {rle['size'][1]}x{rle['size'][0]} "
                                          f"but the image entry says {w}x{h}")
                region = mask_utils.decode(rle).astype(bool)
                mask[region] = cats[int(a["category_id"])]
                covered |= region
            yield ref, where, np.ma.MaskedArray(mask, ~covered)
    except (KeyError, TypeError, ValueError) as e:
        raise MaskImportError(f"{src}: malformed COCO entry ({type(e).__name__}: {e}); export it again") from e
