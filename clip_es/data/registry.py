"""Plain-dict registries: dataset readers, and (re-exported) the built-in class and background sets.

Lookups that miss raise :class:`~clip_es.errors.RegistryError` listing the valid names.
Nothing here runs at import time beyond building constant dicts.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

# the class and background sets live below the readers (clip_es.data.classes); re-exported here
from clip_es.data.classes import (BACKGROUND_SETS, CLASS_SETS, background_words, builtin_classes,  # noqa: F401
                                  lookup)
from clip_es.errors import RunDirError

if TYPE_CHECKING:
    from clip_es.rundir import RunDir


def _voc(root, split, class_file=None, **kw):
    from clip_es.data.voc import VOCDataset

    return VOCDataset(root, split, class_file=class_file, **kw)


def _coco(root, split, class_file=None, **kw):
    from clip_es.data.coco import COCODataset

    return COCODataset(root, split, class_file=class_file, **kw)


def _folder(root, split, class_file=None, **kw):
    from clip_es.data.folder import FolderDataset

    return FolderDataset(root, split, class_file=class_file, **kw)


#: Dataset readers by ``--dataset`` name. ``toy`` is a VOC-layout folder made by ``clipes toy make``.
DATASETS: dict[str, Callable[..., Any]] = {"voc": _voc, "coco": _coco, "folder": _folder, "toy": _voc}
#: Default background set for each dataset kind.
DEFAULT_BACKGROUND: dict[str, str] = {"voc": "voc", "coco": "coco", "folder": "none", "toy": "toy"}


def open_dataset(kind: str, root: str | Path, split: str, class_file: str | Path | None = None, **kw):
    """Open a dataset split by registry name (``voc``, ``coco``, ``folder``, ``toy``)."""
    return lookup(DATASETS, kind, "dataset")(root, split, class_file=class_file, **kw)


def dataset_of_run(run: "RunDir", split: str | None = None):
    """Reopen the dataset recorded in the run's manifest (optionally another split).

    Raises:
        RunDirError: the manifest records no dataset.
    """
    m = run.read_manifest()
    d = m.get("dataset")
    if not d:
        raise RunDirError(f"{run.path}: no dataset recorded in the manifest; run 'clipes cam' into it first")
    extra = {"ann_file": d["ann_file"]} if d.get("ann_file") and (split or d["split"]) == d["split"] else {}
    return open_dataset(d["kind"], d["root"], split or d["split"], d.get("class_file"), **extra)
