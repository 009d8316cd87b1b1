"""Text side (SPEC section 1): templates, synonym fusion, background words.

All functions return L2-normalised embeddings ``(N, D)`` on the model's device.
"""

from __future__ import annotations

from typing import Literal, Sequence

import torch
import torch.nn.functional as F

from clip_es.data.base import ClassSpec
from clip_es.errors import ConfigError
from clip_es.model.tiny import warn_outside_toy_world

Fusion = Literal["sentence", "mean"]
#: The template CLIP-ES selected for PASCAL VOC.
DEFAULT_TEMPLATE = "a clean origami {}."


def check_templates(templates: Sequence[str]) -> list[str]:
    """Each template must contain exactly one ``{}``."""
    out = [t for t in templates if t.strip()]
    if not out:
        raise ConfigError("no templates given; pass at least one, e.g. 'a clean origami {}.'")
    for t in out:
        if t.count("{}") != 1:
            raise ConfigError(f"template {t!r} must contain exactly one '{{}}' where the class name goes")
    return out


def _mean_normalised(embs: torch.Tensor) -> torch.Tensor:
    """Average L2-normalised rows and re-normalise: ``(M, D) -> (D,)``."""
    return F.normalize(F.normalize(embs, dim=-1).mean(0), dim=-1)


def phrase_embeddings(clip, phrases: Sequence[Sequence[str]], templates: Sequence[str],
                      fusion: Fusion = "sentence") -> torch.Tensor:
    """Embed one entry per item, each item given as one or more synonym phrases.

    Args:
        clip: a :class:`~clip_es.model.resolve.ClipModel`.
        phrases: per item, its synonyms (``["person with clothes", "people", "human"]``).
        templates: e.g. ``["a clean origami {}."]``; several are averaged.
        fusion: ``sentence`` puts all synonyms into one sentence ("a clean origami person
            with clothes, people, human."); ``mean`` embeds each synonym on its own and
            averages the normalised embeddings.

    Returns:
        ``(len(phrases), D)`` L2-normalised.
    """
    templates = check_templates(templates)
    if fusion not in ("sentence", "mean"):
        raise ConfigError(f"unknown synonym fusion {fusion!r}; valid: sentence, mean")
    if not phrases:
        return torch.zeros((0, int(clip.model.text_projection.shape[1])), device=clip.device)
    texts: list[str] = []
    groups: list[tuple[int, int]] = []
    for syns in phrases:
        words = [", ".join(syns)] if fusion == "sentence" else list(syns)
        start = len(texts)
        texts += [t.format(w) for w in words for t in templates]
        groups.append((start, len(texts)))
    emb = clip.encode_text(texts)
    return torch.stack([_mean_normalised(emb[a:b]) for a, b in groups])


def class_embeddings(clip, classes: Sequence[ClassSpec], templates: Sequence[str] = (DEFAULT_TEMPLATE,),
                     fusion: Fusion = "sentence") -> torch.Tensor:
    """``(K, D)`` embeddings of classes through their prompt words (synonyms or name).

    Every CLIP meets a class list here, so this is where the bundled toy CLIP says, once,
    that names outside its world get meaningless maps (:func:`~clip_es.model.tiny.warn_outside_toy_world`).
    """
    warn_outside_toy_world(clip, classes)
    return phrase_embeddings(clip, [c.prompt_words for c in classes], templates, fusion)


def background_embeddings(clip, words: Sequence[str], templates: Sequence[str] = (DEFAULT_TEMPLATE,)) -> torch.Tensor:
    """``(B, D)`` embeddings of the class-related background words (may be empty)."""
    return phrase_embeddings(clip, [[w] for w in words], templates, "sentence")
