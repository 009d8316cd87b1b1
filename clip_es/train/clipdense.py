"""The ``clip`` segmenter family: training-free dense patch-text similarity of the frozen CLIP.

No labels, no training: every patch token of the CLIP ViT is projected into the text space
and compared with the class text embeddings by cosine similarity (ZegCLIP's "straightforward
baseline", MaskCLIP's dense prediction)::

    CLIP ViT, frozen, at the input size (interpolated position embeddings), blocks 1..L-1
    last block: "value" (MaskCLIP: ln_1 -> value projection -> out_proj, no attention mixing,
                no residual, no FFN) or "plain" (the whole block)
    ln_post + proj -> L2 norm -> cosine with every class text  (B, K, h, w)
    background: channel 0 is the constant ``threshold``, so a patch is background where no
                class's cosine exceeds it
    logits = scale * [threshold; cosines], bilinear to (H, W)

``clipes train --arch clip`` writes its checkpoint at once (the class text and this record,
no weights); ``clipes segment --arch clip --classes ...`` needs no checkpoint at all. It is
the floor a trained family must beat on classes it never saw.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from clip_es.errors import ConfigError
from clip_es.model.dense import dense_forward, final_tokens
from clip_es.model.resolve import OPENAI_MEAN, OPENAI_STD
from clip_es.train.families import TrainDefaults, record_to_dict
from clip_es.train.frozen_clip import FrozenClipFamily, FrozenClipModule

FAMILY_NAME = "clip"
#: Last-block variants: ``value`` (MaskCLIP's value path) or ``plain`` (the CLIP's own last block).
PATHS = ("value", "plain")


@dataclass(frozen=True)
class ClipDenseArch:
    """Record of a :class:`ClipDenseSegmenter`.

    Attributes:
        text_dim: CLIP embedding width.
        path: ``value`` or ``plain`` (see :data:`PATHS`).
        threshold: background cosine: a patch is background where no class scores above it
            (0.35: best of 0.1-0.55 on 100 toy train images against ground truth, pipelines/toy/ZEROSHOT.md).
        scale: logit scale (softmax temperature of the scores).
        input_scale: the input is upsampled (bilinear) this many times before the ViT (a finer
            patch grid, as ``zegclip``'s; ``clipes train --arch clip --input-scale N``).
        mean, std: RGB normalisation the CLIP is fed with.
    """

    text_dim: int = 512
    path: str = "value"
    threshold: float = 0.35
    scale: float = 100.0
    input_scale: int = 1
    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD

    def validate(self) -> "ClipDenseArch":
        if self.path not in PATHS:
            raise ConfigError(f"unknown --dense-path {self.path!r}; valid: {', '.join(PATHS)}")
        if self.input_scale < 1:
            raise ConfigError(f"the input scale must be >= 1, got {self.input_scale}")
        if not self.scale > 0:
            raise ConfigError(f"the logit scale must be > 0, got {self.scale}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return record_to_dict(FAMILY_NAME, self)


def value_path_tokens(visual: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """MaskCLIP's dense tokens: blocks ``1..L-1``, then the last block's value path only.

    Args:
        images: ``(B, 3, H, W)`` normalised, sides multiples of the patch size.

    Returns:
        ``(B, 1 + N, C)`` tokens before ``ln_post`` (CLS first).
    """
    x = dense_forward(visual, images, attn_blocks=0).penultimate
    last = visual.transformer.resblocks[-1]
    c = x.shape[-1]
    w, b = last.attn.in_proj_weight[2 * c:], last.attn.in_proj_bias[2 * c:]
    return last.attn.out_proj(F.linear(last.ln_1(x), w, b))


class ClipDenseSegmenter(FrozenClipModule):
    """Training-free dense CLIP segmenter (see the module docstring)."""

    score_kind = "softmax"
    calibration = 0.0

    def __init__(self, arch: ClipDenseArch, visual: nn.Module):
        super().__init__(arch, visual, FAMILY_NAME)

    def forward(self, x: torch.Tensor, text: torch.Tensor, return_extras: bool = False):
        """``(B, 3, H, W)`` RGB in [0, 1] (sides multiples of :attr:`stride`) and ``(K, D)`` text ->
        ``(B, K+1, H, W)`` logits, channel 0 background."""
        self.check_text(text)
        size = x.shape[-2:]
        if self.arch.input_scale != 1:
            x = F.interpolate(x, scale_factor=self.arch.input_scale, mode="bilinear", align_corners=False)
        H, W = x.shape[-2:]
        p = self.stride
        z = (x - self.mean) / self.std
        tok = value_path_tokens(self.visual, z) if self.arch.path == "value" else final_tokens(self.visual, z)
        feat = F.normalize(self.visual.ln_post(tok[:, 1:]) @ self.visual.proj, dim=-1)   # (B, N, D)
        cos = feat @ F.normalize(text.to(feat.dtype), dim=-1).T                          # (B, N, K)
        bg = torch.full_like(cos[..., :1], self.arch.threshold)
        logits = self.arch.scale * torch.cat([bg, cos], -1)
        logits = logits.transpose(1, 2).reshape(x.shape[0], -1, H // p, W // p)
        logits = F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)
        return (logits, {}) if return_extras else logits


class ClipDenseFamily(FrozenClipFamily):
    """The ``clip`` family (:mod:`clip_es.train.families`): nothing to train."""

    name = FAMILY_NAME
    arch_cls = ClipDenseArch
    module_cls = ClipDenseSegmenter
    trainable = False
    default_loss = "ce"
    train_defaults = TrainDefaults()  # nothing trains; recorded as for any family

    def arch_from_config(self, cfg: Any, text_dim: int) -> ClipDenseArch:
        return ClipDenseArch(text_dim=text_dim, path=str(getattr(cfg, "dense_path", "value")),
                             input_scale=int(getattr(cfg, "input_scale", None) or 1)).validate()


FAMILY = ClipDenseFamily()
