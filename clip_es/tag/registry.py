"""The taggers by name: one plain dict, one builder each (a new tagger = one file + one line)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from clip_es.errors import RegistryError

if TYPE_CHECKING:
    from clip_es.data.base import ClassSpec

#: The tagger ``clipes label`` / ``clipes tags`` / ``Labeler`` / a recipe's ``[label]`` use when
#: none is named. ``blend`` (the global softmax and TagCLIP must agree): chosen on one toy world
#: (seed 5) and checked on five more of 200 images each (the bundled clipes-tiny), where its tags
#: had precision 97-99 % at recall 93-95 % (``global`` 98-99 % / 81-84 %, ``tagclip`` 94-96 % /
#: 86-91 %) and the masks from its tags came closest to the true labels'. README, "Labels from a
#: class list".
DEFAULT_TAGGER = "blend"


def _global(clip, classes, *, templates, fusion="sentence", background=(), threshold=None, max_side=1024,
            pooling="mean", cache_dir=None, text=None, **_):
    from clip_es.model.text import class_embeddings
    from clip_es.model.zeroshot import ZERO_SHOT_THRESHOLD
    from clip_es.tag.global_softmax import GlobalTagger

    text = class_embeddings(clip, classes, templates, fusion) if text is None else text
    return GlobalTagger(clip, text, ZERO_SHOT_THRESHOLD if threshold is None else threshold, max_side, pooling)


def _tagclip(clip, classes, *, templates=None, fusion="sentence", background=(), max_side=1024, cache_dir=None,
             tag_templates=None, **_):
    from clip_es.tag.tagclip import TagClipTagger
    from clip_es.tag.templates import IMAGENET_TEMPLATES
    from clip_es.tag.text import tag_text

    text, info = tag_text(clip, classes, background, tag_templates or IMAGENET_TEMPLATES, fusion, cache_dir)
    tagger = TagClipTagger(clip, text, len(classes), max_side)
    tagger.text_info = info
    return tagger


def _blend(clip, classes, *, threshold=None, **options):
    from clip_es.tag.blend import BLEND_THRESHOLD, BlendTagger

    return BlendTagger(_global(clip, classes, **options), _tagclip(clip, classes, **options),
                       BLEND_THRESHOLD if threshold is None else threshold)


#: name -> builder ``(clip, classes, **options) -> tagger`` (a tagger has ``name``, ``describe()``, ``tag(image)``).
TAGGERS: dict[str, Callable[..., Any]] = {"blend": _blend, "tagclip": _tagclip, "global": _global}


def check_tagger(name: str) -> str:
    """``name`` when it is a tagger.

    Raises:
        RegistryError: an unknown name; the message lists the valid ones.
    """
    if name not in TAGGERS:
        raise RegistryError(f"unknown tagger {name!r}; valid: {', '.join(sorted(TAGGERS))}")
    return name


def build_tagger(name: str, clip, classes: "Sequence[ClassSpec]", *, templates: Sequence[str],
                 background: Sequence[str] = (), threshold: float | None = None, max_side: int | None = 1024,
                 fusion: str = "sentence", pooling: str = "mean", cache_dir: str | Path | None = None,
                 text=None, tag_templates: Sequence[str] | None = None):
    """A ready tagger.

    Args:
        name: ``blend``, ``tagclip`` or ``global`` (:data:`TAGGERS`).
        templates, fusion: the class prompts of the global tagger (the cam stage's).
        background: background words (TagCLIP scores them beside the classes; the global tagger ignores them).
        threshold: what the global tagger's probability (``global``) or the geometric mean of the two
            taggers' scores (``blend``) must reach (``None``: the tagger's default); TagCLIP's rule is relative.
        cache_dir: where TagCLIP keeps its text embeddings (the run folder), ``None``: not kept.
        text: the global tagger's class embeddings when already computed.
        tag_templates: TagCLIP's templates (default: the 85 ImageNet + scene templates).

    Raises:
        RegistryError: an unknown name.
    """
    return TAGGERS[check_tagger(name)](clip, list(classes), templates=tuple(templates), fusion=fusion,
                                       background=tuple(background), threshold=threshold, max_side=max_side,
                                       pooling=pooling, cache_dir=cache_dir, text=text,
                                       tag_templates=tag_templates)
