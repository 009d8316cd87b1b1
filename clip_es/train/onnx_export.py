"""``clipes export-onnx``: a trained segmenter as one ONNX graph with its class text baked in.

The graph:

* input ``image``: ``(1, 3, H, W)`` float32 RGB in [0, 1] (normalisation is inside);
  ``H`` and ``W`` are dynamic. Any size works and gives what ``clipes segment``
  computes: the graph pads the input to multiples of 32 with the normalisation mean and
  crops the logits back, by the same rule (:func:`~clip_es.train.segment.pad_to_stride`);
* output ``logits``: ``(1, K+1, H, W)`` float32; channel 0 = background, ``k + 1`` =
  class ``k``; the label map is ``argmax`` over channels.

The class list (names and synonyms, in channel order) is stored in the model's
metadata under ``clipes.classes`` (JSON). Exported with the TorchScript-based exporter
(``dynamo=False``), which needs no extra package.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Sequence

import torch

from clip_es.data.base import ClassSpec
from clip_es.errors import ClipEsError, ConfigError, first_line
from clip_es.train.segment import load_segmenter, pad_to_stride
from clip_es.train.text import specs_to_lists

log = logging.getLogger(__name__)


class PaddedSegmenter(torch.nn.Module):
    """``forward(x) -> (B, K+1, H, W)`` for any ``H, W``: pad with :func:`pad_to_stride`,
    run the bound segmenter, crop back (what :func:`~clip_es.train.segment.predict_logits` does).

    Args:
        bound: ``forward(x) -> logits`` with the class text baked in (a family module's ``export_module``).
        mean: ``(1, 3, 1, 1)`` padding colour; stride: padding multiple (both the family module's).
    """

    def __init__(self, bound: torch.nn.Module, mean: torch.Tensor, stride: int):
        super().__init__()
        self.bound = bound
        self.register_buffer("mean", mean.detach().clone(), persistent=False)
        self.stride = int(stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        H, W = x.shape[-2], x.shape[-1]
        return self.bound(pad_to_stride(x, self.mean, self.stride))[:, :, :H, :W]


def export_onnx(checkpoint: str | Path, out: str | Path, classes: Sequence[ClassSpec] | None = None,
                height: int = 512, width: int = 512, opset: int = 17, dynamic: bool = True,
                clip_model: str | None = None, clip_pretrained: str | None = None) -> Path:
    """Export ``checkpoint`` to ``out`` (``.onnx``); returns the path.

    Args:
        checkpoint: segmenter checkpoint.
        out: output file.
        classes: class list to bake in (default: the trained classes; new names need the CLIP).
        height, width: example input size used for tracing.
        opset: ONNX opset.
        dynamic: make ``H`` and ``W`` dynamic axes.

    Raises:
        ClipEsError: export failure (with the exporter's message).
    """
    if height < 32 or width < 32:
        raise ConfigError(f"example size must be at least 32x32, got {height}x{width}")
    seg = load_segmenter(checkpoint, "cpu").with_classes(classes, clip_model, clip_pretrained)
    # a family that cannot be exported says why (ConfigError) before any file is touched
    bound = PaddedSegmenter(seg.model.export_module(seg.text), seg.model.mean, seg.model.stride).eval()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    example = torch.rand(1, 3, height, width)
    axes = {"image": {2: "height", 3: "width"}, "logits": {2: "height", 3: "width"}} if dynamic else None
    tmp = out.with_name(f".tmp-{out.name}")
    try:
        with warnings.catch_warnings():  # the legacy exporter's deprecation notice and benign tracer notes
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            torch.onnx.export(bound, (example,), str(tmp), input_names=["image"], output_names=["logits"],
                              dynamic_axes=axes, opset_version=opset, dynamo=False, do_constant_folding=True)
        import onnx

        m = onnx.load(str(tmp))
        for key, value in (("clipes.classes", json.dumps(specs_to_lists(seg.classes))),
                           ("clipes.input", "image: (1, 3, H, W) float32 RGB in [0, 1]"),
                           ("clipes.output", "logits: (1, K+1, H, W); channel 0 background, k+1 class k"),
                           ("clipes.checkpoint", str(checkpoint)), ("clipes.step", str(seg.step))):
            prop = m.metadata_props.add()
            prop.key, prop.value = key, value
        onnx.checker.check_model(m)
        onnx.save(m, str(tmp))
        tmp.replace(out)
    except ClipEsError:
        raise
    except Exception as e:
        raise ClipEsError(f"ONNX export of {checkpoint} failed: {type(e).__name__}: {first_line(e, 300)}") \
            from e
    finally:
        tmp.unlink(missing_ok=True)
    log.info("wrote %s (%d classes)", out, len(seg.classes))
    return out
