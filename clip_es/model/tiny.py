"""``clipes-tiny``: the small CLIP trained on the toy world and shipped in the package.

It is an ordinary OpenAI-layout CLIP (ViT, patch 16, QuickGELU, head width 64, the
standard 49,408-token BPE vocabulary, context 77), just narrow and shallow, so any tool
that loads an OpenAI CLIP state dict loads it too.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch

from clip_es.data.base import ClassSpec
from clip_es.data.toy import TOY_BACKGROUNDS, TOY_CLASSES

log = logging.getLogger(__name__)

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


#: Where :func:`warn_outside_toy_world` marks a loaded CLIP it has warned about (``ClipModel.extra``).
_WARNED = "warned_outside_toy_world"


def warn_outside_toy_world(clip, classes: Sequence[ClassSpec]) -> None:
    """Warn once per loaded model, in one line, when the bundled toy CLIP meets class names
    outside the toy world (its labels and maps for them are noise), naming the fix.

    Silent for every other CLIP and for toy names (the toy demo, the tests).

    Args:
        clip: a :class:`~clip_es.model.resolve.ClipModel`.
        classes: the class list about to be embedded.
    """
    if getattr(clip, "name", None) != TINY_NAME or clip.extra.get(_WARNED):
        return
    known = set(TOY_CLASSES) | set(TOY_BACKGROUNDS)
    unknown = [c.name for c in classes if c.name.strip().lower() not in known]
    if not unknown:
        return
    clip.extra[_WARNED] = True
    shown = ", ".join(repr(n) for n in unknown[:4]) + (f" and {len(unknown) - 4} more" if len(unknown) > 4 else "")
    log.warning("%s, the bundled toy CLIP, knows only the toy world (%s); %s %s outside it, so labels and masks "
                "for them are noise: use a real CLIP, --model ViT-B-16 --pretrained openai, or --pretrained FILE "
                "for a local checkpoint (Python: model=\"ViT-B-16\", pretrained=\"openai\")",
                TINY_NAME, ", ".join(TOY_CLASSES), shown, "is" if len(unknown) == 1 else "are")
