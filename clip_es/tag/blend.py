"""The blend tagger: a class is kept when the global softmax and TagCLIP agree on it.

The two taggers fail in opposite ways. The global softmax (:mod:`clip_es.tag.global_softmax`)
rarely names a class that is absent, but a small object beside a large one gets a few per cent
and is missed. TagCLIP (:mod:`clip_es.tag.tagclip`) finds those small objects locally, but its
relative rule always keeps something near the top of each image's range, and a patch that
looks like another class (a flower-like patch of a boat) becomes a wrong label the global view
gives almost nothing.

Score of class ``c`` = ``sqrt(p_global(c) * s_tagclip(c))``, the geometric mean of the two
scores; a class is kept when its score is at least ``threshold`` (the most likely class always).
A class both taggers like passes easily; one that either tagger calls near zero does not,
however sure the other is.

The review files keep every part: ``global`` (the softmax probability), ``tagclip`` (TagCLIP's
score) and TagCLIP's ``local`` and ``crop``.
"""

from __future__ import annotations

import numpy as np

from clip_es.tag.base import TagResult

#: Default ``threshold`` on the geometric mean. Chosen on one toy world (seed 5, 200 images, the
#: bundled clipes-tiny; 0.05 and 0.1 compared) and checked on five others: README, "Labels from a
#: class list".
BLEND_THRESHOLD = 0.05


def blend_scores(p_global: np.ndarray, s_tagclip: np.ndarray) -> np.ndarray:
    """``(K,)`` geometric mean of the two taggers' ``(K,)`` scores (negative inputs count as 0)."""
    g = np.clip(np.asarray(p_global, dtype=np.float64), 0.0, None)
    t = np.clip(np.asarray(s_tagclip, dtype=np.float64), 0.0, None)
    return np.sqrt(g * t).astype(np.float32)


def blend_tags(scores: np.ndarray, threshold: float = BLEND_THRESHOLD) -> tuple[int, ...]:
    """Sorted class indices with ``scores >= threshold``; the most likely class when none is."""
    s = np.asarray(scores)
    keep = np.flatnonzero(s >= threshold).tolist()
    return tuple(int(k) for k in keep) if keep else (int(np.argmax(s)),)


class BlendTagger:
    """Both taggers on the same image, their scores blended (see the module docstring).

    Args:
        global_tagger: a :class:`~clip_es.tag.global_softmax.GlobalTagger` over the classes.
        tagclip_tagger: a :class:`~clip_es.tag.tagclip.TagClipTagger` over the same classes.
        threshold: what the geometric mean must reach.
    """

    name = "blend"

    def __init__(self, global_tagger, tagclip_tagger, threshold: float = BLEND_THRESHOLD):
        self.global_tagger, self.tagclip_tagger, self.threshold = global_tagger, tagclip_tagger, threshold
        self.text_info = getattr(tagclip_tagger, "text_info", None)

    def describe(self) -> str:
        """The rule, for the review files."""
        return ("blend: score = sqrt(global x tagclip), global = the class's softmax probability over the classes "
                "(whole image), tagclip = TagCLIP's score (0.5 x local + 0.5 x crop for candidate classes, local "
                f"alone for the others); a class is kept when its score is >= {self.threshold}, the most likely "
                "class always")

    def tag(self, image: np.ndarray) -> TagResult:
        """Tags of one ``(H, W, 3)`` uint8 RGB image."""
        g = self.global_tagger.tag(image)
        t = self.tagclip_tagger.tag(image)
        scores = blend_scores(g.scores, t.scores)
        parts = {"global": np.asarray(g.scores, dtype=np.float32), "tagclip": np.asarray(t.scores, dtype=np.float32),
                 **t.parts}
        return TagResult(blend_tags(scores, self.threshold), scores, parts)
