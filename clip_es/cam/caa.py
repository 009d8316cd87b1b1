"""Class-aware attention-based affinity (CAA), SPEC section 2 step 7. Pure functions."""

from __future__ import annotations

import cv2
import numpy as np
import torch

from clip_es.cam.gradcam import minmax


def balanced_transition(attn: torch.Tensor, iters: int = 3) -> torch.Tensor:
    """Sinkhorn-style balancing and symmetrisation, in float64; the square is left to the caller.

    Args:
        attn: ``(..., N, N)`` non-negative mean attention (a batch is balanced matrix by
            matrix; autograd flows through).
        iters: rounds of (divide by column sums, then by row sums).

    Returns:
        ``(..., N, N)`` float64 symmetric ``T``. CAA's transition is ``T @ T``; applied to
        ``K`` maps it is ``T @ (T @ v)`` (:func:`caa_refine` with ``steps=2``): the same
        arithmetic at ``4 N^2 K`` flops instead of ``2 N^3`` for the square.
    """
    t = attn.double()
    for _ in range(iters):
        t = t / t.sum(-2, keepdim=True).clamp(min=1e-12)
        t = t / t.sum(-1, keepdim=True).clamp(min=1e-12)
    return (t + t.transpose(-1, -2)) / 2


def balance_affinity(attn: torch.Tensor, iters: int = 3) -> torch.Tensor:
    """The transition matrix ``T @ T`` of :func:`balanced_transition`, in ``attn``'s dtype.

    Args:
        attn: ``(..., N, N)`` non-negative mean attention (a batch of them is balanced
            matrix by matrix; autograd flows through, so a training loss can read it).
        iters: rounds of (divide by column sums, then by row sums).

    Returns:
        ``(..., N, N)``. The cam stage never forms it (see :func:`caa_refine`, ``steps=2``).
    """
    t = balanced_transition(attn, iters)
    return (t @ t).to(attn.dtype)


def box_mask(cam: np.ndarray, threshold: float = 0.4, release: bool = False) -> np.ndarray:
    """Union of the filled bounding boxes of every contour of the thresholded CAM.

    A pixel belongs when ``cam >= threshold * cam.max()`` on the float map (compared in
    float64; no uint8 quantisation, which would move a 0.4 cut to 0.4039). A map whose
    maximum is not positive passes no pixel.

    Boxes are inclusive of their last row and column, also for objects touching the right
    or bottom border (the CLIP-ES release clips the end to ``width - 1`` / ``height - 1``
    and so drops that row/column; see ``docs/cam.md`` for the measured effect).

    ``release=True`` is the rule as the CLIP-ES and TagCLIP releases run it (TagCLIP's tagger
    uses it, so its scores match the official code): the map quantised to uint8, a pixel
    kept when strictly above ``int(threshold * max)``, outer contours, and each box's end
    clipped to ``width - 1`` / ``height - 1``.

    Args:
        cam: ``(h, w)`` map in [0, 1].
        threshold: fraction of the map's maximum a pixel must reach.
        release: the releases' rule (above) instead of this project's.

    Returns:
        ``(h, w)`` uint8 in {0, 1}.
    """
    if release:
        return _release_box_mask(cam, threshold)
    cam = np.asarray(cam, np.float64)
    peak = float(cam.max()) if cam.size else 0.0
    out = np.zeros(cam.shape, np.uint8)
    if not peak > 0:
        return out
    binary = (cam >= threshold * peak).astype(np.uint8)
    contours, _ = cv2.findContours(binary, cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE)
    for c in contours:
        x, y, w, h = cv2.boundingRect(c)
        out[y:y + h, x:x + w] = 1
    return out


def _release_box_mask(cam: np.ndarray, threshold: float) -> np.ndarray:
    q = (np.asarray(cam, np.float32) * np.float32(255)).astype(np.uint8)
    h, w = q.shape
    out = np.zeros(q.shape, np.uint8)
    binary = (q > int(np.float32(threshold) * np.float32(q.max() if q.size else 0))).astype(np.uint8)
    contours, _ = cv2.findContours(binary, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    for c in contours:
        x, y, bw, bh = cv2.boundingRect(c)
        out[y:min(y + bh, h - 1), x:min(x + bw, w - 1)] = 1
    return out


def caa_refine(cams: torch.Tensor, trans: torch.Tensor, threshold: float = 0.4, steps: int = 1) -> torch.Tensor:
    """Propagate each class's CAM through the affinity, restricted to its boxes.

    Args:
        cams: ``(..., K, h, w)`` in [0, 1] (leading dims: a batch of images, e.g. ``(B, K, h, w)``
            with ``trans`` ``(B, N, N)``; an all-zero map, such as padding, stays all zero).
        trans: ``(..., N, N)``, ``N = h * w``: ``T @ T`` from :func:`balance_affinity` with
            ``steps=1``, or ``T`` from :func:`balanced_transition` with ``steps=2``.
        threshold: box threshold (VOC 0.4; CLIP-ES used 0.7 for COCO).
        steps: how many times ``trans`` is applied (``T @ (T @ v)`` for 2).

    Returns:
        ``(..., K, h, w)`` min-max normalised, in ``cams``' dtype; all zero for a class whose CAM
        passes no pixel. The product and the min-max run in float64 (``trans`` is promoted
        if given in a lower precision): on near-flat maps float32 drifts by up to 6e-3.
    """
    *lead, k, h, w = cams.shape
    if k == 0:
        return torch.zeros_like(cams)
    cams_np = cams.detach().cpu().double().numpy().reshape(-1, h, w)  # the one host sync of CAA
    masks = np.stack([box_mask(c, threshold) for c in cams_np]).reshape(cams.shape)
    masks = torch.from_numpy(masks).to(cams.device, torch.float64)
    # zeroing T's columns outside the boxes == zeroing the CAM there (exact: a 0/1 factor)
    v = (cams.detach().double() * masks).reshape(*lead, k, h * w).transpose(-1, -2)  # (..., N, K)
    t = trans.double()
    for _ in range(steps):
        v = t @ v
    return minmax(v.transpose(-1, -2).reshape(cams.shape)).to(cams.dtype)
