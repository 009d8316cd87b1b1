"""Issue 15, parts 2-5: precision, batched images, the data loader and the thread knob.

Speed itself is shown by ``pipelines/bench/bench_cam_stage.py`` (never by timed tests);
these tests pin what must not change: bytes across batch sizes and loaders, the
precision choice and its record, bf16 maps agreeing with fp32.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from clip_es.cam.run import CamConfig, generate_cams
from clip_es.cam.store import load_cam
from clip_es.errors import ConfigError
from clip_es.model import precision as prec
from clip_es.model.tiny import TINY_CHECKPOINT
from clip_es.rundir import RunDir
from clip_es.threads import available_cpus, default_threads, resolve_threads, split_threads, use_threads
from tests.conftest import run_cli

TEMPLATE = ("a photo of a {}.",)


def _cfg(root, clip_path, out, **kw) -> CamConfig:
    kw.setdefault("templates", TEMPLATE)
    return CamConfig(dataset="toy", root=str(root), split="trainval", out=str(out), model=str(clip_path),
                     device="cpu", **kw)


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.npz"))}


# ----------------------------------------------------------------------------- batching and loader
@pytest.mark.parametrize("views", [{}, {"scales": (1.0, 0.5), "flip": True}])
def test_fp32_batch_of_four_is_byte_identical_to_one(toy_root, tiny_clip, tiny_clip_path, tmp_path, views):
    one = generate_cams(_cfg(toy_root, tiny_clip_path, tmp_path / "b1", precision="fp32", **views),
                        clip=tiny_clip, progress=False)
    four = generate_cams(_cfg(toy_root, tiny_clip_path, tmp_path / "b4", precision="fp32", batch_size=4, **views),
                         clip=tiny_clip, progress=False)
    assert one.ok and four.ok and one.done == four.done == 12
    a, b = _files(tmp_path / "b1" / "cam"), _files(tmp_path / "b4" / "cam")
    assert len(a) == 12 and a == b
    # batch size is not an output parameter: a run made at B=1 resumes at B=4
    assert RunDir(tmp_path / "b1").stage_info("cam")["hash"] == RunDir(tmp_path / "b4").stage_info("cam")["hash"]


def test_batches_group_images_by_working_size(toy_root, tiny_clip, tiny_clip_path, tmp_path):
    """Toy images have one size; a mixed-size split (cap at 48 px for half of them by resizing)
    still gives the bytes of B=1, whatever the grouping."""
    import shutil

    import cv2

    from clip_es.data.image_io import read_image

    root = Path(shutil.copytree(toy_root, tmp_path / "toy"))
    ids = (root / "ImageSets" / "Segmentation" / "trainval.txt").read_text().split()
    for image_id in ids[::2]:
        p = root / "JPEGImages" / f"{image_id}.jpg"
        img = read_image(p)
        cv2.imwrite(str(p), cv2.resize(img, (img.shape[1] * 3 // 4, img.shape[0] * 3 // 4))[..., ::-1].copy())
        gt = root / "SegmentationClass" / f"{image_id}.png"
        from PIL import Image

        with Image.open(gt) as g:
            g.resize((img.shape[1] * 3 // 4, img.shape[0] * 3 // 4), Image.Resampling.NEAREST).save(gt)
    one = generate_cams(_cfg(root, tiny_clip_path, tmp_path / "b1", precision="fp32"), clip=tiny_clip,
                        progress=False)
    three = generate_cams(_cfg(root, tiny_clip_path, tmp_path / "b3", precision="fp32", batch_size=3),
                          clip=tiny_clip, progress=False)
    assert one.ok and three.ok
    assert _files(tmp_path / "b1" / "cam") == _files(tmp_path / "b3" / "cam")


def test_loader_workers_give_the_same_records_and_failures(toy_root, tiny_clip, tiny_clip_path, tmp_path):
    import shutil

    root = Path(shutil.copytree(toy_root, tmp_path / "toy"))
    ids = (root / "ImageSets" / "Segmentation" / "trainval.txt").read_text().split()
    (root / "JPEGImages" / f"{ids[3]}.jpg").write_bytes(b"")  # a per-image failure, met in a worker
    inline = generate_cams(_cfg(root, tiny_clip_path, tmp_path / "w0"), clip=tiny_clip, progress=False)
    pooled = generate_cams(_cfg(root, tiny_clip_path, tmp_path / "w2", workers=2, batch_size=2), clip=tiny_clip,
                           progress=False)
    assert inline.done == pooled.done == 11
    assert inline.failed == pooled.failed and list(pooled.failed) == [ids[3]]
    assert _files(tmp_path / "w0" / "cam") == _files(tmp_path / "w2" / "cam")
    st = RunDir(tmp_path / "w2").stage_info("cam")
    assert st["status"] == "partial" and st["failed"] == inline.failed


# ----------------------------------------------------------------------------- precision
def test_auto_precision_follows_the_cpu_and_is_recorded(toy_root, tiny_clip, tiny_clip_path, tmp_path,
                                                        monkeypatch):
    monkeypatch.setattr(prec, "cpu_has_bf16", lambda: False)
    assert prec.resolve_precision("auto", "cpu") == "fp32"
    monkeypatch.setattr(prec, "cpu_has_bf16", lambda: True)
    assert prec.resolve_precision("auto", "cpu") == "bf16"
    for p in ("fp32", "bf16", "fp16"):
        assert prec.resolve_precision(p, "cpu") == p
    with pytest.raises(ConfigError, match="--precision"):
        prec.resolve_precision("int8", "cpu")
    res = generate_cams(_cfg(toy_root, tiny_clip_path, tmp_path / "run", limit=2), clip=tiny_clip, progress=False)
    assert res.ok
    assert RunDir(tmp_path / "run").stage_info("cam")["params"]["precision"] == "bf16"  # resolved, never "auto"
    # the same run asked for explicitly resumes; another precision is another run
    assert generate_cams(_cfg(toy_root, tiny_clip_path, tmp_path / "run", limit=2, precision="bf16"),
                         clip=tiny_clip, progress=False).skipped == 2
    from clip_es.errors import RunDirError

    with pytest.raises(RunDirError, match="precision"):
        generate_cams(_cfg(toy_root, tiny_clip_path, tmp_path / "run", limit=2, precision="fp32"), clip=tiny_clip,
                      progress=False)


def test_cpu_bf16_detection_reads_cpuinfo_flags(tmp_path):
    f = tmp_path / "cpuinfo"
    f.write_text("processor\t: 0\nflags\t\t: fpu sse avx512f avx512_bf16 amx_tile\n\nprocessor\t: 1\n")
    assert "avx512_bf16" in prec._cpuinfo_flags(str(f))
    f.write_text("processor\t: 0\nflags\t\t: fpu sse avx2\n")
    assert not {"avx512_bf16", "amx_bf16"} & prec._cpuinfo_flags(str(f))
    assert prec._cpuinfo_flags(str(tmp_path / "missing")) is None


def _labels(maps: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Argmax of ``[1 - max, maps]`` as label ids (the eval/refine reading of the maps)."""
    if len(keys) == 0:
        return np.zeros(maps.shape[1:], np.int64)
    stack = np.concatenate([(1.0 - maps.max(0))[None], maps], 0)
    return np.concatenate([[0], keys + 1])[stack.argmax(0)]


@pytest.mark.skipif(not TINY_CHECKPOINT.is_file(), reason="bundled weights not built")
def test_bf16_maps_agree_with_fp32_on_held_out_toy_images(tmp_path_factory, tmp_path):
    """The bundled clipes-tiny on 40 held-out toy images: bf16 vs fp32 argmax agreement >= 99.5 %."""
    from clip_es.data.toy import make_toy
    from clip_es.model.resolve import load_clip

    root = make_toy(tmp_path_factory.mktemp("held_out") / "toy", n=60, seed=1, val_fraction=2 / 3, progress=False)
    clip = load_clip("clipes-tiny")
    runs = {}
    for p in ("fp32", "bf16"):
        cfg = CamConfig(dataset="toy", root=str(root), split="val", out=str(tmp_path / p), precision=p)
        assert generate_cams(cfg, clip=clip, progress=False).ok
        runs[p] = {f.stem: load_cam(f) for f in sorted((tmp_path / p / "cam").glob("*.npz"))}
    assert len(runs["fp32"]) == 40
    for kind in ("cam", "caa"):
        same = total = 0
        for image_id, a in runs["fp32"].items():
            b = runs["bf16"][image_id]
            la, lb = _labels(getattr(a, kind), a.keys), _labels(getattr(b, kind), b.keys)
            same += int((la == lb).sum())
            total += la.size
        assert same / total >= 0.995, (kind, same / total)


# ----------------------------------------------------------------------------- threads
def test_thread_helper(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert available_cpus() == len(os.sched_getaffinity(0))
    before = torch.get_num_threads()
    try:  # torch's own setting (default: the physical cores) is honoured, capped at the CPUs we may use
        torch.set_num_threads(1)
        assert default_threads() == 1
        torch.set_num_threads(available_cpus() + 3)
        assert default_threads() == available_cpus()
    finally:
        torch.set_num_threads(before)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert default_threads() == 3 and resolve_threads(None) == 3 and resolve_threads(2) == 2
    with pytest.raises(ConfigError, match="--threads"):
        resolve_threads(0)
    assert split_threads(8, 3) == (3, 2) and split_threads(2, 4) == (2, 1) and split_threads(1, 1) == (1, 1)
    before = torch.get_num_threads()
    with use_threads(before + 1) as n:
        assert n == before + 1 and torch.get_num_threads() == before + 1
    assert torch.get_num_threads() == before  # the caller's setting is restored


def test_threads_option_on_every_compute_command():
    from typer.testing import CliRunner

    from clip_es.cli import app

    for cmd in ("cam", "refine", "train", "segment", "demo"):
        out = CliRunner().invoke(app, [cmd, "--help"], env={"COLUMNS": "200"}).output
        assert "--threads" in out, cmd


def test_bad_speed_options_are_usage_errors(toy_root, tiny_clip_path, tmp_path, capsys):
    for extra, needle in ((["--precision", "int8"], "--precision"), (["--batch-size", "0"], "--batch-size"),
                          (["--workers", "-1"], "--workers"), (["--threads", "0"], "--threads")):
        code = run_cli(["cam", "-d", "toy", "-r", str(toy_root), "-o", str(tmp_path / "run"), "-m",
                        str(tiny_clip_path), "-t", TEMPLATE[0], *extra])
        assert code == 2, extra
        assert needle in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_precision_config_validation(toy_root, tiny_clip_path, tmp_path):
    cfg = _cfg(toy_root, tiny_clip_path, tmp_path / "x")
    for kw in ({"precision": "half"}, {"batch_size": 0}, {"workers": -1}, {"threads": 0}):
        with pytest.raises(ConfigError):
            replace(cfg, **kw).validate()
