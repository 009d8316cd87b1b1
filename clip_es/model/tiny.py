"""``clipes-tiny``: the small CLIP trained on the toy world and shipped in the package.

It is an ordinary OpenAI-layout CLIP (ViT, patch 16, QuickGELU, head width 64, the
standard 49,408-token BPE vocabulary, context 77), just narrow and shallow, so any tool
that loads an OpenAI CLIP state dict loads it too.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch

#: Where the bundled checkpoint lives inside the package.
TINY_CHECKPOINT = Path(__file__).parent / "weights" / "clipes-tiny.pt"
#: The name that selects it in :func:`clip_es.model.load_clip`.
TINY_NAME = "clipes-tiny"


@dataclass(frozen=True)
class TinyClipConfig:
    """Architecture of the tiny CLIP (OpenAI layout: heads = width // 64)."""

    embed_dim: int = 128
    image_size: int = 160
    patch_size: int = 16
    vision_width: int = 192
    vision_layers: int = 6
    text_width: int = 128
    text_layers: int = 4
    context_length: int = 77
    vocab_size: int = 49408


def build_tiny_clip(cfg: TinyClipConfig = TinyClipConfig()) -> torch.nn.Module:
    """A randomly initialised open_clip ``CLIP`` with the tiny architecture (fp32)."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    for w in (cfg.vision_width, cfg.text_width):
        if w % 64:
            raise ValueError(f"widths must be multiples of 64 (OpenAI layout), got {w}")
    vision = CLIPVisionCfg(layers=cfg.vision_layers, width=cfg.vision_width, patch_size=cfg.patch_size,
                           image_size=cfg.image_size, head_width=64)
    text = CLIPTextCfg(context_length=cfg.context_length, vocab_size=cfg.vocab_size, width=cfg.text_width,
                       heads=cfg.text_width // 64, layers=cfg.text_layers)
    return CLIP(cfg.embed_dim, vision_cfg=vision, text_cfg=text, quick_gelu=True)


def config_dict(cfg: TinyClipConfig) -> dict:
    """The config as a plain dict (for logs and manifests)."""
    return asdict(cfg)
