"""Dataset readers, class files, the toy generator and image decoding, on tiny fixtures."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clip_es.data.base import Dataset, parse_class_lines, read_class_file, validate_gt
from clip_es.data.image_io import image_size, mask_to_png_bytes, read_image, read_mask
from clip_es.data.registry import builtin_classes, open_dataset
from clip_es.errors import ClassFileError, DatasetError, ImageError, LabelError

# ============================================================================ helpers


def _save_rgb(path: Path, h: int, w: int, fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path, fmt)
    return path


def _save_mask(path: Path, mask: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(mask_to_png_bytes(mask))
    return path


# ============================================================================ class files


def test_class_file_comments_and_synonyms(tmp_path: Path) -> None:
    p = tmp_path / "c.txt"
    p.write_text("# my classes\n\ncat  # a pet\nperson, people, human\n  dog ,  \n", encoding="utf-8")
    classes = read_class_file(p)
    assert [c.name for c in classes] == ["cat", "person", "dog"]
    assert classes[1].synonyms == ("people", "human")
    assert classes[1].prompt_words == ("people", "human")
    assert classes[2].synonyms == () and classes[2].prompt_words == ("dog",)


@pytest.mark.parametrize("lines, needle", [
    ([], "no classes"),
    (["# only a comment", "   "], "no classes"),
    (["cat", "dog", "cat"], "listed twice"),
    (["cat", ", kitty, feline"], "no class name"),
])
def test_class_file_errors(lines: list[str], needle: str) -> None:
    with pytest.raises(ClassFileError, match=needle):
        parse_class_lines(lines, "classes.txt")


def test_class_file_missing(tmp_path: Path) -> None:
    with pytest.raises(ClassFileError, match="does not exist"):
        read_class_file(tmp_path / "nope.txt")


def test_duplicate_class_names_line_numbers() -> None:
    with pytest.raises(ClassFileError, match=r"classes.txt:3.*first on line 1"):
        parse_class_lines(["cat", "dog", "cat, kitty"], "classes.txt")


# ============================================================================ read_image


def test_read_image_modes(tmp_path: Path) -> None:
    cases: dict[str, Image.Image] = {
        "gray.png": Image.new("L", (7, 5), 100),
        "rgba.png": Image.new("RGBA", (7, 5), (10, 20, 30, 0)),
        "cmyk.jpg": Image.new("CMYK", (7, 5), (0, 255, 255, 0)),
    }
    pal = Image.new("P", (7, 5), 1)
    pal.putpalette([0, 0, 0, 200, 10, 20] + [0] * (256 * 3 - 6))
    cases["pal.png"] = pal
    for name, im in cases.items():
        im.save(tmp_path / name)
        arr = read_image(tmp_path / name)
        assert arr.shape == (5, 7, 3) and arr.dtype == np.uint8, name
    assert (read_image(tmp_path / "gray.png") == 100).all()
    assert (read_image(tmp_path / "rgba.png") == 255).all()  # fully transparent -> white
    assert tuple(read_image(tmp_path / "pal.png")[0, 0]) == (200, 10, 20)
    r, g, b = read_image(tmp_path / "cmyk.jpg")[2, 3].astype(int)
    assert r > 200 and g < 60 and b < 60  # CMYK (0, 255, 255, 0) is red


def test_read_image_16bit_png(tmp_path: Path) -> None:
    arr16 = np.zeros((4, 6), np.uint16)
    arr16[:, 3:] = 65535
    Image.fromarray(arr16).save(tmp_path / "d.png")
    out = read_image(tmp_path / "d.png")
    assert out.shape == (4, 6, 3) and out.dtype == np.uint8
    assert (out[:, :3] == 0).all() and (out[:, 3:] == 255).all()


def test_read_image_exif_rotation(tmp_path: Path) -> None:
    im = Image.new("RGB", (20, 10), (0, 128, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to view
    im.save(tmp_path / "rot.jpg", exif=exif)
    out = read_image(tmp_path / "rot.jpg")
    assert out.shape == (20, 10, 3)
    assert image_size(tmp_path / "rot.jpg") == (20, 10)


def test_read_image_failures(tmp_path: Path) -> None:
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("this is not a picture\n")
    _save_rgb(tmp_path / "full.jpg", 64, 64)
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    for name, needle in [("empty.jpg", "empty"), ("text.jpg", "not a readable image"),
                         ("cut.jpg", "not a readable image"), ("missing.jpg", "not found")]:
        with pytest.raises(ImageError, match=needle) as ei:
            read_image(tmp_path / name)
        assert name in str(ei.value)


# ============================================================================ VOC


def _voc(tmp_path: Path) -> Path:
    root = tmp_path / "VOC2012"
    for i in ("a", "b"):
        _save_rgb(root / "JPEGImages" / f"{i}.jpg", 8, 10)
    (root / "Annotations").mkdir()
    (root / "Annotations" / "a.xml").write_text(
        "<annotation><object><name>person</name></object><object><name>dog</name></object>"
        "<object><name>person</name></object></annotation>")
    m = np.zeros((8, 10), np.uint8)
    m[2:5, 2:5] = 8  # cat
    m[0, :] = 255
    _save_mask(root / "SegmentationClass" / "b.png", m)
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text("a\nb\n\nb\n")
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text("b\n")
    return root


def test_voc_labels_xml_and_gt(tmp_path: Path) -> None:
    ds = open_dataset("voc", _voc(tmp_path), "train")
    assert isinstance(ds, Dataset)
    names = [c.name for c in ds.classes]
    assert ds.ids() == ["a", "b"]  # duplicate 'b' dropped
    assert ds.labels("a") == tuple(sorted((names.index("person"), names.index("dog"))))
    assert ds.labels("b") == (names.index("cat"),)  # no XML: from the GT mask
    gt = ds.load_gt("b")
    assert gt is not None and gt.shape == (8, 10) and set(np.unique(gt)) == {0, 8, 255}
    assert ds.load_gt("a") is None
    assert ds.load_image("a").shape == (8, 10, 3)


def test_voc_split_error_lists_splits(tmp_path: Path) -> None:
    ds = open_dataset("voc", _voc(tmp_path), "test")
    with pytest.raises(DatasetError, match=r"available splits: train, val"):
        ds.ids()


def test_voc_bad_ids(tmp_path: Path) -> None:
    root = _voc(tmp_path)
    (root / "ImageSets" / "Segmentation" / "evil.txt").write_text("a\n../../etc/passwd\n")
    with pytest.raises(DatasetError, match=r"evil.txt:2"):
        open_dataset("voc", root, "evil").ids()
    ds = open_dataset("voc", root, "train")
    for bad in ("../a", "/etc/passwd", "x/y", "", ".."):
        with pytest.raises(DatasetError, match="not a plain file name"):
            ds.image_path(bad)


def test_voc_gt_out_of_range_and_size(tmp_path: Path) -> None:
    root = _voc(tmp_path)
    m = np.zeros((8, 10), np.uint8)
    m[1, 1] = 21
    m[1, 2] = 200
    _save_mask(root / "SegmentationClass" / "b.png", m)
    ds = open_dataset("voc", root, "train")
    with pytest.raises(ImageError, match=r"\[21, 200\].*0\.\.20"):
        ds.load_gt("b")
    _save_mask(root / "SegmentationClass" / "b.png", np.zeros((9, 10), np.uint8))
    with pytest.raises(ImageError, match=r"10x9.*10x8"):
        ds.load_gt("b")


def test_voc_unknown_xml_class(tmp_path: Path) -> None:
    root = _voc(tmp_path)
    (root / "Annotations" / "a.xml").write_text("<annotation><object><name>unicorn</name></object></annotation>")
    with pytest.raises(LabelError, match="unicorn.*known: aeroplane"):
        open_dataset("voc", root, "train").labels("a")


# ============================================================================ COCO

#: The 80 COCO category ids in ascending order (with COCO's gaps).
COCO_IDS = ([*range(1, 12), *range(13, 26), 27, 28, *range(31, 45), *range(46, 66), 67, 70,
             *range(72, 83), *range(84, 91)])


def _rle_uncompressed(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE: run lengths of the column-major flattening, zeros first."""
    flat = mask.flatten(order="F").astype(np.uint8)
    counts, cur, run = [], 0, 0
    for v in flat:
        if v != cur:
            counts.append(run)
            cur, run = v, 0
        run += 1
    counts.append(run)
    return {"counts": counts, "size": list(mask.shape)}


def _coco(tmp_path: Path, images_sub: bool = False) -> Path:
    from pycocotools import mask as mask_utils

    root = tmp_path / "coco"
    img_dir = root / "images" / "val2014" if images_sub else root / "val2014"
    names = [c.name for c in builtin_classes("coco")]
    cats = [{"id": cid, "name": n, "supercategory": "x"} for cid, n in zip(COCO_IDS, names)]
    images = [
        {"id": 139, "file_name": "COCO_val2014_000000000139.jpg", "height": 20, "width": 30},
        {"id": 5, "file_name": "COCO_val2014_000000000005.jpg", "height": 16, "width": 16},
        {"id": 200, "file_name": "COCO_val2014_000000000200.jpg", "height": 12, "width": 12},
    ]
    for im in images:
        _save_rgb(img_dir / im["file_name"], im["height"], im["width"])
    cat_mask = np.zeros((20, 30), np.uint8)
    cat_mask[15:19, 25:29] = 1
    cat_rle = mask_utils.encode(np.asfortranarray(cat_mask))
    crowd = np.zeros((16, 16), np.uint8)
    crowd[4:8, 2:6] = 1
    anns = [
        # a small dog drawn over a large person (listed first so drawing order matters)
        {"id": 1, "image_id": 139, "category_id": 18, "iscrowd": 0, "area": 16.0,
         "segmentation": [[4, 4, 8, 4, 8, 8, 4, 8]], "bbox": [4, 4, 4, 4]},
        {"id": 2, "image_id": 139, "category_id": 1, "iscrowd": 0, "area": 120.0,
         "segmentation": [[2, 2, 14, 2, 14, 12, 2, 12]], "bbox": [2, 2, 12, 10]},
        {"id": 3, "image_id": 139, "category_id": 17, "iscrowd": 0, "area": 16.0,
         "segmentation": {"counts": cat_rle["counts"].decode("ascii"), "size": [20, 30]}, "bbox": [25, 15, 4, 4]},
        {"id": 4, "image_id": 5, "category_id": 59, "iscrowd": 1, "area": 16.0,
         "segmentation": _rle_uncompressed(crowd), "bbox": [2, 4, 4, 4]},
    ]
    (root / "annotations").mkdir(parents=True)
    (root / "annotations" / "instances_val2014.json").write_text(
        json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return root


def test_coco_labels_gt_and_ids(tmp_path: Path) -> None:
    ds = open_dataset("coco", _coco(tmp_path), "val2014")
    assert isinstance(ds, Dataset)
    names = [c.name for c in ds.classes]
    assert len(names) == 80 and ds.category_ids == COCO_IDS
    person, dog, cat, pizza = (names.index(n) for n in ("person", "dog", "cat", "pizza"))
    assert (person, dog, cat) == (0, 16, 15) and ds.category_ids[pizza] == 59
    assert ds.ids() == ["COCO_val2014_000000000005", "COCO_val2014_000000000139", "COCO_val2014_000000000200"]
    i5, i139, i200 = ds.ids()
    assert ds.labels(i139) == (person, cat, dog)
    assert ds.labels(i5) == (pizza,)  # crowd annotation counts
    assert ds.labels(i200) == ()  # no annotations: kept, empty labels
    gt = ds.load_gt(i139)
    assert gt.shape == (20, 30) and gt.dtype == np.uint8
    assert set(np.unique(gt)) == {0, person + 1, dog + 1, cat + 1}
    assert gt[6, 6] == dog + 1  # overlap: the smaller dog wins
    assert gt[10, 12] == person + 1 and gt[0, 0] == 0
    assert (gt[15:19, 25:29] == cat + 1).all() and (gt == cat + 1).sum() == 16
    crowd = ds.load_gt(i5)
    expect = np.zeros((16, 16), np.uint8)
    expect[4:8, 2:6] = pizza + 1
    np.testing.assert_array_equal(crowd, expect)
    assert (ds.load_gt(i200) == 0).all()
    assert ds.load_image(i139).shape == (20, 30, 3)
    assert ds.image_path(i5).name == "COCO_val2014_000000000005.jpg"


def test_coco_worker_view_is_slim_and_reads_the_same(tmp_path: Path) -> None:
    """Spawned cam loader workers get the file names and labels of their ids, not the json index."""
    import pickle

    from clip_es.data.base import worker_view

    ds = open_dataset("coco", _coco(tmp_path), "val2014")
    ids = ds.ids()[:2]
    view = worker_view(ds, ids)
    assert type(view).__name__ == "COCOImages"
    back = pickle.loads(pickle.dumps(view))
    for i in ids:
        assert back.labels(i) == ds.labels(i) and back.image_path(i) == ds.image_path(i)
        np.testing.assert_array_equal(back.load_image(i), ds.load_image(i))
    with pytest.raises(DatasetError, match="not in"):
        back.labels(ds.ids()[2])  # not one of its ids
    assert len(pickle.dumps(view)) < len(pickle.dumps(ds)) / 3  # the index (annotations, polygons) stays home
    voc_like = object()  # a reader without worker_view is sent as it is
    assert worker_view(voc_like, ids) is voc_like


def test_coco_images_subfolder_and_errors(tmp_path: Path) -> None:
    root = _coco(tmp_path, images_sub=True)
    ds = open_dataset("coco", root, "val2014")
    assert ds.load_image(ds.ids()[0]).shape == (16, 16, 3)
    with pytest.raises(DatasetError, match="available splits.*val2014"):
        open_dataset("coco", root, "train2017")
    with pytest.raises(DatasetError, match="not in"):
        ds.labels("COCO_val2014_000000000999")
    with pytest.raises(DatasetError, match="not a plain file name"):
        ds.labels("../x")


def test_coco_class_file_must_match_categories(tmp_path: Path) -> None:
    root = _coco(tmp_path)
    few = tmp_path / "few.txt"
    few.write_text("person, people\ndog\n")
    with pytest.raises(DatasetError, match=r"'bicycle'.*known classes: person, dog"):
        open_dataset("coco", root, "val2014", class_file=few).ids()
    # A class file in a different order with synonyms: matched by name.
    names = [c.name for c in builtin_classes("coco")]
    rev = tmp_path / "rev.txt"
    rev.write_text("".join(f"{n}, syn of {n}\n" for n in reversed(names)))
    ds = open_dataset("coco", root, "val2014", class_file=rev)
    assert ds.category_ids == COCO_IDS[::-1]
    assert ds.classes[0].synonyms == ("syn of toothbrush",)
    gt = ds.load_gt("COCO_val2014_000000000139")
    assert gt[6, 6] == [c.name for c in ds.classes].index("dog") + 1


def test_coco_malformed_json(tmp_path: Path) -> None:
    root = _coco(tmp_path)
    (root / "annotations" / "instances_val2014.json").write_text('{"images": [}')
    with pytest.raises(LabelError, match=r"instances_val2014.json:1:\d+: malformed JSON"):
        open_dataset("coco", root, "val2014").ids()


# ============================================================================ folder


def _folder(tmp_path: Path, labels_name: str, labels_text: str) -> Path:
    root = tmp_path / "mine"
    (root / "images").mkdir(parents=True)
    _save_rgb(root / "images" / "cat1.jpg", 6, 8)
    _save_rgb(root / "images" / "dog2.png", 6, 8)
    _save_rgb(root / "images" / "both.jpeg", 6, 8)
    (root / "classes.txt").write_text("cat, kitty\ndog\nperson, people, human\n")
    (root / labels_name).write_text(labels_text)
    return root


@pytest.mark.parametrize("text", [
    "image,labels\ncat1.jpg,cat\ndog2,dog\nboth.jpeg,cat;dog; person\n",
    "cat1,cat\n\ndog2.png,dog\n# comment\nboth,cat;dog;person\n",
])
def test_folder_csv(tmp_path: Path, text: str) -> None:
    ds = open_dataset("folder", _folder(tmp_path, "train.csv", text), "train")
    assert isinstance(ds, Dataset)
    assert ds.ids() == ["cat1", "dog2", "both"]
    assert ds.labels("cat1") == (0,) and ds.labels("dog2") == (1,) and ds.labels("both") == (0, 1, 2)
    assert ds.image_path("dog2").name == "dog2.png" and ds.image_path("both").name == "both.jpeg"
    assert ds.load_image("both").shape == (6, 8, 3)
    assert ds.category_ids == [1, 2, 3]
    assert ds.load_gt("cat1") is None


def test_folder_json_and_path_split(tmp_path: Path) -> None:
    root = _folder(tmp_path, "tags.json", json.dumps({"cat1.jpg": ["cat"], "dog2": ["dog", "person"], "both": []}))
    ds = open_dataset("folder", root, "tags")
    assert ds.ids() == ["cat1", "dog2", "both"] and ds.labels("dog2") == (1, 2) and ds.labels("both") == ()
    ds2 = open_dataset("folder", root, str(root / "tags.json"))
    assert ds2.ids() == ds.ids()


def test_folder_masks(tmp_path: Path) -> None:
    root = _folder(tmp_path, "train.csv", "cat1,cat\ndog2,dog\n")
    m = np.zeros((6, 8), np.uint8)
    m[1:3, 1:3] = 1
    m[0, 0] = 255
    _save_mask(root / "masks" / "cat1.png", m)
    bad = m.copy()
    bad[5, 5] = 4
    _save_mask(root / "masks" / "dog2.png", bad)
    ds = open_dataset("folder", root, "train")
    np.testing.assert_array_equal(ds.load_gt("cat1"), m)
    with pytest.raises(ImageError, match=r"\[4\].*0\.\.3"):
        ds.load_gt("dog2")
    _save_mask(root / "masks" / "dog2.png", np.zeros((7, 8), np.uint8))
    with pytest.raises(ImageError, match=r"8x7.*8x6"):
        ds.load_gt("dog2")


def test_folder_unknown_label(tmp_path: Path) -> None:
    root = _folder(tmp_path, "train.csv", "image,labels\ncat1,cat\ndog2,dgo\n")
    with pytest.raises(LabelError, match=r"train.csv:3.*'dgo'.*did you mean 'dog'.*known classes: cat, dog, person"):
        open_dataset("folder", root, "train").ids()
    # synonyms are prompt words, not labels
    root2 = _folder(tmp_path / "j", "train.json", json.dumps({"cat1": ["kitty"]}))
    with pytest.raises(LabelError, match=r"id 'cat1'.*'kitty'.*known classes"):
        open_dataset("folder", root2, "train").ids()


@pytest.mark.parametrize("name, text, needle", [
    ("train.json", '{"cat1": ["cat"],\n "dog2": ["dog"', r"train.json:2:\d+: malformed JSON"),
    ("train.json", '["cat1"]', "expected one JSON object.*array"),
    ("train.json", '{"cat1": "cat"}', r"id 'cat1': labels must be a list"),
    ("train.json", '{"cat1": {}}', r"id 'cat1': labels must be a list"),
    ("train.csv", 'cat1,cat\n"dog2,dog\n', r"train.csv:\d+: malformed CSV"),
    ("train.csv", "cat1,cat\ndog2,dog,person\n", r"train.csv:2: expected 2 columns"),
    ("train.csv", "cat1.jpg,cat\ndog2,dog\ncat1,dog\n", r"train.csv:3: image 'cat1' is listed twice.*line 1"),
    ("train.json", '{"cat1": ["cat"], "cat1.jpg": ["dog"]}', r"listed twice.*'cat1'.*'cat1.jpg'"),
    ("train.csv", "cat1,cat\n../evil,dog\n", r"train.csv:2.*'../evil' is not a plain file name"),
    ("train.csv", "/etc/passwd,dog\n", r"train.csv:1.*'/etc/passwd' is not a plain file name"),
    ("train.json", '{"../evil.jpg": ["dog"]}', r"'../evil' is not a plain file name"),
])
def test_folder_malformed_labels(tmp_path: Path, name: str, text: str, needle: str) -> None:
    root = _folder(tmp_path, name, text)
    with pytest.raises(LabelError, match=needle):
        open_dataset("folder", root, "train").ids()


def test_folder_setup_errors(tmp_path: Path) -> None:
    root = _folder(tmp_path, "train.csv", "cat1,cat\n")
    with pytest.raises(DatasetError, match=r"no labels file for split 'val'.*train.csv"):
        open_dataset("folder", root, "val")
    (root / "train.json").write_text("{}")
    with pytest.raises(DatasetError, match="ambiguous"):
        open_dataset("folder", root, "train")
    (root / "classes.txt").unlink()
    with pytest.raises(ClassFileError, match="classes.txt not found"):
        open_dataset("folder", root, "train.csv")
    ds = open_dataset("folder", root, "train.csv", class_file=_write(tmp_path / "c.txt", "cat\n"))
    with pytest.raises(DatasetError, match="not a plain file name"):
        ds.load_image("../../etc/passwd")
    with pytest.raises(ImageError, match="not found"):
        open_dataset("folder", _folder(tmp_path / "m", "train.csv", "ghost,cat\n"), "train").load_image("ghost")


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_validate_gt_helper() -> None:
    m = np.array([[0, 1], [255, 2]], np.uint8)
    assert validate_gt(m, 2, "m.png", (2, 2)) is m
    with pytest.raises(ImageError, match=r"m.png.*\[3\]"):
        validate_gt(m + (m == 2), 2, "m.png")


# ============================================================================ toy world


@pytest.fixture(scope="module")
def toy_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from clip_es.data.toy import make_toy

    base = tmp_path_factory.mktemp("toy")
    return (make_toy(base / "a", n=12, seed=3, progress=False), make_toy(base / "b", n=12, seed=3, progress=False))


def test_toy_deterministic(toy_pair: tuple[Path, Path]) -> None:
    a, b = toy_pair
    fa = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    fb = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert fa == fb and len(fa) >= 3 * 12
    for rel in fa:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel


def test_toy_labels_match_masks(toy_pair: tuple[Path, Path]) -> None:
    root = toy_pair[0]
    from clip_es.data.toy import TOY_CLASSES

    labels = json.loads((root / "labels.json").read_text())
    ds = open_dataset("toy", root, "trainval")
    assert [c.name for c in ds.classes] == list(TOY_CLASSES)
    assert len(ds.ids()) == 12 == len(labels)
    assert len(open_dataset("toy", root, "val").ids()) == round(12 * 0.2)
    assert len(open_dataset("toy", root, "train").ids()) == 12 - round(12 * 0.2)
    for iid in ds.ids():
        gt = read_mask(root / "SegmentationClass" / f"{iid}.png")
        assert gt.max() <= len(TOY_CLASSES)
        present = {int(v) - 1 for v in np.unique(gt) if v != 0}
        assert 1 <= len(present) <= 3
        assert {TOY_CLASSES.index(n) for n in labels[iid]} == present
        assert set(ds.labels(iid)) == present  # from the XML objects
        assert ds.load_image(iid).shape[:2] == gt.shape
