"""Issue #7: bad input never crashes a batch or leaves half-written files; untrusted files
are handled safely. One test per row of the issue's matrix, each run through the stages
(``generate_cams`` / ``refine_masks`` / ``clipes ...``) on a copy of the toy fixture.

Behaviour chosen (see the report in the issue and the module docs of the stages):

* A per-image problem (an image that cannot be read, a per-image label file naming an
  unknown class, a GT mask the labels come from that is bad) is recorded in
  ``manifest.json`` (``stages.<stage>.failed``: id -> reason naming the file); the stage
  finishes the rest, prints ``N done, M failed: see RUN/manifest.json ...`` and
  ``clipes`` exits 1. Fixing the file and re-running finishes the run.
* A structural problem (class file, labels file, split list, an id that is not a plain
  file name, weights, a run folder made with other parameters, an unwritable output) is
  fatal: exit 2 with one line, no traceback (``--debug`` raises it), and nothing is
  written to the run folder.
* Odd but valid images (grayscale, RGBA, CMYK, palette, 16-bit, EXIF-rotated, smaller
  than one patch) are processed; outputs have the image's size after EXIF rotation.

The interruption rows (SIGKILL part-way, resume == fresh) are in ``test_interrupt.py``.
Reader-level checks of the same inputs are in ``test_datasets.py`` and ``test_model.py``.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clip_es.cam.run import CamConfig, generate_cams
from clip_es.cam.store import is_valid_cam, load_cam
from clip_es.data.image_io import image_size, read_image, read_mask
from clip_es.data.toy import TOY_CLASSES
from clip_es.errors import LabelError, RunDirError
from clip_es.evaluate import EvalOptions, evaluate_run
from clip_es.refine.crf import IGNORE
from clip_es.refine.run import RefineConfig, refine_masks
from clip_es.refine.store import CRF, MASKS, output_path, read_output
from clip_es.rundir import OutputWriteError, RunDir
from tests.conftest import run_cli
from tests.conftest import make_read_only

TEMPLATE = "a photo of a {}."


# ============================================================================ helpers


@pytest.fixture
def toy(toy_root: Path, tmp_path: Path) -> Path:
    """A writable copy of the 12-image toy dataset (train = 9 images)."""
    return Path(shutil.copytree(toy_root, tmp_path / "toy"))


def _ids(root: Path) -> list[str]:
    return (root / "ImageSets" / "Segmentation" / "train.txt").read_text().split()


def _jpg(root: Path, image_id: str) -> Path:
    return root / "JPEGImages" / f"{image_id}.jpg"


def _cfg(root: Path, out: Path, clip_path: Path, **kw) -> CamConfig:
    return CamConfig(dataset="toy", root=str(root), split="train", out=str(out), model=str(clip_path),
                     templates=(TEMPLATE,), device="cpu", **kw)


def _cam_argv(root: Path, out: Path, clip_path: Path, *extra: str, dataset: str = "toy",
              split: str = "train") -> list[str]:
    return ["cam", "-d", dataset, "-r", str(root), "-s", split, "-o", str(out), "-m", str(clip_path),
            "-t", TEMPLATE, "--device", "cpu", *extra]


def _cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """Run ``clipes`` in-process; ``(exit code, stdout, stderr)``."""
    capsys.readouterr()
    code = run_cli(argv)
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def _assert_one_line_error(err: str, *needles: str) -> str:
    """stderr is exactly one ``error: ...`` line (no traceback) containing every needle.

    Progress-bar refreshes (``\r``-separated, ending in ``img/s]``) are not lines of text.
    """
    assert "Traceback" not in err, err
    lines = [ln for ln in re.split(r"[\r\n]", err) if ln.strip() and not ln.rstrip().endswith("img/s]")]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def _no_temp_files(folder: Path) -> None:
    assert not [p for p in folder.rglob(".tmp-*")], list(folder.rglob(".tmp-*"))


def _files(folder: Path, pattern: str) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.glob(pattern))}


def _manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


# ============================================================================ images: bad files


def _break_image(root: Path, image_id: str, kind: str) -> Path:
    """Damage ``image_id``'s file as the row says; return the path the stage will name."""
    path = _jpg(root, image_id)
    if kind == "missing":
        path.unlink()
    elif kind == "zero_bytes":
        path.write_bytes(b"")
    elif kind == "truncated_jpeg":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 3])
    elif kind == "text_with_image_extension":
        path.write_text("image,labels\nthis is a CSV file, not a JPEG\n")
    elif kind == "above_decode_cap":  # 9000 px wide: refused from the header, never decoded
        path.unlink()
        path = path.with_suffix(".png")
        Image.new("RGB", (9000, 16), (10, 200, 30)).save(path)
    else:  # pragma: no cover
        raise ValueError(kind)
    return path


@pytest.mark.parametrize("kind, needle", [
    ("missing", "image file not found"),
    ("zero_bytes", "empty (0 bytes)"),
    ("truncated_jpeg", "not a readable image"),
    ("text_with_image_extension", "not a readable image"),
    ("above_decode_cap", "above the 8192-pixel side limit"),
])
def test_bad_image_is_recorded_and_the_rest_is_processed(toy, tmp_path, tiny_clip, tiny_clip_path, capsys,
                                                         kind, needle):
    ids = _ids(toy)
    bad = ids[4]
    original = _jpg(toy, bad).read_bytes()
    bad_path = _break_image(toy, bad, kind)
    out = tmp_path / "run"
    res = generate_cams(_cfg(toy, out, tiny_clip_path), clip=tiny_clip, progress=False)
    # the bad image is listed with a reason naming its file; the other 8 are done
    assert list(res.failed) == [bad] and res.done == len(ids) - 1
    assert str(bad_path) in res.failed[bad] and needle in res.failed[bad]
    st = _manifest(out)["stages"]["cam"]
    assert st["status"] == "partial" and st["failed"] == {bad: res.failed[bad]}
    assert sorted(p.stem for p in (out / "cam").glob("*.npz")) == sorted(set(ids) - {bad})
    assert all(is_valid_cam(p) for p in (out / "cam").glob("*.npz"))
    _no_temp_files(out)
    # the command line: summary line, exit code 1 (the 8 done are skipped, the bad one fails again)
    code, stdout, _ = _cli(_cam_argv(toy, out, tiny_clip_path), capsys)
    assert code == 1
    assert f"0 done, 1 failed: see {out / 'manifest.json'} (stages.cam.failed); 8 already there" in stdout
    # fix the file and re-run: the run completes and the failure is cleared
    bad_path.unlink(missing_ok=True)
    _jpg(toy, bad).write_bytes(original)
    res = generate_cams(_cfg(toy, out, tiny_clip_path), clip=tiny_clip, progress=False)
    assert res.ok and res.done == 1 and res.skipped == len(ids) - 1
    st = _manifest(out)["stages"]["cam"]
    assert st["status"] == "done" and st["failed"] == {}


def test_refine_skips_images_whose_cam_failed(toy, tmp_path, tiny_clip, tiny_clip_path):
    ids = _ids(toy)
    _break_image(toy, ids[0], "zero_bytes")
    out = tmp_path / "run"
    generate_cams(_cfg(toy, out, tiny_clip_path, limit=3), clip=tiny_clip, progress=False)
    res = refine_masks(RefineConfig(run=str(out), workers=1), progress=False)
    assert res.ok and res.done == 2
    assert not output_path(out, MASKS, ids[0]).exists()


# ============================================================================ images: odd but valid


def _make_odd(root: Path, image_id: str, kind: str) -> tuple[Path, np.ndarray]:
    """Re-save ``image_id`` in the row's format; return its path and the RGB a viewer shows."""
    path = _jpg(root, image_id)
    with Image.open(path) as im:
        rgb = np.asarray(im.convert("RGB"))
    h, w = rgb.shape[:2]
    path.unlink()
    png = path.with_suffix(".png")
    if kind == "grayscale":
        im = Image.fromarray(rgb).convert("L")
        im.save(path, quality=95)
        return path, np.repeat(np.asarray(im)[..., None], 3, 2)
    if kind == "rgba":  # alpha 255 except a transparent left column band (white behind it)
        alpha = np.full((h, w), 255, np.uint8)
        alpha[:, :5] = 0
        Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(png)
        shown = rgb.copy()
        shown[:, :5] = 255
        return png, shown
    if kind == "cmyk":
        Image.fromarray(rgb).convert("CMYK").save(path, quality=95)
        return path, rgb
    if kind == "palette":
        im = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
        im.save(png)
        return png, np.asarray(im.convert("RGB"))
    if kind == "16bit":
        gray = rgb.mean(2).round().astype(np.uint16) * 257
        Image.fromarray(gray).save(png)  # mode I;16
        return png, np.repeat((gray // 257).astype(np.uint8)[..., None], 3, 2)
    if kind == "exif_rotated":  # stored turned 90 degrees counter-clockwise; EXIF 6 turns it back
        exif = Image.Exif()
        exif[0x0112] = 6
        Image.fromarray(np.ascontiguousarray(np.rot90(rgb, 1))).save(path, quality=95, exif=exif)
        return path, rgb
    if kind == "smaller_than_patch":  # 8x8 < one 16-px patch; its GT is scaled with it
        Image.fromarray(rgb).resize((8, 8), Image.Resampling.BILINEAR).save(png)
        gt = root / "SegmentationClass" / f"{image_id}.png"
        with Image.open(gt) as g:
            g.resize((8, 8), Image.Resampling.NEAREST).save(gt)
        with Image.open(png) as im:
            return png, np.asarray(im.convert("RGB"))
    raise ValueError(kind)  # pragma: no cover


@pytest.mark.parametrize("kind", ["grayscale", "rgba", "cmyk", "palette", "16bit", "exif_rotated",
                                  "smaller_than_patch"])
def test_odd_but_valid_image_is_processed_at_its_size(toy, tmp_path, tiny_clip, tiny_clip_path, kind):
    """Also: the ground truth (drawn on the image as a viewer shows it, EXIF applied) stays
    aligned: eval reads every GT mask of the run and checks its size against the image."""
    image_id = _ids(toy)[0]
    path, shown = _make_odd(toy, image_id, kind)
    hw = shown.shape[:2]
    decoded = read_image(path)
    assert decoded.shape == (*hw, 3) and image_size(path) == hw
    assert np.abs(decoded.astype(int) - shown.astype(int)).mean() < 8  # as a viewer shows it
    out = tmp_path / "run"
    res = generate_cams(_cfg(toy, out, tiny_clip_path, limit=2), clip=tiny_clip, progress=False)
    assert res.ok and res.done == 2
    rec = load_cam(out / "cam" / f"{image_id}.npz")
    assert rec.size == hw and rec.cam.shape == rec.caa.shape == (len(rec.keys), *hw) and len(rec.keys) > 0
    assert np.isfinite(rec.cam).all() and 0 <= rec.cam.min() and rec.cam.max() <= 1
    res = refine_masks(RefineConfig(run=str(out), workers=1, limit=1), progress=False)
    assert res.ok and res.done == 1
    mask = read_output(output_path(out, MASKS, image_id))
    assert mask.shape == hw
    assert set(np.unique(mask)) <= {0, IGNORE, *(int(k) + 1 for k in rec.keys)}
    rep = evaluate_run(out, EvalOptions(stages=("masks",)), progress=False)
    assert rep["stages"]["masks"]["images"] == 1


# ============================================================================ images: very large


_MEASURE = textwrap.dedent("""
    import json, sys

    def vm(key):  # this process's own memory (ru_maxrss would carry the parent's peak over exec)
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    stage, root, out, clip = sys.argv[1:5]
    if stage == "cam":
        from clip_es.cam.run import CamConfig, generate_cams
    else:
        from clip_es.refine.run import RefineConfig, refine_masks
    base = vm("VmHWM")
    if stage == "cam":
        res = generate_cams(CamConfig(dataset="folder", root=root, split="labels", out=out, model=clip,
                                      templates=("a photo of a {}.",), device="cpu"), progress=False)
    else:
        res = refine_masks(RefineConfig(run=out, workers=1, save_conf=True), progress=False)
    print(json.dumps({"ok": res.ok, "done": res.done, "base_mb": base, "peak_mb": vm("VmHWM")}))
""")


def _measure(stage: str, root: Path, out: Path, clip: Path) -> dict:
    """Run one stage in a fresh interpreter; its peak RSS (``VmHWM``) and the peak after the imports."""
    proc = subprocess.run([sys.executable, "-c", _MEASURE, stage, str(root), str(out), str(clip)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow  # 48 MP image, 1.6 GB peak in a child process (about 15 s on an idle 2-core machine)
@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="measures memory with /proc")
def test_very_large_image_is_processed_with_bounded_memory(tmp_path, tiny_clip_path):
    """An 8000x6000 JPEG (48 MP) goes through cam and refine at the default working-size cap
    (``max_side=1024``): cam runs CLIP on a 1024x768 image (64x48 patches), refine runs the
    CRF at 1024x768, and every output has the full 6000x8000 size.

    Memory bound (measured with ``ru_maxrss`` of a fresh interpreter per stage, tiny test CLIP,
    CPU): the image adds under 1 GB to the process on top of what the imports take (measured:
    cam +0.83 GB over a 0.73 GB torch baseline = 1.56 GB peak, of which 0.46 GB is decoding the
    JPEG and 0.3 GB loading the CLIP; refine +0.47 GB over 0.07 GB = 0.54 GB peak, mostly
    decoding). Asserted: growth < 1.2 GB, cam peak < 2 GB, refine peak < 1 GB.
    """
    import cv2

    from clip_es.data.toy import scene_for

    root = tmp_path / "big"
    (root / "images").mkdir(parents=True)
    scene = scene_for(5, 0, (600, 800))
    big = cv2.resize(scene.image, (8000, 6000), interpolation=cv2.INTER_LINEAR)
    assert cv2.imwrite(str(root / "images" / "huge.jpg"), np.ascontiguousarray(big[..., ::-1]),
                       [cv2.IMWRITE_JPEG_QUALITY, 90])
    del big
    (root / "classes.txt").write_text("".join(f"{c}\n" for c in TOY_CLASSES))
    (root / "labels.csv").write_text("huge," + ";".join(TOY_CLASSES[c - 1] for c in scene.labels) + "\n")
    out = tmp_path / "run"

    cam = _measure("cam", root, out, tiny_clip_path)
    assert cam["ok"] and cam["done"] == 1
    rec = load_cam(out / "cam" / "huge.npz", full_size=False)
    assert rec.cam.shape[1:] == (48, 64)  # 768x1024 working image, 16-px patches
    with np.load(out / "cam" / "huge.npz") as z:
        assert tuple(z["size"]) == (6000, 8000)
    assert RunDir(out).stage_info("cam")["params"]["max_side"] == 1024

    ref = _measure("refine", root, out, tiny_clip_path)
    assert ref["ok"] and ref["done"] == 1
    for kind in (MASKS, CRF, "conf"):
        assert read_mask(output_path(out, kind, "huge")).shape == (6000, 8000)

    assert cam["peak_mb"] - cam["base_mb"] < 1200, cam
    assert cam["peak_mb"] < 2048, cam
    assert ref["peak_mb"] - ref["base_mb"] < 1200, ref
    assert ref["peak_mb"] < 1024, ref


def test_image_above_the_working_cap_gives_full_size_outputs(toy, tmp_path, tiny_clip, tiny_clip_path):
    """The fast twin of the 48 MP test, with a 256-px cap: a 640x480 image runs at 256x192 in
    both stages (a 16x12 patch grid stored, single-view and multi-view alike),
    and every output, read back, has the original 640x480 size."""
    import cv2

    image_id = _ids(toy)[0]
    path = _jpg(toy, image_id)
    cv2.imwrite(str(path), cv2.resize(read_image(path), (640, 480))[..., ::-1].copy())
    gt = _gt(toy, image_id)
    _save_gt(gt, cv2.resize(read_mask(gt), (640, 480), interpolation=cv2.INTER_NEAREST_EXACT))
    for name, kw in (("single", {}), ("multi", {"scales": (1.0, 0.5), "flip": True})):
        out = tmp_path / name
        cfg = _cfg(toy, out, tiny_clip_path, limit=1, max_side=256, **kw)
        assert generate_cams(cfg, clip=tiny_clip, progress=False).ok
        stored = load_cam(out / "cam" / f"{image_id}.npz", full_size=False)
        assert stored.cam.shape[1:] == (12, 16)  # the working size's patch grid, multi-view too
        rec = load_cam(out / "cam" / f"{image_id}.npz")
        assert rec.size == (480, 640) and rec.caa.shape[1:] == (480, 640)
        res = refine_masks(RefineConfig(run=str(out), workers=1, save_conf=True, max_side=256), progress=False)
        assert res.ok and res.done == 1
        for kind in (MASKS, CRF, "conf"):
            assert read_mask(output_path(out, kind, image_id)).shape == (480, 640)
        assert RunDir(out).stage_info("refine")["params"]["max_side"] == 256
        assert evaluate_run(out, EvalOptions(stages=("masks",)), progress=False)["stages"]["masks"]["images"] == 1


def test_working_size_cap_keeps_small_images_unchanged_and_rejects_bad_values(toy, tmp_path, tiny_clip,
                                                                              tiny_clip_path, capsys):
    a = generate_cams(_cfg(toy, tmp_path / "capped", tiny_clip_path, limit=2), clip=tiny_clip, progress=False)
    b = generate_cams(_cfg(toy, tmp_path / "native", tiny_clip_path, limit=2, max_side=None), clip=tiny_clip,
                      progress=False)
    assert a.ok and b.ok
    assert _files(tmp_path / "capped" / "cam", "*.npz") == _files(tmp_path / "native" / "cam", "*.npz")
    code, _, err = _cli(_cam_argv(toy, tmp_path / "bad", tiny_clip_path, "--max-side", "-5"), capsys)
    assert code == 2
    _assert_one_line_error(err, "--max-side")


# ============================================================================ labels


def _write_xml(root: Path, image_id: str, names: list[str]) -> None:
    objs = "".join(f"<object><name>{n}</name></object>" for n in names)
    (root / "Annotations" / f"{image_id}.xml").write_text(f"<annotation>{objs}</annotation>")


def test_image_without_labels_gives_empty_record_and_background_mask(toy, tmp_path, tiny_clip, tiny_clip_path):
    image_id = _ids(toy)[0]
    _write_xml(toy, image_id, [])
    out = tmp_path / "run"
    assert generate_cams(_cfg(toy, out, tiny_clip_path, limit=2), clip=tiny_clip, progress=False).ok
    rec = load_cam(out / "cam" / f"{image_id}.npz")
    hw = image_size(_jpg(toy, image_id))
    assert rec.keys.shape == (0,) and rec.cam.shape == rec.caa.shape == (0, *hw)
    res = refine_masks(RefineConfig(run=str(out), workers=1, limit=1), progress=False)
    assert res.ok and res.done == 1
    for kind in (MASKS, CRF):
        m = read_output(output_path(out, kind, image_id))
        assert m.shape == hw and (m == 0).all()  # all background, nothing ignored


def test_unknown_class_in_a_voc_xml_is_a_per_image_failure(toy, tmp_path, tiny_clip, tiny_clip_path):
    """A VOC/toy label file is per image, so an unknown name fails that image only (documented skip)."""
    ids = _ids(toy)
    _write_xml(toy, ids[1], ["ball", "unicorn"])
    res = generate_cams(_cfg(toy, tmp_path / "run", tiny_clip_path, limit=3), clip=tiny_clip, progress=False)
    assert list(res.failed) == [ids[1]] and res.done == 2
    reason = res.failed[ids[1]]
    assert f"Annotations/{ids[1]}.xml" in reason and "'unicorn'" in reason
    assert "known: " + ", ".join(TOY_CLASSES) in reason


def _folder_ds(toy_root: Path, tmp_path: Path, labels_name: str, labels_text: str) -> Path:
    """A folder dataset of three toy images ``img1..img3`` with the toy class file."""
    root = tmp_path / "mine"
    (root / "images").mkdir(parents=True)
    for i, image_id in enumerate(_ids(toy_root)[:3], 1):
        shutil.copy(_jpg(toy_root, image_id), root / "images" / f"img{i}.jpg")
    (root / "classes.txt").write_text("".join(f"{c}\n" for c in TOY_CLASSES))
    (root / labels_name).write_text(labels_text)
    return root


@pytest.mark.parametrize("name, text, needles", [
    ("labels.csv", "image,labels\nimg1,ball\nimg2,ball;unicorn\n",
     ["labels.csv:3", "'unicorn'", "known classes: " + ", ".join(TOY_CLASSES)]),
    ("labels.csv", 'img1,ball\n"img2,star\n', ["labels.csv:", "malformed CSV"]),
    ("labels.json", '{"img1": ["ball"],\n "img2": ["star"],}', ["labels.json:2:", "malformed JSON"]),
    ("labels.csv", "img1,ball\nimg2,star\nimg1.jpg,heart\n", ["labels.csv:3", "'img1' is listed twice", "line 1"]),
    ("labels.json", '{"img1": ["ball"], "img1.jpg": ["star"]}', ["labels.json", "'img1' is listed twice"]),
    ("labels.csv", "img1,ball\n../outside,star\n", ["labels.csv:2", "'../outside' is not a plain file name"]),
    ("labels.csv", "img1,ball\nOUTSIDE,star\n", ["labels.csv:2", "is not a plain file name"]),
], ids=["unknown_label", "malformed_csv", "malformed_json", "duplicate_id_csv", "duplicate_id_json",
        "dotdot_id", "absolute_path_id"])
def test_structural_labels_problem_is_fatal_one_line(toy_root, tmp_path, tiny_clip_path, capsys, name, text,
                                                     needles):
    """Fatal at dataset open: exit 2, one line naming the file (and line), nothing written.
    Ids with ``../`` or an absolute path are refused before any file is opened, so nothing
    outside the dataset root is read and nothing outside the run folder is written."""
    outside = tmp_path / "outside.jpg"  # what '../outside' would reach from images/
    shutil.copy(_jpg(toy_root, _ids(toy_root)[0]), outside)
    text = text.replace("OUTSIDE", str(outside.with_suffix("")))
    root = _folder_ds(toy_root, tmp_path, name, text)
    out = tmp_path / "run"
    before = sorted(p for p in tmp_path.rglob("*"))
    code, stdout, err = _cli(_cam_argv(root, out, tiny_clip_path, dataset="folder", split=Path(name).stem), capsys)
    assert code == 2 and stdout == ""
    _assert_one_line_error(err, str(root / name), *needles)
    assert not out.exists()
    assert sorted(p for p in tmp_path.rglob("*")) == before


def test_dotdot_id_in_a_voc_split_file_is_fatal(toy, tmp_path, tiny_clip_path, capsys):
    split = toy / "ImageSets" / "Segmentation" / "train.txt"
    split.write_text(split.read_text() + "../../outside\n")
    out = tmp_path / "run"
    code, _, err = _cli(_cam_argv(toy, out, tiny_clip_path), capsys)
    assert code == 2
    _assert_one_line_error(err, f"{split}:10", "'../../outside' is not a plain file name")
    assert not out.exists()


def test_debug_shows_the_traceback(toy_root, tmp_path, tiny_clip_path):
    from clip_es.cli import main

    root = _folder_ds(toy_root, tmp_path, "labels.csv", "img1,unicorn\n")
    with pytest.raises(LabelError, match="unicorn"):
        main(["--debug", *_cam_argv(root, tmp_path / "run", tiny_clip_path, dataset="folder", split="labels")])


def test_duplicate_id_in_a_voc_split_file_is_processed_once(toy, tmp_path, tiny_clip, tiny_clip_path):
    """A split list naming an image twice means the same image: it is processed once (a warning is logged)."""
    split = toy / "ImageSets" / "Segmentation" / "train.txt"
    ids = _ids(toy)
    split.write_text("\n".join(ids[:2] + ids[:1]) + "\n")
    res = generate_cams(_cfg(toy, tmp_path / "run", tiny_clip_path), clip=tiny_clip, progress=False)
    assert res.ok and res.done == 2


# ============================================================================ class files


@pytest.mark.parametrize("text, needles", [
    ("# only a comment\n\n", ["no classes found"]),
    ("ball\nstar\nball, sphere\n", [":3:", "'ball' is listed twice (first on line 1)"]),
    ("ball\n, sphere, orb\n", [":2:", "has synonyms but no class name"]),
], ids=["empty", "duplicate_class", "synonyms_only_line"])
def test_bad_class_file_is_fatal_one_line(toy, tmp_path, tiny_clip_path, capsys, text, needles):
    cf = tmp_path / "classes.txt"
    cf.write_text(text)
    out = tmp_path / "run"
    code, _, err = _cli(_cam_argv(toy, out, tiny_clip_path, "--class-file", str(cf)), capsys)
    assert code == 2
    _assert_one_line_error(err, str(cf), *needles)
    assert not out.exists()


# ============================================================================ ground truth


def _gt(root: Path, image_id: str) -> Path:
    return root / "SegmentationClass" / f"{image_id}.png"


def _save_gt(path: Path, m: np.ndarray) -> None:
    from clip_es.data.image_io import mask_to_png_bytes

    path.write_bytes(mask_to_png_bytes(m))


@pytest.mark.parametrize("kind, needles", [
    ("other_size", ["ground truth must have the image's size"]),
    ("value_out_of_range", ["mask values [200] are outside 0..8 and not 255"]),
])
def test_bad_ground_truth(toy, tmp_path, tiny_clip, tiny_clip_path, capsys, kind, needles):
    """Eval needs every GT mask right: a bad one is fatal there (exit 2, one line naming the mask).
    In cam the GT is read only when an image has no label XML; then it fails that image only."""
    ids = _ids(toy)
    gt_path = _gt(toy, ids[1])
    m = read_mask(gt_path)
    if kind == "other_size":
        m = np.zeros((m.shape[0] + 5, m.shape[1]), np.uint8)
        needles = [*needles, f"{m.shape[1]}x{m.shape[0]} (WxH)"]
    else:
        m = m.copy()
        m[:3, :3] = 200
    _save_gt(gt_path, m)
    out = tmp_path / "run"
    assert generate_cams(_cfg(toy, out, tiny_clip_path, limit=3), clip=tiny_clip, progress=False).ok
    code, _, err = _cli(["eval", "--run", str(out)], capsys)
    assert code == 2
    _assert_one_line_error(err, str(gt_path), *needles)
    # labels from the GT (no XML): that image fails in cam, the others are done
    (toy / "Annotations" / f"{ids[1]}.xml").unlink()
    res = generate_cams(_cfg(toy, tmp_path / "run2", tiny_clip_path, limit=3), clip=tiny_clip, progress=False)
    assert list(res.failed) == [ids[1]] and res.done == 2
    assert str(gt_path) in res.failed[ids[1]] and needles[0] in res.failed[ids[1]]


# ============================================================================ checkpoints


class _RunsCode:
    """Pickles to a call of ``os.mkdir(marker)``: loading it with plain pickle would run it."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def _bad_checkpoint(tmp_path: Path, kind: str, good: Path) -> Path:
    import torch

    p = tmp_path / f"{kind}.pt"
    if kind == "code_on_load":
        torch.save({"visual.conv1.weight": torch.zeros(1), "x": _RunsCode(tmp_path / "pwned")}, p)
    elif kind == "truncated":
        p.write_bytes(good.read_bytes()[:4096])
    elif kind == "other_architecture":
        torch.save({"visual.trunk.conv.weight": torch.zeros(2, 2), "head.weight": torch.zeros(3)}, p)
    return p


@pytest.mark.parametrize("kind, needles", [
    ("code_on_load", ["refused", "could run code"]),
    ("truncated", ["not a readable checkpoint"]),
    ("other_architecture", ["not in the OpenAI layout", "--model"]),
])
def test_bad_checkpoint_is_fatal_one_line(toy, tmp_path, tiny_clip_path, capsys, kind, needles):
    """Library-level checks are in test_model.py; here: the stage refuses it with one line."""
    ckpt = _bad_checkpoint(tmp_path, kind, tiny_clip_path)
    out = tmp_path / "run"
    code, _, err = _cli(_cam_argv(toy, out, ckpt), capsys)
    assert code == 2
    _assert_one_line_error(err, str(ckpt), *needles)
    assert not (tmp_path / "pwned").exists()  # the payload never ran
    assert not out.exists()


def test_checkpoint_of_another_architecture_than_requested(toy, tmp_path, tiny_clip_path, capsys):
    argv = ["cam", "-d", "toy", "-r", str(toy), "-o", str(tmp_path / "run"), "-m", "ViT-B-16",
            "--pretrained", str(tiny_clip_path), "-t", TEMPLATE, "--device", "cpu", "--limit", "1"]
    code, _, err = _cli(argv, capsys)
    assert code == 2 and "ViT-B-16" in err


# ============================================================================ parallel refine


_POOL_AFTER_THREADS = textwrap.dedent("""
    import sys
    import cv2
    import numpy as np
    from clip_es.refine.run import RefineConfig, refine_masks

    def main():
        cv2.setNumThreads(4)  # the caller has used OpenCV's thread pool (generate_cams does)
        a = np.random.default_rng(0).random((2000, 2000), dtype=np.float32)
        for _ in range(3):
            cv2.resize(a, (700, 700), interpolation=cv2.INTER_AREA)
            cv2.GaussianBlur(a, (9, 9), 2)
        res = refine_masks(RefineConfig(run=sys.argv[1], workers=2), progress=False)
        print(res.summary())
        sys.exit(0 if res.ok and res.done == 4 else 1)

    if __name__ == "__main__":
        main()
""")


def test_parallel_refine_after_the_caller_used_threads(toy, tmp_path, tiny_clip, tiny_clip_path):
    """Python-API use (cam, then refine with a pool, in one process) must neither hang nor crash:
    with forked workers this failed every time (hang in cv2.setNumThreads or BrokenProcessPool)."""
    out = tmp_path / "run"
    assert generate_cams(_cfg(toy, out, tiny_clip_path, limit=4), clip=tiny_clip, progress=False).ok
    script = tmp_path / "script.py"
    script.write_text(_POOL_AFTER_THREADS)
    proc = subprocess.run([sys.executable, str(script), str(out)], capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "refine: 4 done, 0 failed" in proc.stdout


# ============================================================================ run directory


def test_another_runs_manifest_is_refused_and_left_unchanged(toy, toy_root, tmp_path, tiny_clip, tiny_clip_path,
                                                             capsys):
    out = tmp_path / "run"
    assert generate_cams(_cfg(toy, out, tiny_clip_path, limit=2), clip=tiny_clip, progress=False).ok
    manifest = (out / "manifest.json").read_bytes()
    # other parameters into the same run: refused, naming what changed
    code, _, err = _cli(_cam_argv(toy, out, tiny_clip_path, "--caa-threshold", "0.5", "--limit", "2"), capsys)
    assert code == 2
    _assert_one_line_error(err, str(out), "changed: caa_threshold")
    # another model: refused, and the manifest still names the model the outputs came from
    other = tmp_path / "other-clip.pt"
    shutil.copy(tiny_clip_path, other)
    code, _, err = _cli(_cam_argv(toy, out, other, "--limit", "2"), capsys)
    assert code == 2
    _assert_one_line_error(err, "changed: model")
    # another dataset into a folder holding this run's manifest
    code, _, err = _cli(_cam_argv(toy_root, out, tiny_clip_path, "--limit", "2"), capsys)
    assert code == 2
    _assert_one_line_error(err, "this run was made for dataset", "use a new run folder")
    assert (out / "manifest.json").read_bytes() == manifest
    _no_temp_files(out)


def test_corrupt_cam_cache_file_is_recomputed(toy, tmp_path, tiny_clip, tiny_clip_path):
    out = tmp_path / "run"
    cfg = _cfg(toy, out, tiny_clip_path, limit=4)
    generate_cams(cfg, clip=tiny_clip, progress=False)
    fresh = _files(out / "cam", "*.npz")
    files = sorted((out / "cam").glob("*.npz"))
    files[0].write_bytes(files[0].read_bytes()[:100])  # truncated
    data = bytearray(files[2].read_bytes())
    data[len(data) // 2: len(data) // 2 + 64] = b"\x00" * 64  # damaged in the middle (CRC mismatch)
    files[2].write_bytes(bytes(data))
    files[3].write_bytes(b"")  # empty
    assert not any(is_valid_cam(f) for f in (files[0], files[2], files[3]))
    res = generate_cams(cfg, clip=tiny_clip, progress=False)
    assert res.ok and res.done == 3 and res.skipped == 1
    assert _files(out / "cam", "*.npz") == fresh


def test_corrupt_refine_png_is_recomputed(toy, tmp_path, tiny_clip, tiny_clip_path):
    out = tmp_path / "run"
    generate_cams(_cfg(toy, out, tiny_clip_path, limit=3), clip=tiny_clip, progress=False)
    cfg = RefineConfig(run=str(out), workers=1)
    refine_masks(cfg, progress=False)
    fresh = _files(out / "refine", "*/*.png")
    masks = sorted((out / "refine" / MASKS).glob("*.png"))
    masks[0].write_bytes(masks[0].read_bytes()[:60])  # truncated mask
    crf = sorted((out / "refine" / CRF).glob("*.png"))
    crf[1].write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)  # PNG signature, garbage body
    res = refine_masks(cfg, progress=False)
    assert res.ok and res.done == 2 and res.skipped == 1
    assert _files(out / "refine", "*/*.png") == fresh


def test_read_only_run_folder_is_a_clear_error(toy, tmp_path, tiny_clip, tiny_clip_path, capsys, monkeypatch):
    out = tmp_path / "run"
    cfg = _cfg(toy, out, tiny_clip_path, limit=2)
    generate_cams(_cfg(toy, out, tiny_clip_path, limit=1), clip=tiny_clip, progress=False)
    manifest = (out / "manifest.json").read_bytes()
    make_read_only([out, out / "cam"], out, monkeypatch)
    try:
        with pytest.raises(RunDirError, match="not writable") as ei:
            generate_cams(cfg, clip=tiny_clip, progress=False)
        assert str(out) in str(ei.value) and "choose a writable run folder" in str(ei.value)
        code, _, err = _cli(_cam_argv(toy, out, tiny_clip_path, "--limit", "2"), capsys)
        assert code == 2
        _assert_one_line_error(err, str(out), "not writable")
    finally:
        for d in (out, out / "cam"):
            d.chmod(0o755)
    assert (out / "manifest.json").read_bytes() == manifest
    assert len(list((out / "cam").glob("*.npz"))) == 1
    _no_temp_files(out)


class _DiskFull:
    """``os.fchmod`` replacement (every atomic write calls it once, after writing and before the
    rename; cam records skip the fsync): the disk fills up after ``allow`` more files under
    ``folder``. From then on every write fails with ENOSPC, the manifest's included, as on a full disk.
    """

    def __init__(self, folder: Path, allow: int):
        self.folder, self.allow, self.full = str(folder) + os.sep, allow, False
        self.real = os.fchmod

    def __call__(self, fd: int, mode: int) -> None:
        if not self.full and os.readlink(f"/proc/self/fd/{fd}").startswith(self.folder):
            self.full = self.allow <= 0
            self.allow -= 1
        if self.full:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.real(fd, mode)


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc")
def test_disk_full_during_cam_is_a_clear_error_and_nothing_half_written(toy, tmp_path, tiny_clip, tiny_clip_path,
                                                                        capsys, monkeypatch):
    ref = tmp_path / "ref"
    generate_cams(_cfg(toy, ref, tiny_clip_path, limit=5), clip=tiny_clip, progress=False)
    out = tmp_path / "run"
    cfg = _cfg(toy, out, tiny_clip_path, limit=5)
    monkeypatch.setattr(os, "fchmod", _DiskFull(out / "cam", allow=3))  # config.json + 2 records
    with pytest.raises(OutputWriteError, match="No space left on device") as ei:
        generate_cams(cfg, clip=tiny_clip, progress=False)
    msg = str(ei.value)
    assert f"cannot write {out / 'cam'}" in msg and "free disk space" in msg
    _no_temp_files(out)
    assert len(list((out / "cam").glob("*.npz"))) == 2
    assert all(is_valid_cam(p) for p in (out / "cam").glob("*.npz"))
    assert _manifest(out)["stages"]["cam"]["status"] == "running"  # the manifest is intact
    code, _, err = _cli(_cam_argv(toy, out, tiny_clip_path, "--limit", "5"), capsys)
    assert code == 2
    _assert_one_line_error(err, "No space left on device")
    monkeypatch.undo()  # space freed: the same command finishes the run, identical to a clean one
    res = generate_cams(cfg, clip=tiny_clip, progress=False)
    assert res.ok and res.done == 3 and res.skipped == 2
    assert _files(out / "cam", "*.npz") == _files(ref / "cam", "*.npz")
    _no_temp_files(out)


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc")
def test_disk_full_during_refine_is_a_clear_error_and_nothing_half_written(toy, tmp_path, tiny_clip,
                                                                           tiny_clip_path, monkeypatch):
    out = tmp_path / "run"
    generate_cams(_cfg(toy, out, tiny_clip_path, limit=4), clip=tiny_clip, progress=False)
    ref = Path(shutil.copytree(out, tmp_path / "ref"))
    refine_masks(RefineConfig(run=str(ref), workers=1), progress=False)
    cfg = RefineConfig(run=str(out), workers=1)
    # config.json, then crf + mask of the 1st image, then the 2nd image's crf: its mask hits the full disk
    monkeypatch.setattr(os, "fchmod", _DiskFull(out / "refine", allow=4))
    with pytest.raises(OutputWriteError, match="No space left on device"):
        refine_masks(cfg, progress=False)
    _no_temp_files(out)
    assert len(list((out / "refine" / CRF).glob("*.png"))) == 2
    assert len(list((out / "refine" / MASKS).glob("*.png"))) == 1
    for p in (out / "refine").glob("*/*.png"):
        read_mask(p)  # every file there is complete
    assert _manifest(out)["stages"]["refine"]["status"] == "running"
    monkeypatch.undo()
    res = refine_masks(cfg, progress=False)
    assert res.ok and res.done == 3 and res.skipped == 1
    assert _files(out / "refine", "*/*.png") == _files(ref / "refine", "*/*.png")
