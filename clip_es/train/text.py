"""Class text for the segmenter: frozen CLIP text embeddings, computed once and cached.

The segmenter embeds classes exactly as the run's ``cam`` stage did (same CLIP, templates,
synonym fusion and class synonyms, read from ``RUN/manifest.json``), so training never
needs the CLIP image encoder. The result is cached in ``RUN/<name>/text.pt`` and copied
into every checkpoint together with a record of the CLIP (name, source, sha256), which
lets ``clipes segment`` re-load that CLIP to embed class names never seen in training.

A text payload is a plain dict (loadable with ``weights_only=True``)::

    {"classes": [[name, *synonyms], ...], "embeddings": (K, D) float32,
     "templates": [...], "fusion": "sentence", "clip": {name, source, sha256, ...}}
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import torch

from clip_es.data.base import ClassSpec
from clip_es.errors import RunDirError, WeightsError
from clip_es.rundir import RunDir, atomic_write, params_hash

log = logging.getLogger(__name__)


def specs_to_lists(classes: Sequence[ClassSpec]) -> list[list[str]]:
    return [[c.name, *c.synonyms] for c in classes]


def lists_to_specs(rows: Sequence[Sequence[str]]) -> list[ClassSpec]:
    return [ClassSpec(str(r[0]), tuple(str(s) for s in r[1:])) for r in rows]


def run_text_setup(run: RunDir) -> dict[str, Any]:
    """What the run's ``cam`` stage used: classes (with synonyms), templates, fusion, CLIP record.

    Raises:
        RunDirError: the run has no cam stage recorded.
    """
    m = run.read_manifest()
    cam = (m.get("stages") or {}).get("cam")
    if not cam or "params" not in cam:
        raise RunDirError(f"{run.path}: no cam stage in the manifest; the segmenter embeds classes as the cam "
                          "stage did, so run 'clipes cam' into this run first")
    p = cam["params"]
    classes = p.get("classes") or [[c] for c in m.get("classes", [])]
    clip = p.get("model") if isinstance(p.get("model"), dict) else m.get("model")
    if not classes or not clip:
        raise RunDirError(f"{run.manifest_path}: cam parameters lack classes or model; re-run 'clipes cam'")
    return {"classes": [list(map(str, c)) for c in classes], "templates": list(p.get("templates") or []),
            "fusion": p.get("fusion", "sentence"), "clip": dict(clip)}


def run_background_words(run: RunDir) -> list[str]:
    """The background words a segmenter's text background uses: the cam stage's (``clipes cam
    --background``), or CLIP-ES's generic ``voc`` set when that stage had none.

    Raises:
        RunDirError: the run has no cam stage recorded.
    """
    m = run.read_manifest()
    cam = (m.get("stages") or {}).get("cam")
    if not cam or "params" not in cam:
        raise RunDirError(f"{run.path}: no cam stage in the manifest; run 'clipes cam' into this run first")
    words = [str(w) for w in cam["params"].get("background_words") or []]
    if words:
        return words
    from clip_es.data.classes import background_words

    log.info("the cam stage of %s had no background words; the text background uses the voc set", run.path)
    return background_words("voc")


def clip_load_args(record: dict[str, Any]) -> tuple[str, str | None]:
    """``(model, pretrained)`` for :func:`~clip_es.model.load_clip` from a ``describe()`` record."""
    name, source = str(record.get("name")), str(record.get("source", ""))
    if source.startswith("bundled:"):
        return name, None
    if Path(source).expanduser().is_file():
        return name, source
    if ":" in source and not Path(source).suffix:
        arch, tag = source.split(":", 1)
        return arch, tag
    return name, source or None


def load_recorded_clip(record: dict[str, Any], model: str | None = None, pretrained: str | None = None,
                       device: str = "cpu"):
    """Load the CLIP a record names (or the override), checking its sha256 when both are known.

    Raises:
        WeightsError: the CLIP cannot be loaded, or its weights differ from the recorded ones.
    """
    from clip_es.model.resolve import load_clip

    if model or pretrained:
        args = (model or str(record.get("name")), pretrained)
    else:
        args = clip_load_args(record)
    try:
        clip = load_clip(args[0], args[1], device=device)
    except WeightsError as e:
        raise WeightsError(f"cannot load the CLIP this segmenter was trained with ({record.get('source')}): {e}; "
                           "pass it with --clip-model/--clip-pretrained") from e
    want, got = record.get("sha256"), clip.sha256
    if want and got and want != got:
        raise WeightsError(f"the CLIP at {clip.source} (sha256 {got[:12]}) is not the one recorded "
                           f"({record.get('source')}, sha256 {want[:12]}); new class names embedded with another "
                           "CLIP would not match the trained ones. Pass the original with --clip-model/--clip-pretrained")
    return clip


def embed(clip, classes: Sequence[ClassSpec], templates: Sequence[str], fusion: str) -> torch.Tensor:
    """``(K, D)`` float32 CPU embeddings, as the cam stage computes them."""
    from clip_es.model.text import DEFAULT_TEMPLATE, class_embeddings

    return class_embeddings(clip, list(classes), list(templates) or [DEFAULT_TEMPLATE], fusion).float().cpu()


def embed_background(clip, words: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
    """``(B, D)`` float32 CPU embeddings of background words, as the cam stage computes them."""
    from clip_es.model.text import DEFAULT_TEMPLATE, background_embeddings

    return background_embeddings(clip, list(words), list(templates) or [DEFAULT_TEMPLATE]).float().cpu()


def cached_text(run: RunDir, folder: Path, clip_model: str | None = None, clip_pretrained: str | None = None,
                device: str = "cpu") -> dict[str, Any]:
    """The run's class text, from ``folder/text.pt`` when it matches the run, else computed and saved."""
    setup = run_text_setup(run)
    key = params_hash({k: setup[k] for k in ("classes", "templates", "fusion", "clip")})
    path = folder / "text.pt"
    if path.is_file():
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
            if payload.get("key") == key:
                return payload
            log.info("%s is stale (run's text setup changed); recomputing", path)
        except Exception as e:  # a corrupt cache is recomputed, never trusted
            log.warning("ignoring unreadable %s (%s)", path, e)
    clip = load_recorded_clip(setup["clip"], clip_model, clip_pretrained, device)
    emb = embed(clip, lists_to_specs(setup["classes"]), setup["templates"], setup["fusion"])
    payload = {"classes": setup["classes"], "embeddings": emb.contiguous(), "templates": list(setup["templates"]),
               "fusion": setup["fusion"], "clip": dict(setup["clip"]), "key": key}
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: torch.save(payload, f))
    return payload


def text_for_classes(payload: dict[str, Any], classes: Sequence[ClassSpec], clip_model: str | None = None,
                     clip_pretrained: str | None = None, device: str = "cpu") -> torch.Tensor:
    """``(K', D)`` embeddings of ``classes`` for a trained segmenter (open vocabulary).

    Classes identical (name and synonyms) to trained ones reuse the stored embeddings;
    any other name is embedded with the recorded CLIP, templates and fusion, which is then
    loaded (or the ``clip_model``/``clip_pretrained`` override).
    """
    known = {tuple(c): i for i, c in enumerate(payload["classes"])}
    rows = specs_to_lists(classes)
    missing = [c for c, r in zip(classes, rows) if tuple(r) not in known]
    new: dict[tuple[str, ...], torch.Tensor] = {}
    if missing:
        clip = load_recorded_clip(payload["clip"], clip_model, clip_pretrained, device)
        emb = embed(clip, missing, payload["templates"], payload["fusion"])
        new = {tuple(r): e for r, e in zip(specs_to_lists(missing), emb)}
    stored = payload["embeddings"]
    return torch.stack([stored[known[tuple(r)]] if tuple(r) in known else new[tuple(r)] for r in rows])
