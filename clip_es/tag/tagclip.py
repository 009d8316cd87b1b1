"""TagCLIP's local-to-global tagger (Lin et al., "TagCLIP: A Local-to-Global Framework to Enhance
Open-Vocabulary Multi-Label Classification of CLIP Without Training", AAAI 2024).

A single image embedding is dominated by the largest object, so the global softmax misses
small objects beside large ones. TagCLIP scores every patch instead, with the same frozen CLIP:

1. **Coarse patch scores.** The image at its native size (rounded up to the patch size) goes
   through the ViT with the last block attending each token to itself only (off-diagonal
   scores -100; the attention it reports is the unmasked one). Each patch token, through
   ``ln_post`` and the projection, gets a softmax over classes + background words.
2. **DMAR (attention refinement).** ``A`` = the mean patch-to-patch attention of the blocks
   before the last (TagCLIP: blocks 8-10 of 12), kept where the pair is above its layer's
   mean attention in at least a third of the layers (4 of 12). ``A @ coarse`` gives a map per
   text; each map, min-max normalised, is cut at its own mean into CLIP-ES's boxes
   (:func:`~clip_es.cam.caa.box_mask`, release rule), and the text's patch scores are
   recomputed as ``(A * box) @ coarse``. The local score of a class = its maximum over patches.
3. **CWR (crop refinement).** Classes whose local score is above ``min + 0.5 * range`` (of all
   refined patch scores) are looked at again: the bounding box of their map ``> 0.5`` is cut
   from the input, resized to the CLIP's native size, and encoded with the CLS token
   attending only to the patches inside the map; the crop score is that embedding's softmax
   probability of the class. Score = ``0.5 * local + 0.5 * crop``.
4. **Tags** = classes above ``min + 0.5 * (max - min)`` of the image's scores
   (:func:`~clip_es.tag.base.relative_tags`).

Deliberately kept as the release does it (``pipelines/bench/tagclip_parity.py`` checks
scores to 1e-4 and tags exactly): the boxes' ends clipped to the last row/column minus one,
the uint8 box threshold, and CWR stopping at the first candidate whose box is empty.

Everything except :class:`TagClipTagger` is pure tensor-in/tensor-out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from clip_es.cam.caa import box_mask
from clip_es.errors import ConfigError
from clip_es.cam.gradcam import minmax
from clip_es.model.dense import block_forward, embed, explicit_attention, split_heads
from clip_es.tag.base import TagResult, relative_tags

#: The additive score between two different tokens in the last block (TagCLIP's -100).
SELF_ONLY = -100.0
#: CLS-to-patch score outside a crop's map in CWR (TagCLIP's -1000).
OUTSIDE_CROP = -1000.0


@dataclass(frozen=True)
class TagClipOptions:
    """TagCLIP's constants (the paper's values for VOC/COCO objects).

    Attributes:
        attn_blocks: how many blocks before the last one average into DMAR's attention
            (TagCLIP: 3, blocks 8-10 of a 12-block ViT).
        vote_fraction: a patch pair is kept when above its layer's mean attention in at least
            ``ceil(vote_fraction * layers)`` layers (TagCLIP: 4 of 12).
        candidate_cut: CWR looks again at classes above ``min + cut * range`` (TagCLIP: 0.5;
            0.1 for COCO-Stuff's 171 classes).
        crop_cut: the crop's box is that of the class map above this (min-max normalised).
        crop_weight: weight of the crop score in the final score (TagCLIP: 0.5).
        tag_cut: tags are classes above ``min + tag_cut * (max - min)`` of the scores.
    """

    attn_blocks: int = 3
    vote_fraction: float = 1 / 3
    candidate_cut: float = 0.5
    crop_cut: float = 0.5
    crop_weight: float = 0.5
    tag_cut: float = 0.5


@dataclass
class LocalOutput:
    """Step 1-2 of one image.

    Attributes:
        refined: ``(N, T)`` DMAR patch scores over the texts (classes first, then background).
        coarse: ``(N, T)`` per-patch softmax before refinement.
        grid: ``(h, w)`` patch grid.
    """

    refined: torch.Tensor
    coarse: torch.Tensor
    grid: tuple[int, int]


def native_size(visual: nn.Module) -> int:
    """The side in pixels the CLIP was trained at (its position-embedding grid x patch)."""
    n = visual.positional_embedding.shape[0] - 1
    return int(round(math.sqrt(n))) * int(visual.conv1.kernel_size[0])


def _project(visual: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """``ln_post`` and the projection on ``(..., C)`` tokens, L2-normalised: ``(..., D)``."""
    x = visual.ln_post(tokens)
    x = x @ visual.proj if visual.proj is not None else x
    return F.normalize(x, dim=-1)


def self_only_block(block: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A ViT block whose tokens attend to themselves only (other tokens' scores -100).

    Returns:
        ``(out (B, L, C), unmasked head-averaged attention (B, L, L))``: the attention is the
        softmax of the scores without the mask, as TagCLIP's vote reads it.
    """
    b, n, c = x.shape
    a = block.ln_1(x)
    q, k, v = split_heads(block.attn, a)
    mask = (1 - torch.eye(n, dtype=x.dtype, device=x.device)) * SELF_ONLY
    _, out = explicit_attention(q, k, v, mask)
    probs, _ = explicit_attention(q, k, v)
    y = block.attn.out_proj(out.transpose(1, 2).reshape(b, n, c))
    x = x + block.ls_1(y)
    x = x + block.ls_2(block.mlp(block.ln_2(x)))
    return x, probs.mean(1)


def dmar_attention(visual: nn.Module, x: torch.Tensor, opts: TagClipOptions = TagClipOptions()
                   ) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
    """The ViT forward of step 1 with DMAR's attention.

    Args:
        x: ``(1, 3, H, W)`` normalised, sides multiples of the patch size.

    Returns:
        ``(final tokens (1, 1 + N, C), A (N, N) float32, grid (h, w))``.
    """
    tokens, grid = embed(visual, x)
    blocks = list(visual.transformer.resblocks)
    depth = len(blocks)
    first = depth - 1 - opts.attn_blocks
    votes = max(1, math.ceil(opts.vote_fraction * depth - 1e-9))
    count = None
    total = None
    for i, blk in enumerate(blocks):
        if i < depth - 1:
            tokens, _, probs = block_forward(blk, tokens, need_weights=True)
        else:
            tokens, probs = self_only_block(blk, tokens)
        p = probs[0, 1:, 1:].float()
        above = (p > p.mean()).to(torch.int16)
        count = above if count is None else count + above
        if first <= i < depth - 1:
            total = p.clone() if total is None else total + p
    if total is None:
        raise ConfigError(f"TagCLIP needs a ViT with at least 2 blocks (attention before the last one); this one "
                          f"has {depth}")
    attn = total / min(opts.attn_blocks, depth - 1) * (count >= votes).float()
    return tokens, attn, grid


def local_scores(visual: nn.Module, x: torch.Tensor, text: torch.Tensor, logit_scale: float,
                 opts: TagClipOptions = TagClipOptions()) -> LocalOutput:
    """Steps 1-2: coarse per-patch softmax over ``text`` and DMAR's refinement.

    Args:
        x: ``(1, 3, H, W)`` normalised input.
        text: ``(T, D)`` unit embeddings (classes, then background words).
        logit_scale: CLIP's ``exp(logit_scale)``.
    """
    tokens, attn, grid = dmar_attention(visual, x, opts)
    h, w = grid
    feats = _project(visual, tokens[0, 1:]).float()
    coarse = (logit_scale * feats @ text.float().t()).softmax(-1)  # (N, T)
    dense = attn @ coarse
    maps = minmax(dense.t(), dims=(-1,))  # (T, N) each text's map in [0, 1]
    boxes = np.stack([box_mask(m.reshape(h, w).numpy(), float(m.mean()), release=True).reshape(-1)
                      for m in maps.cpu()])  # (T, N)
    boxes_t = torch.from_numpy(boxes).to(coarse.device, coarse.dtype).t()
    refined = attn @ (coarse * boxes_t)  # column j of A kept inside text t's boxes
    return LocalOutput(refined, coarse, grid)


def crop_box(score_map: np.ndarray, cut: float = 0.5) -> tuple[int, int, int, int] | None:
    """``(y1, y2, x1, x2)`` patch box (end exclusive) of ``score_map > cut``, or ``None`` when empty.

    As the release: the bounding box of every cell above the cut, its ends then clipped to
    the last row/column minus one (so a box reaching the border loses that row/column).

    Args:
        score_map: ``(h, w)`` in [0, 1].
    """
    m = np.asarray(score_map) > cut
    rows, cols = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
    if rows.size == 0:
        return None
    h, w = m.shape
    y1, y2 = int(rows[0]), min(int(rows[-1]) + 1, h - 1)
    x1, x2 = int(cols[0]), min(int(cols[-1]) + 1, w - 1)
    if y1 == y2 or x1 == x2:
        return None
    return y1, y2, x1, x2


@torch.no_grad()
def crop_probabilities(visual: nn.Module, x: torch.Tensor, looks: list[tuple[np.ndarray, tuple[int, int, int, int]]],
                       text: torch.Tensor, logit_scale: float) -> torch.Tensor:
    """CWR's second look, for several classes in one batch: each box cut from ``x``, resized to
    the native size, its CLS token attending only to the patches inside the class's map.

    Args:
        x: ``(1, 3, H, W)`` the normalised input of step 1.
        looks: per class, ``(map, box)``: the ``(h, w)`` boolean map (``> crop_cut``) on the
            patch grid and its ``(y1, y2, x1, x2)`` box from :func:`crop_box`.

    Returns:
        ``(len(looks), T)`` softmax over ``text`` of each crop's CLS embedding.
    """
    p = int(visual.conv1.kernel_size[0])
    size = native_size(visual)
    g = size // p
    crops, masks = [], []
    for score_map, (y1, y2, x1, x2) in looks:
        inside = torch.from_numpy(np.ascontiguousarray(score_map[y1:y2, x1:x2])).float()[None, None]
        inside = F.interpolate(inside, size=(g, g), mode="nearest").reshape(-1).bool().to(x.device)
        crops.append(F.interpolate(x[:, :, y1 * p:y2 * p, x1 * p:x2 * p], size=(size, size), mode="bilinear",
                                   align_corners=False))
        mask = torch.zeros(1 + g * g, 1 + g * g, device=x.device)
        mask[0, 1:][~inside] = OUTSIDE_CROP
        masks.append(mask)
    tokens, _ = embed(visual, torch.cat(crops))
    mask = torch.stack(masks)[:, None].to(tokens.dtype)  # (B, 1, L, L): one mask per crop, every head
    for blk in visual.transformer.resblocks:
        tokens, _, _ = block_forward(blk, tokens, attn_mask=mask)
    emb = _project(visual, tokens[:, 0]).float()
    return (logit_scale * emb @ text.float().t()).softmax(-1)


@torch.no_grad()
def tagclip_scores(visual: nn.Module, x: torch.Tensor, text: torch.Tensor, n_classes: int, logit_scale: float,
                   opts: TagClipOptions = TagClipOptions()) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """TagCLIP's per-class scores of one image.

    Args:
        x: ``(1, 3, H, W)`` normalised input at native size (sides multiples of the patch).
        text: ``(T, D)`` unit embeddings, the ``n_classes`` classes first, then background words.

    Returns:
        ``(scores, local, crop)``, each ``(K,)`` float32: the final scores, the local (DMAR)
        scores and the crop probabilities (NaN for classes CWR did not look at).
    """
    loc = local_scores(visual, x, text, logit_scale, opts)
    h, w = loc.grid
    refined = loc.refined
    local = refined[:, :n_classes].amax(0)
    lo, hi = refined.min(), refined.max()
    thr = lo + opts.candidate_cut * (hi - lo)
    scores = local.clone()
    crop = torch.full_like(local, float("nan"))
    looked, looks = [], []
    for c in [int(c) for c in torch.nonzero(local > thr).flatten()]:
        m = minmax(refined[:, c], dims=(-1,)).reshape(h, w).cpu().numpy() > opts.crop_cut
        box = crop_box(m, 0.5)
        if box is None:  # the release stops here: later candidates keep their local score
            break
        looked.append(c)
        looks.append((m, box))
    if looks:
        probs = crop_probabilities(visual, x, looks, text, logit_scale)
        for j, c in enumerate(looked):
            crop[c] = probs[j, c]
            scores[c] = (1 - opts.crop_weight) * scores[c] + opts.crop_weight * probs[j, c]
    return scores.cpu().numpy(), local.cpu().numpy(), crop.cpu().numpy()


class TagClipTagger:
    """TagCLIP tags for images in memory; the texts are embedded once.

    Args:
        clip: a loaded :class:`~clip_es.model.resolve.ClipModel`.
        text: ``(K + B, D)`` unit embeddings of the classes then the background words
            (:func:`clip_es.tag.text.tag_text`).
        n_classes: ``K``.
        max_side: images whose longer side exceeds it are area-downscaled first (``None``: never).
        opts: TagCLIP's constants.
    """

    name = "tagclip"

    def __init__(self, clip, text: torch.Tensor, n_classes: int, max_side: int | None = 1024,
                 opts: TagClipOptions = TagClipOptions()):
        self.clip, self.text, self.n_classes, self.max_side, self.opts = clip, text, n_classes, max_side, opts

    def describe(self) -> str:
        """The rule, for the review files."""
        return ("TagCLIP: 0.5 x local (attention-refined patch scores, max over patches) + 0.5 x crop (the "
                "class's box looked at again) for candidate classes, local alone for the others; a class is "
                "kept when its score is above "
                f"min + {self.opts.tag_cut} x (max - min) of the image's scores, else the most likely class")

    @torch.no_grad()
    def tag(self, image: np.ndarray) -> TagResult:
        """Tags of one ``(H, W, 3)`` uint8 RGB image."""
        from clip_es.model.inputs import preprocess
        from clip_es.stage import fit_image

        clip = self.clip
        x = preprocess(fit_image(image, self.max_side), 1.0, clip.patch_size, clip.mean, clip.std).to(clip.device)
        scores, local, crop = tagclip_scores(clip.visual, x, self.text, self.n_classes, clip.logit_scale, self.opts)
        return TagResult(relative_tags(scores, self.opts.tag_cut), scores, {"local": local, "crop": crop})
