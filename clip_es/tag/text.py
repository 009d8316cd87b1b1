"""The taggers' text embeddings, cached in the run folder (85 templates x every class and
background word cost far more than one image on a small CLIP; they are computed once per run)."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from clip_es.data.base import ClassSpec
from clip_es.model.text import Fusion, background_embeddings, class_embeddings

log = logging.getLogger(__name__)

#: File name of the cache inside a run folder.
TEXT_CACHE = "tag_text.npz"


def text_key(clip, classes: Sequence[ClassSpec], background: Sequence[str], templates: Sequence[str],
             fusion: Fusion) -> str:
    """What the embeddings depend on, as a short hash (the CLIP's weights, every text)."""
    spec = {"clip": clip.sha256 or clip.source, "name": clip.name, "classes": [c.prompt_words for c in classes],
            "background": list(background), "templates": list(templates), "fusion": fusion}
    return hashlib.sha256(json.dumps(spec, ensure_ascii=False, sort_keys=True).encode("utf-8")).hexdigest()[:16]


def tag_text(clip, classes: Sequence[ClassSpec], background: Sequence[str], templates: Sequence[str],
             fusion: Fusion = "sentence", cache_dir: str | Path | None = None) -> tuple[torch.Tensor, dict]:
    """``(K + B, D)`` unit embeddings: the classes, then the background words, on the CLIP's device.

    Args:
        cache_dir: a folder (the run folder) to keep them in as :data:`TEXT_CACHE`; reused when
            the CLIP, the texts and the templates are the same, recomputed otherwise.

    Returns:
        ``(embeddings, info)``: info holds ``seconds`` (the one-off cost; 0 when read back) and
        ``cached`` (read from the cache).
    """
    from clip_es.rundir import atomic_write_bytes

    key = text_key(clip, classes, background, templates, fusion)
    path = Path(cache_dir) / TEXT_CACHE if cache_dir is not None else None
    if path is not None and path.is_file():
        try:
            with np.load(path) as z:
                if str(z["key"]) == key:
                    return torch.from_numpy(z["text"]).to(clip.device), {"seconds": 0.0, "cached": True,
                                                                         "key": key}
        except (OSError, KeyError, ValueError) as e:
            log.warning("ignoring unreadable text cache %s (%s); recomputing it", path, e)
    t0 = time.perf_counter()
    cls = class_embeddings(clip, classes, templates, fusion)
    bg = background_embeddings(clip, background, templates) if background else cls[:0]
    text = torch.cat([cls, bg]).float()
    seconds = time.perf_counter() - t0
    if path is not None:
        buf = io.BytesIO()
        np.savez(buf, key=np.array(key), text=text.cpu().numpy())
        atomic_write_bytes(path, buf.getvalue())
    return text, {"seconds": round(seconds, 3), "cached": False, "key": key}
