"""The ``zegclip`` segmenter family: a frozen CLIP ViT with deep visual prompts, a relationship
descriptor and a small mask decoder (after Zhou et al., "ZegCLIP", CVPR 2023).

Data flow for an input ``x`` ``(B, 3, H, W)`` (RGB in [0, 1]) and class text ``(K, D)``::

    CLIP ViT, frozen, at the input size (interpolated position embeddings)
        tokens [CLS; P prompts; N patches] -- before every block the P prompt tokens are a
        fresh learnt set (deep visual prompt tuning), each set through one shared Linear + Dropout
    trainable LayerNorm -> CLIP's frozen ln_post + proj -> L2 norm
        patches  (B, N, D)        CLS g  (B, D)
    class queries  q_c = Linear([t_c * g ; t_c])   (B, K+1, D)     relationship descriptor
        (t_0 = the background: the CLIP text of each background word, its logit the best word's
         (background "text", the default), or one learnt embedding ("learnt");
         with relation=False: q_c = Linear(t_c))
    decoder memory: Linear + LayerNorm of the patch tokens (unit-scale keys: L2-normalised
        tokens alone give near-zero q.k logits and, measured, a decoder that predicts only background)
    decoder: layers-1 x [q = LN(q + CrossAttn(q, mem)); q = LN(q + FFN(q))]   (post-norm)
        then the last layer's head-averaged scaled q.k logits over the memory = mask logits
    (B, K+1, h, w) -> bilinear to (H, W)

Only the prompts, their projection, the LayerNorm, the descriptor, a learnt background embedding
and the decoder train; the CLIP stays frozen (gradients flow through its blocks to the
prompts) and is left out of checkpoints (``frozen_prefixes``): the build reloads it from the
class text record, sha256-checked. Every operation on the queries treats them as a set, so
any class list embedded with the same CLIP works at inference (open vocabulary).

Scores are per-class sigmoids (``score_kind = "sigmoid"``), trained with the focal + dice loss
(:func:`clip_es.train.losses.focal_dice_loss`). The last decoder layer only scores (its
query update would be unused, so it has no value path, FFN or norms; DDP needs every
trainable parameter used).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from clip_es.errors import ConfigError
from clip_es.model.dense import block_forward, embed
from clip_es.model.resolve import OPENAI_MEAN, OPENAI_STD
from clip_es.train.families import TrainDefaults, check_background_query, record_to_dict
from clip_es.train.frozen_clip import FrozenClipFamily, FrozenClipModule

FAMILY_NAME = "zegclip"
#: Most decoder heads (ZegCLIP uses 8); fewer when 8 does not divide the CLIP embedding width.
MAX_HEADS = 8
#: Decoder FFN activations.
ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU}
#: Record fields added later, with the value that older checkpoints trained with.
_OLDER_RECORDS = {"activation": "gelu", "decoder_dropout": 0.0, "input_scale": 1, "background": "learnt",
                  "background_words": ()}


def decoder_heads(dim: int, most: int = MAX_HEADS) -> int:
    """The largest head count ``<= most`` that divides ``dim`` (8 for 512 and for clipes-tiny's 128)."""
    return max(h for h in range(1, most + 1) if dim % h == 0)


@dataclass(frozen=True)
class ZegClipArch:
    """Architecture of a :class:`ZegClipSegmenter` (stored in checkpoints as a plain dict).

    Attributes:
        text_dim: CLIP embedding width ``D`` (text and projected image tokens).
        prompts: deep visual prompt tokens per block (0 = no prompts: decoder on the frozen encoder).
        relation: relationship descriptor ``Linear([t * g ; t])``; ``False``: ``Linear(t)``.
        layers: decoder layers (the last one scores).
        heads: decoder attention heads (``text_dim % heads == 0``).
        dropout: dropout on every prompt set.
        activation: the decoder FFN's (``relu``, ZegCLIP's; records written before it existed read
            as ``gelu``, what they trained with).
        decoder_dropout: dropout on the decoder's attention weights and residual branches (ZegCLIP: 0.1;
            older records: 0).
        input_scale: the input is upsampled (bilinear) this many times before the ViT, so the patch
            grid is that much finer; the logits come back at the input's size (older records: 1).
        background: the background query (:data:`~clip_es.train.families.BACKGROUND_QUERIES`; older
            records: ``learnt``).
        background_words: the words of a ``text`` background (their embeddings are a buffer of the
            module, so a checkpoint carries them).
        norm_eps: epsilon of the trainable LayerNorm before ``ln_post`` (ZegCLIP's 1e-6; records
            written before the decoder followed ZegCLIP's, those without ``activation``, trained with 1e-5).
        mean, std: RGB normalisation the CLIP is fed with.
    """

    text_dim: int = 512
    prompts: int = 10
    relation: bool = True
    layers: int = 3
    heads: int = 8
    dropout: float = 0.1
    activation: str = "relu"
    decoder_dropout: float = 0.1
    input_scale: int = 1
    background: str = "learnt"
    background_words: tuple[str, ...] = ()
    norm_eps: float = 1e-6
    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD

    def validate(self) -> "ZegClipArch":
        if self.prompts < 0:
            raise ConfigError(f"--prompts must be >= 0, got {self.prompts}")
        if self.layers < 1:
            raise ConfigError(f"the zegclip decoder needs at least 1 layer, got {self.layers}")
        if self.heads < 1 or self.text_dim % self.heads:
            raise ConfigError(f"zegclip decoder heads must divide the CLIP width {self.text_dim}, got {self.heads}")
        if self.input_scale < 1:
            raise ConfigError(f"zegclip input scale must be >= 1, got {self.input_scale}")
        check_background_query(self.background)
        if self.background == "text" and not self.background_words:
            raise ConfigError("zegclip --background-query text needs background words (the cam stage's, or "
                              "'clipes cam --background voc'); or pass --background-query learnt")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"zegclip decoder activation {self.activation!r}; valid: {', '.join(ACTIVATIONS)}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return record_to_dict(FAMILY_NAME, self)


class DeepPrompts(nn.Module):
    """``blocks`` sets of ``n`` learnt tokens of width ``width`` (VPT-deep), uniform init in
    ``+-sqrt(6 / (3 p^2 + width))`` (``p`` the patch size), each set through one shared
    Linear + Dropout."""

    def __init__(self, blocks: int, n: int, width: int, patch: int, dropout: float):
        super().__init__()
        bound = math.sqrt(6.0 / (3 * patch * patch + width))
        self.tokens = nn.Parameter(torch.empty(blocks, n, width).uniform_(-bound, bound))
        self.proj = nn.Linear(width, width)
        nn.init.kaiming_normal_(self.proj.weight, a=0, mode="fan_out")  # as ZegCLIP initialises it
        self.drop = nn.Dropout(dropout)

    def forward(self, i: int) -> torch.Tensor:
        """``(n, width)`` prompt tokens for block ``i``."""
        return self.drop(self.proj(self.tokens[i]))


class DecoderLayer(nn.Module):
    """Post-norm: ``q = LN(q + drop(CrossAttn(q, mem))); q = LN(q + drop(FFN(q)))`` with a 4x FFN
    (no self-attention among the queries, as ZegCLIP's decoder layer)."""

    def __init__(self, dim: int, heads: int, activation: str = "relu", dropout: float = 0.0):
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.norm1 = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, 4 * dim), ACTIVATIONS[activation](), nn.Dropout(dropout),
                                 nn.Linear(4 * dim, dim))
        self.norm2 = nn.LayerNorm(dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, q: torch.Tensor, mem: torch.Tensor) -> torch.Tensor:
        """``q`` ``(B, C, D)``, ``mem`` ``(B, N, D)`` -> ``(B, C, D)``."""
        q = self.norm1(q + self.drop(self.attn(q, mem, mem, need_weights=False)[0]))
        return self.norm2(q + self.drop(self.ffn(q)))


class MaskLogits(nn.Module):
    """A cross-attention's logits only: head-averaged ``(q_h . k_h) / sqrt(d_h)``."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)

    def forward(self, q: torch.Tensor, mem: torch.Tensor) -> torch.Tensor:
        """``q`` ``(B, C, D)``, ``mem`` ``(B, N, D)`` -> ``(B, C, N)``."""
        b, c, d = q.shape
        dh = d // self.heads
        qh = self.q(q).view(b, c, self.heads, dh).transpose(1, 2)              # (B, h, C, dh)
        kh = self.k(mem).view(b, mem.shape[1], self.heads, dh).transpose(1, 2)  # (B, h, N, dh)
        return ((qh @ kh.transpose(-2, -1)) * dh ** -0.5).mean(1)


class ZegClipSegmenter(FrozenClipModule):
    """Frozen CLIP ViT + deep prompts + relationship descriptor + mask decoder (see the module docstring)."""

    score_kind = "sigmoid"
    #: Offset on trained classes' sigmoid scores when untrained names are asked for: measured on the
    #: toy world (pipelines/toy/ZEROSHOT.md: 0, 0.1 and 0.2 compared on both splits).
    calibration = 0.0

    def __init__(self, arch: ZegClipArch, visual: nn.Module, background_text: torch.Tensor | None = None):
        """``background_text``: ``(len(arch.background_words), D)`` embeddings of a ``text`` background
        (``None``: zeros, for a checkpoint's weights to fill)."""
        super().__init__(arch, visual, FAMILY_NAME)
        width = int(visual.conv1.out_channels)
        blocks = len(visual.transformer.resblocks)
        self.prompts = DeepPrompts(blocks, arch.prompts, width, self.stride, arch.dropout) if arch.prompts else None
        self.out_norm = nn.LayerNorm(width, eps=arch.norm_eps)
        d = arch.text_dim
        if arch.background == "text":
            shape = (len(arch.background_words), d)
            if background_text is not None and tuple(background_text.shape) != shape:
                raise ConfigError(f"zegclip background text must be {shape}, got {tuple(background_text.shape)}")
            bg = torch.zeros(shape) if background_text is None else F.normalize(background_text.float(), dim=-1)
            self.register_buffer("bg_text", bg)
        else:
            g = torch.Generator().manual_seed(0)
            self.bg_token = nn.Parameter(F.normalize(torch.randn(d, generator=g), dim=0))
        self.relation = nn.Linear(2 * d if arch.relation else d, d)
        self.memory = nn.Sequential(nn.Linear(d, d), nn.LayerNorm(d))
        self.decoder = nn.ModuleList(DecoderLayer(d, arch.heads, arch.activation, arch.decoder_dropout)
                                     for _ in range(arch.layers - 1))
        self.scorer = MaskLogits(d, arch.heads)
        self._start_from_clip()

    @torch.no_grad()
    def _start_from_clip(self) -> None:
        """Initialise so a fresh model scores patches by their CLIP cosine with the class text: identity
        descriptor (``q_c = t_c``), memory and scorer projections, zero-initialised residual branches in the
        decoder. Measured on the toy world: a random start stayed at all-background for 200 steps."""
        d = self.arch.text_dim
        eye = torch.eye(d)
        self.relation.weight.zero_()
        self.relation.weight[:, -d:] = eye
        for lin in (self.relation, self.memory[0], self.scorer.q, self.scorer.k):
            if lin is not self.relation:
                lin.weight.copy_(eye)
            lin.bias.zero_()
        for layer in self.decoder:
            for lin in (layer.attn.out_proj, layer.ffn[-1]):
                lin.weight.zero_()
                lin.bias.zero_()

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
        """Normalised ``(B, 3, H, W)`` -> L2-normalised patch tokens ``(B, N, D)``, CLS ``g`` ``(B, D)``, grid."""
        tok, grid = embed(self.visual, x)
        b, n_p = tok.shape[0], self.arch.prompts
        for i, blk in enumerate(self.visual.transformer.resblocks):
            if self.prompts is not None:
                p = self.prompts(i).to(tok.dtype)[None].expand(b, -1, -1)
                tok = torch.cat([tok[:, :1], p, tok[:, 1 + (n_p if i else 0):]], 1)
            tok, _, _ = block_forward(blk, tok)
        tok = self.visual.ln_post(self.out_norm(tok)) @ self.visual.proj
        return F.normalize(tok[:, 1 + n_p:], dim=-1), F.normalize(tok[:, 0], dim=-1), grid

    def queries(self, text: torch.Tensor, g: torch.Tensor, background: bool = True) -> torch.Tensor:
        """Relationship descriptor: ``(K, D)`` text and ``(B, D)`` CLS -> ``(B, K+1, D)`` queries
        (the background first: one learnt query, or one per background word; ``background=False``:
        ``(B, K, D)``, the classes alone)."""
        self.check_text(text)
        t = text.to(g.dtype)
        if background:
            t = torch.cat([self._background_text().to(g.dtype), t], 0)
        t = t[None].expand(g.shape[0], -1, -1)                                             # (B, K+n_bg, D)
        if self.arch.relation:
            t = torch.cat([t * g[:, None], t], -1)
        return self.relation(t)

    def _background_text(self) -> torch.Tensor:
        """``(n_bg, D)``: the background words' embeddings, or the learnt query (``n_bg = 1``)."""
        return self.bg_text if self.arch.background == "text" else F.normalize(self.bg_token, dim=0)[None]

    def forward(self, x: torch.Tensor, text: torch.Tensor, return_extras: bool = False):
        """Per-pixel class logits.

        Args:
            x: ``(B, 3, H, W)`` float RGB in [0, 1], ``H`` and ``W`` multiples of :attr:`stride`.
            text: ``(K, D)`` L2-normalised CLIP text embeddings of the classes.

        Returns:
            ``(B, K+1, H, W)`` logits (sigmoid scores); channel 0 = background (and ``{}`` extras when asked).
        """
        size = x.shape[-2:]
        if self.arch.input_scale != 1:
            x = F.interpolate(x, scale_factor=self.arch.input_scale, mode="bilinear", align_corners=False)
        patches, g, grid = self.encode((x - self.mean) / self.std)
        logits = self.decode(patches, g, text, grid, size)
        return (logits, {}) if return_extras else logits

    def decode(self, patches: torch.Tensor, g: torch.Tensor, text: torch.Tensor, grid: tuple[int, int],
               size: tuple[int, int], background: bool = True, memory: bool = True) -> torch.Tensor:
        """Mask logits from :meth:`encode`'s outputs, bilinear to ``size``: ``(B, K+1, H, W)``.

        ``background=False`` leaves the background queries out (``(B, K, H, W)``) and ``memory=False``
        the memory projection (the decoder attends to the L2-normalised patch tokens themselves): ZegCLIP's
        own head, for the parity check (``pipelines/bench/zegclip_parity.py``)."""
        q = self.queries(text, g, background)
        mem = self.memory(patches) if memory else patches
        for layer in self.decoder:
            q = layer(q, mem)
        logits = self.scorer(q, mem).view(g.shape[0], -1, *grid)
        if background and self.arch.background == "text":  # background = its best-matching word
            n_bg = self.bg_text.shape[0]
            logits = torch.cat([logits[:, :n_bg].amax(1, keepdim=True), logits[:, n_bg:]], 1)
        return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)


class ZegClipFamily(FrozenClipFamily):
    """The ``zegclip`` family (:mod:`clip_es.train.families`)."""

    name = FAMILY_NAME
    arch_cls = ZegClipArch
    module_cls = ZegClipSegmenter
    trainable = True
    default_loss = "focal_dice"
    #: ZegCLIP's VOC recipe (AdamW 2e-5 with lr_mult 10 on the prompts and the head, so 2e-4 on every
    #: trainable parameter; weight decay 0.01, none on norms; linear warm-up then poly 0.9 to 1e-6;
    #: batch 4; scale 0.5-2.0) at a tenth of its 20k iterations for a CPU, the warm-up kept at the same
    #: 7.5 % (1500 of 20k); the crop from the images (crop_size 0, :func:`~clip_es.train.loop.auto_crop_size`:
    #: their median shorter side, as ZegCLIP's 512 crops are on its rescaled VOC images).
    #: The input upsampled until the images' median shorter side spans 20 patches (input_scale 0,
    #: :func:`~clip_es.train.loop.auto_input_scale`): 1 on VOC with a ViT-B/16, 2 on the toy world.
    #: The background from the CLIP text of the run's background words (``background_query="text"``):
    #: a learnt one absorbed unseen classes that look like a background (on the toy world, boat's
    #: wood beside walls and ground: unseen ball,boat 47.8 -> 64.0 at 2000 steps; pipelines/toy/ZEROSHOT.md).
    train_defaults = TrainDefaults(steps=2000, batch_size=4, crop_size=0, scale_range=(0.5, 2.0), lr=2e-4,
                                   weight_decay=0.01, warmup=150, schedule="poly", min_lr=1e-6, input_scale=0,
                                   background_query="text")

    def arch_from_config(self, cfg: Any, text_dim: int) -> ZegClipArch:
        return ZegClipArch(text_dim=text_dim, prompts=int(getattr(cfg, "prompts", 10)),
                           relation=bool(getattr(cfg, "relation", True)), heads=decoder_heads(text_dim),
                           input_scale=int(getattr(cfg, "input_scale", None) or 1),
                           background=str(getattr(cfg, "background_query", None) or "learnt"),
                           background_words=tuple(getattr(cfg, "background_words", None) or ())).validate()

    def module_options(self, arch: ZegClipArch, ctx: Any, clip: Any) -> dict[str, Any]:
        """A ``text`` background embedded with the CLIP and the run's templates when training (a
        checkpoint's buffer fills it otherwise)."""
        if arch.background != "text" or not ctx.for_training:
            return {}
        from clip_es.train.text import embed_background

        return {"background_text": embed_background(clip, arch.background_words, ctx.text.get("templates") or [])}

    def arch_from_dict(self, d: dict[str, Any]) -> ZegClipArch:
        older = {**_OLDER_RECORDS, "norm_eps": 1e-6 if "activation" in d else 1e-5}  # eps came with activation
        return super().arch_from_dict({**older, **d})


FAMILY = ZegClipFamily()
