"""The segmenter's inference file ``model.pt`` (weights only) and the recorded warm-up (issue 16, item 11)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from clip_es.data.image_io import read_mask
from clip_es.errors import RunDirError, WeightsError
from clip_es.train.checkpoint import CHECKPOINT_FORMAT, WEIGHTS_FORMAT, export_weights, load_checkpoint
from clip_es.train.loop import TrainConfig, train_segmenter

SMALL = dict(labels="gt", batch_size=2, crop_size=64, backbone="test_resnet", dim=32, heads=4, device="cpu",
             log_every=1)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_clip_path, toy_root) -> Path:
    """A run with a segmenter trained 20 steps (``warmup`` left at its default 100)."""
    from clip_es.cam.run import CamConfig, generate_cams

    out = tmp_path_factory.mktemp("weights") / "run"
    generate_cams(CamConfig(dataset="toy", root=str(toy_root), split="train", out=str(out),
                            model=str(tiny_clip_path), device="cpu", limit=1), progress=False)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_segmenter(TrainConfig(run=str(out), steps=20, save_every=20, **SMALL), progress=False)
    finally:
        torch.set_num_threads(n)
    return out


def test_config_records_the_warmup_used(trained):
    cfg = json.loads((trained / "segmenter" / "config.json").read_text())
    assert cfg["warmup"] == 4  # min(--warmup 100, steps // 5)
    assert load_checkpoint(trained / "segmenter" / "last.pt")["config"]["train"]["warmup"] == 4


def test_train_writes_a_weights_only_file(trained):
    full = load_checkpoint(trained / "segmenter" / "last.pt")
    slim = load_checkpoint(trained / "segmenter" / "model.pt")
    assert full["format"] == CHECKPOINT_FORMAT and slim["format"] == WEIGHTS_FORMAT
    assert "optimizer" in full and not {"optimizer", "rng", "log"} & set(slim)
    assert slim["step"] == full["step"] == 20 and slim["config"] == full["config"]
    assert slim["model"].keys() == full["model"].keys()
    assert all(torch.equal(slim["model"][k], full["model"][k]) for k in full["model"])
    size = (trained / "segmenter" / "model.pt").stat().st_size
    assert size < 0.6 * (trained / "segmenter" / "last.pt").stat().st_size


def test_segment_gives_the_same_predictions_from_model_pt(trained, toy_root, tmp_path):
    from clip_es.train.segment import SegmentConfig, segment

    for name in ("last.pt", "model.pt"):
        res = segment(SegmentConfig(checkpoint=str(trained / "segmenter" / name), out=str(tmp_path / name),
                                    dataset="toy", root=str(toy_root), split="val", device="cpu"), progress=False)
        assert res.done == 3
    for p in sorted((tmp_path / "last.pt").glob("*.png")):
        assert np.array_equal(read_mask(p), read_mask(tmp_path / "model.pt" / p.name)), p.name


def test_half_precision_export_and_onnx_from_model_pt(trained, tmp_path):
    from clip_es.train.segment import load_segmenter, predict_logits

    half = export_weights(trained / "segmenter" / "last.pt", tmp_path / "half.pt", dtype="float16")
    ck = load_checkpoint(half)
    assert all(v.dtype == torch.float16 for v in ck["model"].values() if v.is_floating_point())
    assert half.stat().st_size < 0.6 * (trained / "segmenter" / "model.pt").stat().st_size
    image = np.random.default_rng(0).integers(0, 255, (64, 96, 3), dtype=np.uint8)
    a = predict_logits(load_segmenter(trained / "segmenter" / "model.pt"), image)
    b = predict_logits(load_segmenter(half), image)  # loaded into float32 parameters
    assert b.dtype == torch.float32 and torch.allclose(a, b, atol=0.05)
    pytest.importorskip("onnx")
    from clip_es.train.onnx_export import export_onnx

    assert export_onnx(trained / "segmenter" / "model.pt", tmp_path / "m.onnx", height=64, width=64).is_file()


def test_eval_uses_model_pt_without_last_pt(trained, tmp_path):
    from clip_es.evaluate import EvalOptions, evaluate_run

    run = tmp_path / "run"
    shutil.copytree(trained, run)
    before = evaluate_run(run, EvalOptions(stages=("segmenter",)), progress=False)["stages"]["segmenter"]
    (run / "segmenter" / "last.pt").unlink()
    after = evaluate_run(run, EvalOptions(stages=("segmenter",)), progress=False)["stages"]["segmenter"]
    assert after["miou"] == before["miou"] and after["images"] == before["images"] == 3


def test_weights_only_file_cannot_be_resumed(trained, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    shutil.copy(run / "segmenter" / "model.pt", run / "segmenter" / "last.pt")
    with pytest.raises(RunDirError, match="weights only"):
        train_segmenter(TrainConfig(run=str(run), steps=20, save_every=20, resume=True, **SMALL), progress=False)
    (run / "segmenter" / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError):
        load_checkpoint(run / "segmenter" / "bad.pt")
