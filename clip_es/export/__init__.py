"""``clipes export`` and ``clipes import-masks``: the refine stage's pseudo masks in the formats
other tools read, and corrected masks back into the run.

One module per format (:mod:`~clip_es.export.coco`, :mod:`~clip_es.export.png`,
:mod:`~clip_es.export.cvat`, :mod:`~clip_es.export.labelstudio`,
:mod:`~clip_es.export.fiftyone`), each documenting its layout and how it carries the unsure
pixels; the registry is :data:`~clip_es.export.registry.FORMATS`. ``review.csv`` and the
image order (``--order least-sure``): :mod:`~clip_es.export.review`,
:mod:`~clip_es.export.common`. The way back: :mod:`~clip_es.export.importer`.
"""

from __future__ import annotations

from pathlib import Path

from tqdm import tqdm

from clip_es.export.coco import export_coco, mask_to_annotations
from clip_es.export.common import ORDERS, ExportResult, image_stats, open_run, select
from clip_es.export.importer import ImportResult, import_masks
from clip_es.export.registry import FORMATS, get_format


def export_run(run: str | Path, fmt: str, out: str | Path, progress: bool = True, *, limit: int | None = None,
               order: str = "dataset", review: bool = False) -> ExportResult:
    """``clipes export``: write the run's pseudo masks in format ``fmt`` to ``out``.

    Args:
        run: a run folder with refine outputs (``clipes label``'s OUT is one).
        fmt: a key of :data:`FORMATS` (``coco``, ``png``, ``cvat``, ``labelstudio``, ``fiftyone``).
        out: the file or folder to write (each format's module says which).
        limit: only the first ``limit`` images in ``order``: a first batch to correct.
        order: ``dataset`` (the dataset's order) or ``least-sure`` (lowest confidence first).
        review: also write ``review.csv`` and an overlay per image (:mod:`clip_es.export.review`).

    Raises:
        RegistryError: unknown ``fmt``. ConfigError: bad ``order``/``limit``/``out``.
        RunDirError: no refine outputs.
    """
    f = get_format(fmt)
    select([], order, limit)  # checks order and limit before anything is read
    rimgs = open_run(run)
    if order == "dataset" and not review:
        ids = rimgs.ids[:limit]
        stats = []
    else:
        pool = rimgs.ids if order != "dataset" else rimgs.ids[:limit]
        with_conf = rimgs.has_conf()
        stats = [image_stats(i, rimgs.mask(i), rimgs.conf(i) if with_conf else None,
                             rimgs.crf(i) if with_conf else None, rimgs.classes)
                 for i in tqdm(pool, desc="confidence", unit="img", disable=not progress)]
        stats = select(stats, order, limit)
        ids = [s.image_id for s in stats]
    res = f.write(rimgs, ids, Path(out), progress)
    if review:
        from clip_es.export.review import review_paths, write_review

        csv_path, overlays = review_paths(Path(out), f.review_inside and Path(out).is_dir())
        res.review = str(write_review(rimgs, stats, csv_path, overlays, progress))
    return res


def export_png(run: str | Path, out: str | Path, progress: bool = True) -> ExportResult:
    """Copy the run's palette PNG pseudo masks into folder ``out`` with ``classes.txt`` (:mod:`.png`)."""
    return export_run(run, "png", out, progress)


__all__ = ["FORMATS", "ORDERS", "ExportResult", "ImportResult", "export_coco", "export_png", "export_run",
           "get_format", "import_masks", "mask_to_annotations"]
