"""The lightweight segmenter (SPEC section 4): timm CNN + neck + fusion blocks + text-matching head.

Data flow for an input ``x`` ``(B, 3, H, W)`` (RGB in [0, 1]) and class text ``(K, D)``::

    backbone (timm, features_only)  ->  strides 8 / 16 / 32
    neck (top-down sum, 3x3 conv)   ->  F  (B, C, H/8, W/8)
    tokens [bg; text] -> Linear+LN  ->  T  (B, K+1, C)
    fusion block x N:  T += CrossAttn(q=T, kv=pool(F))       bridge V->T
                       T += SelfAttn(T); T += MLP(T)         transformer branch
                       F += DWConv3x3-BN-GELU-Conv1x1(F)     CNN branch
                       F += CrossAttn(q=F, kv=T)             bridge T->V
    head: logits = tau * <normalize(Conv1x1(F)), normalize(Linear(T))>   (B, K+1, H/8, W/8)
    bilinear upsampling to (H, W)

This module is the ``fusion`` segmenter family (:mod:`clip_es.train.families`): the CNN
segmenter, whose *head* (``SegmenterArch.head``, ``clipes train --head``) decides what
happens between the backbone and the text-matching output. Heads are a plain registry
(:data:`HEADS`): ``plain`` (no mixing: the text-matching head alone), ``fusion`` (the
fusion blocks above), ``denseclip`` (DenseCLIP's context decoder and pixel-text score map,
:mod:`clip_es.train.denseclip`). A head may act before the neck (on the backbone features
and the raw class text, e.g. to add a score map to the stride-32 features) and after it (on
``F`` and ``T``); see :class:`~clip_es.train.heads.Head`.

Channel 0 of the logits is the learned background token, channel ``k + 1`` is class ``k``
of the text given to :meth:`Segmenter.forward`. Every operation on ``T`` treats the text
tokens as a set (no positional code), so the class list can change at inference time
(open vocabulary): any ``(K', D)`` embedding matrix from the same CLIP works.
``fusion_blocks=0`` is the ablation "plain text-matching head". Each fusion block's residual
branches end in zero-initialised layers, so a fresh fused model computes exactly what the
plain head computes and training adds fusion on top (on the toy world this start beat a
randomly initialised fusion by ~4 mIoU at 300 steps, one seed each).
"""

from __future__ import annotations

import difflib
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from clip_es.errors import ConfigError, RegistryError, WeightsError, first_line
from clip_es.train.denseclip import DenseClipHead
from clip_es.train.families import TrainDefaults, check_text, record_from_dict, record_to_dict
from clip_es.train.heads import Attention, Head

log = logging.getLogger(__name__)

#: Input normalisation when the backbone's timm config names none (ImageNet).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: Inputs are padded to a multiple of this at inference (the backbone's coarsest stride).
STRIDE = 32


@dataclass(frozen=True)
class SegmenterArch:
    """Architecture of a :class:`Segmenter` (stored in checkpoints as a plain dict).

    Attributes:
        backbone: timm model name (``resnet18``, ``mobilenetv3_large_100``, ``test_resnet``...).
        head: what mixes image and text before the text-matching output (a :data:`HEADS` name).
        text_dim: dimension ``D`` of the CLIP text embeddings fed in.
        dim: width ``C`` of the stride-8 map ``F`` and of the text tokens ``T``.
        heads: attention heads in the fusion blocks (``dim % heads == 0``).
        fusion_blocks: number of fusion blocks of the ``fusion`` head.
        mlp_ratio: hidden width of the token MLP, in multiples of ``dim``.
        pool: average-pooling factor applied to ``F`` before the V->T bridge.
        mean, std: RGB input normalisation applied inside the model.
    """

    backbone: str = "resnet18"
    head: str = "fusion"
    text_dim: int = 512
    dim: int = 128
    heads: int = 4
    fusion_blocks: int = 2
    mlp_ratio: float = 2.0
    pool: int = 2
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def validate(self) -> "SegmenterArch":
        if self.dim < 8 or self.heads < 1 or self.dim % self.heads:
            raise ConfigError(f"--dim must be >= 8 and divisible by the {self.heads} heads, got {self.dim}")
        if self.head not in HEADS:
            raise RegistryError(f"unknown --head {self.head!r}; valid: {', '.join(HEADS)}")
        if self.fusion_blocks < 0:
            raise ConfigError(f"fusion blocks must be >= 0, got {self.fusion_blocks}")
        if self.pool < 1:
            raise ConfigError(f"pool must be >= 1, got {self.pool}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return record_to_dict(FAMILY_NAME, self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SegmenterArch":
        """Read a record; one written before heads existed gets ``plain`` (0 fusion blocks) or ``fusion``."""
        known = dict(d)
        known.setdefault("head", "fusion" if int(d.get("fusion_blocks", 2)) > 0 else "plain")
        for k in ("mean", "std"):
            if k in known:
                known[k] = tuple(float(v) for v in known[k])
        return record_from_dict(cls, known)


# ----------------------------------------------------------------------------- backbone
def read_backbone_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """A backbone state dict from a local file, without executing code.

    Accepts ``.safetensors`` or a pickled state dict (``torch.load(weights_only=True)``),
    optionally wrapped as ``{"state_dict": ...}`` / ``{"model": ...}`` and with
    ``module.`` prefixes (DDP saves).

    Raises:
        WeightsError: missing or unreadable file, or no tensors in it.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"--backbone-weights {path} does not exist; pass an existing file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(str(path))
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise WeightsError(f"--backbone-weights {path}: not a plain state dict readable with weights_only=True "
                           f"({type(e).__name__}: {first_line(e)}); re-save it with "
                           "torch.save(model.state_dict(), path)") from e
    for key in ("state_dict", "model", "state_dict_ema"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"--backbone-weights {path}: not a state dict of tensors")
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def create_backbone(name: str, weights: str | Path | None = None, pretrained: bool = False) -> nn.Module:
    """A timm CNN with ``features_only=True``.

    Args:
        name: timm model name.
        weights: local state dict of the full timm model (classifier keys are dropped).
        pretrained: let timm download its default pretrained weights (needs network).

    Raises:
        RegistryError: unknown timm name (with close matches).
        WeightsError: weights that do not fit the architecture.
    """
    import timm

    if name not in timm.list_models():
        close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
        raise RegistryError(f"unknown backbone {name!r}; use a timm model name such as resnet18, "
                            "mobilenetv3_large_100" + (f" (close: {', '.join(close)})" if close else ""))
    if weights is not None and pretrained:
        raise ConfigError("pass either --backbone-weights or --backbone-pretrained, not both")
    kw: dict[str, Any] = {}
    sd: dict[str, torch.Tensor] = {}
    if weights is not None:
        # timm's direct state-dict pass-through: its own key filters apply, no network access.
        sd = read_backbone_weights(weights)
        kw = {"pretrained": True, "pretrained_cfg_overlay": {"state_dict": sd}}
    elif pretrained:
        kw = {"pretrained": True}
    try:
        model = timm.create_model(name, features_only=True, **kw)
        if weights is not None:  # timm loads non-strictly here: insist that every backbone tensor came from the file
            # (features wrappers may flatten "a.0" to "a_0": compare names with "_" read as ".")
            shapes = {k.replace("_", "."): v.shape for k, v in sd.items()}
            missing = [k for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")
                       and shapes.get(k.replace("_", ".")) != v.shape]
            if missing:
                raise WeightsError(f"--backbone-weights {weights} does not fit timm model {name}: {len(missing)} "
                                   f"tensors missing or of another shape (e.g. {', '.join(missing[:3])}); pass "
                                   f"weights saved from timm.create_model({name!r}).state_dict()")
        return model
    except RuntimeError as e:
        if weights is not None:
            raise WeightsError(f"--backbone-weights {weights} does not fit timm model {name}: "
                               f"{first_line(e, 300)}") from e
        raise
    except (TypeError, AttributeError) as e:
        raise RegistryError(f"timm model {name} cannot produce feature maps (features_only); "
                            "pick a CNN such as resnet18") from e


def _feature_indices(backbone: nn.Module) -> list[int]:
    """Indices of the backbone outputs at strides 8, 16, 32 (the last one of each)."""
    red = list(backbone.feature_info.reduction())
    out = []
    for r in (8, 16, 32):
        cand = [i for i, v in enumerate(red) if v == r]
        if not cand:
            raise ConfigError(f"backbone has feature strides {red}; the segmenter needs 8, 16 and 32")
        out.append(cand[-1])
    return out


# ----------------------------------------------------------------------------- blocks
class ConvBNAct(nn.Sequential):
    def __init__(self, cin: int, cout: int, k: int = 3):
        super().__init__(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


class Neck(nn.Module):
    """Top-down fusion of strides 8/16/32 into one stride-8 map ``(B, dim, H/8, W/8)``."""

    def __init__(self, in_channels: list[int], dim: int):
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(c, dim, 1) for c in in_channels)
        self.smooth = ConvBNAct(dim, dim, 3)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        f8, f16, f32 = feats
        p = self.lateral[2](f32)
        p = F.interpolate(p, size=f16.shape[-2:], mode="bilinear", align_corners=False) + self.lateral[1](f16)
        p = F.interpolate(p, size=f8.shape[-2:], mode="bilinear", align_corners=False) + self.lateral[0](f8)
        return self.smooth(p)


class FusionBlock(nn.Module):
    """One fusion block: parallel CNN and transformer branches with a two-way bridge.

    ``forward(f, t)``: ``f`` ``(B, C, h, w)``, ``t`` ``(B, N, C)`` -> the same shapes.
    """

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 2.0, pool: int = 2):
        super().__init__()
        self.pool = pool
        hidden = int(dim * mlp_ratio)
        # bridge V -> T
        self.norm_vt_q, self.norm_vt_kv = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.v2t = Attention(dim, heads)
        # transformer branch
        self.norm_sa = nn.LayerNorm(dim)
        self.self_attn = Attention(dim, heads)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        # CNN branch
        self.local = nn.Sequential(nn.Conv2d(dim, dim, 3, padding=1, groups=dim, bias=False), nn.BatchNorm2d(dim),
                                   nn.GELU(), nn.Conv2d(dim, dim, 1))
        # bridge T -> V
        self.norm_tv_q, self.norm_tv_kv = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.t2v = Attention(dim, heads)
        # Every residual branch ends in a zero-initialised layer: a fresh block is the identity,
        # so a fused model starts exactly as the plain text-matching head and learns what to add.
        for last in (self.v2t.proj, self.self_attn.proj, self.mlp[-1], self.local[-1], self.t2v.proj):
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)

    def forward(self, f: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pooled = F.avg_pool2d(f, self.pool) if self.pool > 1 else f
        t = t + self.v2t(self.norm_vt_q(t), self.norm_vt_kv(pooled.flatten(2).transpose(1, 2)))
        n = self.norm_sa(t)
        t = t + self.self_attn(n, n)
        t = t + self.mlp(self.norm_mlp(t))
        f = f + self.local(f)
        B, C, h, w = f.shape
        tok = f.flatten(2).transpose(1, 2)                                     # (B, h*w, C)
        tok = tok + self.t2v(self.norm_tv_q(tok), self.norm_tv_kv(t))
        return tok.transpose(1, 2).reshape(B, C, h, w), t


class TextMatchingHead(nn.Module):
    """``logits = tau * normalize(Conv1x1(F)) . normalize(Linear(T))``: ``(B, N, h, w)``."""

    def __init__(self, dim: int, tau: float = 10.0, max_tau: float = 100.0):
        super().__init__()
        self.pix = nn.Conv2d(dim, dim, 1)
        self.txt = nn.Linear(dim, dim)
        self.log_tau = nn.Parameter(torch.tensor(math.log(tau)))
        self.max_log_tau = math.log(max_tau)

    def forward(self, f: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        B, _, h, w = f.shape
        p = F.normalize(self.pix(f).flatten(2), dim=1)                         # (B, C, h*w)
        q = F.normalize(self.txt(t), dim=-1)                                   # (B, N, C)
        tau = self.log_tau.clamp(max=self.max_log_tau).exp()
        return (tau * torch.bmm(q, p)).reshape(B, -1, h, w)


# ----------------------------------------------------------------------------- heads
class FusionHead(Head):
    """Jin & Yang's fusion: ``arch.fusion_blocks`` :class:`FusionBlock` s after the neck."""

    def __init__(self, arch: "SegmenterArch", channels: list[int]):
        super().__init__(arch, channels)
        self.blocks = nn.ModuleList(FusionBlock(arch.dim, arch.heads, arch.mlp_ratio, arch.pool)
                                    for _ in range(arch.fusion_blocks))

    def post_neck(self, f: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        for blk in self.blocks:
            f, t = blk(f, t)
        return f, t


#: ``--head`` name -> head class ``(arch, backbone channels at strides 8/16/32) -> Head``.
HEADS: dict[str, type[Head]] = {
    "plain": Head,
    "fusion": FusionHead,
    "denseclip": DenseClipHead,
}


# ----------------------------------------------------------------------------- model
class Segmenter(nn.Module):
    """CNN segmenter that classifies pixels by matching them to class text embeddings.

    Args:
        arch: architecture.
        backbone: a prepared timm features-only model (default: random init of ``arch.backbone``).
    """

    #: Inputs are padded to a multiple of this at inference (the backbone's coarsest stride).
    stride = STRIDE
    #: Softmax over background + classes (cross-entropy training).
    score_kind = "softmax"
    #: No offset on trained classes by default (measured: see README "Segment classes you never labelled").
    calibration = 0.0
    #: Every weight is trained and saved.
    frozen_prefixes: tuple[str, ...] = ()

    def __init__(self, arch: SegmenterArch, backbone: nn.Module | None = None):
        super().__init__()
        self.arch = arch.validate()
        self.backbone = backbone if backbone is not None else create_backbone(arch.backbone)
        self.feature_idx = _feature_indices(self.backbone)
        chs = list(self.backbone.feature_info.channels())
        chs = [chs[i] for i in self.feature_idx]
        self.context = HEADS[arch.head](arch, chs)
        self.neck = Neck(self.context.neck_channels(chs), arch.dim)
        g = torch.Generator().manual_seed(0)
        self.bg_token = nn.Parameter(F.normalize(torch.randn(arch.text_dim, generator=g), dim=0))
        self.text_proj = nn.Sequential(nn.Linear(arch.text_dim, arch.dim), nn.LayerNorm(arch.dim))
        self.head = TextMatchingHead(arch.dim)
        self.register_buffer("mean", torch.tensor(arch.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(arch.std).view(1, 3, 1, 1), persistent=False)

    def class_tokens(self, text: torch.Tensor, batch: int) -> torch.Tensor:
        """``(K, D)`` class text -> ``(B, K+1, D)`` raw tokens, the learned background first."""
        check_text(text, self.arch.text_dim)
        tok = torch.cat([F.normalize(self.bg_token, dim=0)[None], text.to(self.bg_token.dtype)], 0)
        return tok[None].expand(batch, -1, -1)

    def forward(self, x: torch.Tensor, text: torch.Tensor, return_extras: bool = False):
        """Per-pixel class logits.

        Args:
            x: ``(B, 3, H, W)`` float RGB in [0, 1] (normalised inside).
            text: ``(K, D)`` L2-normalised CLIP text embeddings of the classes.
            return_extras: also return the head's extras (auxiliary logits for the loss).

        Returns:
            ``(B, K+1, H, W)`` logits; channel 0 = background, ``k + 1`` = class ``k``
            (and the extras dict when asked).
        """
        H, W = x.shape[-2:]
        feats = self.backbone((x - self.mean) / self.std)
        feats = [feats[i] for i in self.feature_idx]
        feats, tok, extras = self.context.pre_neck(feats, self.class_tokens(text, x.shape[0]))
        f, t = self.context.post_neck(self.neck(feats), self.text_proj(tok))
        logits = F.interpolate(self.head(f, t), size=(H, W), mode="bilinear", align_corners=False)
        return (logits, extras) if return_extras else logits

    def export_module(self, text: torch.Tensor) -> nn.Module:
        """``forward(x) -> (B, K+1, H, W)`` with ``text`` baked in (ONNX)."""
        return BoundSegmenter(self, text)


def backbone_norm(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The input mean/std timm records for a backbone (ImageNet when it records none)."""
    import timm

    try:
        cfg = timm.get_pretrained_cfg(name)
        mean, std = getattr(cfg, "mean", None), getattr(cfg, "std", None)
    except Exception:  # some names carry no pretrained config
        mean = std = None
    if not mean or not std or len(mean) != 3:
        return IMAGENET_MEAN, IMAGENET_STD
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def build_segmenter(arch: SegmenterArch, backbone_weights: str | Path | None = None,
                    backbone_pretrained: bool = False) -> Segmenter:
    """A :class:`Segmenter` with its backbone initialised as asked (random by default)."""
    return Segmenter(arch, create_backbone(arch.backbone, backbone_weights, backbone_pretrained))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class BoundSegmenter(nn.Module):
    """A segmenter with its class text baked in: ``forward(x) -> (B, K+1, H, W)`` (for ONNX)."""

    def __init__(self, model: nn.Module, text: torch.Tensor):
        super().__init__()
        self.model = model
        self.register_buffer("text", text.detach().clone().float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x, self.text)


# ----------------------------------------------------------------------------- the family
FAMILY_NAME = "fusion"


class CnnFamily:
    """The ``fusion`` family (:mod:`clip_es.train.families`): timm CNN + neck + head + text matching."""

    name = FAMILY_NAME
    trainable = True
    default_loss = "ce"
    #: 2000 steps of batch 8 at crop 320, AdamW 1e-3 (wd 1e-4), 100 warm-up steps then cosine.
    train_defaults = TrainDefaults()

    def arch_from_config(self, cfg: Any, text_dim: int) -> SegmenterArch:
        """The record ``clipes train`` options describe (``fusion_blocks=0`` with the fusion head = plain)."""
        mean, std = backbone_norm(cfg.backbone)
        head = "plain" if cfg.head == "fusion" and cfg.fusion_blocks == 0 else cfg.head
        return SegmenterArch(backbone=cfg.backbone, head=head, text_dim=text_dim, dim=cfg.dim, heads=cfg.heads,
                             fusion_blocks=cfg.fusion_blocks if head == "fusion" else 0, mean=mean,
                             std=std).validate()

    def arch_from_dict(self, d: dict[str, Any]) -> SegmenterArch:
        return SegmenterArch.from_dict(d)

    def build(self, arch: SegmenterArch, ctx: Any) -> Segmenter:
        if ctx.for_training:
            return build_segmenter(arch, ctx.backbone_weights, ctx.backbone_pretrained)
        return Segmenter(arch)

    def upgrade_state(self, arch: dict[str, Any], state: dict[str, Any]) -> dict[str, Any]:
        """Checkpoints from before heads kept the fusion blocks at ``blocks.*``."""
        if "head" in arch:
            return state
        return {("context." + k if k.startswith("blocks.") else k): v for k, v in state.items()}


FAMILY = CnnFamily()
