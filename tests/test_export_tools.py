"""``clipes export --format cvat|labelstudio|fiftyone`` (and coco, png), review.csv, ``--limit
--order least-sure``, and the way back: ``clipes import-masks`` then ``--labels corrected``.

Round trips read the files back with readers written from each format's documentation (the
modules' own readers, plus layout checks here) and, where it installs, the tool's library."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import shutil
import zipfile
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlparse
from xml.etree import ElementTree

import numpy as np
import pytest
from PIL import Image

from clip_es.data.image_io import mask_to_png_bytes, read_mask
from clip_es.errors import ConfigError, MaskImportError
from clip_es.export import FORMATS, export_run, import_masks
from clip_es.export.common import open_run
from clip_es.export.importer import settle_uncovered
from clip_es.export.labelstudio import brush_decode, brush_encode, read_tasks
from clip_es.refine.crf import IGNORE
from clip_es.refine.run import RefineConfig, refine_masks
from clip_es.refine.store import CONF, CRF, MASKS, corrected_dir, output_ids, output_path, read_output
from tests.conftest import run_cli

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pycocotools vs numpy 2


@pytest.fixture(scope="module")
def refined(tmp_path_factory, toy_root, tiny_clip_path) -> Path:
    """cam + refine (confidence saved, a soft threshold: masks with classes and unsure pixels) on 6 toy images."""
    from clip_es.cam.run import CamConfig, generate_cams

    out = tmp_path_factory.mktemp("tools") / "run"
    generate_cams(CamConfig(dataset="toy", root=str(toy_root), split="train", out=str(out), limit=6,
                            model=str(tiny_clip_path), templates=("a photo of a {}.",)), progress=False)
    assert refine_masks(RefineConfig(run=str(out), conf=0.6, save_conf=True, workers=1), progress=False).ok
    masks = [read_output(output_path(out, MASKS, i)) for i in output_ids(out, MASKS)]
    assert any((m == IGNORE).any() for m in masks) and any(((m > 0) & (m < IGNORE)).any() for m in masks)
    return out


@pytest.fixture
def run_copy(refined, tmp_path) -> Path:
    """A private copy of the refined run (imports write into it)."""
    dst = tmp_path / "run"
    shutil.copytree(refined, dst)
    return dst


def _masks(run: Path) -> dict[str, np.ndarray]:
    return {i: read_output(output_path(run, MASKS, i)) for i in output_ids(run, MASKS)}


def _snapshot(run: Path) -> dict[str, str]:
    return {p.relative_to(run).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run.rglob("*")) if p.is_file() and p.name != ".manifest.lock"}


# ============================================================================ Label Studio brush RLE
def test_brush_rle_round_trip_and_header():
    rng = np.random.default_rng(0)
    cases = [np.zeros(0, np.uint8), np.full(7, 255, np.uint8), rng.integers(0, 256, 999).astype(np.uint8),
             np.repeat(rng.integers(0, 2, 300).astype(np.uint8) * 255, rng.integers(1, 400, 300)),
             np.zeros(200_000, np.uint8)]  # a run longer than the 16-bit length field
    for values in cases:
        rle = brush_encode(values)
        assert all(0 <= b <= 255 for b in rle)
        np.testing.assert_array_equal(brush_decode(rle), values)
        bits = "".join(f"{b:08b}" for b in rle)
        assert int(bits[:32], 2) == values.size and int(bits[32:37], 2) + 1 == 8  # count, word size
        assert [int(bits[37 + 4 * k:41 + 4 * k], 2) + 1 for k in range(4)] == [3, 4, 8, 16]


def test_brush_decode_reads_literal_records_and_refuses_truncated():
    # hand-built stream: count 5, word 8, widths 3,4,8,16; a literal record of 3 values, then a run of 2
    bits = f"{5:032b}{7:05b}" + "".join(f"{w - 1:04b}" for w in (3, 4, 8, 16))
    bits += "0" + "00" + f"{2:03b}" + f"{10:08b}{20:08b}{30:08b}" + "1" + "00" + f"{1:03b}" + f"{255:08b}"
    bits += "0" * (-len(bits) % 8)
    rle = list(int(bits, 2).to_bytes(len(bits) // 8, "big"))
    assert brush_decode(rle).tolist() == [10, 20, 30, 255, 255]
    with pytest.raises(ValueError, match="truncated"):
        brush_decode(rle[:-3])


def test_brush_rle_matches_label_studio_converter():
    brush = pytest.importorskip("label_studio_converter.brush")
    rng = np.random.default_rng(1)
    mask = np.zeros((23, 31), np.uint8)
    mask[3:15, 4:20] = 255
    mask[rng.random(mask.shape) < 0.05] = 255  # isolated pixels: their encoder writes literal records
    ours = brush_encode(np.repeat(mask, 4))
    theirs = brush.mask2rle(mask)
    np.testing.assert_array_equal(np.asarray(brush.decode_rle(ours)), np.repeat(mask, 4))  # they read ours
    np.testing.assert_array_equal(brush_decode(theirs), np.repeat(mask, 4))  # we read theirs


# ============================================================================ round trips
@pytest.mark.parametrize("fmt,out", [("cvat", "cvat.zip"), ("cvat", "cvat_dir"), ("labelstudio", "ls"),
                                     ("fiftyone", "fo"), ("png", "png"), ("coco", "masks.json")])
def test_round_trip_masks_equal_the_runs(refined, tmp_path, fmt, out):
    out = tmp_path / out
    res = export_run(refined, fmt, out, progress=False)
    rimgs = open_run(refined)
    values = rimgs.label_values()
    if fmt == "labelstudio":  # the export's own pre-annotations, read as Label Studio reads them
        got = list(read_tasks(out / "tasks.json", values, "predictions"))
    else:
        got = list(FORMATS[fmt].read(out, values))
    run_masks = _masks(refined)
    assert res.images == len(run_masks) == len(got)
    from clip_es.export.common import ImageIndex

    index = ImageIndex(rimgs)
    seen = set()
    for ref, where, mask in got:
        image_id = index.resolve(ref, where)
        seen.add(image_id)
        want = run_masks[image_id]
        if fmt == "coco":  # documented: unsure pixels belong to no annotation; left open, they stay unsure
            assert np.array_equal(np.ma.getmaskarray(mask), (want == 0) | (want == IGNORE))
            mask = settle_uncovered(mask, want)
        if mask is None:
            mask = np.zeros_like(want)
        np.testing.assert_array_equal(mask, want, err_msg=f"{fmt} {image_id}")
    assert seen == set(run_masks)


def test_cvat_layout(refined, tmp_path):
    export_run(refined, "cvat", tmp_path / "c.zip", progress=False)
    classes = json.loads((refined / "manifest.json").read_text())["classes"]
    with zipfile.ZipFile(tmp_path / "c.zip") as z:
        names = set(z.namelist())
        lines = z.read("labelmap.txt").decode().splitlines()
        ids = output_ids(refined, MASKS)
        assert z.read("ImageSets/Segmentation/default.txt").decode().splitlines() == ids
        assert {f"SegmentationClass/{i}.png" for i in ids} | {f"SegmentationObject/{i}.png" for i in ids} <= names
        cls = Image.open(io.BytesIO(z.read(f"SegmentationClass/{ids[0]}.png")))
        obj = Image.open(io.BytesIO(z.read(f"SegmentationObject/{ids[0]}.png")))
        assert cls.mode == "RGB" and obj.mode == "P"
        mask = read_output(output_path(refined, MASKS, ids[0]))
        assert len(np.unique(np.asarray(obj))) == len(np.unique(mask))  # one instance per label present
    assert lines[0].startswith("# label:color_rgb:parts:actions")
    rows = [ln.split(":") for ln in lines[1:]]
    assert [r[0] for r in rows] == ["background", *classes, "unsure"]  # background first, unsure declared
    assert rows[0][1] == "0,0,0" and rows[-1][1] == "224,224,192" and all(len(r) == 4 for r in rows)
    colours = {r[1] for r in rows}
    assert len(colours) == len(rows)
    for i in ids:  # every colour in the masks is declared (CVAT refuses undeclared ones)
        with zipfile.ZipFile(tmp_path / "c.zip") as z:
            rgb = np.asarray(Image.open(io.BytesIO(z.read(f"SegmentationClass/{i}.png"))).convert("RGB"))
        used = {",".join(map(str, c)) for c in np.unique(rgb.reshape(-1, 3), axis=0)}
        assert used <= colours


def test_labelstudio_tasks_scores_and_config(refined, tmp_path):
    export_run(refined, "labelstudio", tmp_path / "ls", progress=False)
    tasks = json.loads((tmp_path / "ls" / "tasks.json").read_text(encoding="utf-8"))
    config = ElementTree.fromstring((tmp_path / "ls" / "labeling_config.xml").read_text(encoding="utf-8"))
    brush = config.find("BrushLabels")
    image = config.find("Image")
    assert image.get("value") == "$image"
    declared = [lab.get("value") for lab in brush.findall("Label")]
    classes = json.loads((refined / "manifest.json").read_text())["classes"]
    assert declared == [*classes, "unsure"]
    rimgs = open_run(refined)
    for t in tasks:
        image_id = t["data"]["clipes_id"]
        mask = read_output(output_path(refined, MASKS, image_id))
        conf = read_output(output_path(refined, CONF, image_id))
        path = parse_qs(urlparse(t["data"]["image"]).query)["d"][0]
        assert (Path(rimgs.dataset.root) / unquote(path)).is_file()
        (pred,) = t["predictions"]
        assert 0 < pred["score"] <= 1 and pred["model_version"].startswith("clipes-refine-")
        for r in pred["result"]:
            assert (r["from_name"], r["to_name"], r["type"]) == (brush.get("name"), image.get("name"), "brushlabels")
            assert (r["original_height"], r["original_width"]) == mask.shape
            (name,) = r["value"]["brushlabels"]
            value = rimgs.label_values()[name]
            region = brush_decode(r["value"]["rle"]).reshape(*mask.shape, 4)[..., 3] == 255
            np.testing.assert_array_equal(region, mask == value)
            assert r["score"] == pytest.approx(conf[region].mean() / 255, abs=1e-5)  # mean confidence over it


def test_fiftyone_layout(refined, tmp_path):
    export_run(refined, "fiftyone", tmp_path / "fo", progress=False)
    targets = json.loads((tmp_path / "fo" / "mask_targets.json").read_text())
    classes = json.loads((refined / "manifest.json").read_text())["classes"]
    assert targets == {"0": "background", **{str(k + 1): c for k, c in enumerate(classes)}, "255": "unsure"}
    for i in output_ids(refined, MASKS):
        assert (tmp_path / "fo" / "data" / f"{i}.jpg").is_file()
        lab = Image.open(tmp_path / "fo" / "labels" / f"{i}.png")
        assert lab.mode == "L"
        np.testing.assert_array_equal(np.asarray(lab), read_output(output_path(refined, MASKS, i)))


def test_fiftyone_reads_the_export(refined, tmp_path):
    fo = pytest.importorskip("fiftyone")  # heavy: not installed here; the layout test above stands in
    export_run(refined, "fiftyone", tmp_path / "fo", progress=False)
    ds = fo.Dataset.from_dir(dataset_dir=str(tmp_path / "fo"), dataset_type=fo.types.ImageSegmentationDirectory)
    assert len(ds) == len(output_ids(refined, MASKS))


# ============================================================================ confidence, review, order
def test_review_csv_least_sure_first_and_limit(refined, tmp_path):
    res = export_run(refined, "cvat", tmp_path / "all.zip", progress=False, review=True)
    rows = list(csv.DictReader((tmp_path / "all.review.csv").open(encoding="utf-8")))
    assert res.review == str(tmp_path / "all.review.csv") and len(rows) == 6
    assert list(rows[0]) == ["image", "id", "labels", "unsure_share", "lowest_class_confidence", "lowest_class",
                             "score", "overlay"]
    scores = [float(r["score"]) for r in rows]
    assert scores == sorted(scores)
    classes = json.loads((refined / "manifest.json").read_text())["classes"]
    for r in rows:
        mask = read_output(output_path(refined, MASKS, r["id"]))
        conf = read_output(output_path(refined, CONF, r["id"]))
        crf = read_output(output_path(refined, CRF, r["id"]))
        assert float(r["unsure_share"]) == pytest.approx((mask == IGNORE).mean(), abs=1e-4)
        assert r["labels"].split(";") == [classes[v - 1] for v in np.unique(mask) if 0 < v < IGNORE] or not r["labels"]
        fg = [v for v in np.unique(crf) if v > 0] or [0]
        lowest = min(conf[crf == v].mean() / 255 for v in fg)
        assert float(r["lowest_class_confidence"]) == pytest.approx(lowest, abs=1e-4)
        assert (tmp_path / r["overlay"]).is_file() and r["image"] == f"{r['id']}.jpg"
    # a first batch: the two least sure images, the same two review.csv puts first
    first = export_run(refined, "png", tmp_path / "batch", progress=False, limit=2, order="least-sure", review=True)
    assert first.images == 2
    assert sorted(p.stem for p in (tmp_path / "batch").glob("*.png")) == sorted(r["id"] for r in rows[:2])
    batch = list(csv.DictReader((tmp_path / "batch" / "review.csv").open(encoding="utf-8")))
    assert [r["id"] for r in batch] == [r["id"] for r in rows[:2]]
    assert run_cli(["export", "--run", str(refined), "--format", "cvat", "--out", str(tmp_path / "b.zip"),
                    "--limit", "2", "--order", "least-sure"]) == 0
    with zipfile.ZipFile(tmp_path / "b.zip") as z:
        assert sorted(z.read("ImageSets/Segmentation/default.txt").decode().split()) == sorted(r["id"] for r in rows[:2])
    assert run_cli(["export", "--run", str(refined), "--format", "cvat", "--out", str(tmp_path / "r.zip"),
                    "--order", "random"]) == 2
    assert not (tmp_path / "r.zip").exists()
    with pytest.raises(ConfigError, match="--order"):
        export_run(refined, "png", tmp_path / "x", order="random")
    with pytest.raises(ConfigError, match="--limit"):
        export_run(refined, "png", tmp_path / "x", limit=0)


def test_without_confidence_maps_order_by_unsure_share(run_copy, tmp_path, caplog):
    shutil.rmtree(run_copy / "refine" / "conf")
    res = export_run(run_copy, "labelstudio", tmp_path / "ls", progress=False, order="least-sure", review=True)
    assert "--save-conf" in caplog.text
    rows = list(csv.DictReader((tmp_path / "ls" / "review.csv").open(encoding="utf-8")))
    assert all(r["lowest_class_confidence"] == "" for r in rows)
    shares = [float(r["unsure_share"]) for r in rows]
    assert shares == sorted(shares, reverse=True) and res.images == 6
    tasks = json.loads((tmp_path / "ls" / "tasks.json").read_text())
    assert all("score" not in t["predictions"][0] for t in tasks)
    assert all("score" not in r for t in tasks for r in t["predictions"][0]["result"])


# ============================================================================ import -> train --labels corrected
def _changed_mask(mask: np.ndarray) -> np.ndarray:
    fixed = mask.copy()
    h, w = mask.shape
    fixed[: h // 2, : w // 2] = 1  # a person paints the top-left quarter as class 0
    fixed[fixed == IGNORE] = 0  # and settles every unsure pixel as background
    assert not np.array_equal(fixed, mask)
    return fixed


def test_import_one_corrected_image_changes_its_training_target_only(run_copy, tmp_path):
    from clip_es.data.registry import dataset_of_run
    from clip_es.rundir import RunDir
    from clip_es.train.data import CropDataset, LabelSource

    export_run(run_copy, "labelstudio", tmp_path / "ls", progress=False)
    tasks = json.loads((tmp_path / "ls" / "tasks.json").read_text(encoding="utf-8"))
    ids = output_ids(run_copy, MASKS)
    target = ids[2]
    rimgs = open_run(run_copy)
    names = rimgs.label_names()
    for t in tasks:  # as Label Studio exports it: the accepted pre-annotation is an annotation now
        t["annotations"] = [{"id": 1, "was_cancelled": False, "result": t["predictions"][0]["result"]}]
        if t["data"]["clipes_id"] == target:
            fixed = _changed_mask(read_output(output_path(run_copy, MASKS, target)))
            h, w = fixed.shape
            t["annotations"].append({"id": 2, "result": [
                {"from_name": "tag", "to_name": "image", "type": "brushlabels", "original_width": w,
                 "original_height": h, "value": {"format": "rle", "rle": brush_encode(np.repeat(
                     (fixed == v).astype(np.uint8) * 255, 4)), "brushlabels": [names[int(v)]]}}
                for v in np.unique(fixed) if v != 0]})
    src = tmp_path / "project-1-at-2026.json"
    src.write_text(json.dumps(tasks), encoding="utf-8")
    assert run_cli(["import-masks", "--run", str(run_copy), "--from", str(src), "--format", "labelstudio"]) == 0
    stored = sorted(p.stem for p in corrected_dir(run_copy).glob("*.png"))
    assert stored == [target]  # the other five equal their pseudo masks: not stored
    history = json.loads((corrected_dir(run_copy) / "imports.json").read_text())
    assert history[-1]["stored"] == [target] and history[-1]["unchanged"] == len(ids) - 1

    run = RunDir(run_copy)
    ds = dataset_of_run(run)
    refine, corrected = LabelSource(run, "refine"), LabelSource(run, "corrected")
    assert corrected.available(ds, ds.ids()) == refine.available(ds, ds.ids())
    for i in ids:
        same = np.array_equal(corrected.load(ds, i), refine.load(ds, i))
        assert same == (i != target), i
    np.testing.assert_array_equal(corrected.load(ds, target), fixed)
    # the training target (augmented crop) changes for that image only
    a = CropDataset(ds, ids, refine, 64, (1.0, 1.0), seed=0)
    b = CropDataset(ds, ids, corrected, 64, (1.0, 1.0), seed=0)
    for n, i in enumerate(ids):
        (ia, ma), (ib, mb) = a[(n, n)], b[(n, n)]
        assert torch_equal(ia, ib)
        assert torch_equal(ma, mb) == (i != target), i


    # and the command trains on them (two steps: the option is accepted end to end)
    assert run_cli(["train", "--run", str(run_copy), "--labels", "corrected", "--steps", "2", "--batch-size", "1",
                    "--crop-size", "64", "--backbone", "test_resnet", "--dim", "32", "--device", "cpu",
                    "--no-fusion", "--warmup", "0", "--threads", "1"]) == 0
    assert json.loads((run_copy / "segmenter" / "config.json").read_text())["labels"] == "corrected"


def torch_equal(x, y) -> bool:
    import torch

    return bool(torch.equal(x, y))


def test_reserved_class_names_are_refused():
    from clip_es.export.common import RunImages

    with pytest.raises(ConfigError, match="reserve"):
        RunImages(None, ["cat", "unsure"], [1, 2], [], {}).label_values()
    assert RunImages(None, ["cat"], [1], [], {}).label_values() == {"background": 0, "cat": 1, "unsure": 255}


def test_labelstudio_task_urls():
    from clip_es.export.labelstudio import task_ref

    def ref(url):
        return task_ref({"data": {"image": url}}, "t")

    assert ref("/data/local-files/?d=photos/chien%20caf%C3%A9.jpg") == "photos/chien café.jpg"
    assert ref("/data/upload/3/1a2b3c4d-chien%20caf%C3%A9.jpg") == "chien café.jpg"
    assert ref("s3://bucket/set/x.jpg") == "x.jpg" and ref("https://host/img/x.jpg?sig=1") == "x.jpg"
    for bad in ("/data/local-files/?d=../x.jpg", "/data/local-files/?d=/etc/x.jpg", "https://h/a/../../x.jpg",
                "/home/me/x.jpg"):
        with pytest.raises(MaskImportError, match="outside the run"):
            ref(bad)
    with pytest.raises(MaskImportError, match="outside the run"):
        task_ref({"data": {"clipes_id": "../x"}}, "t")


def test_train_labels_corrected_needs_an_import(run_copy):
    from clip_es.rundir import RunDir
    from clip_es.train.data import LabelSource

    with pytest.raises(ConfigError, match="import-masks"):
        LabelSource(RunDir(run_copy), "corrected")


@pytest.mark.parametrize("fmt", ["cvat", "png", "coco", "fiftyone"])
def test_import_each_format_after_a_correction(run_copy, tmp_path, fmt):
    ids = output_ids(run_copy, MASKS)
    target = ids[0]
    fixed = _changed_mask(read_output(output_path(run_copy, MASKS, target)))
    out = tmp_path / ("x.zip" if fmt == "cvat" else "x.json" if fmt == "coco" else "x")
    export_run(run_copy, fmt, out, progress=False)
    if fmt == "cvat":  # edit the zip as CVAT would write it back: RGB in the labelmap's colours
        from clip_es.export.cvat import mask_files

        with zipfile.ZipFile(out) as z:
            files = {n: z.read(n) for n in z.namelist()}
        files[f"SegmentationClass/{target}.png"] = mask_files(fixed, len(open_run(run_copy).classes))[0]
        with zipfile.ZipFile(out, "w") as z:
            for n, d in files.items():
                z.writestr(n, d)
    elif fmt == "png":
        (out / f"{target}.png").write_bytes(mask_to_png_bytes(fixed))
    elif fmt == "fiftyone":
        Image.fromarray(fixed, mode="L").save(out / "labels" / f"{target}.png")
    else:
        from clip_es.export.coco import mask_to_annotations

        doc = json.loads(out.read_text(encoding="utf-8"))
        im = next(i for i in doc["images"] if i["source_id"] == target)
        doc["annotations"] = [a for a in doc["annotations"] if a["image_id"] != im["id"]]
        for a in mask_to_annotations(fixed, open_run(run_copy).category_ids):
            doc["annotations"].append({"id": 10_000 + len(doc["annotations"]), "image_id": im["id"], **a})
        out.write_text(json.dumps(doc), encoding="utf-8")
    res = import_masks(run_copy, out, fmt, progress=False)
    assert res.stored == [target] and res.unchanged == len(ids) - 1
    if fmt == "coco":  # COCO cannot say background: an unsure pixel no annotation covers stays unsure
        pseudo = read_output(output_path(run_copy, MASKS, target))
        fixed = np.where((fixed == 0) & (pseudo == IGNORE), IGNORE, fixed)
    np.testing.assert_array_equal(read_mask(corrected_dir(run_copy) / f"{target}.png"), fixed)


# ============================================================================ refused imports
def _refused(run: Path, src: Path, fmt: str, capsys, match: str) -> None:
    before = _snapshot(run)
    assert run_cli(["import-masks", "--run", str(run), "--from", str(src), "--format", fmt]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and match in err, err
    assert _snapshot(run) == before  # nothing in the run changed
    assert not corrected_dir(run).exists()


def test_refused_imports_change_nothing(run_copy, tmp_path, capsys):
    ids = output_ids(run_copy, MASKS)
    # a truncated JSON (Label Studio and COCO)
    export_run(run_copy, "labelstudio", tmp_path / "ls", progress=False)
    tasks = json.loads((tmp_path / "ls" / "tasks.json").read_text(encoding="utf-8"))
    for t in tasks:
        t["annotations"] = [{"result": t["predictions"][0]["result"]}]
    full = json.dumps(tasks)
    (tmp_path / "cut.json").write_text(full[: len(full) // 2], encoding="utf-8")
    _refused(run_copy, tmp_path / "cut.json", "labelstudio", capsys, "not valid JSON")
    export_run(run_copy, "coco", tmp_path / "c.json", progress=False)
    text = (tmp_path / "c.json").read_text(encoding="utf-8")
    (tmp_path / "cut_coco.json").write_text(text[:-10], encoding="utf-8")
    _refused(run_copy, tmp_path / "cut_coco.json", "coco", capsys, "not valid JSON")
    # a mask of the wrong size, with a later image corrected validly: still nothing written
    export_run(run_copy, "png", tmp_path / "png", progress=False)
    (tmp_path / "png" / f"{ids[-1]}.png").write_bytes(mask_to_png_bytes(_changed_mask(
        read_output(output_path(run_copy, MASKS, ids[-1])))))
    small = read_output(output_path(run_copy, MASKS, ids[0]))[:-3, :]
    (tmp_path / "png" / f"{ids[0]}.png").write_bytes(mask_to_png_bytes(small))
    _refused(run_copy, tmp_path / "png", "png", capsys, "correct the mask at the image's own size")
    good = (tmp_path / "png" / f"{ids[1]}.png").read_bytes()
    (tmp_path / "cut_png").mkdir()
    (tmp_path / "cut_png" / f"{ids[1]}.png").write_bytes(good[: len(good) // 2])  # a truncated PNG
    _refused(run_copy, tmp_path / "cut_png", "png", capsys, "not a readable PNG")
    doc = json.loads(text)
    doc["images"][0]["width"] += 1  # the entry disagrees with its own RLEs
    (tmp_path / "wide.json").write_text(json.dumps(doc), encoding="utf-8")
    _refused(run_copy, tmp_path / "wide.json", "coco", capsys, "but the image entry says")
    doc["annotations"] = [a for a in doc["annotations"] if a["image_id"] != doc["images"][0]["id"]]
    (tmp_path / "wide.json").write_text(json.dumps(doc), encoding="utf-8")  # consistent, but not the image's size
    _refused(run_copy, tmp_path / "wide.json", "coco", capsys, "image's own size")
    # an unknown class name (CVAT labelmap, Label Studio brush label, COCO category)
    export_run(run_copy, "cvat", tmp_path / "cv", progress=False)
    lm = tmp_path / "cv" / "labelmap.txt"
    lm.write_text(lm.read_text().replace("unsure:", "dragon:"))
    _refused(run_copy, tmp_path / "cv", "cvat", capsys, "unknown class name 'dragon'")
    tasks[0]["annotations"][0]["result"][0]["value"]["brushlabels"] = ["dragon"]
    (tmp_path / "dragon.json").write_text(json.dumps(tasks), encoding="utf-8")
    _refused(run_copy, tmp_path / "dragon.json", "labelstudio", capsys, "unknown class name 'dragon'")
    doc = json.loads(text)
    doc["categories"][0]["name"] = "dragon"
    (tmp_path / "dragon_coco.json").write_text(json.dumps(doc), encoding="utf-8")
    _refused(run_copy, tmp_path / "dragon_coco.json", "coco", capsys, "unknown class name 'dragon'")
    # a path outside the run: COCO file_name, Label Studio URL, a zip member
    doc = json.loads(text)
    doc["images"][0]["file_name"] = "../../etc/" + doc["images"][0]["file_name"]
    (tmp_path / "out.json").write_text(json.dumps(doc), encoding="utf-8")
    _refused(run_copy, tmp_path / "out.json", "coco", capsys, "points outside the run")
    tasks = json.loads(full)
    del tasks[0]["data"]["clipes_id"]
    tasks[0]["data"]["image"] = "/data/local-files/?d=../../secret/x.jpg"
    (tmp_path / "out_ls.json").write_text(json.dumps(tasks), encoding="utf-8")
    _refused(run_copy, tmp_path / "out_ls.json", "labelstudio", capsys, "points outside the run")
    export_run(run_copy, "cvat", tmp_path / "z.zip", progress=False)
    with zipfile.ZipFile(tmp_path / "z.zip", "a") as z:
        z.writestr("SegmentationClass/../../evil.png", b"")
    _refused(run_copy, tmp_path / "z.zip", "cvat", capsys, "points outside the run")
    # an image the run does not have, an undeclared colour, a truncated zip, an unknown format
    doc = json.loads(text)
    doc["images"][0]["file_name"] = "not_in_the_run.jpg"
    (tmp_path / "stranger.json").write_text(json.dumps(doc), encoding="utf-8")
    _refused(run_copy, tmp_path / "stranger.json", "coco", capsys, "is not an image of the run")
    Image.fromarray(np.full((*small.shape[:1], 4, 3), 7, np.uint8)).save(tmp_path / "cv" / "SegmentationClass"
                                                                          / f"{ids[0]}.png")
    lm.write_text(lm.read_text().replace("dragon:", "unsure:"))
    _refused(run_copy, tmp_path / "cv", "cvat", capsys, "not a declared label colour")
    data = (tmp_path / "z.zip").read_bytes()
    (tmp_path / "cut.zip").write_bytes(data[: len(data) // 2])
    _refused(run_copy, tmp_path / "cut.zip", "cvat", capsys, "zip")
    _refused(run_copy, tmp_path / "png", "yolo", capsys, "unknown --format 'yolo'")


# ============================================================================ odd file names, clipes label's run
def test_label_run_with_odd_names_round_trips_every_format(toy_root, tmp_path, tiny_clip_path):
    from clip_es.label import LabelConfig, label_folder

    photos = tmp_path / "photos"
    photos.mkdir()
    names = ["chien café.jpg", "熊 (1).jpg", "a b.c.jpg"]
    for src, name in zip(sorted((toy_root / "JPEGImages").glob("*.jpg")), names):
        shutil.copy(src, photos / name)
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps({"chien café.jpg": ["ball"], "熊 (1).jpg": ["star", "boat"], "a b.c.jpg": ["kite"]},
                                 ensure_ascii=False), encoding="utf-8")
    run = tmp_path / "out"
    res = label_folder(LabelConfig(images=str(photos), out=str(run), classes="ball,star,heart,ring,boat,kite",
                                   labels=str(labels), model=str(tiny_clip_path), device="cpu", workers=1, conf=0.6),
                       progress=False)
    assert res.ok and sorted(output_ids(run, CONF)) == sorted(n[:-4] for n in names)  # label saves confidence
    for fmt, out in [("cvat", "c.zip"), ("labelstudio", "ls"), ("fiftyone", "fo"), ("png", "p"), ("coco", "c.json")]:
        assert run_cli(["export", "--run", str(run), "--format", fmt, "--out", str(tmp_path / out)]) == 0
    with zipfile.ZipFile(tmp_path / "c.zip") as z:
        assert "SegmentationClass/chien café.png" in z.namelist()
        assert z.read("ImageSets/Segmentation/default.txt").decode("utf-8").splitlines() == sorted(
            n[:-4] for n in names)
    assert sorted(p.name for p in (tmp_path / "fo" / "data").iterdir()) == sorted(names)
    tasks = json.loads((tmp_path / "ls" / "tasks.json").read_text(encoding="utf-8"))
    urls = {t["data"]["file_name"]: unquote(parse_qs(urlparse(t["data"]["image"]).query)["d"][0]) for t in tasks}
    assert {k: Path(v).name for k, v in urls.items()} == {n: n for n in names}
    assert all(" " not in t["data"]["image"] for t in tasks)  # URL-quoted
    rows = list(csv.DictReader((tmp_path / "ls" / "review.csv").open(encoding="utf-8")))
    assert sorted(r["image"] for r in rows) == sorted(names)
    assert all((tmp_path / "ls" / r["overlay"]).is_file() for r in rows)
    # the way back, unchanged masks: every format reads its own export and finds nothing to store
    for t in tasks:  # Label Studio matches by URL when clipes_id is gone
        del t["data"]["clipes_id"]
        t["annotations"] = [{"result": t["predictions"][0]["result"]}]
    (tmp_path / "ls_export.json").write_text(json.dumps(tasks, ensure_ascii=False), encoding="utf-8")
    for fmt, src in [("cvat", "c.zip"), ("labelstudio", "ls_export.json"), ("fiftyone", "fo"), ("png", "p")]:
        r = import_masks(run, tmp_path / src, fmt, progress=False)
        assert (r.read, r.stored, r.unchanged) == (3, [], 3), fmt
    assert not corrected_dir(run).exists()
    with pytest.raises(MaskImportError, match="no corrected mask"):
        import_masks(run, tmp_path / "ls" / "tasks.json", "labelstudio", progress=False)  # predictions only
