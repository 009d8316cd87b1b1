"""``clipes export``: the refine stage's pseudo masks in formats other tools read.

* ``coco``: one JSON file in COCO layout (``images``, ``categories``, ``annotations``)
  with one RLE segmentation per (image, class present in its mask), encoded with
  ``pycocotools.mask.encode``. Category ids are the source dataset's (the manifest's
  ``category_ids``: COCO ids for COCO, ``1..K`` otherwise). Ignored pixels (255) belong to
  no annotation; background is not exported. Each annotation carries a ``score``: the
  mean confidence over its region when the run saved confidence maps, else 1.0.
  Image entries: ``file_name`` is the image's real file name with its extension
  (``chien café.jpg``, ``000000000089.jpg``); ``id`` is an integer, COCO's own id for
  COCO runs and ``1..N`` in dataset order otherwise; ``source_id`` is the run's image id
  (the file stem, the name of its mask PNG), an extra field COCO readers ignore.
* ``png``: the palette PNGs (VOC palette, ``k + 1`` = class ``k``, 255 = ignore) copied to
  a folder, with ``classes.txt`` (one class name per line; line ``n`` is label id ``n``,
  so it is also a valid ``--class-file``).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from clip_es.errors import ClipEsError, ConfigError, RunDirError
from clip_es.refine.crf import IGNORE
from clip_es.refine.store import CONF, MASKS, STAGE, output_ids, output_path, read_output
from clip_es.rundir import RunDir, atomic_write_bytes

log = logging.getLogger(__name__)

#: ``--format`` values.
FORMATS = ("coco", "png")


@dataclass
class ExportResult:
    """What an export wrote."""

    path: str
    images: int
    annotations: int = 0

    def summary(self) -> str:
        extra = f", {self.annotations} annotations" if self.annotations else ""
        return f"export: {self.images} images{extra} -> {self.path}"


def _run_info(run: RunDir) -> tuple[list[str], list[int], list[str]]:
    """``(classes, category_ids, mask ids)`` of a run with refine outputs."""
    if not run.manifest_path.is_file():
        raise RunDirError(f"{run.path}: no manifest.json; is this a clipes run folder?")
    m = run.read_manifest()
    classes, cat_ids = m.get("classes"), m.get("category_ids")
    if not classes or not cat_ids or len(classes) != len(cat_ids):
        raise RunDirError(f"{run.manifest_path}: classes/category_ids missing or inconsistent; "
                          "re-run 'clipes cam' into a new run folder")
    ids = output_ids(run, MASKS)
    if run.stage_info(STAGE) is None or not ids:
        raise RunDirError(f"{run.path}: no pseudo masks; run 'clipes refine --run {run.path}' first")
    return list(classes), [int(c) for c in cat_ids], ids


def _image_entries(run: RunDir, ids: list[str]) -> dict[str, tuple[int, str]]:
    """``id -> (integer COCO image id, file name with extension)`` for every mask id.

    COCO runs keep COCO's ids and file names. Other runs number the images ``1..N`` in
    the dataset's order (so the numbers are the same each time a run is exported) and
    take the file name from the dataset; when the dataset cannot be reopened (moved or
    deleted since the run) the file name falls back to the id with a warning.
    """
    from clip_es.data.registry import dataset_of_run

    kind = (run.read_manifest().get("dataset") or {}).get("kind")
    try:
        ds = dataset_of_run(run)
        order = {i: n for n, i in enumerate(ds.ids())}
    except ClipEsError as e:
        if kind == "coco":
            raise
        log.warning("the run's dataset cannot be reopened (%s); file_name is the image id without extension", e)
        return {i: (n, i) for n, i in enumerate(ids, 1)}
    if kind == "coco":
        return {i: (int(ds._coco_id(i)), ds.image_path(i).name) for i in ids}
    ranked = sorted(ids, key=lambda i: (order.get(i, len(order)), i))
    return {i: (n, _file_name(ds, i)) for n, i in enumerate(ranked, 1)}


def _file_name(ds, image_id: str) -> str:
    try:
        return ds.image_path(image_id).name
    except ClipEsError:  # no longer in the split: the id is all there is
        return image_id


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
        score = float(conf[region].mean() / 255.0) if conf is not None else 1.0
        out.append({"category_id": category_ids[int(label) - 1],
                    "segmentation": {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")},
                    "area": int(mask_utils.area(rle)), "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                    "score": round(score, 6), "iscrowd": 0})
    return out


def export_coco(run: str | Path, out: str | Path, progress: bool = True) -> ExportResult:
    """Write the run's pseudo masks as a COCO-layout JSON file (see the module doc).

    Raises:
        RunDirError: no refine outputs, or an inconsistent manifest.
    """
    rd = RunDir(run)
    classes, cat_ids, ids = _run_info(rd)
    entries = _image_entries(rd, ids)
    images, anns = [], []
    for image_id in tqdm(sorted(ids, key=lambda i: entries[i][0]), desc="export coco", unit="img",
                         disable=not progress):
        mask = read_output(output_path(rd, MASKS, image_id))
        conf_path = output_path(rd, CONF, image_id)
        conf = read_output(conf_path) if conf_path.is_file() else None
        h, w = mask.shape
        src, file_name = entries[image_id]
        images.append({"id": src, "file_name": file_name, "width": int(w), "height": int(h),
                       "source_id": image_id})
        for a in mask_to_annotations(mask, cat_ids, conf):
            anns.append({"id": len(anns) + 1, "image_id": src, **a})
    doc = {"info": {"description": f"clipes pseudo masks of {rd.path.resolve()}", "ignore_label": IGNORE},
           "images": images,
           "categories": [{"id": c, "name": n} for c, n in zip(cat_ids, classes)],
           "annotations": anns}
    out = Path(out)
    _parent(out)
    atomic_write_bytes(out, json.dumps(doc, separators=(",", ":")).encode())
    return ExportResult(str(out), len(images), len(anns))


def export_png(run: str | Path, out: str | Path, progress: bool = True) -> ExportResult:
    """Copy the run's palette PNG pseudo masks into folder ``out`` and write ``classes.txt``.

    Raises:
        RunDirError: no refine outputs.
        ConfigError: ``out`` exists and is not a folder.
    """
    rd = RunDir(run)
    classes, _, ids = _run_info(rd)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a folder; png export writes a folder of PNGs")
    out.mkdir(parents=True, exist_ok=True)
    for image_id in tqdm(ids, desc="export png", unit="img", disable=not progress):
        atomic_write_bytes(out / f"{image_id}.png", output_path(rd, MASKS, image_id).read_bytes())
    atomic_write_bytes(out / "classes.txt", "".join(f"{c}\n" for c in classes).encode())
    return ExportResult(str(out), len(ids))


def export_run(run: str | Path, fmt: str, out: str | Path, progress: bool = True) -> ExportResult:
    """``clipes export``: :func:`export_coco` or :func:`export_png` by ``fmt``."""
    if fmt == "coco":
        return export_coco(run, out, progress)
    if fmt == "png":
        return export_png(run, out, progress)
    raise ConfigError(f"unknown --format {fmt!r}; valid: {', '.join(FORMATS)}")


def _parent(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create folder {path.parent} for --out: {e.strerror}") from e
    if path.is_dir():
        raise ConfigError(f"--out {path} is a folder; coco export writes one JSON file (e.g. {path}/masks.json)")
