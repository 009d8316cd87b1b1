"""Issue #23: the Python API. Top-level names (lazy, no torch on ``import clip_es``), the
in-memory :class:`clip_es.Labeler` against the files ``clipes cam`` + ``clipes refine`` /
``clipes label`` write, its batched form, typed errors for bad input, :class:`clip_es.Segmenter`
against ``clipes segment``, and the one-line warning when the bundled toy CLIP meets other names.
"""

from __future__ import annotations

import json
import os
import logging
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import clip_es
from clip_es.cam.store import load_cam
from clip_es.data.image_io import read_image, read_mask
from clip_es.data.toy import TOY_CLASSES, scene_for
from clip_es.errors import ConfigError, ImageError, LabelError
from tests.conftest import run_cli

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- names
def test_every_public_name_imports():
    for name in clip_es.__all__:
        assert getattr(clip_es, name) is not None, name
    ns: dict = {}
    exec("from clip_es import *", ns)
    assert set(clip_es.__all__) <= ns.keys()
    assert clip_es.Labeler.__module__ == "clip_es.labeler" and clip_es.generate_cams.__module__ == "clip_es.cam.run"
    with pytest.raises(AttributeError, match="public names"):
        clip_es.no_such_name  # noqa: B018
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert clip_es.__version__ == version


def test_import_clip_es_does_not_import_torch():
    code = ("import sys, clip_es; bad = [m for m in ('torch', 'open_clip', 'cv2', 'numpy', 'clip_es.cam') "
            "if m in sys.modules]; assert not bad, bad; print(len(clip_es.__all__))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert p.returncode == 0, p.stderr
    assert int(p.stdout) == len(clip_es.__all__)


# ----------------------------------------------------------------------------- Labeler == run folder
def _labeler(clip_path, **kw) -> "clip_es.Labeler":
    return clip_es.Labeler(classes=list(TOY_CLASSES), model=str(clip_path), device="cpu", precision="fp32",
                           threads=1, **kw)


@pytest.mark.parametrize("opts", [{}, {"scales": (1.0, 0.5), "flip": True, "max_side": 100}],
                         ids=["default", "multiscale-flip-capped"])
def test_labeler_equals_cam_and_refine_files(opts, toy_root, tiny_clip_path, tmp_path):
    from clip_es.data.registry import open_dataset

    run = tmp_path / "run"
    extra = []
    if opts:
        extra = ["--scales", "1.0,0.5", "--flip", "--max-side", "100"]
    assert run_cli(["cam", "-d", "toy", "-r", str(toy_root), "-s", "val", "-o", str(run), "--model",
                    str(tiny_clip_path), "--device", "cpu", "--precision", "fp32", "--background", "voc",
                    "--threads", "1", *extra]) == 0
    assert run_cli(["refine", "--run", str(run), "--workers", "1", *extra[-2:]]) == 0
    ds = open_dataset("toy", str(toy_root), "val")
    labeler = _labeler(tiny_clip_path, **opts)
    ids = ds.ids()
    assert len(ids) == 3
    for image_id in ids:
        names = [TOY_CLASSES[k] for k in ds.labels(image_id)]
        out = labeler(ds.load_image(image_id), labels=names)
        stored = load_cam(run / "cam" / f"{image_id}.npz")
        assert out.labels == names and list(out.keys) == list(stored.keys)
        assert out.cam.dtype == np.float32 and out.cam.shape == stored.cam.shape
        assert np.abs(out.cam - stored.cam).max() <= 1e-6 and np.abs(out.caa - stored.caa).max() <= 1e-6
        assert np.array_equal(out.mask, read_mask(run / "refine" / "masks" / f"{image_id}.png"))
        assert np.array_equal(out.crf, read_mask(run / "refine" / "crf" / f"{image_id}.png"))
        assert 0 <= out.cam.min() and out.caa.max() <= 1 and out.confidence.shape == out.mask.shape
        assert out.probabilities is None


def test_zero_shot_labels_and_masks_equal_clipes_label(toy_root, tiny_clip_path, tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    files = sorted((toy_root / "JPEGImages").glob("*.jpg"))[:4]
    for f in files:
        shutil.copy(f, photos / f.name)
    out = tmp_path / "out"
    assert run_cli(["label", str(photos), "--classes", ",".join(TOY_CLASSES), "--out", str(out), "--model",
                    str(tiny_clip_path), "--device", "cpu", "--precision", "fp32", "--threshold", "0.13",
                    "--workers", "1", "--threads", "1"]) == 0
    used = json.loads((out / "labels_used.json").read_text())
    scores = json.loads((out / "labels_zeroshot_scores.json").read_text())["images"]
    labeler = _labeler(tiny_clip_path, threshold=0.13)
    results = list(labeler.label_many(str(f) for f in (photos / f.name for f in files)))
    assert len({len(r.labels) for r in results}) > 1 or len(results[0].labels) < len(TOY_CLASSES)  # a real choice
    for f, res in zip(files, results):
        assert res.labels == used[f.name]
        assert res.probabilities.keys() == scores[f.stem].keys()
        assert np.allclose(list(res.probabilities.values()), list(scores[f.stem].values()), atol=1e-6)
        assert np.array_equal(res.mask, read_mask(out / "refine" / "masks" / f"{f.stem}.png"))


def test_batched_equals_single_and_inputs_agree(tiny_clip_path, tmp_path):
    scenes = [scene_for(11, i, size=(96, 128)) for i in range(3)] + [scene_for(11, 3), scene_for(11, 4)]
    images = [s.image for s in scenes]
    labels = [[TOY_CLASSES[c - 1] for c in s.labels] for s in scenes]
    labels[2] = None  # zero-shot for this one
    single = _labeler(tiny_clip_path)
    batched = _labeler(tiny_clip_path, batch_size=3)
    one = [single(im, lab) for im, lab in zip(images, labels)]
    many = list(batched.label_many(images, labels))
    assert len(many) == 5
    for a, b in zip(one, many):
        assert a.labels == b.labels and np.array_equal(a.cam, b.cam) and np.array_equal(a.caa, b.caa)
        assert np.array_equal(a.mask, b.mask) and (a.probabilities is None) == (b.probabilities is None)
    assert one[2].probabilities is not None and one[0].probabilities is None
    # a PIL image and a file path give what the array gives; the input array is not changed
    path = tmp_path / "x.png"
    Image.fromarray(images[3]).save(path)
    before = images[3].copy()
    for form in (Image.fromarray(images[3]), str(path), path):
        other = single(form, labels[3])
        assert np.array_equal(other.caa, one[3].caa) and np.array_equal(other.mask, one[3].mask)
    assert np.array_equal(images[3], before)


def test_bad_inputs_raise_typed_errors_before_model_work(tiny_clip_path, tmp_path, monkeypatch):
    labeler = _labeler(tiny_clip_path)
    image = scene_for(2, 0).image
    with pytest.raises(ImageError, match="^image 1: array of dtype int64"):  # batched: names the position
        list(labeler.label_many([image, image.astype(np.int64)], [["ball"], ["ball"]]))

    def no_model(*a, **k):
        raise AssertionError("model work started before the input was checked")

    monkeypatch.setattr(labeler.engine, "compute_batch", no_model)
    monkeypatch.setattr("clip_es.model.zeroshot.class_probabilities", no_model)
    with pytest.raises(LabelError, match=r"'cow' is not one of the Labeler's classes \(ball, star"):
        labeler(image, labels=["ball", "cow"])
    with pytest.raises(LabelError, match="given twice"):
        labeler(image, labels=["ball", "ball"])
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg at all")
    with pytest.raises(ImageError, match="broken.jpg: not a readable image"):
        labeler(bad, labels=["ball"])
    with pytest.raises(ImageError, match="missing.jpg: image file not found"):
        labeler(str(tmp_path / "missing.jpg"), labels=["ball"])
    with pytest.raises(ImageError, match=r"dtype float32, expected uint8.*astype\(np.uint8\)"):
        labeler(image.astype(np.float32) / 255, labels=["ball"])
    with pytest.raises(ImageError, match=r"shape \(\d+, \d+\), expected \(H, W, 3\).*np.repeat"):
        labeler(image[..., 0], labels=["ball"])
    with pytest.raises(ImageError, match=r"shape \(\d+, \d+, 4\).*a\[\.\.\., :3\]"):
        labeler(np.dstack([image, image[..., :1]]), labels=["ball"])
    with pytest.raises(ImageError, match="got a list; pass a PIL image"):
        labeler([[1, 2, 3]], labels=["ball"])
    with pytest.raises(ConfigError, match="unknown option.*caa_treshold.*valid: .*caa_threshold"):
        clip_es.Labeler(classes=["ball"], model=str(tiny_clip_path), caa_treshold=0.5)
    with pytest.raises(ConfigError, match="classes is empty"):
        clip_es.Labeler(classes=[], model=str(tiny_clip_path))
    with pytest.raises(ConfigError, match="ball twice"):
        clip_es.Labeler(classes="ball,star,ball", model=str(tiny_clip_path))
    with pytest.raises(ConfigError, match="--conf must be in"):
        clip_es.Labeler(classes=["ball"], model=str(tiny_clip_path), conf=1.5)


def test_labeler_takes_the_stage_options(tiny_clip_path):
    lab = _labeler(tiny_clip_path, background="none", crf=False, caa=False, templates="a photo of a {}.")
    assert lab.cam_config.background == "none" and lab.cam_config.templates == ("a photo of a {}.",)
    assert lab.engine.bg_text.shape[0] == 0 and not lab.refine_config.crf
    s = scene_for(4, 1)
    out = lab(s.image, [TOY_CLASSES[c - 1] for c in s.labels])
    assert np.array_equal(out.cam, out.caa) and out.confidence is None and np.array_equal(out.mask, out.crf)
    assert 255 not in out.mask
    assert _labeler(tiny_clip_path).cam_config.background == "voc"  # clipes label's default


# ----------------------------------------------------------------------------- Segmenter
def test_segmenter_equals_clipes_segment(toy_root, tiny_clip_path, tmp_path):
    from clip_es.cam.run import CamConfig, generate_cams
    from clip_es.train.loop import TrainConfig, train_segmenter

    run = tmp_path / "run"
    generate_cams(CamConfig(dataset="toy", root=str(toy_root), split="train", out=str(run), model=str(tiny_clip_path),
                            device="cpu", limit=1, threads=1), progress=False)
    train_segmenter(TrainConfig(run=str(run), steps=3, labels="gt", batch_size=2, crop_size=64, backbone="test_resnet",
                                dim=32, heads=4, device="cpu", log_every=1, warmup=1, threads=1), progress=False)
    ckpt = run / "segmenter" / "model.pt"
    seg = clip_es.Segmenter.load(ckpt, device="cpu")
    assert seg.classes == list(TOY_CLASSES)
    images = toy_root / "JPEGImages"
    for extra, classes in (([], None), (["--classes", "boat,ball,sea"], ["boat", "ball", "sea"])):
        out = tmp_path / f"seg{len(extra)}"
        assert run_cli(["segment", "--checkpoint", str(ckpt), "--images", str(images), "--out", str(out),
                        "--device", "cpu", "--limit", "2", *extra]) == 0
        pngs = sorted(out.glob("*.png"))
        assert len(pngs) == 2
        for p in pngs:
            pred = seg(read_image(images / f"{p.stem}.jpg"), classes=classes)
            assert pred.dtype == np.uint8 and np.array_equal(pred, read_mask(p))
            assert pred.max() <= len(classes or TOY_CLASSES)
    with pytest.raises(ImageError, match="expected uint8"):
        seg(np.zeros((8, 8, 3), np.float32))


# ----------------------------------------------------------------------------- the toy CLIP's vocabulary
def _tiny_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "clip_es.model.tiny" and r.levelno >= logging.WARNING]


def test_bundled_toy_clip_warns_once_on_other_names(toy_root, tmp_path, caplog):
    photos = tmp_path / "photos"
    photos.mkdir()
    for f in sorted((toy_root / "JPEGImages").glob("*.jpg"))[:2]:
        shutil.copy(f, photos / f.name)
    caplog.set_level(logging.WARNING)
    # clipes label embeds the classes twice (zero-shot, then cam): one line all the same
    assert run_cli(["label", str(photos), "--classes", "person,dog,cat,car,pizza,ball", "--out", str(tmp_path / "o"),
                    "--device", "cpu", "--workers", "1", "--threads", "1"]) == 0
    msgs = _tiny_warnings(caplog)
    assert len(msgs) == 1, msgs
    assert "\n" not in msgs[0] and "'person', 'dog', 'cat', 'car' and 1 more are outside it" in msgs[0]
    assert "--model ViT-B-16 --pretrained openai" in msgs[0] and "'ball'" not in msgs[0]


def test_toy_names_and_other_clips_stay_silent(tiny_clip_path, caplog):
    caplog.set_level(logging.WARNING)
    lab = clip_es.Labeler(classes=list(TOY_CLASSES), device="cpu", threads=1)  # the bundled model, its own world
    assert lab.clip.name == "clipes-tiny"
    lab(scene_for(1, 0).image)
    clip_es.Labeler(classes=["person", "dog"], model=str(tiny_clip_path), device="cpu")  # not the bundled one
    assert _tiny_warnings(caplog) == []
    clip_es.Labeler(classes=["person", "ball"], clip=lab.clip)  # the same model on other names: says so
    assert len(_tiny_warnings(caplog)) == 1 and "'person' is outside it" in _tiny_warnings(caplog)[0]


def test_label_in_memory_example_runs(tmp_path):
    out = tmp_path / "sheet.png"
    p = subprocess.run([sys.executable, str(ROOT / "pipelines" / "examples" / "label_in_memory.py"), "--out", str(out)],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-2000:]
    lines = p.stdout.splitlines()
    assert sum(line.startswith("image ") for line in lines) == 3 and lines[-1].startswith(f"overlay: {out}")
    sheet = np.asarray(Image.open(out))
    assert sheet.ndim == 3 and sheet.shape[2] == 3 and sheet.shape[0] > 3 * 128
