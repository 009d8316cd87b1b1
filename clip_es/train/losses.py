"""Segmentation losses on pseudo masks (pure tensor functions).

Targets are ``(B, H, W)`` int64 label maps: 0 = background, ``k + 1`` = class ``k``,
255 = ignore. Ignored pixels contribute nothing (CLIP-ES's confidence-guided loss: the
refine stage marks low-confidence pixels 255). Every loss is a mean over *valid* pixels
and is exactly 0 (with a zero gradient, never NaN) when a batch has none.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from clip_es.errors import ConfigError

IGNORE = 255


def _check(logits: torch.Tensor, target: torch.Tensor) -> None:
    if logits.ndim != 4 or target.shape != (logits.shape[0], *logits.shape[2:]):
        raise ConfigError(f"logits (B, N, H, W) and target (B, H, W) do not match: "
                          f"{tuple(logits.shape)} vs {tuple(target.shape)}")


def ce_loss(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy over valid pixels (softmax over background + classes).

    Args:
        logits: ``(B, N, H, W)``.
        target: ``(B, H, W)`` int64, 255 = ignore.
        weight: optional ``(B, H, W)`` per-pixel weights (e.g. confidence).

    Returns:
        Scalar: sum of per-pixel losses (times weights) / number of valid pixels.
    """
    _check(logits, target)
    valid = target != IGNORE
    per_px = F.cross_entropy(logits, torch.where(valid, target, torch.zeros_like(target)), reduction="none")
    per_px = per_px * valid
    if weight is not None:
        per_px = per_px * weight
    return per_px.sum() / valid.sum().clamp(min=1)


def sigmoid_focal_dice_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float = 2.0,
                            focal_weight: float = 1.0, dice_weight: float = 1.0, eps: float = 1.0
                            ) -> torch.Tensor:
    """Non-mutually-exclusive loss (after ZegCLIP): per-class sigmoid focal loss + dice.

    Each of the ``N`` channels is an independent binary "is this pixel class n" problem
    (background included), so a class never has to win a softmax against the others.

    * focal: ``-(1 - p_t)^gamma log p_t`` summed over channels, mean over valid pixels;
    * dice: ``1 - (2 sum p t + eps) / (sum p + sum t + eps)`` per channel over the batch's
      valid pixels, mean over channels.

    Args:
        logits: ``(B, N, H, W)``.
        target: ``(B, H, W)`` int64, 255 = ignore.

    Returns:
        Scalar ``focal_weight * focal + dice_weight * dice``; 0 when no pixel is valid.
    """
    _check(logits, target)
    n = logits.shape[1]
    valid = (target != IGNORE).unsqueeze(1).to(logits.dtype)                 # (B, 1, H, W)
    count = valid.sum()
    onehot = F.one_hot(torch.where(target == IGNORE, torch.zeros_like(target), target).clamp(max=n - 1), n)
    onehot = onehot.permute(0, 3, 1, 2).to(logits.dtype)                      # (B, N, H, W)
    prob = torch.sigmoid(logits)
    bce = F.binary_cross_entropy_with_logits(logits, onehot, reduction="none")
    p_t = prob * onehot + (1 - prob) * (1 - onehot)
    focal = ((1 - p_t) ** gamma * bce * valid).sum() / count.clamp(min=1)
    inter = (prob * onehot * valid).sum((0, 2, 3))
    denom = (prob * valid).sum((0, 2, 3)) + (onehot * valid).sum((0, 2, 3))
    dice = (1 - (2 * inter + eps) / (denom + eps)).mean()
    total = focal_weight * focal + dice_weight * dice
    return torch.where(count > 0, total, total * 0)


def focal_dice_loss(logits: torch.Tensor, target: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0,
                    focal_weight: float = 100.0, dice_weight: float = 1.0, unsure: str = "ignore",
                    eps: float = 1.0) -> torch.Tensor:
    """ZegCLIP's loss: per-class sigmoid focal loss over all classes and pixels + dice over the
    classes present, ``focal_weight : dice_weight`` (ZegCLIP: 100 : 1).

    Both terms are normalised as ZegCLIP's criterion does, by the number ``M`` of (image, channel)
    pairs whose class is present in the image (at least 1):

    * focal: ``alpha_t (1 - p_t)^gamma BCE`` with ``alpha_t = alpha`` on positives and ``1 - alpha``
      on negatives, a mean over each image's counted pixels per (image, channel), summed over every
      (image, channel) pair (absent classes too) and divided by ``M``;
    * dice: ``1 - (2 sum p t + eps) / (sum p + sum t + eps)`` per image and channel over the counted
      pixels, summed over the ``M`` present pairs and divided by ``M`` (an absent class enters through
      the focal term only).

    With ``unsure="negative"`` every pixel counts, and this is ZegCLIP's loss value (checked against its
    code by ``pipelines/bench/zegclip_parity.py``). ``M`` is per process (ZegCLIP averages it over DDP ranks).

    Args:
        logits: ``(B, N, H, W)`` (channel 0 background).
        target: ``(B, H, W)`` int64, 255 = unsure.
        unsure: ``"ignore"`` (255 pixels count nowhere: the confidence-guided loss) or ``"negative"``
            (255 pixels are negatives for every channel, background included, as ZegCLIP's code does).

    Returns:
        Scalar; 0 (zero gradient) when no pixel is counted.
    """
    _check(logits, target)
    if unsure not in ("ignore", "negative"):
        raise ConfigError(f"unsure pixels are 'ignore' or 'negative', got {unsure!r}")
    n = logits.shape[1]
    unsure_px = target == IGNORE
    counted = (~unsure_px if unsure == "ignore" else torch.ones_like(unsure_px)).unsqueeze(1).to(logits.dtype)
    onehot = F.one_hot(torch.where(unsure_px, torch.zeros_like(target), target).clamp(max=n - 1), n)
    onehot = onehot.permute(0, 3, 1, 2).to(logits.dtype) * (~unsure_px).unsqueeze(1)   # (B, N, H, W)
    prob = torch.sigmoid(logits)
    bce = F.binary_cross_entropy_with_logits(logits, onehot, reduction="none")
    p_t = prob * onehot + (1 - prob) * (1 - onehot)
    alpha_t = alpha * onehot + (1 - alpha) * (1 - onehot)
    count = counted.sum()
    present = (onehot.sum((2, 3)) > 0).to(logits.dtype)                             # (B, N)
    n_present = present.sum().clamp(min=1)
    per_image = counted.sum((2, 3)).clamp(min=1)                                    # (B, 1)
    focal = ((alpha_t * (1 - p_t) ** gamma * bce * counted).sum((2, 3)) / per_image).sum() / n_present
    inter = (prob * onehot * counted).sum((2, 3))                                   # (B, N)
    denom = (prob * counted).sum((2, 3)) + onehot.sum((2, 3))
    dice = ((1 - (2 * inter + eps) / (denom + eps)) * present).sum() / n_present
    total = focal_weight * focal + dice_weight * dice
    return torch.where(count > 0, total, total * 0)


def focal_dice_negative_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """:func:`focal_dice_loss` with 255 pixels as negatives for every class (ZegCLIP's own handling)."""
    return focal_dice_loss(logits, target, unsure="negative")


#: ``--loss`` name -> loss function ``(logits, target) -> scalar``.
LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "ce": ce_loss,
    "sigmoid": sigmoid_focal_dice_loss,
    "focal_dice": focal_dice_loss,
    "focal_dice_neg": focal_dice_negative_loss,
}


def get_loss(name: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    try:
        return LOSSES[name]
    except KeyError:
        raise ConfigError(f"unknown --loss {name!r}; valid: {', '.join(LOSSES)}") from None
