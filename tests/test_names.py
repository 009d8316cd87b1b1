"""Image ids are plain file names as a photo folder holds them: spaces, accents, CJK,
``Photo (1)``; traversal and control characters stay refused, and one odd file in a folder
is left out and listed instead of stopping the whole folder."""

from __future__ import annotations

import json
import os
import shutil
import unicodedata
from pathlib import Path

import pytest

from clip_es.data.base import check_id, id_problem
from clip_es.data.folder import scan_images
from clip_es.errors import DatasetError
from tests.conftest import run_cli
from tests.test_segmenter import base_run, trained  # noqa: F401 - session fixtures (a 4-step segmenter)

ODD = ["chien café", "熊", "Photo (1)", "a,b;c", "#1 beach", "x'y\"z", "in side", "tab-free ünï", "-dash", "日本 語 (2)"]


@pytest.mark.parametrize("name", ODD + ["2007_000032", "a.b.c", "COCO_val2014_000000000139", "x..y"])
def test_plain_file_names_are_ids(name):
    assert id_problem(name) is None and check_id(name, "here") == name


@pytest.mark.parametrize("name, why", [
    ("", "empty"), (".", "folder"), ("..", "folder"), ("../x", "separator"), ("a/b", "separator"),
    ("/etc/passwd", "separator"), ("a\\b", "separator"), ("a\x00b", "U+0000"), ("a\nb", "U+000A"),
    ("a\tb", "U+0009"), ("a\x7fb", "U+007F"), ("a\u2028b", "U+2028"), (os.fsdecode(b"caf\xe9"), "UTF-8"),
    (".hidden", "hidden"), ("._IMG_1", "hidden"), (".tmp-1.host.x", "hidden"), (" lead", "white space"),
    ("trail ", "white space"),
])
def test_unsafe_names_are_refused(name, why):
    assert why in id_problem(name)
    with pytest.raises(DatasetError, match=r"here: image id .* is not a plain file name"):
        check_id(name, "here")


def _copy_images(toy_root: Path, folder: Path, names: list[str]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    src = sorted((toy_root / "JPEGImages").glob("*.jpg"))
    out = []
    for s, n in zip(src, names):
        shutil.copy(s, folder / n)
        out.append(folder / n)
    return out


def test_scan_images_leaves_out_odd_files_not_the_folder(toy_root, tmp_path):
    folder = tmp_path / "photos"
    _copy_images(toy_root, folder, ["chien café.jpg", "熊.JPG", "Photo (1).jpeg", "dup.jpg", "dup.png",
                                    "ctrl\x01name.jpg", "._IMG_1.jpg"])
    os.close(os.open(os.path.join(os.fsencode(folder), b"caf\xe9.jpg"), os.O_CREAT | os.O_WRONLY))  # not UTF-8
    (folder / "notes.txt").write_text("not an image")
    (folder / "sub.jpg").mkdir()
    found, left_out = scan_images(folder)
    assert [i for i, _ in found] == ["Photo (1)", "chien café", "dup", "熊"]
    assert dict(found)["熊"].name == "熊.JPG" and dict(found)["dup"].name == "dup.jpg"
    assert set(left_out) == {"dup.png", "ctrl\x01name.jpg", "caf\\xe9.jpg"}
    assert "same id 'dup'" in left_out["dup.png"] and "U+0001" in left_out["ctrl\x01name.jpg"]
    assert "UTF-8" in left_out["caf\\xe9.jpg"]
    json.dumps(left_out)  # printable: undecodable bytes are escaped


def _folder_dataset(toy_root: Path, tmp_path: Path, names: list[str], labels_text: str) -> Path:
    root = tmp_path / "ds"
    _copy_images(toy_root, root / "images", names)
    (root / "classes.txt").write_text("ball\nstar\nheart\nring\nboat\nkite\nflower\nfish\n")
    (root / "train.csv").write_text(labels_text, encoding="utf-8")
    return root


def test_folder_dataset_with_odd_names_end_to_end(toy_root, tmp_path, tiny_clip_path, capsys):
    """cam -> refine -> export (PNG and COCO) on names with spaces, accents, CJK, brackets, a
    comma and a leading '#': every output is named after its input."""
    names = ["chien café.jpg", "熊.jpg", "Photo (1).jpg", "a,b;c.jpg", "#1 beach.jpg"]
    labels = ('image,labels\n# a comment row\n"chien café.jpg",ball;star\n熊,heart\nPhoto (1).jpg,boat\n'
              '"a,b;c.jpg",kite\n"#1 beach.jpg",fish;ball\n')
    root = _folder_dataset(toy_root, tmp_path, names, labels)
    run = tmp_path / "run"
    common = ["--dataset", "folder", "--root", str(root), "--split", "train"]
    assert run_cli(["cam", *common, "--out", str(run), "--model", str(tiny_clip_path), "--device", "cpu"]) == 0
    assert run_cli(["refine", "--run", str(run), "--workers", "1", "--conf", "0.5"]) == 0
    assert run_cli(["export", "--run", str(run), "--format", "png", "--out", str(tmp_path / "png")]) == 0
    assert run_cli(["export", "--run", str(run), "--format", "coco", "--out", str(tmp_path / "c.json")]) == 0
    stems = [n[: -len(".jpg")] for n in names]
    assert sorted(p.stem for p in (run / "cam").glob("*.npz")) == sorted(stems)
    assert sorted(p.stem for p in (tmp_path / "png").glob("*.png")) == sorted(stems)
    doc = json.loads((tmp_path / "c.json").read_text(encoding="utf-8"))
    assert sorted(im["file_name"] for im in doc["images"]) == sorted(names)
    assert {im["source_id"]: im["file_name"] for im in doc["images"]} == dict(zip(stems, names))
    from clip_es.data.registry import open_dataset

    ds = open_dataset("folder", root, "train")
    assert ds.labels("#1 beach") == (0, 7) and ds.labels("a,b;c") == (5,)  # quoted '#' is a name, not a comment


def test_labels_file_finds_decomposed_file_names(toy_root, tmp_path):
    nfd = unicodedata.normalize("NFD", "café")  # as macOS writes names
    root = _folder_dataset(toy_root, tmp_path, [f"{nfd}.jpg"], "café,ball\n")  # typed composed (NFC)
    from clip_es.data.registry import open_dataset

    ds = open_dataset("folder", root, "train")
    assert ds.ids() == ["café"] and ds.image_path("café").name == f"{nfd}.jpg"
    assert ds.load_image("café").ndim == 3


def test_folder_labels_still_refuse_traversal(toy_root, tmp_path):
    root = _folder_dataset(toy_root, tmp_path, ["a.jpg"], "a,ball\n../../etc/passwd,star\n")
    from clip_es.data.registry import open_dataset

    with pytest.raises(DatasetError, match=r"train.csv:2: image id '../../etc/passwd' is not a plain file name"):
        open_dataset("folder", root, "train").ids()


def test_segment_images_does_not_refuse_the_folder_for_one_name(trained, toy_root, tmp_path):  # noqa: F811
    folder = tmp_path / "photos"
    _copy_images(toy_root, folder, ["chien café.jpg", "熊.png", "Photo (1).jpg", "bad\x02name.jpg", ".hidden.jpg"])
    out = tmp_path / "pred"
    code = run_cli(["segment", "--checkpoint", str(trained / "segmenter" / "last.pt"), "--images", str(folder),
                    "--out", str(out), "--device", "cpu"])
    assert code == 1  # one file left out: listed, the others predicted
    assert sorted(p.stem for p in out.glob("*.png")) == sorted(["chien café", "熊", "Photo (1)"])
    failed = json.loads((out / "failed.json").read_text())
    assert list(failed) == ["bad\x02name.jpg"] and "U+0002" in failed["bad\x02name.jpg"]


def test_voc_split_file_keeps_ids_with_spaces(tmp_path):
    from clip_es.data.registry import open_dataset
    from tests.test_datasets import _voc

    root = _voc(tmp_path)
    jpgs = sorted((root / "JPEGImages").glob("*.jpg"))
    shutil.copy(jpgs[0], root / "JPEGImages" / "my photo (1).jpg")
    (root / "ImageSets" / "Segmentation" / "odd.txt").write_text(f"my photo (1)\n{jpgs[0].stem}  1\n")
    ds = open_dataset("voc", root, "odd")
    assert ds.ids() == ["my photo (1)", jpgs[0].stem]
    assert ds.load_image("my photo (1)").ndim == 3
