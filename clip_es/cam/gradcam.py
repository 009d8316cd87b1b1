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
    h, w = grid
    k = n_targets
    blk = visual.transformer.resblocks[-1]
    x = penultimate.detach()
    if k == 0:
        with torch.no_grad():
            _, _, attn = block_forward(blk, x, need_weights=True)
        return GradCamOutput(torch.zeros((0, h, w), device=x.device), attn[0, 1:, 1:], torch.zeros(0))

    with torch.enable_grad():
        a = blk.ln_1(x).detach().requires_grad_(True)  # the activations A (1, 1+N, C)
        y, probs_attn = attention(blk.attn, a, need_weights=True)  # explicit softmax: vmappable
        out = x + blk.ls_1(y)
        out = out + blk.ls_2(blk.mlp(blk.ln_2(out)))
        img = F.normalize(pool_tokens(visual, out, pooling), dim=-1)  # (1, D)
        logits = logit_scale * img @ text.t()  # (1, M)
        # A softmax over a single row is 1 whatever the image: its gradient is zero and every
        # CAM would be empty. With one target and no background words, use the logit.
        scores = logits.softmax(-1) if use_softmax and logits.shape[1] > 1 else logits
        eye = torch.eye(k, scores.shape[1], device=scores.device, dtype=scores.dtype)
        if mode == "batched":
            (grads,) = torch.autograd.grad(scores, a, grad_outputs=eye[:, None, :], is_grads_batched=True)
            grads = grads[:, 0]  # (K, 1+N, C)
        elif mode == "loop":
            grads = torch.stack([torch.autograd.grad(scores, a, grad_outputs=eye[i][None], retain_graph=True)[0][0]
                                 for i in range(k)])
        else:
            raise ValueError(f"unknown mode {mode!r}; valid: batched, loop")
    acts = a.detach()[0, 1:]  # (N, C)
    weights = grads[:, 1:].mean(1)  # (K, C): spatial mean of the gradient
    cam = F.relu(weights @ acts.t()).reshape(k, h, w)
    return GradCamOutput(minmax(cam), probs_attn.detach()[0, 1:, 1:], logits.detach()[0])
