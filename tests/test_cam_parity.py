"""Issue 15, part 1: the arithmetic rules the cam stage shares with the CLIP-ES release.

Each rule is pinned on a small synthetic input (SPEC section 2): the input size and PIL
bicubic resize, the float box threshold, float64 CAA, inclusive boxes.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from clip_es.cam import run as cam_run
from clip_es.cam.caa import balance_affinity, box_mask, caa_refine
from clip_es.cam.run import CamConfig, build_engine, input_size, preprocess
from clip_es.model.inputs import normalise
from clip_es.data.registry import open_dataset

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


def _image(h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    return cv2.GaussianBlur(img, (3, 3), 0)  # some structure, as photos have


# ----------------------------------------------------------------------------- resize rule
@pytest.mark.parametrize("size, scale, patch, expected", [
    ((375, 500), 1.0, 16, (384, 512)),
    ((375, 500), 0.75, 16, (288, 384)),   # ceil(281.25 / 16) = 18, ceil(375 / 16) = 24
    ((500, 375), 1.25, 16, (640, 480)),   # ceil(625 / 16) = 40, ceil(468.75 / 16) = 30
    ((375, 500), 1.0, 14, (378, 504)),    # the model's own patch size, not 16
    ((8, 8), 1.0, 16, (16, 16)),          # smaller than a patch: one patch
    ((384, 512), 1.0, 16, (384, 512)),    # already a multiple: unchanged
])
def test_input_size_is_ceil_of_scaled_side_to_the_patch(size, scale, patch, expected):
    assert input_size(size, scale, patch) == expected
    h, w = expected
    assert h == math.ceil(size[0] * scale / patch) * patch and w == math.ceil(size[1] * scale / patch) * patch


@pytest.mark.parametrize("flip", [False, True])
def test_preprocess_is_pil_bicubic_on_uint8_then_normalised(flip):
    img = _image(37, 53)
    x = preprocess(img, 1.0, 16, MEAN, STD, flip=flip)
    assert x.shape == (1, 3, 48, 64) and x.dtype == torch.float32
    src = np.ascontiguousarray(img[:, ::-1] if flip else img)
    ref = np.asarray(Image.fromarray(src).resize((64, 48), Image.Resampling.BICUBIC), np.float32) / 255.0
    ref = (ref - np.asarray(MEAN, np.float32)) / np.asarray(STD, np.float32)
    assert np.array_equal(x[0].permute(1, 2, 0).numpy(), ref)
    # OpenCV's cubic kernel is a different resize: the rule is not met by it
    cv = cv2.resize(src, (64, 48), interpolation=cv2.INTER_CUBIC).astype(np.float32) / 255.0
    cv = (cv - np.asarray(MEAN, np.float32)) / np.asarray(STD, np.float32)
    assert np.abs(cv - ref).max() > 0.05


def test_engine_resizes_with_the_models_patch_size(tiny_clip, toy_root, tmp_path):
    ds = open_dataset("toy", toy_root, "train")
    engine = build_engine(CamConfig(dataset="toy", root=str(toy_root), split="train", out=str(tmp_path),
                                    model="x", templates=("a photo of a {}.",), scales=(0.7,)), ds.classes,
                          tiny_clip)
    img = _image(45, 70)
    item = engine.prepare(img)
    p = tiny_clip.patch_size
    assert item.views[0].shape[-2:] == input_size((45, 70), 0.7, p)
    assert item.views[0].dtype == torch.uint8  # normalised on the model's device
    assert torch.equal(normalise(item.views[0], tiny_clip.mean, tiny_clip.std),
                       preprocess(img, 0.7, p, tiny_clip.mean, tiny_clip.std))


# ----------------------------------------------------------------------------- box threshold rule
def test_box_threshold_is_on_the_float_map():
    cam = np.zeros((3, 11), np.float32)
    cam[1, 0] = 1.0      # the peak
    cam[1, 2] = 0.4      # exactly threshold * max: kept (>=)
    cam[1, 4] = 0.402    # above 0.4 but below the uint8 cut 0.4039: kept
    cam[1, 6] = 0.3999   # just below: dropped
    cam[1, 8] = 0.41     # kept
    m = box_mask(cam, 0.4)
    assert m[1].tolist() == [1, 0, 1, 0, 1, 0, 0, 0, 1, 0, 0]
    assert m.sum() == 4


def test_box_threshold_is_relative_to_the_maps_maximum_and_empty_for_a_zero_map():
    cam = np.zeros((1, 7), np.float32)
    cam[0, 0], cam[0, 2], cam[0, 4] = 0.5, 0.2, 0.1999  # cut at 0.4 * 0.5 = 0.2
    assert box_mask(cam, 0.4)[0].tolist() == [1, 0, 1, 0, 0, 0, 0]
    assert box_mask(np.zeros((4, 4), np.float32), 0.4).sum() == 0  # no positive pixel: no box
    assert box_mask(cam, 0.7)[0].tolist() == [1, 0, 0, 0, 0, 0, 0]


# ----------------------------------------------------------------------------- boxes inclusive
def test_boxes_keep_their_last_row_and_column_at_the_border():
    """The release would clip this box's end to width-1/height-1 and drop row 4 and column 5."""
    cam = np.zeros((5, 6), np.float32)
    cam[2:, 3:] = 1.0
    cam[3, 4] = 0.2  # below the cut, inside the box: still in the box
    m = box_mask(cam, 0.4)
    expected = np.zeros((5, 6), np.uint8)
    expected[2:, 3:] = 1
    assert np.array_equal(m, expected)


# ----------------------------------------------------------------------------- float64 CAA
def _near_flat(n_side: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A transition matrix within 1e-7 of uniform and CAMs in [0.5, 1] (one box covers all):
    the propagated map is flat to ~1e-7, so min-max magnifies any rounding."""
    n = n_side * n_side
    g = torch.Generator().manual_seed(seed)
    noise = torch.rand(n, n, generator=g, dtype=torch.float64) * 1e-7
    trans = (torch.full((n, n), 1.0 / n, dtype=torch.float64) + (noise + noise.t()) / 2).float()
    cams = 0.5 + 0.5 * torch.rand(2, n_side, n_side, generator=g)
    cams[:, 0, 0] = 1.0
    return trans, cams


def test_caa_product_and_minmax_are_float64():
    trans, cams = _near_flat()
    out = caa_refine(cams, trans, 0.4)
    assert out.dtype == cams.dtype
    t64 = trans.double().numpy()
    for i in range(2):
        ref = t64 @ cams[i].double().numpy().reshape(-1)
        ref = (ref - ref.min()) / (ref.max() - ref.min())
        assert np.abs(out[i].numpy().reshape(-1) - ref).max() < 1e-6, i
    # the float32 product and min-max are far off on this input (what the rule is for)
    f32 = trans @ cams[0].reshape(-1)
    f32 = (f32 - f32.min()) / (f32.max() - f32.min())
    ref = t64 @ cams[0].double().numpy().reshape(-1)
    ref = (ref - ref.min()) / (ref.max() - ref.min())
    assert np.abs(f32.double().numpy() - ref).max() > 1e-3


def test_caa_zero_columns_outside_the_boxes():
    n_side = 4
    trans = torch.rand(16, 16, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    cams = torch.zeros(1, n_side, n_side)
    cams[0, 0, 0], cams[0, 0, 1], cams[0, 3, 3] = 1.0, 0.9, 0.3  # (3, 3) is below the cut: outside the box
    out = caa_refine(cams, trans, 0.4)
    v = cams[0].double().reshape(-1).clone()
    v[15] = 0.0
    ref = trans @ v
    ref = (ref - ref.min()) / (ref.max() - ref.min())
    assert torch.allclose(out[0].double().reshape(-1), ref, atol=1e-6)


def test_balancing_keeps_float64_and_the_engine_feeds_caa_float64(tiny_clip, toy_root, tmp_path, monkeypatch):
    attn = torch.rand(9, 9, generator=torch.Generator().manual_seed(0)).softmax(-1)
    assert balance_affinity(attn.double()).dtype == torch.float64
    seen = []
    real = cam_run.caa_refine

    def spy(cams, trans, threshold, **kw):
        seen.append(trans.dtype)
        return real(cams, trans, threshold, **kw)

    monkeypatch.setattr(cam_run, "caa_refine", spy)
    ds = open_dataset("toy", toy_root, "train")
    engine = build_engine(CamConfig(dataset="toy", root=str(toy_root), split="train", out=str(tmp_path),
                                    model="x", templates=("a photo of a {}.",), precision="fp32"), ds.classes,
                          tiny_clip)
    image_id = ds.ids()[0]
    engine.compute(ds.load_image(image_id), list(ds.labels(image_id)))
    assert seen == [torch.float64]
