"""clip_es: CLIP-ES pseudo masks from image tags with a frozen CLIP, then a light segmenter.

In memory (one image or an iterable, no run folder)::

    import clip_es

    labeler = clip_es.Labeler(classes=["cat", "dog", "sofa"], model="ViT-B-16", pretrained="openai")
    out = labeler(image, labels=["cat", "sofa"])    # out.cam, out.caa (K, H, W); out.mask (H, W) uint8
    seg = clip_es.Segmenter.load("RUN/segmenter/model.pt")
    labels = seg(image)

Datasets, through a run folder (one call per ``clipes`` command)::

    clip_es.generate_cams(clip_es.CamConfig(dataset="folder", root="mydata", split="train", out="runs/mine"))
    clip_es.refine_masks(clip_es.RefineConfig(run="runs/mine"))
    clip_es.export_run("runs/mine", "cvat", "fix/cvat.zip", limit=50, order="least-sure", review=True)
    clip_es.import_masks("runs/mine", "cvat_export.zip", "cvat")   # then TrainConfig(labels="corrected")

Names are imported on first use: ``import clip_es`` alone loads neither torch nor a model.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: Public name -> the module that defines it (imported on first access).
_LAZY: dict[str, str] = {
    "Labeler": "clip_es.labeler",
    "PseudoMask": "clip_es.labeler",
    "Segmenter": "clip_es.segmenter",
    "CamConfig": "clip_es.cam.run",
    "generate_cams": "clip_es.cam.run",
    "RefineConfig": "clip_es.refine.run",
    "refine_masks": "clip_es.refine.run",
    "TrainConfig": "clip_es.train.loop",
    "train_segmenter": "clip_es.train.loop",
    "SegmentConfig": "clip_es.train.segment",
    "segment": "clip_es.train.segment",
    "LabelConfig": "clip_es.label",
    "label_folder": "clip_es.label",
    "export_run": "clip_es.export",
    "import_masks": "clip_es.export",
    "EvalOptions": "clip_es.evaluate",
    "evaluate_run": "clip_es.evaluate",
    "load_clip": "clip_es.model.resolve",
    "ClassSpec": "clip_es.data.base",
    "ClipEsError": "clip_es.errors",
}

__all__ = ["__version__", *_LAZY]

if TYPE_CHECKING:  # for type checkers and IDEs; at run time the names come from __getattr__
    from clip_es.cam.run import CamConfig, generate_cams
    from clip_es.data.base import ClassSpec
    from clip_es.errors import ClipEsError
    from clip_es.evaluate import EvalOptions, evaluate_run
    from clip_es.export import export_run, import_masks
    from clip_es.label import LabelConfig, label_folder
    from clip_es.labeler import Labeler, PseudoMask
    from clip_es.model.resolve import load_clip
    from clip_es.refine.run import RefineConfig, refine_masks
    from clip_es.segmenter import Segmenter
    from clip_es.train.loop import TrainConfig, train_segmenter
    from clip_es.train.segment import SegmentConfig, segment


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'clip_es' has no attribute {name!r}; public names: {', '.join(__all__)}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
