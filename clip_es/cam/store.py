"""The cam stage's per-image file: ``RUN/cam/<id>.npz``.

Arrays (``np.savez_compressed``, written atomically):

    keys  int64   (K,)        0-based class indices of the image's labels, in this order
    cam   float16 (K, h, w)   softmax-GradCAM, each map min-max normalised to [0, 1]
    caa   float16 (K, h, w)   CAA-refined maps, [0, 1] (all zero where a class had no box)
    size  int64   (2,)        original image (H, W)

Records store maps at the scale-1 patch grid ``(h, w)`` of the working image (the original,
or the ``max_side``-capped size for larger images), single-view and multi-view alike: a
multi-scale or flipped run averages its views there (each view's maps resized bilinearly
to that grid, flipped ones flipped back), so its records are no larger than a single-view
run's. :func:`load_cam` upsamples them to ``(H, W)`` with bilinear interpolation (OpenCV
``resize``), exactly as the stage would have, so storing the grid is lossless for every
reader. Records written before this rule (multi-view maps at the working size) read the
same way.

Writes are atomic (temp file, then rename) but not fsynced (see :func:`save_cam`).
"""

from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from clip_es.errors import RunDirError
from clip_es.rundir import atomic_write_bytes


@dataclass
class CamMaps:
    """Decoded cam-stage record. Maps are ``(K, H, W)`` float32 in [0, 1] at the original size."""

    keys: np.ndarray
    cam: np.ndarray
    caa: np.ndarray

    @property
    def size(self) -> tuple[int, int]:
        return int(self.cam.shape[1]), int(self.cam.shape[2])


def upsample(maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear (OpenCV) resize of ``(K, h, w)`` maps to ``(K, H, W)`` float32."""
    maps = np.asarray(maps, dtype=np.float32)
    h, w = size
    if maps.shape[1:] == (h, w):
        return maps
    if maps.shape[0] == 0:
        return np.zeros((0, h, w), np.float32)
    return np.stack([cv2.resize(m, (w, h), interpolation=cv2.INTER_LINEAR) for m in maps])


def save_cam(path: str | Path, keys, cam: np.ndarray, caa: np.ndarray, size: tuple[int, int]) -> None:
    """Write one record atomically (see module doc for the arrays), without fsync: a killed
    process leaves the record whole or absent; after a power loss it may be torn, which
    :func:`is_valid_cam` (asked by resume for every existing record) detects."""
    buf = io.BytesIO()
    np.savez_compressed(buf, keys=np.asarray(keys, np.int64), cam=np.asarray(cam, np.float16),
                        caa=np.asarray(caa, np.float16), size=np.asarray(size, np.int64))
    atomic_write_bytes(path, buf.getvalue(), fsync=False)


def load_cam(path: str | Path, full_size: bool = True) -> CamMaps:
    """Read a record; maps upsampled to the original size unless ``full_size=False``.

    Raises:
        RunDirError: the file is missing, truncated or lacks an array (a corrupt cache entry).
    """
    try:
        with np.load(path, allow_pickle=False) as z:
            keys, cam, caa, size = z["keys"], z["cam"], z["caa"], tuple(int(s) for s in z["size"])
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise RunDirError(f"{path}: corrupt or incomplete cam file ({type(e).__name__}: {e}); "
                          "delete it and re-run 'clipes cam' to recompute it") from e
    if cam.shape != caa.shape or cam.shape[0] != len(keys):
        raise RunDirError(f"{path}: inconsistent shapes keys{keys.shape} cam{cam.shape} caa{caa.shape}; "
                          "delete it and re-run 'clipes cam'")
    if full_size:
        return CamMaps(keys, upsample(cam, size), upsample(caa, size))
    return CamMaps(keys, cam.astype(np.float32), caa.astype(np.float32))


def is_valid_cam(path: str | Path) -> bool:
    """True when ``path`` holds a complete, readable record."""
    try:
        load_cam(path, full_size=False)
        return True
    except RunDirError:
        return False
