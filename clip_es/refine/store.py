"""The refine stage's files, one per image and kind, all palette/grayscale PNGs::

    RUN/refine/config.json        the stage parameters (hashed into the manifest)
    RUN/refine/masks/<id>.png     pseudo mask: 0 bg, k + 1 class k, 255 = ignore (conf < --conf);
                                  VOC palette. With --no-crf: the argmax of [bg, caa], no 255.
    RUN/refine/crf/<id>.png       CRF argmax without ignore (same ids, VOC palette); CRF runs only
    RUN/refine/conf/<id>.png      grayscale uint8 round(max_c Q_c * 255); --save-conf only

    RUN/corrected/<id>.png        a pseudo mask corrected by hand, same values (``clipes import-masks``;
                                  ``clipes train --labels corrected`` prefers it to masks/<id>.png)

Other stages (eval, export, show, the segmenter) read these through the helpers here.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from clip_es.data.image_io import read_mask
from clip_es.errors import ImageError, RunDirError
from clip_es.rundir import RunDir

STAGE = "refine"
MASKS, CRF, CONF = "masks", "crf", "conf"
KINDS = (MASKS, CRF, CONF)
CORRECTED = "corrected"


def refine_dir(run: RunDir | str | Path, kind: str) -> Path:
    """``RUN/refine/<kind>`` for ``kind`` in :data:`KINDS`."""
    if kind not in KINDS:
        raise ValueError(f"unknown refine output {kind!r}; valid: {', '.join(KINDS)}")
    rd = run if isinstance(run, RunDir) else RunDir(run)
    return rd.stage_dir(STAGE) / kind


def corrected_dir(run: RunDir | str | Path) -> Path:
    """``RUN/corrected``: the hand-corrected masks ``clipes import-masks`` stores (not a refine output:
    re-running refine leaves them as they are)."""
    rd = run if isinstance(run, RunDir) else RunDir(run)
    return rd.path / CORRECTED


def output_path(run: RunDir | str | Path, kind: str, image_id: str) -> Path:
    """``RUN/refine/<kind>/<id>.png``."""
    return refine_dir(run, kind) / f"{image_id}.png"


def output_ids(run: RunDir | str | Path, kind: str = MASKS) -> list[str]:
    """Sorted ids that have a ``kind`` file (empty when the folder does not exist)."""
    d = refine_dir(run, kind)
    return sorted(p.stem for p in d.glob("*.png")) if d.is_dir() else []


def read_output(path: str | Path) -> np.ndarray:
    """Read one refine PNG as ``(H, W)`` uint8.

    Raises:
        RunDirError: missing or unreadable (a corrupt cache entry).
    """
    try:
        return read_mask(path)
    except ImageError as e:
        raise RunDirError(f"{e}; delete it and re-run 'clipes refine' to recompute it") from e


def is_valid_png(path: Path) -> bool:
    """True when ``path`` is a complete, decodable PNG."""
    if not path.is_file():
        return False
    try:
        read_mask(path)
        return True
    except ImageError:
        return False
