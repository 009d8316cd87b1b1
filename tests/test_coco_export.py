"""The COCO export is read by pycocotools as COCO tools read it: real file names with their
extension, integer image ids (COCO's own for COCO runs), the run's id kept as ``source_id``."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest

from clip_es.export import export_coco
from clip_es.refine.run import RefineConfig, refine_masks
from clip_es.refine.store import MASKS, output_path, read_output

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pycocotools vs numpy 2


def _read_back(path: Path):
    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(path))
        res = gt.loadRes(json.loads(path.read_text(encoding="utf-8"))["annotations"])
    return gt, res


def _run(kind, root, split, out, clip_path, **kw):
    from clip_es.cam.run import CamConfig, generate_cams

    assert generate_cams(CamConfig(dataset=kind, root=str(root), split=split, out=str(out), model=str(clip_path),
                                   device="cpu", **kw), progress=False).ok
    assert refine_masks(RefineConfig(run=str(out), conf=0.5, workers=1), progress=False).ok
    return out


def test_toy_run_reads_back_with_pycocotools(toy_root, tmp_path, tiny_clip_path):
    run = _run("toy", toy_root, "train", tmp_path / "run", tiny_clip_path, limit=4)
    path = Path(export_coco(run, tmp_path / "coco.json", progress=False).path)
    gt, res = _read_back(path)
    imgs = gt.loadImgs(gt.getImgIds())
    assert [im["id"] for im in imgs] == [1, 2, 3, 4]
    assert all(type(im["id"]) is int for im in imgs)
    for im in imgs:
        assert im["file_name"] == f"{im['source_id']}.jpg" and (toy_root / "JPEGImages" / im["file_name"]).is_file()
    assert len(res.getAnnIds()) == len(gt.getAnnIds()) > 0
    for ann in res.loadAnns(res.getAnnIds()):  # each result decodes to its image's pseudo mask region
        im = gt.loadImgs(ann["image_id"])[0]
        mask = read_output(output_path(run, MASKS, im["source_id"]))
        assert res.annToMask(ann).shape == mask.shape == (im["height"], im["width"])
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):  # the masks scored against themselves: a perfect AP
        ev = COCOeval(gt, res, "segm")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    assert ev.stats[0] == pytest.approx(1.0)
    again = json.loads(Path(export_coco(run, tmp_path / "again.json", progress=False).path).read_text())
    assert again["images"] == json.loads(path.read_text())["images"]  # the same numbers every export


def test_coco_run_keeps_coco_ids_and_file_names(tmp_path, tiny_clip_path):
    from tests.test_datasets import _coco

    root = _coco(tmp_path)
    run = _run("coco", root, "val2014", tmp_path / "run", tiny_clip_path, background="none")
    gt, _ = _read_back(Path(export_coco(run, tmp_path / "coco.json", progress=False).path))
    imgs = {im["id"]: im for im in gt.loadImgs(gt.getImgIds())}
    assert sorted(imgs) == [5, 139, 200]
    assert imgs[139]["file_name"] == "COCO_val2014_000000000139.jpg"
    assert imgs[139]["source_id"] == "COCO_val2014_000000000139"


def test_moved_dataset_falls_back_to_ids(toy_root, tmp_path, tiny_clip_path, caplog):
    import shutil

    copy = tmp_path / "toy"
    shutil.copytree(toy_root, copy)
    run = _run("toy", copy, "train", tmp_path / "run", tiny_clip_path, limit=2)
    shutil.rmtree(copy)
    doc = json.loads(Path(export_coco(run, tmp_path / "c.json", progress=False).path).read_text())
    assert [im["id"] for im in doc["images"]] == [1, 2]
    assert [im["file_name"] for im in doc["images"]] == [im["source_id"] for im in doc["images"]]
    assert "cannot be reopened" in caplog.text
    assert np.all([a["image_id"] in (1, 2) for a in doc["annotations"]])
