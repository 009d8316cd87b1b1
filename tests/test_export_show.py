"""``clipes export`` (COCO RLE JSON, PNG folder) and ``clipes show`` on a refined toy run."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from clip_es.errors import ConfigError, RunDirError
from clip_es.export import export_coco, export_png, mask_to_annotations
from clip_es.refine.crf import IGNORE
from clip_es.refine.run import RefineConfig, refine_masks
from clip_es.refine.store import CONF, MASKS, output_ids, output_path, read_output
from clip_es.visualize import show_run
from tests.conftest import run_cli


@pytest.fixture(scope="module")
def refined(tmp_path_factory, toy_root, tiny_clip_path) -> Path:
    """cam + refine (confidence saved, a soft threshold so masks have classes) on 5 toy images."""
    from clip_es.cam.run import CamConfig, generate_cams

    out = tmp_path_factory.mktemp("export") / "run"
    generate_cams(CamConfig(dataset="toy", root=str(toy_root), split="train", out=str(out), limit=5,
                            model=str(tiny_clip_path), templates=("a photo of a {}.",)), progress=False)
    res = refine_masks(RefineConfig(run=str(out), conf=0.6, save_conf=True, workers=1), progress=False)
    assert res.ok and res.done == 5
    return out


# ============================================================================ export


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pycocotools' decode vs numpy 2
def test_coco_rles_decode_to_the_png_masks(refined: Path, tmp_path: Path) -> None:
    from pycocotools import mask as mask_utils

    res = export_coco(refined, tmp_path / "sub" / "masks.json", progress=False)
    doc = json.loads((tmp_path / "sub" / "masks.json").read_text())
    manifest = json.loads((refined / "manifest.json").read_text())
    assert [c["id"] for c in doc["categories"]] == manifest["category_ids"]
    assert [c["name"] for c in doc["categories"]] == manifest["classes"]
    ids = output_ids(refined, MASKS)
    assert [im["source_id"] for im in doc["images"]] == ids and res.images == 5
    assert [im["id"] for im in doc["images"]] == [1, 2, 3, 4, 5]  # integers (COCO readers need them)
    assert [im["file_name"] for im in doc["images"]] == [f"{i}.jpg" for i in ids]
    assert res.annotations == len(doc["annotations"]) > 0
    assert len({a["id"] for a in doc["annotations"]}) == len(doc["annotations"])
    cat_to_label = {c: k + 1 for k, c in enumerate(manifest["category_ids"])}
    for im in doc["images"]:
        mask = read_output(output_path(refined, MASKS, im["source_id"]))
        conf = read_output(output_path(refined, CONF, im["source_id"]))
        assert (im["height"], im["width"]) == mask.shape
        rebuilt = np.zeros_like(mask)
        anns = [a for a in doc["annotations"] if a["image_id"] == im["id"]]
        for a in anns:
            region = mask_utils.decode(a["segmentation"]).astype(bool)
            label = cat_to_label[a["category_id"]]
            np.testing.assert_array_equal(region, mask == label)  # exactly that class's non-ignored pixels
            assert not (rebuilt[region]).any()  # one RLE per (image, class): no overlaps
            rebuilt[region] = label
            assert a["area"] == int(region.sum())
            assert a["score"] == pytest.approx(conf[region].mean() / 255, abs=1e-5) and 0 <= a["score"] <= 1
        present = set(np.unique(mask)) - {0, IGNORE}
        assert {cat_to_label[a["category_id"]] for a in anns} == present
        keep = (mask != 0) & (mask != IGNORE)
        np.testing.assert_array_equal(rebuilt[keep], mask[keep])


def test_mask_to_annotations_without_conf_scores_one() -> None:
    mask = np.array([[0, 2, 2], [255, 2, 1]], np.uint8)
    anns = mask_to_annotations(mask, [10, 20])
    assert [(a["category_id"], a["area"], a["score"]) for a in anns] == [(10, 1, 1.0), (20, 3, 1.0)]
    with pytest.raises(RunDirError):
        mask_to_annotations(np.full((2, 2), 3, np.uint8), [10, 20])


def test_png_export_copies_masks_and_writes_classes(refined: Path, tmp_path: Path) -> None:
    res = export_png(refined, tmp_path / "pngs", progress=False)
    ids = output_ids(refined, MASKS)
    assert res.images == len(ids)
    for image_id in ids:
        copied = (tmp_path / "pngs" / f"{image_id}.png").read_bytes()
        assert copied == output_path(refined, MASKS, image_id).read_bytes()
    classes = json.loads((refined / "manifest.json").read_text())["classes"]
    assert (tmp_path / "pngs" / "classes.txt").read_text().splitlines() == classes
    from clip_es.data.base import read_class_file  # usable as --class-file

    assert [c.name for c in read_class_file(tmp_path / "pngs" / "classes.txt")] == classes


def test_export_errors(refined: Path, tmp_path: Path) -> None:
    from clip_es.export import export_run

    with pytest.raises(ConfigError, match="--format"):
        export_run(refined, "yaml", tmp_path / "x")
    with pytest.raises(ConfigError, match="folder"):
        export_coco(refined, tmp_path, progress=False)
    with pytest.raises(RunDirError, match="manifest"):
        export_coco(tmp_path / "nothing", tmp_path / "m.json", progress=False)


def test_cli_export(refined: Path, tmp_path: Path, capsys) -> None:
    assert run_cli(["export", "--run", str(refined), "--format", "coco", "--out", str(tmp_path / "m.json")]) == 0
    assert json.loads((tmp_path / "m.json").read_text())["annotations"]
    assert run_cli(["export", "--run", str(refined), "--format", "png", "--out", str(tmp_path / "d")]) == 0
    assert (tmp_path / "d" / "classes.txt").is_file()
    assert run_cli(["export", "--run", str(refined), "--format", "bmp", "--out", str(tmp_path / "e")]) == 2
    assert "coco, png" in capsys.readouterr().err


# ============================================================================ show


def test_show_one_image_and_contact_sheet(refined: Path, tmp_path: Path) -> None:
    ids = output_ids(refined, MASKS)
    one = cv2.imread(str(show_run(refined, tmp_path / "one.png", ids=[ids[1]])))
    assert one is not None and one.ndim == 3
    h1, w1 = one.shape[:2]
    assert 200 <= h1 <= 600 and 5 * 200 <= w1 <= 30 * 206  # at least image, GT, mask, CRF, CAM+CAA
    sheet = cv2.imread(str(show_run(refined, tmp_path / "sheet.png", n=3, tile=120)))
    assert sheet.shape[0] > 3 * 96 and sheet.shape[0] < 3 * 250 + 200
    assert sheet.std() > 10  # not a blank canvas
    start = cv2.imread(str(show_run(refined, tmp_path / "from.png", ids=[ids[2]], n=2, tile=120)))
    assert start.shape[0] < sheet.shape[0]


def test_show_errors(refined: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no cam output"):
        show_run(refined, tmp_path / "x.png", ids=["nope"])
    with pytest.raises(ConfigError, match=".png"):
        show_run(refined, tmp_path / "x.jpg")
    with pytest.raises(ConfigError, match="--n"):
        show_run(refined, tmp_path / "x.png", n=0)


def test_cli_show(refined: Path, tmp_path: Path, capsys) -> None:
    ids = output_ids(refined, MASKS)
    assert run_cli(["show", "--run", str(refined), "--id", ids[0], "--out", str(tmp_path / "s.png")]) == 0
    assert (tmp_path / "s.png").stat().st_size > 1000
    assert run_cli(["show", "--run", str(refined), "--n", "2", "--out", str(tmp_path / "t.png")]) == 0
    assert run_cli(["show", "--run", str(refined), "--id", "missing", "--out", str(tmp_path / "u.png")]) == 2
