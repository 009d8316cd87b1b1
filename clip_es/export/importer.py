"""``clipes import-masks``: corrected masks back into the run, as the label source
``clipes train --labels corrected``.

Everything is read and checked before anything is written: a truncated file, a mask whose
size is not its image's, a class name the run does not have, an image path outside the run
(absolute or with ``..``) or one that names no image of the run is refused with one line
(:class:`~clip_es.errors.MaskImportError`) and the run is left as it was. Then each
corrected mask is written atomically to ``RUN/corrected/<id>.png`` (the refine stage's
values: 0 background, ``k + 1`` class ``k``, 255 unsure/ignored; VOC palette), and the import
is recorded in ``RUN/corrected/imports.json``. A mask equal to what training would read
already (the pseudo mask, or an earlier correction) is not stored; images the import does
not hold keep their pseudo mask (or earlier correction).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from clip_es.data.image_io import mask_to_png_bytes, read_mask
from clip_es.errors import ImageError, MaskImportError
from clip_es.export.common import ImageIndex, open_run
from clip_es.export.registry import get_format
from clip_es.refine.crf import IGNORE
from clip_es.refine.store import corrected_dir
from clip_es.rundir import atomic_write_bytes, atomic_write_json

log = logging.getLogger(__name__)

IMPORTS = "imports.json"


@dataclass
class ImportResult:
    """What an import stored."""

    folder: str
    read: int
    stored: list[str] = field(default_factory=list)
    unchanged: int = 0

    def summary(self) -> str:
        return (f"import-masks: {self.read} masks read, {len(self.stored)} stored as corrected, {self.unchanged} "
                f"unchanged -> {self.folder} (train on them: clipes train --labels corrected)")


def import_masks(run: str | Path, src: str | Path, fmt: str, progress: bool = True) -> ImportResult:
    """Read corrected masks from ``src`` (format ``fmt``) into ``RUN/corrected`` (see the module doc).

    Raises:
        RegistryError: unknown ``fmt``.
        RunDirError: ``run`` has no pseudo masks.
        MaskImportError: anything wrong with ``src``; nothing was written.
    """
    f = get_format(fmt, reading=True)
    rimgs = open_run(run)
    values = rimgs.label_values()
    allowed = np.zeros(256, bool)
    allowed[list(values.values())] = True
    index = ImageIndex(rimgs)
    out = corrected_dir(rimgs.run)
    src = Path(src)
    ready: dict[str, bytes] = {}
    seen: dict[str, str] = {}
    unchanged = 0
    for ref, where, mask in tqdm(f.read(src, values), desc=f"import {fmt}", unit="img", disable=not progress,
                                      delay=1.0):
        image_id = index.resolve(ref, where)
        if image_id in seen:
            raise MaskImportError(f"{where}: image {image_id!r} is also given by {seen[image_id]}; keep one")
        seen[image_id] = where
        pseudo = rimgs.mask(image_id)
        if mask is None:  # no region drawn: all background
            mask = np.zeros_like(pseudo)
        if mask.shape != pseudo.shape:
            raise MaskImportError(f"{where}: mask is {mask.shape[1]}x{mask.shape[0]} but image "
                                  f"{rimgs.file_name(image_id)!r} is {pseudo.shape[1]}x{pseudo.shape[0]}; "
                                  "correct the mask at the image's own size")
        mask = settle_uncovered(mask, pseudo)
        if not allowed[mask].all():
            bad = int(mask[~allowed[mask]][0])
            raise MaskImportError(f"{where}: value {bad} is no label of the run (0 background, 1..{len(rimgs.classes)} "
                                  "the classes, 255 unsure)")
        current = _current(out / f"{image_id}.png", pseudo)
        if np.array_equal(mask, current):
            unchanged += 1
            continue
        ready[image_id] = mask_to_png_bytes(mask)
    if not seen:
        why = " (no task has an annotation: export the project after correcting, not the predictions)" \
            if fmt == "labelstudio" else ""
        raise MaskImportError(f"{src}: no corrected mask found in it{why}; check --from and --format {fmt}")
    if ready:
        out.mkdir(parents=True, exist_ok=True)
        for image_id, data in ready.items():
            atomic_write_bytes(out / f"{image_id}.png", data)
    if ready or (out / IMPORTS).is_file():
        record = _history(out / IMPORTS)
        record.append({"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "source": str(src.resolve()), "format": fmt,
                       "stored": sorted(ready), "unchanged": unchanged})
        atomic_write_json(out / IMPORTS, record)
    return ImportResult(str(out), len(seen), sorted(ready), unchanged)


def settle_uncovered(mask: np.ndarray, pseudo: np.ndarray) -> np.ndarray:
    """Fill the pixels a reader left open (a masked array's masked pixels: a COCO pixel no annotation
    covers): unsure (255) where the pseudo mask was unsure, background elsewhere. Plain arrays pass."""
    if not isinstance(mask, np.ma.MaskedArray):
        return mask
    open_ = np.ma.getmaskarray(mask)
    return np.where(open_, np.where(pseudo == IGNORE, IGNORE, 0), mask.data).astype(np.uint8)


def _current(path: Path, pseudo: np.ndarray) -> np.ndarray:
    if not path.is_file():
        return pseudo
    try:
        return read_mask(path)
    except ImageError:  # a damaged earlier correction: the new one replaces it
        return np.full_like(pseudo, 254)


def _history(path: Path) -> list:
    if not path.is_file():
        return []
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
        return old if isinstance(old, list) else []
    except (OSError, ValueError):
        log.warning("%s is unreadable; starting its history afresh", path)
        return []
