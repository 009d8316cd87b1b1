"""What the segmenter families on a frozen CLIP ViT share (``zegclip``, ``clip``): arch records as
plain dicts, the frozen image tower and its normalisation, and the family object's build.

The CLIP's weights are never part of such a module's checkpoint (``frozen_prefixes = ("visual.",)``):
:meth:`FrozenClipFamily.build` reloads the CLIP the class text record names, sha256-checked.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from clip_es.errors import ConfigError
from clip_es.model.dense import patch_size_of
from clip_es.train.families import check_text, record_from_dict

log = logging.getLogger(__name__)


class FrozenClipModule(nn.Module):
    """Base of a segmenter module on a frozen CLIP ``VisionTransformer`` (kept at ``self.visual``).

    Sets ``stride`` (the patch size: inputs are padded to it), the ``mean``/``std`` buffers of the
    arch record (``arch.mean``, ``arch.std``), and keeps the CLIP frozen and in eval mode.
    """

    frozen_prefixes: tuple[str, ...] = ("visual.",)

    def __init__(self, arch: Any, visual: nn.Module, family: str):
        super().__init__()
        self.family = family
        self.arch = arch.validate()
        if not hasattr(visual, "transformer") or getattr(visual, "proj", None) is None:
            raise ConfigError(f"--arch {family} needs a ViT CLIP with a projection (e.g. clipes-tiny, ViT-B-16)")
        if visual.proj.shape[1] != arch.text_dim:
            raise ConfigError(f"the CLIP projects images to {visual.proj.shape[1]} dims, the class text has "
                              f"{arch.text_dim}; embed the classes with the same CLIP")
        self.visual = visual.eval()
        for p in self.visual.parameters():
            p.requires_grad_(False)
        self.stride = patch_size_of(visual)
        self.register_buffer("mean", torch.tensor(arch.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(arch.std).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> "FrozenClipModule":
        super().train(mode)
        self.visual.eval()  # the frozen CLIP always runs as at inference
        return self

    def export_module(self, text: torch.Tensor) -> nn.Module:
        raise ConfigError(f"export-onnx does not export --arch {self.family} (a frozen CLIP ViT run at every input "
                          "size through interpolated position embeddings); use clipes segment")

    def check_text(self, text: torch.Tensor) -> None:
        check_text(text, self.arch.text_dim)


class FrozenClipFamily:
    """Family object of a :class:`FrozenClipModule`: ``arch_cls`` records, ``module_cls`` modules."""

    arch_cls: type
    module_cls: type

    def arch_from_dict(self, d: dict[str, Any]) -> Any:
        return record_from_dict(self.arch_cls, d)

    def build(self, arch: Any, ctx: Any) -> FrozenClipModule:
        clip = ctx.load_clip()
        if tuple(clip.mean) != tuple(arch.mean) or tuple(clip.std) != tuple(arch.std):
            log.warning("the CLIP %s normalises with mean %s / std %s; --arch %s feeds it with %s / %s",
                        clip.name, clip.mean, clip.std, self.name, arch.mean, arch.std)
        return self.module_cls(arch, clip.model.visual, **self.module_options(arch, ctx, clip))

    def module_options(self, arch: Any, ctx: Any, clip: Any) -> dict[str, Any]:
        """Keyword arguments of ``module_cls`` beyond ``(arch, visual)``; none by default."""
        return {}

    def upgrade_state(self, arch: dict[str, Any], state: dict[str, Any]) -> dict[str, Any]:
        return state
