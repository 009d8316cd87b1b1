"""The ``denseclip`` head of the CNN segmenter: DenseCLIP's post-model context-aware prompting.

Rao et al., "DenseCLIP: Language-Guided Dense Prediction with Context-Aware Prompting"
(CVPR 2022), adapted to a timm CNN (no CLIP attention pool) and to an open vocabulary.
For the backbone's stride-32 map ``f32`` ``(B, C32, h, w)`` and the class tokens ``t``
``(B, K+1, D)`` (the learned background first)::

    z      = Conv1x1(f32)                       (B, D, h, w)    local visual embeddings
    v      = [mean(z); z]                       (B, 1+h*w, D)   global (mean: no attention pool) + local
    delta  = ContextDecoder(t, v)               (B, K+1, D)     3 pre-norm layers, width 256, 4 heads:
                                                                self-attn over the text, cross-attn to v,
                                                                4x GELU MLP; out LN -> Linear to D
    t     <- t + gamma * delta                  gamma (D,) learnable, initialised to 1e-4
    s      = <normalize(z), normalize(t)>       (B, K+1, h, w)  pixel-text score map
    aux    = s / 0.07, cross-entropy weight 0.4 (the training loop scores it, ignoring 255)
    f32   <- [f32; sum_k W(t_k) * s_k]          (B, C32 + 32, h, w) into the neck

The updated tokens ``t`` then feed the same text-matching output as every head.

**Open vocabulary (ours).** DenseCLIP concatenates the ``K`` score channels to the features,
so the neck's first convolution has one weight column per class and the model only runs
with the class list it was trained on. Here the weights of those columns are *generated from
each class's text*: ``W`` is a ``Linear(D, 32)`` applied to ``normalize(t_k)``, and the neck
receives ``sum_k W(t_k) s_k``, which is exactly a 1x1 convolution on the concatenated score
maps whose weight column for class ``k`` is ``W(t_k)``. With training text embeddings that are
linearly independent (``K + 1 <= D``) a linear ``W`` can produce any per-class columns, so this
is as expressive as DenseCLIP's concatenation on the training classes, and it is defined for
any ``K`` (a class never trained on gets the columns its text implies). A fixed set of
summary channels (e.g. the max over classes) would also be class-agnostic but throws away
which class scored.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from clip_es.train.heads import Attention, Head

#: Context decoder width, attention heads and depth (DenseCLIP's defaults).
CONTEXT_WIDTH, CONTEXT_HEADS, CONTEXT_LAYERS = 256, 4, 3
#: MLP hidden width of a decoder layer, in multiples of the width.
MLP_RATIO = 4
#: Initial value of every channel of the text-update scale ``gamma``.
GAMMA_INIT = 1e-4
#: Temperature and loss weight of the auxiliary cross-entropy on the score map.
AUX_TEMPERATURE, AUX_WEIGHT = 0.07, 0.4
#: Channels the score map adds to the stride-32 features (see the module docstring).
SCORE_CHANNELS = 32


class ContextDecoderLayer(nn.Module):
    """Pre-norm: ``x += SelfAttn(LN x)``; ``x += CrossAttn(LN x, memory)``; ``x += MLP(LN x)``.

    ``forward(x, memory)``: ``x`` ``(B, N, W)`` text queries, ``memory`` ``(B, M, W)`` visual
    tokens -> ``(B, N, W)``.
    """

    def __init__(self, width: int, heads: int, mlp_ratio: int = MLP_RATIO):
        super().__init__()
        self.norm_sa, self.self_attn = nn.LayerNorm(width), Attention(width, heads)
        self.norm_ca, self.cross_attn = nn.LayerNorm(width), Attention(width, heads)
        self.norm_mlp = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, mlp_ratio * width), nn.GELU(), nn.Linear(mlp_ratio * width, width))

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        n = self.norm_sa(x)
        x = x + self.self_attn(n, n)
        x = x + self.cross_attn(self.norm_ca(x), memory)
        return x + self.mlp(self.norm_mlp(x))


class ContextDecoder(nn.Module):
    """Text tokens attend to visual tokens: ``(B, N, D), (B, M, Dv) -> (B, N, D)`` (the update ``delta``).

    Text in: LN -> Linear(D, W); visual in: LN -> Linear(Dv, W) -> LN; out: LN -> Linear(W, D).
    Linear weights start as truncated normals of std 0.02 with zero biases (DenseCLIP's init).
    """

    def __init__(self, text_dim: int, visual_dim: int, width: int = CONTEXT_WIDTH, heads: int = CONTEXT_HEADS,
                 layers: int = CONTEXT_LAYERS):
        super().__init__()
        self.text_in = nn.Sequential(nn.LayerNorm(text_dim), nn.Linear(text_dim, width))
        self.visual_in = nn.Sequential(nn.LayerNorm(visual_dim), nn.Linear(visual_dim, width), nn.LayerNorm(width))
        self.layers = nn.ModuleList(ContextDecoderLayer(width, heads) for _ in range(layers))
        self.out = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, text_dim))
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, text: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
        x, memory = self.text_in(text), self.visual_in(visual)
        for layer in self.layers:
            x = layer(x, memory)
        return self.out(x)


class DenseClipHead(Head):
    """DenseCLIP's context-aware prompting before the neck (see the module docstring)."""

    def __init__(self, arch: Any, channels: list[int]):
        super().__init__(arch, channels)
        d = arch.text_dim
        self.visual_proj = nn.Conv2d(channels[2], d, 1)
        self.decoder = ContextDecoder(d, d)
        self.gamma = nn.Parameter(torch.full((d,), GAMMA_INIT))
        self.score_weights = nn.Linear(d, SCORE_CHANNELS)
        nn.init.normal_(self.score_weights.weight, std=1.0)  # unit-variance columns for unit-norm text
        nn.init.zeros_(self.score_weights.bias)

    def neck_channels(self, channels: list[int]) -> list[int]:
        return [channels[0], channels[1], channels[2] + SCORE_CHANNELS]

    def update_text(self, z: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """``t + gamma * ContextDecoder(t, [mean(z); z])``: ``z`` ``(B, D, h, w)``, ``text`` ``(B, K+1, D)``."""
        local = z.flatten(2).transpose(1, 2)                                   # (B, h*w, D)
        visual = torch.cat([local.mean(1, keepdim=True), local], 1)            # (B, 1+h*w, D)
        return text + self.gamma * self.decoder(text, visual)

    def pre_neck(self, feats: list[torch.Tensor], text: torch.Tensor
                 ) -> tuple[list[torch.Tensor], torch.Tensor, dict[str, Any]]:
        f8, f16, f32 = feats
        z = self.visual_proj(f32)                                              # (B, D, h, w)
        t = self.update_text(z, text)                                          # (B, K+1, D)
        s = torch.einsum("bdhw,bkd->bkhw", F.normalize(z, dim=1), F.normalize(t, dim=-1))
        extra = torch.einsum("bke,bkhw->behw", self.score_weights(F.normalize(t, dim=-1)), s)
        return [f8, f16, torch.cat([f32, extra], 1)], t, {"aux": [(AUX_WEIGHT, s / AUX_TEMPERATURE)]}
