"""Training data: images with pseudo masks, augmentation, and a resumable step sampler.

Label sources (``--labels``):

* ``refine`` (default): ``RUN/refine/masks/<id>.png``, confidence-guided pseudo masks (255 = ignore);
* ``crf``: ``RUN/refine/crf/<id>.png``, CRF argmax without ignore;
* ``corrected``: ``RUN/corrected/<id>.png`` where ``clipes import-masks`` stored a mask corrected by
  hand, the pseudo mask ``RUN/refine/masks/<id>.png`` elsewhere;
* ``gt``: the dataset's ground truth (an upper bound; also how the code is tested);
* any folder path: ``FOLDER/<id>.png``.

Determinism: the sample order and every augmentation are functions of ``(seed, position in
the global sample stream)`` only, so a run resumed at step ``s`` sees exactly the samples an
uninterrupted run would, whatever the number of dataloader workers.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np
import torch

from clip_es.data.image_io import read_mask
from clip_es.errors import ConfigError, DatasetError
from clip_es.rundir import RunDir

log = logging.getLogger(__name__)

#: Named label sources -> refine output kind (see :mod:`clip_es.refine.store`); ``gt`` reads the dataset.
LABEL_SOURCES: dict[str, str | None] = {"refine": "masks", "crf": "crf", "corrected": "masks", "gt": None}
#: The label source whose masks ``RUN/corrected/<id>.png`` replace the pseudo masks where they exist.
CORRECTED = "corrected"


class LabelSource:
    """Where the training masks of a run come from (picklable, for dataloader workers)."""

    def __init__(self, run: RunDir, spec: str):
        self.spec = spec
        self.override: Path | None = None  # corrected masks, read first
        if spec == CORRECTED:
            from clip_es.refine.store import corrected_dir

            self.override = corrected_dir(run)
            if not self.override.is_dir():
                raise ConfigError(f"no corrected masks in {self.override}; store them first with 'clipes "
                                  f"import-masks --run {run.path} --from FILE --format cvat|labelstudio|coco|png'")
        if spec in LABEL_SOURCES:
            kind = LABEL_SOURCES[spec]
            if kind is None:
                self.folder = None
            else:
                from clip_es.refine.store import refine_dir

                self.folder = refine_dir(run, kind)
        elif Path(spec).is_dir():
            self.folder = Path(spec)
        else:
            raise ConfigError(f"--labels must be one of {', '.join(LABEL_SOURCES)} or an existing folder of "
                              f"<id>.png masks, got {spec!r}")
        if self.folder is not None and not self.folder.is_dir() and self.override is None:
            hint = " (run 'clipes refine' first, or train on --labels gt to test)" if spec in LABEL_SOURCES else ""
            raise ConfigError(f"label folder {self.folder} does not exist{hint}")

    def available(self, ds, ids: list[str]) -> list[str]:
        """The ids that have a mask in this source."""
        if self.folder is None:
            return [i for i in ids if ds.gt_path(i) is not None] if hasattr(ds, "gt_path") else list(ids)
        have = {p.stem for p in self.folder.glob("*.png")}
        if self.override is not None:
            have |= {p.stem for p in self.override.glob("*.png")}
        return [i for i in ids if i in have]

    def load(self, ds, image_id: str) -> np.ndarray:
        """``(H, W)`` uint8 mask of one image."""
        if self.folder is None:
            m = ds.load_gt(image_id)
            if m is None:
                raise DatasetError(f"{image_id}: no ground-truth mask in {ds.root}")
            return m
        if self.override is not None and (self.override / f"{image_id}.png").is_file():
            return read_mask(self.override / f"{image_id}.png")
        return read_mask(self.folder / f"{image_id}.png")


def scale_crop_flip(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator, crop: int,
                    scale_range: tuple[float, float] = (0.5, 2.0), pad_color: tuple[int, int, int] = (124, 116, 104)
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Random scale, random crop (padding with ``pad_color`` / 255), random horizontal flip.

    Args:
        image: ``(H, W, 3)`` uint8.
        mask: ``(H, W)`` uint8 (255 = ignore).
        rng: decides everything.
        crop: output side.

    Returns:
        ``(crop, crop, 3)`` uint8 image and ``(crop, crop)`` uint8 mask (new arrays).
    """
    if image.shape[:2] != mask.shape:
        raise DatasetError(f"image {image.shape[:2]} and mask {mask.shape} differ in size")
    s = float(rng.uniform(*scale_range))
    h, w = max(1, round(image.shape[0] * s)), max(1, round(image.shape[1] * s))
    img = cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR)
    msk = cv2.resize(mask, (w, h), interpolation=cv2.INTER_NEAREST)
    ph, pw = max(crop - h, 0), max(crop - w, 0)
    if ph or pw:
        img = cv2.copyMakeBorder(img, 0, ph, 0, pw, cv2.BORDER_CONSTANT, value=pad_color)
        msk = cv2.copyMakeBorder(msk, 0, ph, 0, pw, cv2.BORDER_CONSTANT, value=255)
    y = int(rng.integers(0, img.shape[0] - crop + 1))
    x = int(rng.integers(0, img.shape[1] - crop + 1))
    img, msk = img[y:y + crop, x:x + crop], msk[y:y + crop, x:x + crop]
    if rng.random() < 0.5:
        img, msk = img[:, ::-1], msk[:, ::-1]
    return np.ascontiguousarray(img), np.ascontiguousarray(msk)


class CropDataset(torch.utils.data.Dataset):
    """Augmented crops; indexed by ``(sample index, stream position)`` pairs.

    Returns ``(image (3, crop, crop) uint8, mask (crop, crop) int64)``.
    """

    def __init__(self, ds, ids: list[str], labels: LabelSource, crop: int, scale_range: tuple[float, float],
                 seed: int, pad_color: tuple[int, int, int] = (124, 116, 104)):
        self.ds, self.ids, self.labels = ds, list(ids), labels
        self.crop, self.scale_range, self.seed, self.pad_color = crop, scale_range, seed, pad_color

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        index, pos = key
        image_id = self.ids[index]
        image = self.ds.load_image(image_id)
        mask = self.labels.load(self.ds, image_id)
        if mask.shape != image.shape[:2]:
            raise DatasetError(f"{image_id}: mask {mask.shape} does not match image {image.shape[:2]}")
        rng = np.random.default_rng([self.seed, 1, pos])
        img, msk = scale_crop_flip(image, mask, rng, self.crop, self.scale_range, self.pad_color)
        return torch.from_numpy(img).permute(2, 0, 1), torch.from_numpy(msk.astype(np.int64))


class StepBatchSampler(torch.utils.data.Sampler):
    """Yields this rank's batches for steps ``start .. steps-1``.

    The global sample stream is a sequence of epochs, each a permutation of the ``n``
    samples seeded by ``(seed, epoch)``. Step ``s`` consumes stream positions
    ``[s * world * batch, (s + 1) * world * batch)``; rank ``r`` takes its ``batch``-long
    slice of them (so ranks never share a sample within a step). Items are
    ``(sample index, stream position)``; the position seeds that sample's augmentation.
    """

    def __init__(self, n: int, batch: int, steps: int, start: int = 0, rank: int = 0, world: int = 1,
                 seed: int = 0):
        if n < 1:
            raise ConfigError("no training samples")
        self.n, self.batch, self.steps, self.start = n, batch, steps, start
        self.rank, self.world, self.seed = rank, world, seed
        self._perm: tuple[int, np.ndarray] | None = None

    def _index(self, pos: int) -> int:
        epoch = pos // self.n
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.seed, 2, epoch]).permutation(self.n))
        return int(self._perm[1][pos % self.n])

    def batch_at(self, step: int) -> list[tuple[int, int]]:
        first = (step * self.world + self.rank) * self.batch
        return [(self._index(p), p) for p in range(first, first + self.batch)]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for s in range(self.start, self.steps):
            yield self.batch_at(s)

    def __len__(self) -> int:
        return max(0, self.steps - self.start)
