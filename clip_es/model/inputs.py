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

    :func:`normalise` of :func:`resize_input`: resized with PIL's bicubic filter on the uint8
    image (as CLIP's own preprocessing and the CLIP-ES release do; OpenCV's cubic kernel
    moves the maps by up to 0.054, see docs/cam.md), then scaled to [0, 1] and normalised
    with the model's mean/std in float32.
    """
    return normalise(resize_input(image, scale, patch, flip), mean, std)


def resize_input(image: np.ndarray, scale: float, patch: int, flip: bool = False) -> torch.Tensor:
    """``(H, W, 3)`` uint8 -> ``(1, 3, h, w)`` uint8 at :func:`input_size` (PIL bicubic; flipped first
    if asked). A quarter of the float32 input's bytes: what loader workers send the main process."""
    from PIL import Image

    h, w = input_size(image.shape[:2], scale, patch)
    img = np.ascontiguousarray(image[:, ::-1] if flip else image)
    x = np.array(Image.fromarray(img).resize((w, h), Image.Resampling.BICUBIC), np.uint8)
    return torch.from_numpy(x).permute(2, 0, 1)[None].contiguous()


def normalise(x: torch.Tensor, mean, std) -> torch.Tensor:
    """``(B, 3, h, w)`` uint8 -> float32 ``(x / 255 - mean) / std``, on ``x``'s device.

    The same float32 operations, in the same order, as the numpy path had, so the input is
    bit-identical wherever it is computed (a CPU or the GPU the batch is on).
    """
    m = torch.tensor(mean, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    return (x.float() / 255.0 - m) / s
