"""PASCAL VOC 2012 layout reader (also the layout ``clipes toy make`` writes).

::

    ROOT/JPEGImages/<id>.jpg
    ROOT/Annotations/<id>.xml                   image-level labels (object names)
    ROOT/SegmentationClass/<id>.png             GT (palette PNG; or SegmentationClassAug/)
    ROOT/ImageSets/Segmentation/<split>.txt     one id per line

When an XML file is missing, the image's labels come from its GT mask. A class file in
the root (``classes.txt``) overrides the VOC class list (the toy world ships one).
"""

from __future__ import annotations

import logging
import xml.etree.ElementTree as ET
from functools import cached_property
from pathlib import Path

import numpy as np

from clip_es.data.base import ClassSpec, check_id, read_class_file
from clip_es.data.image_io import read_gt, read_image
from clip_es.data.classes import builtin_classes
from clip_es.errors import DatasetError, LabelError

log = logging.getLogger(__name__)

GT_FOLDERS = ("SegmentationClassAug", "SegmentationClass")


class VOCDataset:
    """A VOC-layout dataset split.

    Args:
        root: the folder holding ``JPEGImages/`` etc. (``VOC2012/`` itself).
        split: name of a file in ``ImageSets/Segmentation/`` (``train``, ``val``,
            ``train_aug``...), or a path to an id list.
        class_file: class list; default ``ROOT/classes.txt`` if present, else VOC's 20.
        gt_folder: ground-truth folder name; default the first of ``SegmentationClassAug``,
            ``SegmentationClass`` that exists.
    """

    name = "voc"

    def __init__(self, root: str | Path, split: str = "train", class_file: str | Path | None = None,
                 gt_folder: str | None = None):
        self.root = Path(root)
        self.split = split
        if not (self.root / "JPEGImages").is_dir():
            raise DatasetError(f"{self.root}: no JPEGImages/ folder; point --root at the VOC2012 folder "
                               "(see data/README.md)")
        if class_file is None and (self.root / "classes.txt").is_file():
            class_file = self.root / "classes.txt"
        self.classes: list[ClassSpec] = read_class_file(class_file) if class_file else builtin_classes("voc")
        self.category_ids = list(range(1, len(self.classes) + 1))
        self._index = {c.name: i for i, c in enumerate(self.classes)}
        gts = [gt_folder] if gt_folder else [g for g in GT_FOLDERS if (self.root / g).is_dir()]
        self.gt_dir = self.root / gts[0] if gts else None

    @cached_property
    def _ids(self) -> list[str]:
        p = Path(self.split)
        if not p.is_file():
            p = self.root / "ImageSets" / "Segmentation" / f"{self.split}.txt"
        if not p.is_file():
            avail = sorted(q.stem for q in (self.root / "ImageSets" / "Segmentation").glob("*.txt"))
            raise DatasetError(f"split file {p} not found; available splits: {', '.join(avail) or 'none'}")
        ids, seen = [], set()
        for n, line in enumerate(p.read_text().splitlines(), 1):
            s = line.strip()
            if s and len(s.split()) > 1 and not any((self.root / "JPEGImages" / f"{s}{e}").is_file()
                                                  for e in (".jpg", ".jpeg", ".png", ".JPG")):
                s = s.split()[0]  # 'id 1' lines (VOC's Main lists); an id with spaces is kept when its image exists
            if not s:
                continue
            check_id(s, f"{p}:{n}")
            if s in seen:
                log.warning("%s:%d: duplicate id %s ignored", p, n, s)
                continue
            seen.add(s)
            ids.append(s)
        return ids

    def ids(self) -> list[str]:
        return list(self._ids)

    def image_path(self, image_id: str) -> Path:
        check_id(image_id, str(self.root))
        for ext in (".jpg", ".jpeg", ".png", ".JPG"):
            p = self.root / "JPEGImages" / f"{image_id}{ext}"
            if p.exists():
                return p
        return self.root / "JPEGImages" / f"{image_id}.jpg"

    def labels(self, image_id: str) -> tuple[int, ...]:
        xml = self.root / "Annotations" / f"{check_id(image_id, str(self.root))}.xml"
        if xml.is_file():
            try:
                tree = ET.parse(xml)
            except ET.ParseError as e:
                raise LabelError(f"{xml}: malformed XML ({e})") from e
            out = set()
            for obj in tree.getroot().iter("object"):
                name = (obj.findtext("name") or "").strip()
                if name not in self._index:
                    raise LabelError(f"{xml}: object '{name}' is not a known class; known: "
                                     f"{', '.join(self._index)}")
                out.add(self._index[name])
            return tuple(sorted(out))
        gt = self.load_gt(image_id)
        if gt is None:
            raise LabelError(f"{image_id}: no {xml.name} and no ground-truth mask to take labels from")
        return tuple(sorted(int(v) - 1 for v in np.unique(gt) if 0 < v <= len(self.classes)))

    def load_image(self, image_id: str) -> np.ndarray:
        return read_image(self.image_path(image_id))

    def gt_path(self, image_id: str) -> Path | None:
        if self.gt_dir is None:
            return None
        p = self.gt_dir / f"{check_id(image_id, str(self.root))}.png"
        return p if p.is_file() else None

    def load_gt(self, image_id: str) -> np.ndarray | None:
        """``(H, W)`` uint8 GT mask, or ``None`` without one.

        Raises:
            ImageError: values outside ``0..K`` and not 255, or a size that differs from the image's.
        """
        p = self.gt_path(image_id)
        if p is None:
            return None
        return read_gt(p, len(self.classes), self.image_path(image_id))
