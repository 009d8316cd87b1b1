"""cam -> refine -> export -> eval on small VOC-layout and COCO fixtures (not only the toy world)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from clip_es.cam.run import CamConfig, generate_cams
from clip_es.evaluate import EvalOptions, evaluate_run
from clip_es.export import export_coco
from clip_es.refine.run import RefineConfig, refine_masks
from tests.test_datasets import COCO_IDS, _coco, _voc


def _pipeline(kind, root, split, run, clip_path):
    res = generate_cams(CamConfig(dataset=kind, root=str(root), split=split, out=str(run), model=str(clip_path),
                                  background="none"), progress=False)
    assert res.ok, res.failed
    res = refine_masks(RefineConfig(run=str(run), workers=1), progress=False)
    assert res.ok, res.failed
    return res


def test_voc_fixture_end_to_end(tmp_path, tiny_clip_path):
    root = _voc(tmp_path)
    run = tmp_path / "run"
    _pipeline("voc", root, "train", run, tiny_clip_path)
    man = json.loads((run / "manifest.json").read_text())
    assert len(man["classes"]) == 20 and man["category_ids"] == list(range(1, 21))
    exp = json.loads(Path(export_coco(run, tmp_path / "voc.json", progress=False).path).read_text())
    # image "a" is labelled person + dog: only those classes can appear (ids 15, 12)
    (int_a,) = [im["id"] for im in exp["images"] if im["source_id"] == "a"]  # integer ids, source id kept
    ids_a = {a["category_id"] for a in exp["annotations"] if a["image_id"] == int_a}
    assert ids_a <= {12, 15}
    val = tmp_path / "val"
    _pipeline("voc", root, "val", val, tiny_clip_path)
    rep = evaluate_run(val, EvalOptions(stages=("cam", "caa", "crf", "masks")), progress=False)
    assert rep["stages"]["masks"]["images"] == 1


def test_coco_fixture_end_to_end(tmp_path, tiny_clip_path):
    root = _coco(tmp_path)
    run = tmp_path / "run"
    _pipeline("coco", root, "val2014", run, tiny_clip_path)
    out = tmp_path / "coco.json"
    exp = json.loads(Path(export_coco(run, out, progress=False).path).read_text())
    assert [c["id"] for c in exp["categories"]] == list(COCO_IDS)
    by_image: dict = {}
    for a in exp["annotations"]:
        by_image.setdefault(a["image_id"], set()).add(a["category_id"])
    assert by_image.get(139, set()) <= {1, 17, 18}  # person, cat, dog: the image's own COCO ids
    assert 200 not in by_image  # no annotations -> no labels -> all background
    rep = evaluate_run(run, EvalOptions(stages=("cam", "masks")), progress=False)
    assert rep["stages"]["cam"]["images"] == 3 and np.isfinite(rep["stages"]["cam"]["miou"])
