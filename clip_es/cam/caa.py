"""Class-aware attention-based affinity (CAA), SPEC section 2 step 7. Pure functions."""

from __future__ import annotations

import cv2
import numpy as np
import torch

from clip_es.cam.gradcam import minmax


def balance_affinity(attn: torch.Tensor, iters: int = 3) -> torch.Tensor:
    """Sinkhorn-style balancing, symmetrise, square.

    Args:
        attn: ``(..., N, N)`` non-negative mean attention (a batch of them is balanced
            matrix by matrix; autograd flows through, so a training loss can read it).
        iters: rounds of (divide by column sums, then by row sums).

    Returns:
        ``(..., N, N)`` transition matrix ``T @ T`` of the symmetrised balanced affinity.
    """
    t = attn.double()
    for _ in range(iters):
        t = t / t.sum(-2, keepdim=True).clamp(min=1e-12)
        t = t / t.sum(-1, keepdim=True).clamp(min=1e-12)
    t = (t + t.transpose(-1, -2)) / 2
    return (t @ t).to(attn.dtype)


def box_mask(cam: np.ndarray, threshold: float = 0.4) -> np.ndarray:
    """Union of the filled bounding boxes of every contour of the thresholded CAM.

    Args:
        cam: ``(h, w)`` map in [0, 1].
        threshold: keep pixels strictly above ``int(threshold * max)`` of the uint8 map.

    Returns:
        ``(h, w)`` uint8 in {0, 1}; boxes include their last row and column.
    """
    q = (np.clip(cam, 0, 1) * 255).astype(np.uint8)
    binary = (q > int(threshold * int(q.max()))).astype(np.uint8)
    out = np.zeros_like(binary)
    if not binary.any():
        return out
    contours, _ = cv2.findContours(binary, cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE)
    for c in contours:
        x, y, w, h = cv2.boundingRect(c)
        out[y:y + h, x:x + w] = 1
    return out


def caa_refine(cams: torch.Tensor, trans: torch.Tensor, threshold: float = 0.4) -> torch.Tensor:
    """Propagate each class's CAM through the affinity, restricted to its boxes.

    Args:
        cams: ``(K, h, w)`` in [0, 1].
        trans: ``(N, N)`` from :func:`balance_affinity`, ``N = h * w``.
        threshold: box threshold (VOC 0.4; CLIP-ES used 0.7 for COCO).

    Returns:
        ``(K, h, w)`` min-max normalised; all zero for a class whose CAM passes no pixel.
    """
    k, h, w = cams.shape
    out = torch.zeros_like(cams)
    cams_np = cams.detach().cpu().float().numpy()
    for i in range(k):
        m = torch.from_numpy(box_mask(cams_np[i], threshold)).to(cams.device, trans.dtype).reshape(-1)
        if not bool(m.any()):
            continue
        refined = (trans * m[None, :]) @ cams[i].reshape(-1).to(trans.dtype)
        out[i] = refined.reshape(h, w).to(cams.dtype)
    return minmax(out) if k else out
