"""The segmenter (train stage): model, losses, data, training/resume, segment, eval, ONNX.

Everything runs on timm's ``test_resnet`` (0.4M parameters) with 64-pixel crops and a
random tiny CLIP, on the 12-image toy set; training tests use ground-truth masks
(``labels="gt"``) so they do not depend on the refine stage.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clip_es.data.image_io import read_mask
from clip_es.errors import ConfigError, RunDirError, WeightsError
from clip_es.train.data import StepBatchSampler, scale_crop_flip
from clip_es.train.losses import ce_loss, sigmoid_focal_dice_loss
from clip_es.train.model import BoundSegmenter, SegmenterArch, build_segmenter, create_backbone
from tests.conftest import run_cli

BACKBONE = "test_resnet"
SMALL = dict(labels="gt", batch_size=2, crop_size=64, backbone=BACKBONE, dim=32, heads=4, device="cpu",
             log_every=1, warmup=2)


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def base_run(tmp_path_factory, tiny_clip_path, toy_root) -> Path:
    """A run folder whose manifest holds the toy dataset and a cam stage (one image is enough)."""
    from clip_es.cam.run import CamConfig, generate_cams

    out = tmp_path_factory.mktemp("segrun") / "run"
    generate_cams(CamConfig(dataset="toy", root=str(toy_root), split="train", out=str(out),
                            model=str(tiny_clip_path), device="cpu", limit=1), progress=False)
    return out


@pytest.fixture
def run_dir(base_run, tmp_path) -> Path:
    """A private copy of :func:`base_run`."""
    dst = tmp_path / "run"
    shutil.copytree(base_run, dst)
    return dst


@pytest.fixture(scope="session")
def trained(base_run, tmp_path_factory) -> Path:
    """A run with a segmenter trained for a few steps (read-only for tests)."""
    from clip_es.train.loop import TrainConfig, train_segmenter

    dst = tmp_path_factory.mktemp("trained") / "run"
    shutil.copytree(base_run, dst)
    torch.set_num_threads(1)
    train_segmenter(TrainConfig(run=str(dst), steps=4, **SMALL), progress=False)
    return dst


def _text(k: int, d: int = 64, seed: int = 0) -> torch.Tensor:
    return F.normalize(torch.randn(k, d, generator=torch.Generator().manual_seed(seed)), dim=-1)


# ----------------------------------------------------------------------------- model
@pytest.mark.parametrize("head,blocks", [("plain", 0), ("fusion", 2)])
def test_model_shapes_and_open_vocab(head, blocks):
    torch.manual_seed(0)
    model = build_segmenter(SegmenterArch(backbone=BACKBONE, head=head, text_dim=64, dim=32,
                                          fusion_blocks=blocks)).eval()
    with torch.no_grad():  # fresh fusion blocks are the identity (zero-initialised outputs): perturb them
        for p in model.context.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x = torch.rand(2, 3, 64, 96)
    x0 = x.clone()
    with torch.no_grad():
        y = model(x, _text(5))
        assert y.shape == (2, 6, 64, 96) and torch.isfinite(y).all()
        assert torch.equal(x, x0)  # input untouched
        # odd sizes and another number of classes (open vocabulary) work too
        assert model(torch.rand(1, 3, 70, 50), _text(3)).shape == (1, 4, 70, 50)
        # classes are a set: permuting the text permutes the class channels, background stays
        perm = torch.tensor([3, 0, 4, 1, 2])
        yp = model(x, _text(5)[perm])
        assert torch.allclose(yp[:, 1:], y[:, 1:][:, perm], atol=1e-5)
        assert torch.allclose(yp[:, 0], y[:, 0], atol=1e-5)
        # batched == looped
        y1 = torch.cat([model(x[i:i + 1], _text(5)) for i in range(2)])
        assert torch.allclose(y, y1, atol=1e-5)
    assert len(getattr(model.context, "blocks", [])) == blocks


def test_fresh_fusion_blocks_are_identity():
    torch.manual_seed(0)
    fused = build_segmenter(SegmenterArch(backbone=BACKBONE, text_dim=64, dim=32, fusion_blocks=2)).eval()
    plain = build_segmenter(SegmenterArch(backbone=BACKBONE, head="plain", text_dim=64, dim=32)).eval()
    plain.load_state_dict({k: v for k, v in fused.state_dict().items() if not k.startswith("context.")})
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(fused(x, _text(4)), plain(x, _text(4)), atol=1e-5)


def test_model_rejects_wrong_text_dim():
    model = build_segmenter(SegmenterArch(backbone=BACKBONE, text_dim=64, dim=32))
    with pytest.raises(ConfigError, match="CLIP"):
        model(torch.rand(1, 3, 64, 64), _text(3, d=32))


def test_backbone_weights_file(tmp_path):
    import timm

    full = timm.create_model(BACKBONE, pretrained=False)
    path = tmp_path / "bb.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in full.state_dict().items()}}, path)
    bb = create_backbone(BACKBONE, weights=path)
    ref = full.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in bb.state_dict().items())
    torch.save({"conv1.weight": torch.zeros(3)}, path)
    with pytest.raises(WeightsError, match="does not fit"):
        create_backbone(BACKBONE, weights=path)
    torch.save({"x": torch.nn.Linear(2, 2)}, path)  # a pickled module: refused, never executed
    with pytest.raises(WeightsError, match="weights_only"):
        create_backbone(BACKBONE, weights=path)


# ----------------------------------------------------------------------------- losses
def test_ce_loss_ignores_255():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 8, 8, requires_grad=True)
    target = torch.randint(0, 4, (2, 8, 8))
    target[0, :3] = 255
    ref = F.cross_entropy(logits, target, ignore_index=255)
    assert torch.allclose(ce_loss(logits, target), ref)
    # logits at ignored pixels do not matter
    other = logits.detach().clone()
    other[0, :, :3] = 100 * torch.randn_like(other[0, :, :3])
    assert torch.allclose(ce_loss(other, target), ref)
    # an all-ignored batch: zero loss, zero (finite) gradient
    loss = ce_loss(logits, torch.full_like(target, 255))
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(logits.grad).all() and logits.grad.abs().sum() == 0


def test_sigmoid_loss_finite_and_ignores_255():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 8, 8, requires_grad=True)
    target = torch.randint(0, 4, (2, 8, 8))
    target[1, 4:] = 255
    loss = sigmoid_focal_dice_loss(logits, target)
    loss.backward()
    assert torch.isfinite(loss) and loss > 0 and torch.isfinite(logits.grad).all()
    assert logits.grad[1, :, 4:].abs().sum() == 0
    empty = sigmoid_focal_dice_loss(logits, torch.full_like(target, 255))
    assert empty.item() == 0.0
    # a confident, correct prediction scores lower than a wrong one
    good = F.one_hot(target.clamp(max=3), 4).permute(0, 3, 1, 2).float() * 20 - 10
    assert sigmoid_focal_dice_loss(good, target) < sigmoid_focal_dice_loss(-good, target)


# ----------------------------------------------------------------------------- data
def test_scale_crop_flip_invariants():
    img = np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8)
    mask = np.random.default_rng(1).integers(0, 4, (50, 70), dtype=np.uint8)
    img0, mask0 = img.copy(), mask.copy()
    a = scale_crop_flip(img, mask, np.random.default_rng(3), 64, (0.5, 1.5))
    b = scale_crop_flip(img, mask, np.random.default_rng(3), 64, (0.5, 1.5))
    assert a[0].shape == (64, 64, 3) and a[1].shape == (64, 64) and a[0].dtype == np.uint8
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert set(np.unique(a[1])) <= {0, 1, 2, 3, 255}
    assert np.array_equal(img, img0) and np.array_equal(mask, mask0)
    small = scale_crop_flip(img, mask, np.random.default_rng(0), 200, (1.0, 1.0))
    assert (small[1] == 255).sum() == 200 * 200 - 50 * 70  # padding is ignored


def test_step_sampler_shards_and_resumes():
    full = list(StepBatchSampler(10, 3, 6, seed=1))
    assert list(StepBatchSampler(10, 3, 6, start=4, seed=1)) == full[4:]
    r0 = list(StepBatchSampler(10, 3, 6, rank=0, world=2, seed=1))
    r1 = list(StepBatchSampler(10, 3, 6, rank=1, world=2, seed=1))
    for a, b in zip(r0, r1):  # ranks never share a stream position within a step
        assert not {p for _, p in a} & {p for _, p in b}
    epoch0 = [i for batch in full for i, p in batch if p < 10]
    assert sorted(epoch0) == list(range(10))  # every sample once per epoch


# ----------------------------------------------------------------------------- train
def resume_matches_uninterrupted(run_dir: Path, tmp_path: Path, cfg: dict, kill_at: int) -> tuple[dict, dict]:
    """Train ``cfg`` in ``run_dir``, and in a copy killed after step ``kill_at`` then resumed; check the
    copy refuses to restart without --resume and that both log.csv files are equal. Returns both last.pt."""
    from clip_es.train.loop import TrainConfig, load_checkpoint, train_segmenter

    other = tmp_path / "other"
    shutil.copytree(run_dir, other)
    train_segmenter(TrainConfig(run=str(run_dir), **cfg), progress=False)

    class Killed(Exception):
        pass

    def kill(step, loss):
        if step == kill_at:
            raise Killed

    with pytest.raises(Killed):
        train_segmenter(TrainConfig(run=str(other), **cfg), progress=False, on_step=kill)
    saved = kill_at - kill_at % cfg["save_every"]
    assert load_checkpoint(other / "segmenter" / "last.pt")["step"] == saved
    with pytest.raises(RunDirError, match="--resume"):
        train_segmenter(TrainConfig(run=str(other), **cfg), progress=False)
    res = train_segmenter(TrainConfig(run=str(other), resume=True, **cfg), progress=False)
    assert res.resumed_from == saved and res.step == cfg["steps"]
    log_a = (run_dir / "segmenter" / "log.csv").read_text()
    assert log_a == (other / "segmenter" / "log.csv").read_text() and len(log_a.splitlines()) == cfg["steps"] + 1
    a, b = load_checkpoint(run_dir / "segmenter" / "last.pt"), load_checkpoint(other / "segmenter" / "last.pt")
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    # resuming a finished run does nothing
    assert train_segmenter(TrainConfig(run=str(other), resume=True, **cfg), progress=False).step == cfg["steps"]
    return a, b


def test_resume_matches_uninterrupted(run_dir, tmp_path):
    resume_matches_uninterrupted(run_dir, tmp_path, dict(steps=6, save_every=2, **SMALL), kill_at=5)


def test_workers_do_not_change_the_stream(run_dir, tmp_path):
    from clip_es.train.loop import TrainConfig, train_segmenter

    other = tmp_path / "other"
    shutil.copytree(run_dir, other)
    train_segmenter(TrainConfig(run=str(run_dir), steps=2, **SMALL), progress=False)
    train_segmenter(TrainConfig(run=str(other), steps=2, workers=2, **SMALL), progress=False)
    assert (run_dir / "segmenter" / "log.csv").read_text() == (other / "segmenter" / "log.csv").read_text()


def test_forked_train_workers_start_with_one_opencv_thread(run_dir, tmp_path, monkeypatch):
    """Loader workers fork from a process running ``threads`` OpenCV threads; each worker must get
    one (not ``threads`` each), and the training process its own count back."""
    import os

    import cv2

    from clip_es.train import data as tdata
    from clip_es.train.loop import TrainConfig, train_segmenter

    seen = tmp_path / "seen"
    seen.mkdir()
    real = tdata.CropDataset.__getitem__

    def spy(self, i):  # forked workers inherit this patch
        (seen / f"{os.getpid()}-{i}").write_text(str(cv2.getNumThreads()))
        return real(self, i)

    monkeypatch.setattr(tdata.CropDataset, "__getitem__", spy)
    before = cv2.getNumThreads()
    train_segmenter(TrainConfig(run=str(run_dir), steps=2, workers=2, **{**SMALL, "threads": 2}), progress=False)
    counts = {p.read_text() for p in seen.iterdir()}
    assert counts == {"1"} and len({p.name.split("-")[0] for p in seen.iterdir()}) >= 1
    assert str(os.getpid()) not in {p.name.split("-")[0] for p in seen.iterdir()}  # read in the workers
    assert cv2.getNumThreads() == before


def test_checkpoint_is_weights_only_and_complete(trained):
    ck = torch.load(trained / "segmenter" / "last.pt", map_location="cpu", weights_only=True)
    assert ck["step"] == 4 and {"model", "optimizer", "config", "text", "rng", "log"} <= set(ck)
    json.dumps(ck["config"])  # plain JSON-able config
    text = ck["text"]
    assert text["embeddings"].shape[0] == len(text["classes"]) == 8
    assert torch.allclose(text["embeddings"].norm(dim=-1), torch.ones(8), atol=1e-5)
    assert text["templates"] == ["a clean origami {}."]
    assert (trained / "segmenter" / "text.pt").is_file()
    m = json.loads((trained / "manifest.json").read_text())
    assert m["stages"]["segmenter"]["status"] == "done"


def test_changed_params_refused(trained, tmp_path):
    from clip_es.train.loop import TrainConfig, train_segmenter

    run = tmp_path / "run"
    shutil.copytree(trained, run)
    with pytest.raises(RunDirError):
        train_segmenter(TrainConfig(run=str(run), steps=5, resume=True, **SMALL), progress=False)


def test_sigmoid_no_fusion_trains(run_dir):
    from clip_es.train.loop import TrainConfig, train_segmenter

    res = train_segmenter(TrainConfig(run=str(run_dir), name="segmenter_nofusion", steps=2, loss="sigmoid",
                                      fusion_blocks=0, **SMALL), progress=False)
    assert res.last_loss is not None and np.isfinite(res.last_loss)


def test_missing_refine_labels_message(run_dir):
    from clip_es.train.loop import TrainConfig, train_segmenter

    with pytest.raises(ConfigError, match="refine"):
        train_segmenter(TrainConfig(run=str(run_dir), steps=2, **{**SMALL, "labels": "refine"}), progress=False)


def test_trains_on_refine_outputs(tmp_path, tiny_clip_path, toy_root):
    """The default label source: the refine stage's confidence-guided masks; and its CRF argmax."""
    from clip_es.cam.run import CamConfig, generate_cams
    from clip_es.refine.run import RefineConfig, refine_masks
    from clip_es.train.loop import TrainConfig, train_segmenter

    run = tmp_path / "run"
    generate_cams(CamConfig(dataset="toy", root=str(toy_root), split="train", out=str(run),
                            model=str(tiny_clip_path), device="cpu", limit=3), progress=False)
    refine_masks(RefineConfig(run=str(run), workers=1), progress=False)
    for name, labels in (("segmenter", "refine"), ("segmenter_crf", "crf")):
        res = train_segmenter(TrainConfig(run=str(run), name=name, steps=2, **{**SMALL, "labels": labels}),
                              progress=False)
        assert res.step == 2 and np.isfinite(res.last_loss)


def test_trainrun_cli(run_dir, capsys):
    code = run_cli(["train", "--run", str(run_dir), "--labels", "gt", "--steps", "2", "--batch-size", "1",
              "--crop-size", "64", "--backbone", BACKBONE, "--dim", "32", "--device", "cpu", "--no-fusion",
              "--loss", "sigmoid", "--seed", "3"])
    assert code == 0
    assert "step 2/2" in capsys.readouterr().out
    ck = torch.load(run_dir / "segmenter" / "last.pt", weights_only=True)
    assert ck["config"]["arch"]["fusion_blocks"] == 0 and ck["config"]["train"]["loss"] == "sigmoid"


# ----------------------------------------------------------------------------- segment / eval
def test_segment_dataset_and_folder(trained, toy_root, tmp_path):
    from clip_es.data.image_io import image_size
    from clip_es.train.segment import SegmentConfig, segment

    ckpt = str(trained / "segmenter" / "last.pt")
    res = segment(SegmentConfig(checkpoint=ckpt, out=str(tmp_path / "a"), dataset="toy", root=str(toy_root),
                                split="val", device="cpu"), progress=False)
    assert res.done == 3 and res.ok
    for p in sorted((tmp_path / "a").glob("*.png")):
        m = read_mask(p)
        assert m.shape == image_size(toy_root / "JPEGImages" / f"{p.stem}.jpg") and m.max() <= 8
    again = segment(SegmentConfig(checkpoint=ckpt, out=str(tmp_path / "a"), dataset="toy", root=str(toy_root),
                                  split="val", device="cpu"), progress=False)
    assert again.skipped == 3 and again.done == 0
    res = segment(SegmentConfig(checkpoint=ckpt, out=str(tmp_path / "b"), images=str(toy_root / "JPEGImages"),
                                device="cpu", limit=2, max_side=64), progress=False)
    assert res.done == 2
    for p in sorted((tmp_path / "b").glob("*.png")):  # predicted downscaled, written at full size
        assert read_mask(p).shape == image_size(toy_root / "JPEGImages" / f"{p.stem}.jpg")
    # a bad --images or dataset is refused before anything is written
    for argv in (["--images", str(toy_root / "nope")], ["-d", "toy", "-r", str(tmp_path / "nope"), "-s", "val"]):
        assert run_cli(["segment", "--checkpoint", ckpt, "--out", str(tmp_path / "c"), "--device", "cpu",
                        *argv]) == 2
        assert not (tmp_path / "c").exists()


def test_segment_open_vocabrun_cli(trained, toy_root, tmp_path):
    out = tmp_path / "ov"
    code = run_cli(["segment", "--checkpoint", str(trained / "segmenter" / "last.pt"), "--images",
              str(toy_root / "JPEGImages"), "--out", str(out), "--classes", "ball,zebra,kite", "--limit", "2",
              "--device", "cpu"])
    assert code == 0
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) == 2 and all(read_mask(p).max() <= 3 for p in pngs)
    assert (out / "classes.txt").read_text().split() == ["ball", "zebra", "kite"]
    # known classes reuse the stored embeddings exactly; a new name goes through the recorded CLIP
    from clip_es.data.base import ClassSpec
    from clip_es.train.segment import load_segmenter

    seg = load_segmenter(trained / "segmenter" / "last.pt")
    sub = seg.with_classes([ClassSpec("kite"), ClassSpec("zebra")])
    kite = [c.name for c in seg.classes].index("kite")
    assert torch.equal(sub.text[0], seg.text[kite]) and sub.text.shape == (2, seg.text.shape[1])
    # a class list of another run's folder is refused
    assert run_cli(["segment", "--checkpoint", str(trained / "segmenter" / "last.pt"), "--images",
                 str(toy_root / "JPEGImages"), "--out", str(out), "--classes", "ball", "--limit", "2",
                 "--device", "cpu"]) == 2


def test_eval_reports_segmenter(trained, tmp_path):
    from clip_es.evaluate import EvalOptions, evaluate_run

    run = tmp_path / "run"
    shutil.copytree(trained, run)
    rep = evaluate_run(run, EvalOptions(stages=("segmenter",)), progress=False)
    seg = rep["stages"]["segmenter"]
    assert seg["images"] == 3 and seg["split"] == "val" and 0 <= seg["miou"] <= 1
    rep = evaluate_run(run, EvalOptions(stages=("segmenter",), split="train", limit=2), progress=False)
    assert rep["stages"]["segmenter"]["images"] == 2
    # a segmenter trained under another --name (an ablation) is found and scored too
    from clip_es.rundir import RunDir

    shutil.copytree(run / "segmenter", run / "segmenter_ablation")
    man = RunDir(run).read_manifest()
    with RunDir(run)._locked() as m:
        m["stages"]["segmenter_ablation"] = man["stages"]["segmenter"]
    rep = evaluate_run(run, EvalOptions(limit=1), progress=False)
    assert rep["stages"]["segmenter_ablation"]["miou"] == rep["stages"]["segmenter"]["miou"]


# ----------------------------------------------------------------------------- ONNX
def check_onnx_parity(ckpt: Path, out: Path) -> Path:
    """Export ``ckpt`` at 64x64 to ``out`` and check onnxruntime against torch there and at 96x128."""
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from clip_es.train.onnx_export import export_onnx
    from clip_es.train.segment import load_segmenter

    path = export_onnx(ckpt, out, height=64, width=64)
    seg = load_segmenter(ckpt)
    bound = BoundSegmenter(seg.model, seg.text).eval()
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for h, w in ((64, 64), (96, 128)):  # the export size and another one (dynamic axes)
        x = torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(h))
        (got,) = sess.run(["logits"], {"image": x.numpy()})
        with torch.no_grad():
            ref = bound(x).numpy()
        assert got.shape == (1, 9, h, w)
        np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)
    return path


def test_onnx_export_parity(trained, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    ckpt = trained / "segmenter" / "last.pt"
    path = check_onnx_parity(ckpt, tmp_path / "m.onnx")
    import onnx

    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert len(json.loads(meta["clipes.classes"])) == 8
    # the CLI, with a sub-list of classes baked in
    assert run_cli(["export-onnx", "--checkpoint", str(ckpt), "--out", str(tmp_path / "two.onnx"), "--classes",
                 "kite,ball", "--height", "64", "--width", "64"]) == 0
    sess = ort.InferenceSession(str(tmp_path / "two.onnx"), providers=["CPUExecutionProvider"])
    assert sess.run(None, {"image": np.zeros((1, 3, 64, 96), np.float32)})[0].shape == (1, 3, 64, 96)
