"""Pictures: ``clipes show`` columns (segmenter, aligned rows without ground truth), the
display palette, and ``clipes segment --overlay``."""

from __future__ import annotations

import shutil
from itertools import combinations

import cv2
import numpy as np

from clip_es.data.image_io import image_size, voc_palette
from clip_es.visualize import _lab, ascii_text, display_palette, image_row, show_run
from tests.conftest import run_cli
from tests.test_segmenter import base_run, trained  # noqa: F401 - session fixtures (a 4-step segmenter)


def test_display_palette_neighbours_and_pairs_are_distinct():
    lab = _lab(display_palette()[1:255])
    neighbours = np.linalg.norm(lab[1:] - lab[:-1], axis=1)
    assert neighbours.min() > 30  # classes k and k+1 never look alike (Lab units)
    assert min(np.linalg.norm(lab[a] - lab[b]) for a, b in combinations(range(80), 2)) > 20  # 80 COCO classes
    voc = np.asarray(voc_palette(), np.uint8).reshape(256, 3)
    assert not np.array_equal(voc[1:21], display_palette()[1:21])  # masks keep VOC colours; display does not


def test_rows_stay_aligned_when_some_lack_ground_truth():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)
    cam = rng.random((1, 20, 30)).astype(np.float32)
    mask = np.zeros((20, 30), np.uint8)
    mask[5:10, 5:10] = 1
    cols = ("gt", "mask", "seg")
    with_gt = image_row("a", image, np.array([0]), cam, cam, ["x"], gt=mask, mask=mask, seg=mask, columns=cols)
    without = image_row("b", image, np.array([0]), cam, cam, ["x"], gt=None, mask=mask, seg=None, columns=cols)
    caps = [t.caption for t in with_gt.tiles]
    assert caps == [t.caption for t in without.tiles] == ["image", "ground truth", "pseudo mask", "segmenter",
                                                          "CAM x", "CAA x"]
    assert without.tiles[1].image is None and "no ground truth" in without.tiles[1].note
    assert without.tiles[3].image is None and with_gt.tiles[3].image is not None
    # no columns given: only what the row has (the pure function's old behaviour)
    assert [t.caption for t in image_row("b", image, np.array([0]), cam, cam, ["x"], mask=mask).tiles] == \
        ["image", "pseudo mask", "CAM x", "CAA x"]


def test_show_has_a_segmenter_column_when_the_run_has_one(trained, tmp_path):  # noqa: F811
    with_seg = cv2.imread(str(show_run(trained, tmp_path / "a.png", tile=100)))
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    (run / "segmenter" / "last.pt").unlink()
    without = cv2.imread(str(show_run(run, tmp_path / "b.png", tile=100)))
    assert with_seg.shape[1] - without.shape[1] == 100 + 6  # one more tile (and its gap)


def test_segment_overlay(trained, toy_root, tmp_path):  # noqa: F811
    ckpt = str(trained / "segmenter" / "last.pt")
    out = tmp_path / "pred"
    argv = ["segment", "--checkpoint", ckpt, "--images", str(toy_root / "JPEGImages"), "--out", str(out),
            "--limit", "2", "--device", "cpu"]
    assert run_cli(argv) == 0
    assert not list(out.glob("*.overlay.jpg"))
    masks = {p: p.stat().st_mtime_ns for p in out.glob("*.png")}
    assert run_cli(argv + ["--overlay"]) == 0  # added to the earlier predictions, which stay as they were
    overlays = sorted(out.glob("*.overlay.jpg"))
    assert len(overlays) == 2 and {p: p.stat().st_mtime_ns for p in out.glob("*.png")} == masks
    for p in overlays:
        stem = p.name[: -len(".overlay.jpg")]
        img = cv2.imread(str(p))
        assert img.shape[:2] == image_size(toy_root / "JPEGImages" / f"{stem}.jpg")
        assert (out / f"{stem}.png").is_file()
    fresh = tmp_path / "fresh"
    assert run_cli(argv[:5] + ["--out", str(fresh), "--limit", "1", "--device", "cpu", "--overlay"]) == 0
    assert len(list(fresh.glob("*.overlay.jpg"))) == len(list(fresh.glob("*.png"))) == 1


def test_captions_drop_accents_for_the_ascii_font():
    assert ascii_text("chien café (1)") == "chien cafe (1)"
    assert ascii_text("熊 ñ") == "? n"
