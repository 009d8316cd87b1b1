"""What a refinement method is to the refine stage (the registry is :mod:`clip_es.refine.methods`).

A method turns the per-pixel class distribution of one image, ``[bg, caa_1..caa_K]``
normalised, into refined probabilities of the same shape, looking at the image. The stage
then applies the same confidence-guided ignore rule to every method's output
(:func:`clip_es.refine.crf.labels_from_q`). Each method lives in its own module (its
"room": :mod:`~clip_es.refine.crf`, :mod:`~clip_es.refine.pamr`) and describes itself with
one :class:`RefineMethod`; nothing outside the room asks for a method by name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

#: ``(image, probs, params, device) -> q``: ``(H, W, 3)`` uint8 RGB, ``(C, H, W)`` float32
#: distribution, the method's parameter dataclass, a torch device string -> ``(C, H, W)``
#: float32 refined distribution (in [0, 1], summing to 1 over ``C``).
RefineFn = Callable[[np.ndarray, np.ndarray, Any, str], np.ndarray]


@dataclass(frozen=True)
class RefineMethod:
    """One refinement method as the stage sees it.

    Attributes:
        name: the ``--method`` value.
        refine: the pure function (see :data:`RefineFn`).
        params_field: the :class:`~clip_es.refine.run.RefineConfig` field that holds this
            method's parameter dataclass (hashed into the stage parameters).
        default_conf: the confidence threshold used when ``--conf`` is not given (each
            method's probabilities are peaked differently; see docs/refine.md for how it was chosen).
        torch_device: runs on a torch device (``--device`` cpu/cuda); ``False`` = CPU only.
        summary: one line for ``--help`` and the docs.
    """

    name: str
    refine: RefineFn
    params_field: str
    default_conf: float
    torch_device: bool
    summary: str


def check_inputs(image: np.ndarray, probs: np.ndarray) -> None:
    """Refuse inputs a :data:`RefineFn` cannot take.

    Raises:
        ValueError: ``image`` is not ``(H, W, 3)`` uint8, or ``probs`` is not ``(C, H, W)`` at its size.
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be (H, W, 3) uint8, got {image.shape} {image.dtype}")
    if probs.ndim != 3 or probs.shape[1:] != image.shape[:2]:
        raise ValueError(f"probs must be (C, H, W) with (H, W) = {image.shape[:2]}, got {probs.shape}")
