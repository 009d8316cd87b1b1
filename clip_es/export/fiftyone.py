"""FiftyOne ``ImageSegmentationDirectory``::

    OUT/
        data/<image file name>      the images (hard links where the file system allows, else copies)
        labels/<stem>.png           grayscale PNG of label values: 0 background, k + 1 class k, 255 unsure
        mask_targets.json           {"0": "background", "1": <class 0>, ..., "255": "unsure"}

Unsure pixels keep their value 255 and are named by ``mask_targets`` (FiftyOne accepts any
value in a mask; one named ``unsure`` shows as its own class in the App, easy to filter on).
Load it with::

    import json, fiftyone as fo
    ds = fo.Dataset.from_dir(dataset_dir=OUT, dataset_type=fo.types.ImageSegmentationDirectory)
    ds.default_mask_targets = {int(k): v for k, v in json.load(open(f"{OUT}/mask_targets.json")).items()}

Import (``--format fiftyone``): the same layout as FiftyOne's own ``export`` writes it: the
``labels/`` PNGs (grayscale values as above); with a ``mask_targets.json`` beside them its
names are matched to the run's (an unknown name is refused).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image
from tqdm import tqdm

from clip_es.errors import MaskImportError
from clip_es.export.coco import load_json
from clip_es.export.common import ExportResult, RunImages, values_from_names
from clip_es.export.png import out_folder, read_label_png, remap
from clip_es.refine.crf import IGNORE
from clip_es.rundir import atomic_write_bytes

DATA, LABELS, TARGETS = "data", "labels", "mask_targets.json"


def _gray_png(mask: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(mask, np.uint8), mode="L").save(buf, format="PNG")
    return buf.getvalue()


def _link_or_copy(src: Path, dst: Path) -> None:
    tmp = dst.with_name(f".tmp-{os.getpid()}-{dst.name}")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def write(rimgs: RunImages, ids: list[str], out: Path, progress: bool = True) -> ExportResult:
    """Write ``ids``' images and masks as a FiftyOne ImageSegmentationDirectory (see the module doc)."""
    out = out_folder(out, "fiftyone")
    (out / DATA).mkdir(exist_ok=True)
    (out / LABELS).mkdir(exist_ok=True)
    missing = 0
    for image_id in tqdm(ids, desc="export fiftyone", unit="img", disable=not progress):
        img = rimgs.image_path(image_id)
        if img is None:
            missing += 1
        else:
            _link_or_copy(img, out / DATA / img.name)
        atomic_write_bytes(out / LABELS / f"{image_id}.png",  # FiftyOne pairs data and labels by stem
                           _gray_png(rimgs.mask(image_id)))
    if missing:
        import logging

        logging.getLogger(__name__).warning("%d image file(s) not found (the dataset moved?): data/ lacks them",
                                            missing)
    targets = {str(v): n for v, n in rimgs.label_names().items()}
    atomic_write_bytes(out / TARGETS, json.dumps(targets, indent=1, ensure_ascii=False).encode("utf-8"))
    return ExportResult(str(out), len(ids))


def read(src: Path, values: dict[str, int]) -> Iterator[tuple[str, str, np.ndarray]]:
    """``(image reference, where, mask)`` for each ``labels/`` PNG (see the module doc)."""
    folder = src / LABELS if (src / LABELS).is_dir() else src
    if not folder.is_dir():
        raise MaskImportError(f"--from {src}: not a folder; --format fiftyone reads an ImageSegmentationDirectory")
    lut = {v: v for v in values.values()}
    tp = src / TARGETS
    if tp.is_file():
        doc = load_json(tp)
        try:
            named = {int(k): str(v) for k, v in doc.items()}
        except (AttributeError, ValueError) as e:
            raise MaskImportError(f"{tp}: not a {{value: class name}} object ({e})") from e
        lut = values_from_names(named, values, str(tp))
        lut.setdefault(0, 0)
        lut.setdefault(IGNORE, IGNORE)
    for p in sorted(folder.glob("*.png")):
        yield p.name[: -len(".png")], str(p), remap(read_label_png(p, str(p)), lut, str(p))
