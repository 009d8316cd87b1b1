"""The exported ONNX graph computes what ``clipes segment`` computes at any input size,
including sizes that are not multiples of 32 (the graph pads as segment does)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.test_segmenter import base_run, trained  # noqa: F401 - session fixtures (a 4-step segmenter)


@pytest.mark.parametrize("h, w", [(375, 500), (45, 77)])
def test_onnx_matches_segment_at_odd_sizes(trained, tmp_path, h, w):  # noqa: F811
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from clip_es.train.onnx_export import export_onnx
    from clip_es.train.segment import load_segmenter, predict_labels, predict_logits

    torch.set_num_threads(1)
    ckpt = trained / "segmenter" / "last.pt"
    path = export_onnx(ckpt, tmp_path / "m.onnx", height=64, width=64)  # traced at a multiple of 32
    seg = load_segmenter(ckpt)
    image = np.random.default_rng(h).integers(0, 256, (h, w, 3), dtype=np.uint8)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = (image.astype(np.float32) / 255).transpose(2, 0, 1)[None]
    (got,) = sess.run(["logits"], {"image": np.ascontiguousarray(x)})
    ref = predict_logits(seg, image).numpy()
    assert got.shape == (1, len(seg.classes) + 1, h, w)
    assert np.abs(got[0] - ref).max() < 1e-3
    labels = predict_labels(seg, image, max_side=None)
    assert (got[0].argmax(0) == labels).mean() > 0.999  # ties aside, the same label map
