"""MS COCO 2014 / 2017 reader: image-level labels and semantic GT from instance annotations.

Layout (``SPLIT`` is e.g. ``train2014``, ``val2014``, ``train2017``, ``val2017``)::

    ROOT/annotations/instances_SPLIT.json       instance annotations (or pass ``ann_file``)
    ROOT/SPLIT/<file_name>                      images (or ROOT/images/SPLIT/<file_name>)

Class mapping. ``dataset.classes`` is the class list (default: the 80 built-in COCO
classes, in ascending category-id order, with CLIP-ES's prompt synonyms). Class ``k``
is matched to the json category **by name**, and ``dataset.category_ids[k]`` is that
COCO category id. With the default list the 80 categories are thus numbered in
ascending id order: ``person`` (id 1) is class 0 and GT value 1, ``bicycle`` (id 2) is
class 1 and GT value 2, ..., ``toothbrush`` (id 90) is class 79 and GT value 80 (COCO
ids have gaps at 12, 26, 29, 30, 45, 66, 68, 69, 71, 83; class indices do not). A
class file, when given, fixes the order instead; every json category name must be in
it and every class must exist in the json, else :class:`~clip_es.errors.DatasetError`.

Image-level labels are the set of classes with at least one annotation in the image,
crowd annotations (``iscrowd=1``) included. Images without annotations stay in
:meth:`COCODataset.ids` with labels ``()`` and an all-background GT.

Ground truth is rendered with ``pycocotools`` from the polygon, uncompressed-RLE and
compressed-RLE segmentations to ``(H, W)`` uint8, 0 = background, ``k + 1`` = class
``k``. Overlaps: annotations are drawn in order of decreasing ``area`` (ties keep json
order), so the smaller object drawn last wins; this keeps small objects lying on top
of big ones (a cup on a dining table) visible. Crowd regions get their class value,
not 255. The mask has the json's ``height x width``; when the image file exists its
size (after EXIF rotation, as :func:`~clip_es.data.image_io.read_image` returns it)
must match, else :class:`~clip_es.errors.ImageError` names both sizes.

Image ids are file stems (``COCO_val2014_000000000139`` or ``000000000139``), ordered
by COCO image id. The json is parsed once, on first use.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import warnings
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from clip_es.data.base import ClassSpec, check_id, read_class_file, validate_gt
from clip_es.data.image_io import image_size, read_image
from clip_es.data.classes import builtin_classes
from clip_es.errors import DatasetError, ImageError, LabelError

log = logging.getLogger(__name__)

#: Image file extensions a COCO ``file_name`` may carry (stripped to make the id).
_IMAGE_EXTS = (".jpg", ".jpeg", ".png")


@dataclass(frozen=True)
class _Index:
    """What the reader keeps from the json: a ``pycocotools.coco.COCO`` and lookups."""

    coco: Any  # pycocotools.coco.COCO
    ids: list[str]  # image ids (file stems), by COCO image id
    coco_id: dict[str, int]  # image id -> COCO image id
    file_name: dict[str, str]  # image id -> file name in the image folder
    category_ids: list[int]  # class k -> COCO category id
    class_of: dict[int, int]  # COCO category id -> class index


class COCODataset:
    """A COCO split read from its instances json.

    Args:
        root: the COCO folder holding ``annotations/`` and the image folders.
        split: image folder / annotation suffix, e.g. ``val2014`` or ``train2017``.
        class_file: class list matched to the json categories by name; default the
            built-in 80 COCO classes (``builtin_classes("coco")``).
        ann_file: instances json; default ``ROOT/annotations/instances_{split}.json``.

    Raises:
        DatasetError: no annotation file or no image folder (at construction).
        ClassFileError: an unreadable or malformed class file.
    """

    name = "coco"

    def __init__(self, root: str | Path, split: str = "val2014", class_file: str | Path | None = None,
                 ann_file: str | Path | None = None):
        self.root = Path(root)
        self.split = split
        self.classes: list[ClassSpec] = read_class_file(class_file) if class_file else builtin_classes("coco")
        self._class_source = str(class_file) if class_file else "the built-in COCO class list"
        self.ann_file = Path(ann_file) if ann_file else self.root / "annotations" / f"instances_{split}.json"
        if not self.ann_file.is_file():
            avail = sorted(p.stem[len("instances_"):] for p in (self.root / "annotations").glob("instances_*.json"))
            raise DatasetError(f"COCO annotation file {self.ann_file} not found; available splits in "
                               f"{self.root / 'annotations'}: {', '.join(avail) or 'none'} "
                               "(see data/README.md for the layout, or pass ann_file)")
        candidates = [self.root / split, self.root / "images" / split]
        found = [d for d in candidates if d.is_dir()]
        if not found:
            raise DatasetError(f"no COCO image folder for split {split!r}: tried {candidates[0]} and "
                               f"{candidates[1]}; unpack {split}.zip there (see data/README.md)")
        self.image_dir = found[0]

    # ------------------------------------------------------------------ json index
    @cached_property
    def _index(self) -> _Index:
        from pycocotools.coco import COCO

        where = str(self.ann_file)
        try:
            data = json.loads(self.ann_file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise LabelError(f"{where}:{e.lineno}:{e.colno}: malformed JSON ({e.msg}); "
                             "re-download or re-export the annotation file") from e
        except (OSError, UnicodeDecodeError) as e:
            raise LabelError(f"{where}: cannot be read as UTF-8 JSON ({e})") from e
        if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ("images", "categories")):
            raise LabelError(f"{where}: not a COCO instances file (expected a JSON object with 'images', "
                             "'categories' and 'annotations' lists)")
        data.setdefault("annotations", [])
        coco = COCO()
        coco.dataset = data
        buf = io.StringIO()
        try:
            with contextlib.redirect_stdout(buf):  # pycocotools prints progress
                coco.createIndex()
        except (KeyError, TypeError) as e:
            raise LabelError(f"{where}: malformed COCO entry (missing or bad field {e}); "
                             "every image needs 'id' and 'file_name', every annotation 'id', "
                             "'image_id' and 'category_id'") from e
        log.debug("%s: %s", where, buf.getvalue().strip())

        # Classes <-> categories, by name.
        known = {c.name: k for k, c in enumerate(self.classes)}
        cat_of_class: dict[int, int] = {}
        for cat in sorted(coco.cats.values(), key=lambda c: c["id"]):
            name = str(cat.get("name", ""))
            if name not in known:
                raise DatasetError(f"{where}: category {name!r} (id {cat['id']}) is not in {self._class_source}; "
                                   f"known classes: {', '.join(known)}; pass a class file that lists it")
            if known[name] in cat_of_class:
                raise DatasetError(f"{where}: category name {name!r} is used by ids {cat_of_class[known[name]]} "
                                   f"and {cat['id']}; category names must be unique")
            cat_of_class[known[name]] = int(cat["id"])
        missing = [c.name for k, c in enumerate(self.classes) if k not in cat_of_class]
        if missing:
            raise DatasetError(f"{where}: classes {', '.join(missing)} from {self._class_source} have no "
                               f"category in the json; its categories are "
                               f"{', '.join(str(c.get('name')) for c in coco.cats.values())}; "
                               "pass a class file that matches them")
        category_ids = [cat_of_class[k] for k in range(len(self.classes))]
        class_of = {cid: k for k, cid in enumerate(category_ids)}
        for ann in coco.anns.values():
            if ann["category_id"] not in class_of:
                raise LabelError(f"{where}: annotation {ann['id']} has category_id {ann['category_id']}, "
                                 "which is not in 'categories'")

        ids: list[str] = []
        coco_id: dict[str, int] = {}
        file_name: dict[str, str] = {}
        for img in sorted(coco.imgs.values(), key=lambda i: i["id"]):
            fname = str(img["file_name"])
            stem = next((fname[: -len(e)] for e in _IMAGE_EXTS if fname.lower().endswith(e)), fname)
            check_id(stem, f"{where}: image {img['id']} file_name")
            if stem in coco_id:
                raise DatasetError(f"{where}: images {coco_id[stem]} and {img['id']} share the file stem "
                                   f"{stem!r}; file names must be unique")
            ids.append(stem)
            coco_id[stem] = int(img["id"])
            file_name[stem] = fname
        log.info("%s: %d images, %d annotations, %d classes", where, len(ids), len(coco.anns), len(category_ids))
        return _Index(coco, ids, coco_id, file_name, category_ids, class_of)

    @property
    def category_ids(self) -> list[int]:
        """``category_ids[k]`` is the COCO category id of class ``k`` (parses the json on first use)."""
        return list(self._index.category_ids)

    def _coco_id(self, image_id: str) -> int:
        check_id(image_id, str(self.ann_file))
        try:
            return self._index.coco_id[image_id]
        except KeyError:
            raise _unknown_id(image_id, self.ann_file) from None

    # ------------------------------------------------------------------ Dataset protocol
    def ids(self) -> list[str]:
        """Image ids (file stems) of the split, ordered by COCO image id."""
        return list(self._index.ids)

    def image_path(self, image_id: str) -> Path:
        """Path of the image file (it may not exist; :meth:`load_image` says so)."""
        self._coco_id(image_id)
        return self.image_dir / self._index.file_name[image_id]

    def worker_view(self, ids: list[str]) -> "COCOImages":
        """The file names and labels of ``ids`` only (see :func:`~clip_es.data.base.worker_view`):
        what spawned loader workers need, instead of a pickled copy of the whole json index
        (every annotation's polygons; hundreds of MB for COCO train)."""
        known = [i for i in ids if i in self._index.coco_id]  # others stay unknown there too
        return COCOImages(self.image_dir, str(self.ann_file), {i: self._index.file_name[i] for i in known},
                          {i: self.labels(i) for i in known})

    def labels(self, image_id: str) -> tuple[int, ...]:
        """Sorted class indices with at least one annotation (crowd included); ``()`` if none."""
        idx = self._index
        anns = idx.coco.imgToAnns.get(self._coco_id(image_id), [])
        return tuple(sorted({idx.class_of[a["category_id"]] for a in anns}))

    def load_image(self, image_id: str) -> np.ndarray:
        """``(H, W, 3)`` uint8 RGB."""
        return read_image(self.image_path(image_id))

    def load_gt(self, image_id: str) -> np.ndarray:
        """Render the ``(H, W)`` uint8 semantic mask (0 bg, ``k + 1`` class ``k``) from the instances.

        Raises:
            ImageError: a segmentation pycocotools cannot decode, or a mask size that differs
                from the image file's.
        """
        idx = self._index
        cid = self._coco_id(image_id)
        info = idx.coco.imgs[cid]
        h, w = int(info["height"]), int(info["width"])
        mask = np.zeros((h, w), np.uint8)
        anns = sorted(idx.coco.imgToAnns.get(cid, []), key=lambda a: -float(a.get("area", 0.0)))
        for ann in anns:
            if not ann.get("segmentation"):
                continue  # a box-only annotation still labels the image but draws nothing
            try:
                with warnings.catch_warnings():  # pycocotools' decode predates numpy 2's copy keyword
                    warnings.filterwarnings("ignore", message=r"__array__ implementation", category=DeprecationWarning)
                    m = idx.coco.annToMask(ann)
            except Exception as e:  # pycocotools raises bare Exception / TypeError on bad input
                raise ImageError(f"{self.ann_file}: annotation {ann['id']} of image {image_id} has a "
                                 f"segmentation pycocotools cannot decode ({type(e).__name__}: {e})") from e
            if m.shape != (h, w):
                raise ImageError(f"{self.ann_file}: annotation {ann['id']} of image {image_id} decodes to "
                                 f"{m.shape[1]}x{m.shape[0]} but the image entry says {w}x{h}")
            mask[m > 0] = idx.class_of[ann["category_id"]] + 1
        img = self.image_path(image_id)
        return validate_gt(mask, len(self.classes), f"{self.ann_file} (image {image_id})",
                           image_size(img) if img.is_file() else None, img)


@dataclass(frozen=True)
class COCOImages:
    """:meth:`COCODataset.worker_view`: image files and labels of some ids, nothing else."""

    image_dir: Path
    ann_file: str
    files: dict[str, str]
    label_table: dict[str, tuple[int, ...]]

    def _known(self, image_id: str) -> str:
        if image_id not in self.files:
            raise _unknown_id(image_id, self.ann_file)
        return image_id

    def image_path(self, image_id: str) -> Path:
        return self.image_dir / self.files[self._known(image_id)]

    def labels(self, image_id: str) -> tuple[int, ...]:
        return self.label_table[self._known(image_id)]

    def load_image(self, image_id: str) -> np.ndarray:
        return read_image(self.image_path(image_id))


def _unknown_id(image_id: str, ann_file) -> DatasetError:
    return DatasetError(f"image id {image_id!r} is not in {ann_file}; use an id from ids() "
                        "(COCO file stems such as COCO_val2014_000000000139)")
