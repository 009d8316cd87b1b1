"""PAMR: pixel-adaptive mask refinement (Araslanov & Roth, CVPR 2020), on torch (CPU or CUDA).

The refine stage's second method (SPEC section 3b). PAMR smooths the score stack with a
local affinity taken from the image's colour: for every pixel ``i`` and each of its 8
neighbours ``j`` in a 3x3 neighbourhood at every dilation ``d`` (``P = 8 * len(dilations)``
neighbours in all),

    ``a_ij = softmax_j( mean_c( -|I_i^c - I_j^c| / (eps + sigma * std_i^c) ) )``

where ``std_i^c`` is the standard deviation of channel ``c`` over the ``9 * len(dilations)``
pixels of those neighbourhoods (the centre counted once per dilation) and the softmax runs
over the ``P`` neighbours; then ``iters`` times ``m_i <- sum_j a_ij m_j``. Borders repeat
the edge pixel. Every step is a convex combination, so a distribution stays a
distribution. Dividing by the local spread makes the affinity adaptive: in a flat region
small colour steps already separate, in a textured one only large ones do.

The math is a few element-wise passes over shifted views of one padded tensor (no
unfold copies), so it needs ``O(P * H * W)`` memory for the affinity and runs alike on
the CPU (one thread is enough) and on a GPU. torch is imported inside the functions, so
importing this module (as the CRF's worker processes do) costs nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from clip_es.errors import ConfigError
from clip_es.refine.method import RefineMethod, check_inputs

if TYPE_CHECKING:
    import torch

#: Added to the scaled local standard deviation (a flat patch has std 0).
STD_EPS = 1e-8


@dataclass(frozen=True)
class PamrParams:
    """PAMR parameters (the defaults are the published ones).

    Attributes:
        dilations: dilations of the 3x3 neighbourhoods (pixels of the working image).
        iters: propagation steps ``m <- A m``.
        sigma: factor on the local standard deviation in the affinity's denominator
            (smaller = sharper colour edges).
    """

    dilations: tuple[int, ...] = (1, 2, 4, 8, 12, 24)
    iters: int = 10
    sigma: float = 0.1

    def validate(self) -> "PamrParams":
        if not self.dilations or any(int(d) != d or d < 1 for d in self.dilations):
            raise ConfigError(f"PAMR dilations must be positive whole pixels, got {list(self.dilations)}")
        if self.iters < 1:
            raise ConfigError(f"PAMR iterations must be at least 1, got {self.iters}")
        if not self.sigma > 0:
            raise ConfigError(f"PAMR sigma must be > 0, got {self.sigma}")
        return self


def _offsets(dilations: tuple[int, ...]) -> list[tuple[int, int]]:
    """``(dy, dx)`` of the ``8 * len(dilations)`` neighbours, centre excluded, in a fixed order."""
    return [(d * dy, d * dx) for d in dilations for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx]


def _shifted(padded: "torch.Tensor", pad: int, offsets: list[tuple[int, int]], h: int, w: int):
    """Views ``(..., h, w)`` of a replicate-padded tensor, one per offset (no copies)."""
    for dy, dx in offsets:
        yield padded[..., pad + dy:pad + dy + h, pad + dx:pad + dx + w]


def _pad(x: "torch.Tensor", pad: int) -> "torch.Tensor":
    """``(C, H, W)`` -> ``(C, H + 2 pad, W + 2 pad)``, edges repeated (replicate padding == index clamping,
    so one pad by the largest dilation serves every dilation)."""
    import torch.nn.functional as F

    return F.pad(x[None], (pad, pad, pad, pad), mode="replicate")[0]


def local_affinity(image: "torch.Tensor", params: PamrParams = PamrParams()) -> "torch.Tensor":
    """The PAMR affinity of every pixel to its ``P = 8 * len(dilations)`` neighbours.

    Args:
        image: ``(3, H, W)`` float image (any scale: the affinity divides by the local std).
        params: dilations and ``sigma``.

    Returns:
        ``(P, H, W)`` float, non-negative, summing to 1 over ``P`` (same device and dtype as ``image``).
    """
    import torch

    dil = tuple(int(d) for d in params.dilations)
    offs, pad, n_dil = _offsets(dil), max(dil), len(dil)
    _, h, w = image.shape
    xp = _pad(image, pad)
    n = 9 * n_dil  # the centre is in each dilation's 3x3 neighbourhood
    total = image * n_dil
    for v in _shifted(xp, pad, offs, h, w):
        total.add_(v)
    mean = total / n
    var = (image - mean).square_().mul_(n_dil)
    for v in _shifted(xp, pad, offs, h, w):
        var.add_((v - mean).square_())
    denom = var.div_(n - 1).sqrt_().mul_(params.sigma).add_(STD_EPS)  # (3, H, W) unbiased std, scaled
    logits = torch.empty((len(offs), h, w), dtype=image.dtype, device=image.device)
    for p, v in enumerate(_shifted(xp, pad, offs, h, w)):
        torch.mean((image - v).abs_().div_(denom), 0, out=logits[p])
    return logits.neg_().softmax(0)


def propagate(probs: "torch.Tensor", affinity: "torch.Tensor", params: PamrParams = PamrParams()) -> "torch.Tensor":
    """``params.iters`` steps of ``m_i <- sum_j a_ij m_j``.

    Args:
        probs: ``(C, H, W)`` per-pixel distribution (not modified).
        affinity: ``(P, H, W)`` from :func:`local_affinity` with the same ``params.dilations``.

    Returns:
        ``(C, H, W)`` refined distribution (a new tensor).
    """
    import torch

    dil = tuple(int(d) for d in params.dilations)
    offs, pad = _offsets(dil), max(dil)
    if affinity.shape[0] != len(offs) or affinity.shape[1:] != probs.shape[1:]:
        raise ValueError(f"affinity must be ({len(offs)}, H, W) for {probs.shape}, got {tuple(affinity.shape)}")
    _, h, w = probs.shape
    m = probs
    for _ in range(params.iters):
        mp = _pad(m, pad)
        out = torch.zeros_like(m)
        for a, v in zip(affinity, _shifted(mp, pad, offs, h, w)):
            out.addcmul_(v, a)  # a (H, W) broadcast over the C channels
        m = out
    return m


def pamr(image: np.ndarray, probs: np.ndarray, params: PamrParams = PamrParams(), device: str = "cpu") -> np.ndarray:
    """PAMR on one image: the refine stage's :data:`~clip_es.refine.method.RefineFn`.

    Args:
        image: ``(H, W, 3)`` uint8 RGB (the working-size image).
        probs: ``(C, H, W)`` per-pixel class distribution (C >= 1).
        params: dilations, iterations, ``sigma``.
        device: a torch device (``cpu``, ``cuda``, ``cuda:1``); float32 on every device.

    Returns:
        ``(C, H, W)`` float32 refined distribution in [0, 1], summing to 1 over ``C``
        (inputs are not modified).
    """
    import torch

    check_inputs(image, probs)
    c, h, w = probs.shape
    if c == 1:
        return np.ones((1, h, w), np.float32)
    with torch.inference_mode():
        x = torch.from_numpy(np.array(image, np.uint8, copy=True)).to(device).permute(2, 0, 1).float().div_(255.0)
        m = torch.from_numpy(np.array(probs, np.float32, copy=True)).to(device)
        q = propagate(m, local_affinity(x, params), params)
        return q.clamp_(0.0, 1.0).cpu().numpy()


#: The default threshold 0.44 keeps the share of pixels that the CRF keeps at 0.95: matched on
#: toy train images (``pipelines/bench/bench_refine_methods.py``), checked on held-out val (docs/refine.md).
METHOD = RefineMethod(name="pamr", refine=pamr, params_field="pamr_params", default_conf=0.44, torch_device=True,
                      summary="PAMR, iterated local colour affinity (torch: CPU or GPU)")
