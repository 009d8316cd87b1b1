"""Softmax-GradCAM over the last ViT block (SPEC section 2, steps 3-6).

Pure tensor functions: no files, no model loading.

The targets of one image share the forward of the last block; their gradients come
from ONE batched backward (``torch.autograd.grad(..., is_grads_batched=True)``: a
vmap over the per-target output cotangents), which computes only input gradients
(the model is frozen). ``mode="loop"`` runs one backward per target instead; it exists
for the equivalence test and the benchmark.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from clip_es.model.dense import Pooling, attention, block_forward, pool_tokens


@dataclass
class GradCamOutput:
    """Result for one image.

    Attributes:
        cam: ``(K, h, w)`` min-max normalised CAMs in [0, 1], one per target.
        attn_last: ``(N, N)`` head-averaged patch attention of the last block.
        logits: ``(M,)`` scaled cosine logits of the softmax set.
    """

    cam: torch.Tensor
    attn_last: torch.Tensor
    logits: torch.Tensor


def minmax(x: torch.Tensor, dims: tuple[int, ...] = (-2, -1)) -> torch.Tensor:
    """Min-max normalise over ``dims`` to [0, 1]; a constant map becomes all zeros."""
    lo = x.amin(dim=dims, keepdim=True)
    hi = x.amax(dim=dims, keepdim=True)
    span = hi - lo
    return torch.where(span > 0, (x - lo) / span.clamp(min=torch.finfo(x.dtype).tiny), torch.zeros_like(x))


def softmax_gradcam(visual: nn.Module, penultimate: torch.Tensor, grid: tuple[int, int], text: torch.Tensor,
                    n_targets: int, logit_scale: float, pooling: Pooling = "mean", use_softmax: bool = True,
                    mode: Literal["batched", "loop"] = "batched") -> GradCamOutput:
    """GradCAM of the image's own classes on the softmax over classes + background words.

    Args:
        visual: open_clip ``VisionTransformer`` (frozen).
        penultimate: ``(1, 1 + N, C)`` tokens entering the last block.
        grid: ``(h, w)`` with ``h * w = N``.
        text: ``(M, D)`` L2-normalised embeddings; rows ``0..n_targets-1`` are the image's
            classes (the targets), the rest are background words. The softmax runs over
            exactly these ``M`` rows.
        n_targets: ``K``.
        logit_scale: CLIP's ``logit_scale.exp()``.
        pooling: image embedding pooling (``mean`` of patch tokens, as CLIP-ES).
        use_softmax: ``False`` = plain GradCAM on the raw logit of each class (ablation).
            With ``M == 1`` (one target, no background words) the softmax is constant, so
            the raw logit is used whatever this says.
        mode: ``batched`` (one backward for all targets) or ``loop`` (one per target).

    Returns:
        :class:`GradCamOutput`; ``cam`` is ``(K, h, w)``.
    """
    g = softmax_gradcam_batch(visual, penultimate, grid, [text], [n_targets], logit_scale, pooling, use_softmax,
                              mode)
    return GradCamOutput(g.cam[0, :n_targets], g.attn_last[0], g.logits[0, :text.shape[0]])


def softmax_gradcam_batch(visual: nn.Module, penultimate: torch.Tensor, grid: tuple[int, int],
                          texts: list[torch.Tensor], n_targets: list[int], logit_scale: float,
                          pooling: Pooling = "mean", use_softmax: bool = True,
                          mode: Literal["batched", "loop"] = "batched",
                          autocast_dtype: torch.dtype | None = None) -> GradCamOutput:
    """:func:`softmax_gradcam` for ``B`` images of one grid at once: one last-block forward and
    one backward for every target of every image.

    Image ``i`` has its own softmax set ``texts[i]`` ``(M_i, D)`` whose first ``n_targets[i]``
    rows are its targets. The sets are padded to ``M = max M_i`` (padded logits are ``-inf``
    before the softmax, so they take no probability and no gradient) and the targets to
    ``K = max K_i``; the ``K`` backward cotangents each pick target ``j`` of every image at
    once (images do not interact in the block, so image ``i``'s gradient is its own).

    Args:
        penultimate: ``(B, 1 + N, C)`` tokens entering the last block.
        texts, n_targets: per image, as ``text`` and ``n_targets`` of :func:`softmax_gradcam`.
        autocast_dtype: run the block's forward (and so its backward) under ``torch.autocast``
            with this dtype; ``None`` (the stage's choice) = fp32. The activations ``A``, their
            gradients and the CAMs stay fp32 either way.

    Returns:
        :class:`GradCamOutput` with a batch dim: ``cam`` ``(B, K, h, w)`` (rows
        ``n_targets[i]..K-1`` of image ``i`` all zero), ``attn_last`` ``(B, N, N)``,
        ``logits`` ``(B, M)`` (``-inf`` past ``M_i``). In fp32 each image's maps equal
        :func:`softmax_gradcam` on it alone to rounding (within 1e-6).
    """
    h, w = grid
    b = penultimate.shape[0]
    k = max(n_targets, default=0)
    blk = visual.transformer.resblocks[-1]
    x = penultimate.detach()
    if k == 0:
        with torch.no_grad():
            _, _, attn = block_forward(blk, x, need_weights=True)
        return GradCamOutput(torch.zeros((b, 0, h, w), device=x.device), attn[:, 1:, 1:],
                             torch.zeros((b, 0), device=x.device))
    m = max(t.shape[0] for t in texts)
    onehot = np.zeros((k, b, m), np.float32)  # cotangent j picks target j of every image (built on the host)
    for i, ki in enumerate(n_targets):
        onehot[np.arange(ki), i, np.arange(ki)] = 1.0
    # A softmax over a single row is 1 whatever the image: its gradient is zero and every
    # CAM would be empty. With one target and no background words, use the logit.
    soft = [use_softmax and t.shape[0] > 1 for t in texts]

    with torch.enable_grad():
        a = blk.ln_1(x).detach().requires_grad_(True)  # the activations A (B, 1+N, C)
        with torch.autocast(x.device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
            y, probs_attn = attention(blk.attn, a, need_weights=True)  # explicit softmax: vmappable
            out = x + blk.ls_1(y)
            out = out + blk.ls_2(blk.mlp(blk.ln_2(out)))
        out = out.float()
        # The pooled projection and the logits are one-row products per image: a B-row GEMM
        # takes another kernel (and rounding) than a one-row one, so this keeps every image's
        # maps what it gets alone; the other ops are row-wise or batched matmuls.
        logits = torch.cat([F.pad(logit_scale * F.normalize(pool_tokens(visual, out[i:i + 1], pooling), dim=-1)
                                  @ t.t(), (0, m - t.shape[0]), value=float("-inf"))
                            for i, t in enumerate(texts)])  # (B, M)
        if all(soft) or not any(soft):
            scores = logits.softmax(-1) if soft[0] else logits
        else:
            scores = torch.where(torch.tensor(soft, device=x.device)[:, None], logits.softmax(-1), logits)
        eye = torch.from_numpy(onehot).to(scores.device, scores.dtype)  # (K, B, M)
        if mode == "batched":
            (grads,) = torch.autograd.grad(scores, a, grad_outputs=eye, is_grads_batched=True)  # (K, B, 1+N, C)
        elif mode == "loop":
            grads = torch.stack([torch.autograd.grad(scores, a, grad_outputs=eye[j], retain_graph=True)[0]
                                 for j in range(k)])
        else:
            raise ValueError(f"unknown mode {mode!r}; valid: batched, loop")
    acts = a.detach()[:, 1:]  # (B, N, C)
    weights = grads[:, :, 1:].mean(2).transpose(0, 1)  # (B, K, C): spatial mean of the gradient
    cam = F.relu(weights @ acts.transpose(1, 2)).reshape(b, k, h, w)
    return GradCamOutput(minmax(cam), probs_attn.detach()[:, 1:, 1:], logits.detach())
