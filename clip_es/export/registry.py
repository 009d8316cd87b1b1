"""The export formats: a plain dict from ``--format`` name to its writer and reader.

Adding a format is one module with ``write(run_images, ids, out, progress) -> ExportResult``
and, when a tool sends masks back, ``read(src, label_values) -> iterator of (image reference,
where, mask)``, plus one entry here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from clip_es.errors import RegistryError
from clip_es.export import coco, cvat, fiftyone, labelstudio, png
from clip_es.export.common import ExportResult, RunImages

Writer = Callable[[RunImages, list[str], Path, bool], ExportResult]
#: yields (image reference, where, (H, W) uint8 mask, or None for all background)
Reader = Callable[[Path, dict[str, int]], Iterator[tuple[str, str, Any]]]


@dataclass(frozen=True)
class Format:
    """One ``--format``: what it writes, how it carries unsure pixels, its writer and reader."""

    name: str
    writes: str
    unsure: str
    write: Writer
    read: Reader | None = None
    #: ``review.csv`` and ``overlays/`` inside a folder ``--out`` (else beside it, kept out of what the tool reads)
    review_inside: bool = True


FORMATS: dict[str, Format] = {
    "coco": Format("coco", "one JSON file", "in no annotation (imported: still unsure where no annotation covers it)",
                   coco.write, coco.read, review_inside=False),
    "png": Format("png", "a folder of palette PNGs + classes.txt", "value 255", png.write, png.read),
    "cvat": Format("cvat", "a zip (OUT ends with .zip) or folder, Segmentation mask 1.1",
                   "a declared label 'unsure', colour 224,224,192", cvat.write, cvat.read,
                   review_inside=False),
    "labelstudio": Format("labelstudio", "a folder: tasks.json + labeling_config.xml",
                          "a brush label 'unsure'", labelstudio.write, labelstudio.read),
    "fiftyone": Format("fiftyone", "a folder: data/, labels/, mask_targets.json",
                       "value 255, mask_targets name 'unsure'", fiftyone.write, fiftyone.read),
}


def get_format(name: str, reading: bool = False) -> Format:
    """The :class:`Format` called ``name``; ``reading``: one that ``import-masks`` reads.

    Raises:
        RegistryError: an unknown name (the message lists the valid ones).
    """
    names = [n for n, f in FORMATS.items() if f.read is not None or not reading]
    if name not in names:
        raise RegistryError(f"unknown --format {name!r}; valid: {', '.join(names)}")
    return FORMATS[name]
