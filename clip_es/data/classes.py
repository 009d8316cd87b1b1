"""Built-in class lists and background word sets, below every dataset reader.

The VOC and COCO readers take their default class list from here, and the registry
(:mod:`clip_es.data.registry`) re-exports these names, so nothing circles back.
Lookups that miss raise :class:`~clip_es.errors.RegistryError` listing the valid names.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

from clip_es.data.base import ClassSpec, parse_class_lines, read_word_list
from clip_es.errors import RegistryError

#: Built-in class files shipped in ``clip_es/resources``.
CLASS_SETS: dict[str, str] = {"voc": "voc_classes.txt", "coco": "coco_classes.txt"}
#: Built-in class-related background sets (``none`` = no background words).
BACKGROUND_SETS: dict[str, str | None] = {"voc": "voc_background.txt", "coco": "coco_background.txt",
                                          "toy": None, "none": None}


def _resource_lines(name: str) -> list[str]:
    return resources.files("clip_es").joinpath("resources", name).read_text(encoding="utf-8").splitlines()


def lookup(registry: dict[str, Any], name: str, what: str) -> Any:
    """``registry[name]`` or a :class:`RegistryError` that lists the valid names."""
    try:
        return registry[name]
    except KeyError:
        raise RegistryError(f"unknown {what} {name!r}; valid: {', '.join(sorted(registry))}") from None


def builtin_classes(name: str) -> list[ClassSpec]:
    """A built-in class list: ``voc`` (20), ``coco`` (80) or ``toy`` (8)."""
    if name == "toy":
        from clip_es.data.toy import TOY_CLASSES

        return [ClassSpec(c) for c in TOY_CLASSES]
    return parse_class_lines(_resource_lines(lookup(CLASS_SETS, name, "class set")), f"clip_es/resources/{name}")


def background_words(spec: str) -> list[str]:
    """Resolve a background-set option: ``voc``, ``coco``, ``toy``, ``none``, or a path to a word file."""
    if spec in BACKGROUND_SETS:
        if spec == "toy":
            from clip_es.data.toy import TOY_BACKGROUNDS

            return list(TOY_BACKGROUNDS)
        fname = BACKGROUND_SETS[spec]
        return [] if fname is None else [w for w in (ln.split("#", 1)[0].strip() for ln in _resource_lines(fname))
                                         if w]
    if Path(spec).is_file():
        return read_word_list(spec)
    raise RegistryError(f"unknown background set {spec!r}; valid: {', '.join(sorted(BACKGROUND_SETS))} "
                        "or a path to a text file with one word per line")
