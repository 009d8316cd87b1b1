"""The CLIP image input: resize to a patch multiple and normalise (used by the cam stage,
prompt ranking and zero-shot prediction alike).
"""

from __future__ import annotations

import math

import numpy as np
import torch


def input_size(size: tuple[int, int], scale: float, patch: int) -> tuple[int, int]:
    """The model input ``(h, w)`` for an image of ``size = (H, W)``: ``ceil(side * scale / patch) * patch``."""
    H, W = size
    return max(1, math.ceil(H * scale / patch)) * patch, max(1, math.ceil(W * scale / patch)) * patch


def preprocess(image: np.ndarray, scale: float, patch: int, mean, std, flip: bool = False) -> torch.Tensor:
    """``(H, W, 3)`` uint8 -> ``(1, 3, h, w)`` normalised, at :func:`input_size`.

    Resized with PIL's bicubic filter on the uint8 image (as CLIP's own preprocessing and
    the CLIP-ES release do; OpenCV's cubic kernel moves the maps by up to 0.054, see docs/cam.md), then
    scaled to [0, 1] and normalised with the model's mean/std in float32.
    """
    from PIL import Image

    h, w = input_size(image.shape[:2], scale, patch)
    img = np.ascontiguousarray(image[:, ::-1] if flip else image)
    x = np.asarray(Image.fromarray(img).resize((w, h), Image.Resampling.BICUBIC), np.float32) / 255.0
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return torch.from_numpy(x).permute(2, 0, 1)[None].contiguous()
