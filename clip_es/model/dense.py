"""A dense forward over open_clip's ``VisionTransformer`` modules.

open_clip's own forward only accepts the resolution the position embeddings were
trained at. CLIP-ES runs the image at (a multiple of the patch size near) its native
size, so this module re-implements the forward over the same sub-modules with the
grid position embeddings interpolated to the input's grid, and exposes what the cam
stage needs: the tokens before the last block, the last block's LayerNorm-1
activations, and the head-averaged attention of the last blocks as a running sum.

Everything here is pure tensor-in/tensor-out; no files, no state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

Pooling = Literal["mean", "cls"]


@dataclass
class DenseOutput:
    """What :func:`dense_forward` returns for a batch.

    Attributes:
        penultimate: ``(B, 1 + N, C)`` tokens entering the last block (CLS first).
        attn_sum: ``(B, N, N)`` sum of head-averaged patch-to-patch attention over the
            blocks before the last one that fall in the last ``attn_blocks`` blocks,
            or ``None`` when no attention was asked for.
        attn_count: how many blocks were summed into ``attn_sum``.
        grid: ``(h, w)`` patch grid, ``N = h * w``.
    """

    penultimate: torch.Tensor
    attn_sum: torch.Tensor | None
    attn_count: int
    grid: tuple[int, int]


def interpolate_pos_embed(pos: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Resize ViT position embeddings to a new patch grid.

    Args:
        pos: ``(1 + G*G, C)`` embeddings, CLS first, square ``G x G`` grid.
        grid: target ``(h, w)``.

    Returns:
        ``(1 + h*w, C)``: the CLS embedding unchanged, the grid part resized
        bilinearly with ``align_corners=False``. Returned as-is when the grid matches.
    """
    n = pos.shape[0] - 1
    side = int(round(math.sqrt(n)))
    if side * side != n:
        raise ValueError(f"position embedding has {n} grid tokens, not a square grid")
    h, w = grid
    if (h, w) == (side, side):
        return pos
    cls, g = pos[:1], pos[1:]
    g = g.reshape(1, side, side, -1).permute(0, 3, 1, 2)
    g = F.interpolate(g.float(), size=(h, w), mode="bilinear", align_corners=False).to(pos.dtype)
    return torch.cat([cls, g.permute(0, 2, 3, 1).reshape(h * w, -1)], 0)


def patch_size_of(visual: nn.Module) -> int:
    """Patch size of an open_clip ``VisionTransformer`` (square patches)."""
    return int(visual.conv1.kernel_size[0])


def embed(visual: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    """Patchify, add CLS and interpolated position embeddings, apply ``ln_pre``.

    Args:
        visual: open_clip ``VisionTransformer``.
        images: ``(B, 3, H, W)`` normalised, ``H`` and ``W`` multiples of the patch size.

    Returns:
        ``((B, 1 + N, C) tokens, (h, w) grid)``.
    """
    p = patch_size_of(visual)
    b, _, hh, ww = images.shape
    if hh % p or ww % p:
        raise ValueError(f"image size {hh}x{ww} is not a multiple of the patch size {p}")
    x = visual.conv1(images.to(visual.conv1.weight.dtype))
    h, w = x.shape[-2:]
    x = x.flatten(2).transpose(1, 2)
    cls = visual.class_embedding.to(x.dtype).expand(b, 1, -1)
    x = torch.cat([cls, x], 1)
    x = x + interpolate_pos_embed(visual.positional_embedding, (h, w)).to(x.dtype)
    x = visual.ln_pre(x)
    return x, (h, w)


def split_heads(attn: nn.MultiheadAttention, x: torch.Tensor) -> torch.Tensor:
    """``attn``'s input projection of batch-first ``x`` ``(B, L, C)`` as ``(3, B, H, L, d)``: q, k, v per head."""
    b, n, c = x.shape
    qkv = F.linear(x, attn.in_proj_weight, attn.in_proj_bias)
    return qkv.view(b, n, 3, attn.num_heads, c // attn.num_heads).permute(2, 0, 3, 1, 4)


def explicit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Scaled dot-product attention with an explicit softmax (fp32 under autocast too) on
    ``(B, H, L, d)`` heads; returns ``(probabilities (B, H, L, L), per-head output (B, H, L, d))``."""
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    if attn_mask is not None:
        scores = scores + attn_mask
    probs = scores.float().softmax(-1)  # no-op casts in fp32
    return probs, probs.to(v.dtype) @ v


def attention(attn: nn.MultiheadAttention, x: torch.Tensor, need_weights: bool = False,
              attn_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Self-attention with ``attn``'s weights on batch-first ``x`` ``(B, L, C)``.

    Args:
        attn_mask: optional additive ``(L, L)`` mask (the text tower's causal mask).

    Returns the output ``(B, L, C)`` and, if asked, the head-averaged attention
    probabilities ``(B, L, L)`` (computed with an explicit softmax, which the batched
    GradCAM backward can vmap over; otherwise a fused kernel).
    """
    b, n, c = x.shape
    q, k, v = split_heads(attn, x)
    if need_weights:
        probs, out = explicit_attention(q, k, v, attn_mask)
        avg = probs.mean(1)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        avg = None
    out = out.transpose(1, 2).reshape(b, n, c)
    return attn.out_proj(out), avg


def block_forward(block: nn.Module, x: torch.Tensor, need_weights: bool = False,
                  attn_mask: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One open_clip ``ResidualAttentionBlock`` on batch-first tokens (vision or text tower).

    Returns:
        ``(out (B, L, C), ln_1 activations (B, L, C), head-averaged attention (B, L, L) or None)``.
    """
    a = block.ln_1(x)
    y, probs = attention(block.attn, a, need_weights, attn_mask)
    x = x + block.ls_1(y)
    x = x + block.ls_2(block.mlp(block.ln_2(x)))
    return x, a, probs


def dense_forward(visual: nn.Module, images: torch.Tensor, attn_blocks: int = 8) -> DenseOutput:
    """Run blocks ``1..L-1`` (no gradients are needed; the caller decides the grad mode).

    The head-averaged patch-to-patch attention of those of blocks ``1..L-1`` that lie in
    the last ``attn_blocks`` blocks is accumulated as a running sum, never stored per block.
    """
    x, grid = embed(visual, images)
    blocks = list(visual.transformer.resblocks)
    first_attn = len(blocks) - attn_blocks
    attn_sum = None
    count = 0
    for i, blk in enumerate(blocks[:-1]):
        want = attn_blocks > 0 and i >= first_attn
        x, _, probs = block_forward(blk, x, need_weights=want)
        if want:
            patch = probs[:, 1:, 1:].float()  # accumulated in fp32 under autocast too
            attn_sum = patch.clone() if attn_sum is None else attn_sum + patch
            count += 1
    return DenseOutput(x, attn_sum, count, grid)


def pool_tokens(visual: nn.Module, tokens: torch.Tensor, pooling: Pooling = "mean") -> torch.Tensor:
    """Image embedding from final-block tokens, before L2 normalisation.

    Args:
        tokens: ``(B, 1 + N, C)`` output of the last block.
        pooling: ``"mean"`` (CLIP-ES: ``ln_post`` on every token, mean of the patch
            tokens) or ``"cls"`` (open_clip: ``ln_post`` on the CLS token).

    Returns:
        ``(B, D)`` projected embedding.
    """
    if pooling == "mean":
        pooled = visual.ln_post(tokens[:, 1:]).mean(1)
    elif pooling == "cls":
        pooled = visual.ln_post(tokens[:, 0])
    else:
        raise ValueError(f"unknown pooling {pooling!r}; valid: mean, cls")
    return pooled @ visual.proj if visual.proj is not None else pooled


def final_tokens(visual: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """All blocks at any patch-multiple size; the last block's tokens ``(B, 1 + N, C)``."""
    x, _ = embed(visual, images)
    for blk in visual.transformer.resblocks:
        x, _, _ = block_forward(blk, x)
    return x


def encode_image(visual: nn.Module, images: torch.Tensor, pooling: Pooling = "mean") -> torch.Tensor:
    """Full dense forward at any patch-multiple size; ``(B, D)`` unnormalised embedding."""
    return pool_tokens(visual, final_tokens(visual, images), pooling)


def encode_text(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Text embedding ``(B, D)`` (unnormalised) of an open_clip ``CLIP`` model.

    Computes only up to the longest sequence's end-of-text token: with the causal mask,
    later positions cannot change the pooled token, so the result equals
    ``model.encode_text`` while costing a fraction of the 77-token forward.

    Args:
        tokens: ``(B, 77)`` int token ids (end-of-text is the largest id in each row).
    """
    eot = tokens.argmax(-1)
    n = int(eot.max()) + 1
    x = model.token_embedding(tokens[:, :n]) + model.positional_embedding[:n]
    mask = torch.full((n, n), float("-inf"), device=x.device, dtype=x.dtype).triu(1)
    for blk in model.transformer.resblocks:
        x, _, _ = block_forward(blk, x, attn_mask=mask)
    x = model.ln_final(x)
    pooled = x[torch.arange(x.shape[0], device=x.device), eot]
    return pooled @ model.text_projection
