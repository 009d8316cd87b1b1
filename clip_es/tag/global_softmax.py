"""The global tagger: one softmax over the classes of the whole image's embedding.

Cheap (one forward), but a single embedding is dominated by the largest object, so a small
object beside a large one often gets a few per cent and is missed (see :mod:`clip_es.tag.tagclip`).
"""

from __future__ import annotations

import numpy as np
import torch

from clip_es.model.dense import Pooling
from clip_es.model.zeroshot import ZERO_SHOT_THRESHOLD, class_probabilities, multilabel_from_probabilities
from clip_es.tag.base import TagResult


class GlobalTagger:
    """:func:`~clip_es.model.zeroshot.class_probabilities`, then
    :func:`~clip_es.model.zeroshot.multilabel_from_probabilities`.

    Args:
        clip: a loaded :class:`~clip_es.model.resolve.ClipModel`.
        text: ``(K, D)`` unit class embeddings (no background words).
        threshold: presence threshold on the softmax probability (the most likely class always kept).
        max_side: working-size cap (pixels), ``None`` = none.
        pooling: image embedding pooling (``mean``: CLIP-ES's mean of patch tokens).
    """

    name = "global"

    def __init__(self, clip, text: torch.Tensor, threshold: float = ZERO_SHOT_THRESHOLD,
                 max_side: int | None = 1024, pooling: Pooling = "mean"):
        self.clip, self.text, self.threshold, self.max_side, self.pooling = clip, text, threshold, max_side, pooling

    def describe(self) -> str:
        return ("softmax over the classes; a class is kept when its probability >= threshold, "
                "the most likely class always")

    def tag(self, image: np.ndarray) -> TagResult:
        """Tags of one ``(H, W, 3)`` uint8 RGB image (``scores``: the softmax probabilities)."""
        p = class_probabilities(self.clip, image, self.text, self.max_side, self.pooling)
        return TagResult(multilabel_from_probabilities(p, self.threshold), p)
