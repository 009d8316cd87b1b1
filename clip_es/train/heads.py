"""The head contract of the CNN segmenter (:mod:`clip_es.train.model`) and the layers heads share.

A head (``SegmenterArch.head``, ``clipes train --head``) decides what happens between the
backbone and the text-matching output. The registry of heads is
:data:`clip_es.train.model.HEADS`; each head lives in its own module and subclasses
:class:`Head` from here, so head modules import this one and the model imports them,
never the other way round.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class Attention(nn.Module):
    """Multi-head attention ``(B, Nq, C), (B, Nk, C) -> (B, Nq, C)``.

    Written with plain matmuls (no fused kernel) so ONNX export sees ordinary ops.
    """

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, q_in: torch.Tensor, kv_in: torch.Tensor) -> torch.Tensor:
        B, _, C = q_in.shape
        h = self.heads
        q = self.q(q_in).reshape(B, -1, h, C // h).transpose(1, 2)             # (B, h, Nq, c)
        kv = self.kv(kv_in).reshape(B, -1, 2, h, C // h).permute(2, 0, 3, 1, 4)  # (2, B, h, Nk, c)
        attn = (q @ kv[0].transpose(-2, -1)) * self.scale
        out = attn.softmax(-1) @ kv[1]                                         # (B, h, Nq, c)
        return self.proj(out.transpose(1, 2).reshape(B, -1, C))


class Head(nn.Module):
    """What a head adds between the backbone and the text-matching output (identity here: ``plain``).

    ``pre_neck(feats, text)``: the backbone's stride-8/16/32 maps and the raw class tokens
    ``(B, K+1, D)`` (background first) -> the same, possibly changed, plus extras (e.g.
    ``{"aux": [(weight, logits)]}``). ``post_neck(f, t)``: ``F`` ``(B, C, h, w)`` and the
    projected tokens ``T`` ``(B, K+1, C)`` -> the same shapes. ``neck_channels(chs)``: the
    channel counts the neck receives for backbone channels ``chs`` (strides 8/16/32).
    Every head must treat the class tokens as a set (any ``K`` at inference).
    """

    def __init__(self, arch: Any, channels: list[int]):
        """``arch``: the :class:`~clip_es.train.model.SegmenterArch`; ``channels``: backbone channels
        at strides 8/16/32."""
        super().__init__()

    def neck_channels(self, channels: list[int]) -> list[int]:
        return list(channels)

    def pre_neck(self, feats: list[torch.Tensor], text: torch.Tensor
                 ) -> tuple[list[torch.Tensor], torch.Tensor, dict[str, Any]]:
        return feats, text, {}

    def post_neck(self, f: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return f, t
