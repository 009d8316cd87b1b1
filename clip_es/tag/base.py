"""What every tagger returns, and the relative tag rule TagCLIP uses. Pure functions."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class TagResult:
    """One image's tags.

    Attributes:
        keys: sorted 0-based indices of the classes tagged present (never empty).
        scores: ``(K,)`` float per-class scores the tags were chosen from (higher = more likely).
        parts: named ``(K,)`` score parts written to the review file (TagCLIP: ``local`` and
            ``crop``; a class without a crop score holds NaN there). Empty for the global tagger.
    """

    keys: tuple[int, ...]
    scores: np.ndarray
    parts: dict[str, np.ndarray] = field(default_factory=dict)


def relative_tags(scores: np.ndarray, cut: float = 0.5) -> tuple[int, ...]:
    """Classes whose score is above ``min + cut * (max - min)`` of this image's scores.

    When none is (all scores equal), the most likely class alone: an image handed to the
    tagger is assumed to show at least one listed class.

    Args:
        scores: ``(K,)`` per-class scores.
        cut: fraction of the image's score range a class must exceed (TagCLIP: 0.5).

    Returns:
        Sorted 0-based class indices.
    """
    s = np.asarray(scores)
    if s.size == 0:
        return ()
    s = s if s.dtype in (np.float32, np.float64) else s.astype(np.float64)
    thr = s.min() + s.dtype.type(cut) * (s.max() - s.min())  # in the scores' precision
    keep = np.flatnonzero(s > thr).tolist()
    return tuple(int(k) for k in keep) if keep else (int(np.argmax(s)),)
