"""The refine stage: the CRF core on tiny arrays, and the runner on the toy fixture
(outputs, --no-crf, resume == fresh, workers=2 == workers=1, refused params, failures, CLI)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from clip_es.cam.store import load_cam
from clip_es.errors import ConfigError, RunDirError
from clip_es.evaluate import scores_to_labels
from clip_es.refine.crf import (IGNORE, CrfParams, conf_to_uint8, dense_crf, labels_from_q, scores_to_probs,
                                stack_scores)
from clip_es.refine.run import RefineConfig, refine_masks
from clip_es.refine.store import CONF, CRF, MASKS, output_ids, output_path, read_output
from clip_es.rundir import RunDir
from tests.conftest import run_cli

NUM_TOY_CLASSES = 8

# ============================================================================ fixtures / helpers


@pytest.fixture(scope="module")
def cam_run(tmp_path_factory, toy_root, tiny_clip_path) -> Path:
    """A run folder with only the cam stage done on the toy train split (9 images). Read-only: copy it."""
    from clip_es.cam.run import CamConfig, generate_cams

    out = tmp_path_factory.mktemp("refine") / "cam_run"
    res = generate_cams(CamConfig(dataset="toy", root=str(toy_root), split="train", out=str(out),
                                  model=str(tiny_clip_path), templates=("a photo of a {}.",)), progress=False)
    assert res.ok and res.done == 9
    return out


def _copy_run(cam_run: Path, dst: Path) -> Path:
    shutil.copytree(cam_run, dst)
    return dst


@pytest.fixture(scope="module")
def reference(cam_run, tmp_path_factory) -> Path:
    """A fresh full refine (workers=1, confidence saved) of a copy of ``cam_run``."""
    run = _copy_run(cam_run, tmp_path_factory.mktemp("ref") / "run")
    res = refine_masks(RefineConfig(run=str(run), workers=1, save_conf=True), progress=False)
    assert res.ok and res.done == 9 and res.skipped == 0
    return run


def _outputs(run: Path) -> dict[str, bytes]:
    return {f"{p.parent.name}/{p.name}": p.read_bytes() for p in sorted((run / "refine").glob("*/*.png"))}


# ============================================================================ pure core


def test_stack_scores_background_and_probs() -> None:
    maps = np.array([[[0.2, 0.9]], [[0.5, 0.1]]], np.float32)  # (K=2, 1, 2)
    before = maps.copy()
    s = stack_scores(maps, alpha=2.0)
    assert s.shape == (3, 1, 2) and s.dtype == np.float32
    np.testing.assert_allclose(s[0], (1 - np.array([[0.5, 0.9]])) ** 2, rtol=1e-6)
    np.testing.assert_array_equal(s[1:], maps)
    p = scores_to_probs(np.zeros((3, 4, 5), np.float32))
    np.testing.assert_allclose(p, 1 / 3, rtol=1e-6)
    np.testing.assert_allclose(scores_to_probs(s).sum(0), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(maps, before)
    assert stack_scores(np.zeros((0, 3, 4), np.float32)).shape == (1, 3, 4)


def test_dense_crf_shapes_ranges_and_inputs_untouched() -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
    image[:, 16:] = 200  # two regions so the bilateral term has structure
    probs = scores_to_probs(stack_scores(rng.random((3, 24, 32)).astype(np.float32)))
    img0, p0 = image.copy(), probs.copy()
    q = dense_crf(image, probs, CrfParams(iters=5))
    assert q.shape == (4, 24, 32) and q.dtype == np.float32
    assert np.isfinite(q).all() and q.min() >= 0 and q.max() <= 1
    np.testing.assert_allclose(q.sum(0), 1.0, atol=1e-4)
    np.testing.assert_array_equal(image, img0)
    np.testing.assert_array_equal(probs, p0)
    np.testing.assert_array_equal(q, dense_crf(image, probs, CrfParams(iters=5)))  # deterministic
    image.setflags(write=False)  # decoded images are read-only arrays
    np.testing.assert_array_equal(q, dense_crf(image, probs, CrfParams(iters=5)))


def test_dense_crf_single_label_and_bad_shapes() -> None:
    image = np.zeros((5, 6, 3), np.uint8)
    np.testing.assert_array_equal(dense_crf(image, np.ones((1, 5, 6), np.float32)), np.ones((1, 5, 6)))
    with pytest.raises(ValueError):
        dense_crf(image, np.ones((2, 6, 5), np.float32) / 2)
    with pytest.raises(ValueError):
        dense_crf(image.astype(np.float32), np.ones((2, 5, 6), np.float32) / 2)


def test_dense_crf_follows_confident_unary() -> None:
    """A confident unary with a flat image is kept; near-uniform pixels are pulled to their region."""
    image = np.full((20, 20, 3), 128, np.uint8)
    probs = np.zeros((2, 20, 20), np.float32)
    probs[1, :, :10] = 0.95
    probs[0] = 1 - probs[1]
    q = dense_crf(image, probs)
    assert (q.argmax(0)[:, :10] == 1).all() and (q.argmax(0)[:, 10:] == 0).all()


def test_labels_from_q_maps_keys_and_ignores_low_confidence() -> None:
    q = np.array([[[0.97, 0.4]], [[0.02, 0.5]], [[0.01, 0.1]]], np.float32)  # (3, 1, 2)
    labels, conf, mask = labels_from_q(q, np.array([4, 6]), 0.95)
    np.testing.assert_array_equal(labels, [[0, 5]])
    np.testing.assert_allclose(conf, [[0.97, 0.5]])
    np.testing.assert_array_equal(mask, [[0, IGNORE]])
    np.testing.assert_array_equal(conf_to_uint8(np.array([0.0, 0.5, 1.0])), [0, 128, 255])


def test_crf_params_validation() -> None:
    with pytest.raises(ConfigError, match="iterations"):
        CrfParams(iters=0).validate()
    with pytest.raises(ConfigError, match="bi-srgb"):
        CrfParams(bi_srgb=0).validate()
    with pytest.raises(ConfigError, match="--conf"):
        RefineConfig(run="x", conf=1.5).validate()
    with pytest.raises(ConfigError, match="--save-conf"):
        RefineConfig(run="x", crf=False, save_conf=True).validate()


# ============================================================================ runner


def test_refine_outputs_on_toy(reference: Path, toy_root: Path) -> None:
    from clip_es.data.image_io import image_size

    ids = output_ids(reference, MASKS)
    assert len(ids) == 9 and output_ids(reference, CRF) == ids and output_ids(reference, CONF) == ids
    allowed = set(range(NUM_TOY_CLASSES + 1)) | {IGNORE}
    for image_id in ids:
        mask = read_output(output_path(reference, MASKS, image_id))
        crf = read_output(output_path(reference, CRF, image_id))
        conf = read_output(output_path(reference, CONF, image_id))
        keys = load_cam(reference / "cam" / f"{image_id}.npz").keys
        assert mask.dtype == np.uint8 and mask.shape == image_size(toy_root / "JPEGImages" / f"{image_id}.jpg")
        assert set(np.unique(mask)) <= allowed
        assert set(np.unique(crf)) <= {0, *(int(k) + 1 for k in keys)}
        keep = mask != IGNORE
        np.testing.assert_array_equal(mask[keep], crf[keep])
        assert (conf[~keep] < round(0.95 * 255) + 1).all() and (conf[keep] >= round(0.95 * 255) - 1).all()
    # the pseudo masks are palette PNGs with the VOC palette
    from PIL import Image

    with Image.open(output_path(reference, MASKS, ids[0])) as im:
        assert im.mode == "P" and im.getpalette()[3:6] == [128, 0, 0]
    st = RunDir(reference).stage_info("refine")
    assert st["status"] == "done" and st["params"]["crf_params"]["bi_sxy"] == 67.0
    assert json.loads((reference / "refine" / "config.json").read_text())["conf"] == 0.95


def test_no_crf_equals_scores_to_labels(cam_run: Path, tmp_path: Path) -> None:
    run = _copy_run(cam_run, tmp_path / "run")
    res = refine_masks(RefineConfig(run=str(run), crf=False, alpha=2.0, workers=1), progress=False)
    assert res.ok and res.done == 9
    assert not output_ids(run, CRF)
    for image_id in output_ids(run, MASKS):
        maps = load_cam(run / "cam" / f"{image_id}.npz")
        np.testing.assert_array_equal(read_output(output_path(run, MASKS, image_id)),
                                      scores_to_labels(maps.keys, maps.caa, 2.0))


def test_resume_gives_byte_identical_outputs(cam_run: Path, reference: Path, tmp_path: Path) -> None:
    run = _copy_run(cam_run, tmp_path / "run")
    cfg = RefineConfig(run=str(run), workers=1, save_conf=True)
    refine_masks(cfg, progress=False)
    ids = output_ids(run, MASKS)
    for k, image_id in enumerate(ids[::2]):  # half the images; some lose one file, some all
        for kind in ((MASKS, CRF, CONF) if k % 2 else (MASKS,) if k % 3 else (CONF,)):
            output_path(run, kind, image_id).unlink()
    (run / "refine" / MASKS / ".tmp-killed").write_bytes(b"partial")  # a killed writer's temp file
    res = refine_masks(cfg, progress=False)
    assert res.done == len(ids[::2]) and res.skipped == len(ids) - len(ids[::2]) and res.ok
    assert _outputs(run) == _outputs(reference)
    assert not list((run / "refine" / MASKS).glob(".tmp-*"))


def test_workers_2_identical_to_workers_1(cam_run: Path, reference: Path, tmp_path: Path) -> None:
    run = _copy_run(cam_run, tmp_path / "run")
    res = refine_masks(RefineConfig(run=str(run), workers=2, save_conf=True), progress=False)
    assert res.ok and res.done == 9
    assert _outputs(run) == _outputs(reference)


def test_changed_params_refused_same_params_resume(reference: Path) -> None:
    with pytest.raises(RunDirError, match="conf"):
        refine_masks(RefineConfig(run=str(reference), conf=0.9, workers=1), progress=False)
    with pytest.raises(RunDirError, match="crf_params"):
        refine_masks(RefineConfig(run=str(reference), crf_params=CrfParams(iters=5), workers=1), progress=False)
    # workers / save_conf / limit do not change outputs: a re-run skips everything
    res = refine_masks(RefineConfig(run=str(reference), workers=2, limit=4), progress=False)
    assert res.skipped == 4 and res.done == 0 and res.ok


def test_refine_needs_cam(tmp_path: Path) -> None:
    with pytest.raises(RunDirError, match="clipes cam"):
        refine_masks(RefineConfig(run=str(tmp_path / "nothing")), progress=False)


def test_per_image_failure_recorded_and_stage_goes_on(cam_run: Path, tmp_path: Path) -> None:
    run = _copy_run(cam_run, tmp_path / "run")
    bad = sorted((run / "cam").glob("*.npz"))[1]
    bad.write_bytes(b"not a zip file")
    res = refine_masks(RefineConfig(run=str(run), workers=2, limit=5), progress=False)
    assert list(res.failed) == [bad.stem] and res.done == 4
    assert "corrupt" in res.failed[bad.stem]
    st = RunDir(run).stage_info("refine")
    assert st["status"] == "partial" and bad.stem in st["failed"]
    assert not output_path(run, MASKS, bad.stem).exists()
    # the CLI maps the failure to exit code 1 (and the rest is skipped)
    assert run_cli(["refine", "--run", str(run), "--workers", "1", "--limit", "5"]) == 1


def test_cli_refine_and_eval_rows(cam_run: Path, tmp_path: Path, capsys) -> None:
    run = _copy_run(cam_run, tmp_path / "run")
    assert run_cli(["refine", "--run", str(run), "--workers", "2", "--limit", "3", "--iters", "4",
                 "--save-conf"]) == 0
    assert len(output_ids(run, MASKS)) == 3 and len(output_ids(run, CONF)) == 3
    assert RunDir(run).stage_info("refine")["params"]["crf_params"]["iters"] == 4
    assert run_cli(["refine", "--run", str(run), "--conf", "0.5"]) == 2  # changed params: refused
    assert run_cli(["refine", "--run", str(run), "--workers", "0"]) == 2
    capsys.readouterr()
    assert run_cli(["eval", "--run", str(run)]) == 0
    table = capsys.readouterr().out
    head = table.splitlines()[0].split()
    assert head == ["class", "cam", "caa", "crf", "masks"]
    assert "coverage" in table and "precision" in table
    rep = json.loads((run / "eval.json").read_text())["stages"]
    assert rep["crf"]["images"] == 3 and rep["masks"]["images"] == 3
    assert 0 < rep["masks"]["coverage"] <= 1
