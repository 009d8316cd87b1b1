"""The bundled clipes-tiny is a faithful testbed: it names the classes and its CAMs find them.

Guards the shipped checkpoint against a regression (a re-trained model with high mAP whose
CAMs light up the most salient object for every class, which would make every quality
table of the project meaningless). Held-out toy images (world seed 1; the recipe trains on
seed 1000), default cam settings. The floors sit a few points under what the shipped
checkpoint measures on these 40 images (see pipelines/toy/RESULTS.md for the full-val figures).
"""

from __future__ import annotations

import pytest

from clip_es.cam.run import CamConfig, generate_cams
from clip_es.data.registry import open_dataset
from clip_es.data.toy import make_toy
from clip_es.evaluate import EvalOptions, evaluate_run
from clip_es.model.resolve import load_clip
from clip_es.model.tiny import TINY_CHECKPOINT
from clip_es.model.zeroshot import zero_shot_map

pytestmark = pytest.mark.skipif(not TINY_CHECKPOINT.is_file(), reason="bundled weights not built")

# The shipped checkpoint (run 9) measures mAP 0.994 / 1.000, CAM mIoU 0.590 (worst class 0.389)
# and CAA mIoU 0.590 (worst class 0.329) here; the salient-object failure the floors guard
# against scored 0.20-0.30 CAM mIoU, and attention that does not group objects puts CAA
# 10-16 points under CAM (runs 2-7).
MAP_FLOOR = 0.95
CAM_FLOOR = 0.55
CAA_FLOOR = 0.52
CLASS_FLOOR = 0.25


@pytest.fixture(scope="module")
def held_out(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy_held_out")
    make_toy(root, n=200, seed=1)  # val = the last 40
    return root


@pytest.fixture(scope="module")
def tiny():
    return load_clip("clipes-tiny")


def test_bundled_clip_names_the_classes_under_both_poolings(held_out, tiny):
    ds = open_dataset("toy", held_out, "val")
    for pooling in ("mean", "cls"):
        assert zero_shot_map(tiny, ds, pooling=pooling)["map"] >= MAP_FLOOR, pooling


def test_bundled_clip_cams_localize_the_named_class(held_out, tiny, tmp_path):
    generate_cams(CamConfig(dataset="toy", root=str(held_out), split="val", out=str(tmp_path / "run")),
                  clip=tiny, progress=False)
    stages = evaluate_run(tmp_path / "run", EvalOptions(stages=("cam", "caa")), progress=False)["stages"]
    for name, floor in (("cam", CAM_FLOOR), ("caa", CAA_FLOOR)):
        rep = stages[name]
        assert rep["images"] == 40
        assert rep["miou"] >= floor, (name, rep["per_class"])
        # every class is found: no foreground class collapses to the salient-object failure
        fg = {k: v for k, v in rep["per_class"].items() if k != "background" and v is not None}
        assert len(fg) == 8 and min(fg.values()) >= CLASS_FLOOR, (name, fg)
