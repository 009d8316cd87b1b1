"""``clipes label``: a plain folder of photos to masks in one command, with a labels file or
with CLIP's zero-shot labels (saved for review, corrected, passed back)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from clip_es.data.image_io import read_mask
from clip_es.errors import ConfigError, DatasetError
from clip_es.label import LabelConfig, label_folder
from clip_es.model.zeroshot import multilabel_from_probabilities
from tests.conftest import run_cli

CLASSES = "ball,star,heart,ring,boat,kite,flower,fish"
NAMES = ["chien café.jpg", "熊.jpg", "Photo (1).jpg", "#2 beach.png"]


@pytest.fixture
def photos(toy_root, tmp_path) -> Path:
    folder = tmp_path / "photos"
    folder.mkdir()
    for src, name in zip(sorted((toy_root / "JPEGImages").glob("*.jpg")), NAMES):
        shutil.copy(src, folder / name)
    (folder / "README.txt").write_text("not an image")
    return folder


def _cfg(photos, out, clip_path, **kw) -> LabelConfig:
    return LabelConfig(images=str(photos), out=str(out), model=str(clip_path), device="cpu", workers=1, **kw)


def test_multilabel_rule():
    assert multilabel_from_probabilities(np.array([0.5, 0.3, 0.2]), 0.25) == (0, 1)
    assert multilabel_from_probabilities(np.array([0.4, 0.35, 0.25]), 0.9) == (0,)  # the top class always
    assert multilabel_from_probabilities(np.array([0.1, 0.8, 0.1]), 0.1) == (0, 1, 2)


def test_zero_shot_labels_then_corrected_labels(photos, tmp_path, tiny_clip_path):
    out = tmp_path / "out"
    res = label_folder(_cfg(photos, out, tiny_clip_path, classes=CLASSES, threshold=0.2, tagger="global"),
                       progress=False)
    stems = sorted(n.rsplit(".", 1)[0] for n in NAMES)
    assert res.ok and res.labels_source == "zero-shot" and res.images == 4
    assert res.cam.done == 4 and res.refine.done == 4
    # the predictions: a labels file the folder dataset reads, and every probability beside it
    from clip_es.data.folder import FolderDataset

    ds = FolderDataset(photos, str(out / "labels_zeroshot.csv"), class_file=out / "classes.txt")
    assert sorted(ds.ids()) == stems
    scores = json.loads((out / "labels_zeroshot_scores.json").read_text(encoding="utf-8"))
    assert scores["threshold"] == 0.2
    for i in ds.ids():
        p = np.array(list(scores["images"][i].values()))
        assert p.sum() == pytest.approx(1, abs=1e-3)
        got = set(ds.labels(i))  # the rule, up to the file's rounding: >= threshold, or the most likely
        assert {k for k in range(len(p)) if p[k] >= 0.2 + 1e-5} <= got
        assert all(p[k] >= 0.2 - 1e-5 or p[k] >= p.max() - 1e-5 for k in got)
    text = (out / "labels_zeroshot.csv").read_text(encoding="utf-8")
    assert text.startswith("# Labels predicted by CLIP") and "--labels" in text
    # outputs named after the inputs: PNG masks and a COCO file with the real file names
    assert sorted(p.stem for p in (out / "masks").glob("*.png")) == stems
    coco = json.loads((out / "annotations.json").read_text(encoding="utf-8"))
    assert sorted(im["file_name"] for im in coco["images"]) == sorted(NAMES)
    for i in stems:
        assert read_mask(out / "masks" / f"{i}.png").shape == read_mask(out / "refine" / "masks" / f"{i}.png").shape
    assert "masks (COCO)" in res.summary() and str(out / "labels_zeroshot.csv") in res.summary()

    # the same command again: nothing to do
    again = label_folder(_cfg(photos, out, tiny_clip_path, classes=CLASSES, threshold=0.2, tagger="global"),
                         progress=False)
    assert again.cam.done == 0 and again.cam.skipped == 4 and not again.recomputed

    # the user corrects one image's labels and passes the file back: only that image is recomputed
    fixed = tmp_path / "fixed.csv"
    old = ds.labels("熊")
    new = "star;kite" if old != (1, 5) else "ball"
    fixed.write_text("\n".join(ln if not ln.startswith("熊.jpg,") else f"熊.jpg,{new}" for ln in text.splitlines()),
                     encoding="utf-8")
    npz = out / "cam" / "熊.npz"
    before = npz.read_bytes()
    res = label_folder(_cfg(photos, out, tiny_clip_path, classes=CLASSES, labels=str(fixed)), progress=False)
    assert res.labels_source == "file" and res.recomputed == ["熊"]
    assert res.cam.done == 1 and res.cam.skipped == 3 and res.refine.done == 1
    from clip_es.cam.store import load_cam

    assert npz.read_bytes() != before
    assert sorted(load_cam(npz).keys.tolist()) == sorted(CLASSES.split(",").index(c) for c in new.split(";"))

    # another class list into the same folder is refused before anything is touched
    with pytest.raises(ConfigError, match="different class list needs a new --out"):
        label_folder(_cfg(photos, out, tiny_clip_path, classes="ball,star"), progress=False)


def test_labels_file_and_class_file(photos, tmp_path, tiny_clip_path):
    (tmp_path / "classes.txt").write_text("ball, ball, sphere\nstar\nfish\n")
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps({"chien café.jpg": ["ball"], "熊": ["star", "fish"], "Photo (1)": []}),
                      encoding="utf-8")
    out = tmp_path / "out"
    res = label_folder(_cfg(photos, out, tiny_clip_path, class_file=str(tmp_path / "classes.txt"),
                            labels=str(labels)), progress=False)
    assert res.ok and res.labels_source == "file" and res.cam.done == 3  # '#2 beach' is not in the labels file
    assert not (out / "labels_zeroshot.csv").exists()
    assert (out / "masks" / "classes.txt").read_text().split() == ["ball", "star", "fish"]
    assert read_mask(out / "masks" / "Photo (1).png").max() == 0  # no label: all background
    coco = json.loads((out / "annotations.json").read_text(encoding="utf-8"))
    assert [c["name"] for c in coco["categories"]] == ["ball", "star", "fish"]
    assert {im["source_id"] for im in coco["images"]} == {"chien café", "熊", "Photo (1)"}


def test_label_cli(photos, tmp_path, tiny_clip_path, capsys):
    out = tmp_path / "out"
    code = run_cli(["label", str(photos), "--classes", CLASSES, "--out", str(out), "--model", str(tiny_clip_path),
                    "--device", "cpu", "--workers", "1", "--threshold", "0.1"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    for needle in ("cam: 4 done", "refine: 4 done", str(out / "labels_zeroshot.csv"), str(out / "annotations.json"),
                   str(out / "masks")):
        assert needle in printed
    assert json.loads((out / "labels_zeroshot_scores.json").read_text())["threshold"] == 0.1


@pytest.mark.parametrize("extra, needle", [
    ([], "either --classes"),
    (["--classes", "a,b", "--class-file", "x.txt"], "either --classes"),
    (["--classes", "a,a"], "twice"),
    (["--classes", "a", "--threshold", "0"], "--threshold"),
    (["--classes", "a", "--labels", "missing.csv"], "does not exist"),
    (["--classes", "a", "--out", "PHOTOS"], "is the image folder"),
])
def test_label_cli_errors(photos, tmp_path, capsys, extra, needle):
    extra = [str(photos) if a == "PHOTOS" else a for a in extra]
    assert run_cli(["label", str(photos), "--out", str(tmp_path / "o"), *extra]) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_label_folder_without_images(tmp_path, tiny_clip_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="holds no images"):
        label_folder(_cfg(tmp_path / "empty", tmp_path / "o", tiny_clip_path, classes="a"), progress=False)
    with pytest.raises(DatasetError, match="is not a folder"):
        label_folder(_cfg(tmp_path / "nope", tmp_path / "o", tiny_clip_path, classes="a"), progress=False)
    assert not (tmp_path / "o").exists()


def test_bad_labels_file_leaves_nothing_behind(photos, tmp_path, tiny_clip_path):
    from clip_es.errors import LabelError

    bad = tmp_path / "bad.csv"
    bad.write_text("熊.jpg,unicorn\n", encoding="utf-8")
    with pytest.raises(LabelError, match=r"bad.csv:1: label 'unicorn' is not in the class file"):
        label_folder(_cfg(photos, tmp_path / "o", tiny_clip_path, classes=CLASSES, labels=str(bad)), progress=False)
    assert not (tmp_path / "o").exists()


def test_unreadable_images_are_listed_not_fatal(tmp_path, tiny_clip_path, photos):
    (photos / "broken.jpg").write_bytes(b"not a jpeg")
    res = label_folder(_cfg(photos, tmp_path / "o", tiny_clip_path, classes=CLASSES), progress=False)
    assert not res.ok and "broken" in res.left_out and "not a readable image" in res.left_out["broken"]
    assert res.cam.done == 4 and res.png.images == 4  # the others are labelled
    only_broken = tmp_path / "only"
    only_broken.mkdir()
    (only_broken / "x.jpg").write_bytes(b"junk")
    res = label_folder(_cfg(only_broken, tmp_path / "o2", tiny_clip_path, classes=CLASSES), progress=False)
    assert not res.ok and res.png is None and "no image got a mask" in res.summary()


def test_cli_threshold_default_is_the_library_default():
    import inspect

    from clip_es.cli import label
    from clip_es.model.zeroshot import ZERO_SHOT_THRESHOLD

    assert inspect.signature(label).parameters["threshold"].default.default == ZERO_SHOT_THRESHOLD
    assert LabelConfig(images=".", out="o", classes="a").threshold == ZERO_SHOT_THRESHOLD
