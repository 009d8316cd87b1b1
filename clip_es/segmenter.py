"""A trained segmenter for images held in memory: :class:`Segmenter`.

::

    import clip_es

    seg = clip_es.Segmenter.load("RUN/segmenter/model.pt")
    labels = seg(image)                              # (H, W) uint8, 0 background, k = seg.classes[k - 1]
    labels = seg(image, classes=["cat", "dog"])      # another class list (open vocabulary)

It wraps :func:`~clip_es.train.segment.load_segmenter` and
:func:`~clip_es.train.segment.predict_labels`, the functions ``clipes segment`` runs, so a
label map equals the PNG ``clipes segment`` writes for the same image.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from clip_es.data.base import ClassSpec
from clip_es.data.image_io import as_rgb_image
from clip_es.labeler import as_class_specs
from clip_es.train.segment import MAX_SIDE


class Segmenter:
    """A loaded segmenter checkpoint that labels images (see the module doc).

    Not the network itself (that is :class:`clip_es.train.model.Segmenter`, in :attr:`loaded`).

    Attributes:
        loaded: the :class:`~clip_es.train.segment.LoadedSegmenter` (model, class text, record).
        max_side: working-resolution cap in pixels (longer side); larger images are predicted
            on a downscaled copy and the labels resized back; ``None`` = native size.
    """

    def __init__(self, loaded, max_side: int | None = MAX_SIDE):
        self.loaded = loaded
        self.max_side = max_side
        self._other: tuple[tuple[ClassSpec, ...], object] | None = None  # the last other class list, embedded

    @classmethod
    def load(cls, path: str | Path, device: str = "auto", max_side: int | None = MAX_SIDE) -> "Segmenter":
        """Load ``RUN/segmenter/model.pt`` (or ``last.pt``) on ``device`` (``cpu``, ``cuda``, ``auto``).

        Raises:
            WeightsError: not a readable segmenter checkpoint.
            ConfigError: a bad device.
        """
        from clip_es.stage import resolve_device
        from clip_es.train.segment import load_segmenter

        return cls(load_segmenter(path, resolve_device(device)), max_side)

    @property
    def classes(self) -> list[str]:
        """The trained class names (what :meth:`__call__` predicts without ``classes``)."""
        return [c.name for c in self.loaded.classes]

    def __repr__(self) -> str:
        return f"Segmenter({self.loaded.checkpoint!r}, classes={self.classes}, device={self.loaded.device!r})"

    def _for(self, classes: str | Sequence[str | ClassSpec] | None):
        if classes is None:
            return self.loaded
        specs = tuple(as_class_specs(classes))
        if specs == tuple(self.loaded.classes):
            return self.loaded
        if self._other is None or self._other[0] != specs:  # embedding new names loads the CLIP: keep the last
            self._other = (specs, self.loaded.with_classes(list(specs)))
        return self._other[1]

    def __call__(self, image, classes: str | Sequence[str | ClassSpec] | None = None) -> np.ndarray:
        """Label map of one image.

        Args:
            image: a PIL image, an ``(H, W, 3)`` uint8 RGB array, or an image file path.
            classes: class names to segment (``None`` = the trained ones); names never
                trained on are embedded with the checkpoint's CLIP (loaded once per list).

        Returns:
            ``(H, W)`` uint8: 0 background, ``k`` = ``classes[k - 1]``.

        Raises:
            ImageError: the image cannot be read or has the wrong shape/dtype.
            ConfigError: bad class names.
        """
        from clip_es.train.segment import predict_labels

        rgb = as_rgb_image(image)
        return predict_labels(self._for(classes), rgb, self.max_side)
