"""Issue 21: the CUDA server path, pinned on the CPU.

No GPU reaches these tests: the device mapping is a pure function, the CUDA calls it
makes are faked with monkeypatch, and the OOM path runs on a fake OOM raised from a
patched forward. Speed is shown by ``pipelines/bench/bench_cam_overhead.py``, not here.
"""

from __future__ import annotations

import logging
import os
import weakref

import numpy as np
import pytest
import torch
from PIL import Image

from clip_es.cam import run as cam_run
from clip_es.cam.caa import balance_affinity, balanced_transition, caa_refine
from clip_es.cam.run import CamConfig, build_engine, generate_cams, resolve_workers
from clip_es.cam.store import load_cam, save_cam, upsample
from clip_es.data.registry import open_dataset
from clip_es.errors import ConfigError
from clip_es.model import precision as prec
from clip_es.stage import bind_device, is_out_of_memory, pick_device, resolve_device
from clip_es.train import checkpoint as ckpt
from tests.test_segmenter import base_run  # noqa: F401  (session fixture reused)

TEMPLATE = ("a photo of a {}.",)


def _cfg(root, clip_path, out, **kw) -> CamConfig:
    kw.setdefault("templates", TEMPLATE)
    return CamConfig(dataset="toy", root=str(root), split="trainval", out=str(out), model=str(clip_path),
                     device="cpu", **kw)


def _same_size(toy_root, tmp_path, clip_path, n: int, **kw) -> CamConfig:
    """A folder dataset of ``n`` images of one size (toy images vary in size), so they batch."""
    from clip_es.data.toy import TOY_CLASSES, scene_for

    root = tmp_path / "same"
    (root / "images").mkdir(parents=True)
    lines = []
    for i in range(n):
        scene = scene_for(3, i, (96, 128))
        Image.fromarray(scene.image).save(root / "images" / f"im{i}.png")
        lines.append(f"im{i}," + ";".join(TOY_CLASSES[c - 1] for c in scene.labels))
    (root / "classes.txt").write_text("".join(f"{c}\n" for c in TOY_CLASSES))
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    kw.setdefault("templates", TEMPLATE)
    return CamConfig(dataset="folder", root=str(root), split="labels", out=str(tmp_path / "run"),
                     model=str(clip_path), device="cpu", precision="fp32", **kw)


# ----------------------------------------------------------------------------- findings 1 and 2: the device
@pytest.mark.parametrize("requested, rank, count, want", [
    ("auto", None, 0, "cpu"), ("auto", 3, 0, "cpu"), ("cpu", 1, 4, "cpu"),
    ("auto", None, 2, "cuda:0"), ("cuda", None, 2, "cuda:0"),
    ("auto", 3, 4, "cuda:3"), ("cuda", 3, 4, "cuda:3"),  # torchrun, --device auto or cuda alike
    ("auto", 5, 4, "cuda:1"), ("cuda", 2, 1, "cuda:0"),  # more ranks than GPUs; one visible GPU per rank
    ("cuda:1", 0, 2, "cuda:1"), ("cuda:1", 5, 2, "cuda:1"),  # explicit index kept
])
def test_device_is_a_function_of_request_local_rank_and_count(requested, rank, count, want):
    assert pick_device(requested, rank, count) == want


@pytest.mark.parametrize("requested, count", [("cuda", 0), ("cuda:0", 0), ("cuda:2", 2), ("gpu", 1), ("cuda:x", 1)])
def test_device_refusals(requested, count):
    with pytest.raises(ConfigError):
        pick_device(requested, None, count)


def test_resolve_device_reads_local_rank_and_the_visible_devices(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert resolve_device("cuda") == "cuda:1" and resolve_device("auto") == "cuda:1"
    assert resolve_device("cpu") == "cpu"
    monkeypatch.setenv("LOCAL_RANK", "x")
    with pytest.raises(ConfigError):
        resolve_device("auto")
    monkeypatch.delenv("LOCAL_RANK")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == "cpu"


def test_train_binds_every_cuda_device_before_the_process_group(monkeypatch):
    from clip_es.train import loop
    from clip_es.train.loop import TrainConfig

    bound = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: bound.append(torch.device(d)))
    bind_device("cpu")
    bind_device("cuda:1")
    assert bound == [torch.device("cuda", 1)]

    class Stop(Exception):
        pass

    def distributed(info, device, requested=None):
        raise Stop(device)

    monkeypatch.setattr(loop, "resolve_device", lambda d: "cuda:3")
    monkeypatch.setattr(loop, "distributed", distributed)
    with pytest.raises(Stop, match="cuda:3"):
        loop.train_segmenter(TrainConfig(run="unused"), progress=False)
    assert bound[-1] == torch.device("cuda", 3)  # bound before the process group (and NCCL) starts


# ----------------------------------------------------------------------------- finding 4: bf16
def test_auto_bf16_follows_the_run_devices_compute_capability(monkeypatch):
    asked = []

    def capability(d):
        asked.append(torch.device(d).index)
        return caps[torch.device(d).index]

    caps = {0: (7, 0), 1: (8, 0), 2: (7, 5), 3: (9, 0)}  # V100, A100, T4, H100
    monkeypatch.setattr(torch.cuda, "get_device_capability", capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: pytest.fail("emulation-counting probe"))
    assert [prec.resolve_precision("auto", f"cuda:{i}") for i in range(4)] == ["fp32", "bf16", "fp32", "bf16"]
    assert asked == [0, 1, 2, 3]  # the run's device, not the current one
    monkeypatch.setattr(prec, "cpu_has_bf16", lambda: False)
    assert prec.resolve_precision("auto", "cpu") == "fp32"
    monkeypatch.setattr(prec, "cpu_has_bf16", lambda: True)
    assert prec.resolve_precision("auto", "cpu") == "bf16"


class _LegacyFlags:
    """``torch.backends`` of torch < 2.9: only the legacy ``allow_tf32`` flags."""

    def __init__(self):
        from types import SimpleNamespace

        self.cuda = SimpleNamespace(matmul=SimpleNamespace(allow_tf32=True))
        self.cudnn = SimpleNamespace(allow_tf32=True)


class _Op:
    """One operator's new-API flag; reading the legacy flag raises, as recent torch does after the new API was used."""

    def __init__(self, value: str):
        self.fp32_precision = value

    @property
    def allow_tf32(self):
        raise RuntimeError("you have used mix of the legacy and new APIs to set the TF32 status")


class _NewFlags:
    """``torch.backends`` of torch >= 2.9 after ``set_float32_matmul_precision("high")``."""

    def __init__(self):
        from types import SimpleNamespace

        self.cuda = SimpleNamespace(matmul=_Op("tf32"))
        self.cudnn = SimpleNamespace(conv=_Op("tf32"))
        self.mkldnn = SimpleNamespace(matmul=_Op("bf16"), conv=_Op("none"))

    def __getattr__(self, name):  # the legacy module-level flag
        raise RuntimeError(f"legacy flag {name} read after the new API was used")


def test_fp32_switches_off_tf32_for_matmul_and_conv_with_the_legacy_flags(monkeypatch):
    """torch < 2.9: at --precision fp32 on CUDA both legacy flags are off (matmul too, not only
    cuDNN), and restored after; on the CPU they are left alone."""
    flags = _LegacyFlags()
    monkeypatch.setattr(prec, "_backends", lambda: flags)
    with prec.autocast("fp32", "cuda:0"):
        assert flags.cuda.matmul.allow_tf32 is False and flags.cudnn.allow_tf32 is False
    assert flags.cuda.matmul.allow_tf32 is True and flags.cudnn.allow_tf32 is True
    with prec.exact_fp32("cpu"):
        assert flags.cuda.matmul.allow_tf32 is True and flags.cudnn.allow_tf32 is True


def test_fp32_uses_the_new_fp32_precision_api_and_never_reads_legacy_flags(monkeypatch):
    """torch >= 2.9 after ``set_float32_matmul_precision("high")``: matmul and conv are "ieee"
    inside, restored after, and no legacy ``allow_tf32`` flag is read (that raises there)."""
    flags = _NewFlags()
    monkeypatch.setattr(prec, "_backends", lambda: flags)
    with prec.autocast("fp32", "cuda"):
        assert flags.cuda.matmul.fp32_precision == flags.cudnn.conv.fp32_precision == "ieee"
        assert flags.mkldnn.matmul.fp32_precision == "bf16"  # the CPU's are not the GPU run's business
    assert flags.cuda.matmul.fp32_precision == flags.cudnn.conv.fp32_precision == "tf32"
    with prec.exact_fp32("cpu"):  # oneDNN's bf16 fp32 matmuls ("medium") are off on the CPU
        assert flags.mkldnn.matmul.fp32_precision == flags.mkldnn.conv.fp32_precision == "ieee"
        assert flags.cuda.matmul.fp32_precision == "tf32"
    assert flags.mkldnn.matmul.fp32_precision == "bf16" and flags.mkldnn.conv.fp32_precision == "none"


@pytest.mark.skipif(not hasattr(torch.backends.mkldnn, "matmul"), reason="torch < 2.9: no fp32_precision API")
def test_the_last_block_runs_in_exact_fp32(toy_root, tiny_clip, tiny_clip_path, tmp_path, monkeypatch):
    """A process that set ``set_float32_matmul_precision("medium")`` (bf16 fp32 matmuls in oneDNN on
    the CPU; TF32 on CUDA with "high"): the cam stage's last block and closed-form gradients still
    run in IEEE fp32 (before, only the frozen blocks' cuDNN convolutions were covered)."""
    seen = []
    real = cam_run.softmax_gradcam_batch

    def gradcam(*a, **k):
        seen.append(torch.backends.mkldnn.matmul.fp32_precision)
        return real(*a, **k)

    monkeypatch.setattr(cam_run, "softmax_gradcam_batch", gradcam)
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")
    try:
        res = generate_cams(_cfg(toy_root, tiny_clip_path, tmp_path / "run", limit=2, precision="fp32"),
                            clip=tiny_clip, progress=False)
        assert torch.backends.mkldnn.matmul.fp32_precision == "bf16"  # restored after the stage
    finally:
        torch.set_float32_matmul_precision(before)
    assert res.ok and seen == ["ieee", "ieee"]


# ----------------------------------------------------------------------------- finding 3: OOM
@pytest.mark.parametrize("error", [torch.cuda.OutOfMemoryError("CUDA out of memory"),
                                   RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate")])
def test_oom_retry_runs_after_the_failed_batch_is_freed(toy_root, tiny_clip, tiny_clip_path, tmp_path, monkeypatch,
                                                        error):
    real = cam_run.dense_forward
    refs: list[weakref.ref] = []
    alive_at_retry: list[bool] = []

    def forward(visual, x, attn_blocks=8):
        if x.shape[0] > 1:  # the batch "does not fit"
            activations = torch.empty(x.shape[0], 1 << 16)  # stands for the batch's activations
            refs.append(weakref.ref(activations))
            raise type(error)(*error.args)  # a fresh one, as a real failure is
        alive_at_retry.append(any(r() is not None for r in refs))
        return real(visual, x, attn_blocks)

    monkeypatch.setattr(cam_run, "dense_forward", forward)
    res = generate_cams(_same_size(toy_root, tmp_path, tiny_clip_path, 8, batch_size=4), clip=tiny_clip,
                        progress=False)
    assert res.ok and res.done == 8
    assert len(refs) == 1 and alive_at_retry == [False] * 8  # the second batch of 4 goes one by one at once


def test_an_oom_is_remembered_and_later_batches_of_that_size_go_one_by_one(toy_root, tiny_clip, tiny_clip_path,
                                                                           tmp_path, monkeypatch):
    """A fake allocator failure where the real allocation is (the attention's (B, H, L, L)
    probabilities, the largest tensor of a block): a batch of 4 does not fit, one image does.
    The first batch of 4 runs out of memory once; the two later batches of 4 go straight to one
    by one (before, each ran out of memory again first); the records equal a batch-1 run."""
    from clip_es.model import dense

    real = dense.explicit_attention
    ooms: list[int] = []

    def explicit_attention(q, k, v, attn_mask=None):
        if q.shape[0] > 1:
            ooms.append(q.shape[0])
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(q, k, v, attn_mask)

    cfg = _same_size(toy_root, tmp_path, tiny_clip_path, 12, batch_size=4)
    monkeypatch.setattr(dense, "explicit_attention", explicit_attention)
    res = generate_cams(cfg, clip=tiny_clip, progress=False)
    monkeypatch.undo()
    assert res.ok and res.done == 12
    assert ooms == [4]
    ref = generate_cams(CamConfig(**{**cfg.__dict__, "out": str(tmp_path / "ref"), "batch_size": 1}),
                        clip=tiny_clip, progress=False)
    assert ref.ok and ref.done == 12
    for i in range(12):
        a, b = load_cam(tmp_path / "run" / "cam" / f"im{i}.npz"), load_cam(tmp_path / "ref" / "cam" / f"im{i}.npz")
        assert np.array_equal(a.keys, b.keys) and np.allclose(a.caa, b.caa, atol=2e-6)


def test_oom_type_exists_on_torch_before_2_5(monkeypatch):
    """``torch.OutOfMemoryError`` appeared in torch 2.5 (pyproject allows 2.1): without it the OOM
    test still knows CUDA's out-of-memory error."""
    err = torch.cuda.OutOfMemoryError("CUDA out of memory")
    monkeypatch.delattr(torch, "OutOfMemoryError", raising=False)
    assert is_out_of_memory(err) and not is_out_of_memory(RuntimeError("CUDA error: device-side assert"))


def test_oom_of_a_single_image_is_recorded_and_other_errors_propagate(toy_root, tiny_clip, tiny_clip_path, tmp_path,
                                                                      monkeypatch):
    def forward(visual, x, attn_blocks=8):
        raise RuntimeError("CUBLAS_STATUS_ALLOC_FAILED")

    monkeypatch.setattr(cam_run, "dense_forward", forward)
    res = generate_cams(_cfg(toy_root, tiny_clip_path, tmp_path / "a", limit=2), clip=tiny_clip, progress=False)
    assert res.done == 0 and len(res.failed) == 2
    assert all("out of memory" in r for r in res.failed.values())

    def broken(visual, x, attn_blocks=8):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(cam_run, "dense_forward", broken)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        generate_cams(_cfg(toy_root, tiny_clip_path, tmp_path / "b", limit=2), clip=tiny_clip, progress=False)
    assert is_out_of_memory(MemoryError()) and not is_out_of_memory(ValueError("out of memory"))


# ----------------------------------------------------------------------------- finding 8
def test_checkpoints_hold_cpu_tensors(tmp_path):
    moved = []

    class OnGpu(torch.Tensor):  # stands for a CUDA tensor: only .cpu() gives a plain one back
        def cpu(self, *a, **k):
            moved.append(1)
            return self.as_subclass(torch.Tensor)

    def gpu(t):
        return t.as_subclass(OnGpu)

    ck = {"format": ckpt.CHECKPOINT_FORMAT, "model": {"w": gpu(torch.ones(2, 2))},
          "optimizer": {"state": {0: {"exp_avg": gpu(torch.zeros(2))}}, "param_groups": [{"lr": 0.1}]},
          "rng": {"cuda": [gpu(torch.zeros(4, dtype=torch.uint8))]}, "log": [(1, 0.5)], "step": 1}
    ckpt.save_checkpoint(tmp_path / "last.pt", ck)
    back = torch.load(tmp_path / "last.pt", weights_only=True)  # no map_location: a CPU-only machine
    assert len(moved) == 3
    tensors = [back["model"]["w"], back["optimizer"]["state"][0]["exp_avg"], back["rng"]["cuda"][0]]
    assert all(type(t) is torch.Tensor and t.device.type == "cpu" for t in tensors)
    assert back["log"] == [(1, 0.5)]


def test_resume_with_fewer_cuda_rng_states_than_saved(monkeypatch, caplog):
    set_calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, d: set_calls.append((int(s[0]), d)))
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda s: pytest.fail("raises with fewer GPUs"))
    st = ckpt.rng_state()
    st["cuda"] = [torch.full((8,), 7, dtype=torch.uint8), torch.full((8,), 9, dtype=torch.uint8)]
    with caplog.at_level(logging.WARNING):
        ckpt.set_rng_state(st)
    assert set_calls == [(7, 0)]
    assert "2 CUDA RNG state(s)" in caplog.text


def test_fp16_batch_with_non_finite_activations_is_redone_in_fp32_and_said_once(toy_root, tiny_clip, tmp_path,
                                                                                monkeypatch, caplog):
    real = cam_run.dense_forward

    def overflowing(visual, x, attn_blocks=8):
        d = real(visual, x, attn_blocks)
        if torch.is_autocast_enabled("cpu"):
            d.penultimate[:, 1, 0] = float("inf")  # what an fp16 residual-stream overflow leaves
        return d

    monkeypatch.setattr(cam_run, "dense_forward", overflowing)
    ds = open_dataset("toy", toy_root, "train")
    base = CamConfig(dataset="toy", root=str(toy_root), split="train", out=str(tmp_path), model="x",
                     templates=TEMPLATE, precision="fp32")
    fp32 = build_engine(base, ds.classes, tiny_clip)
    fp16 = build_engine(CamConfig(**{**base.__dict__, "precision": "fp16"}), ds.classes, tiny_clip)
    assert fp16.precision == "fp16"
    with caplog.at_level(logging.WARNING):
        for image_id in ds.ids()[:2]:
            image, keys = ds.load_image(image_id), list(ds.labels(image_id))
            got, want = fp16.compute(image, keys), fp32.compute(image, keys)
            assert all(np.isfinite(m).all() for m in got)
            assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])
    assert caplog.text.count("computed again in fp32") == 1


# ----------------------------------------------------------------------------- finding 6: CAA
def test_caa_as_t_times_t_v_equals_the_squared_transition():
    g = torch.Generator().manual_seed(0)
    n_side = 7
    attn = torch.rand(n_side * n_side, n_side * n_side, generator=g, dtype=torch.float64).softmax(-1)
    t = balanced_transition(attn, 3)
    v = torch.rand(n_side * n_side, 3, generator=g, dtype=torch.float64)
    assert (t @ (t @ v) - (t @ t) @ v).abs().max() < 1e-12
    cams = torch.rand(3, n_side, n_side, generator=g, dtype=torch.float64)
    old = caa_refine(cams, balance_affinity(attn, 3), 0.4)
    new = caa_refine(cams, t, 0.4, steps=2)
    assert old.dtype == new.dtype == torch.float64
    assert (old - new).abs().max() < 1e-12
    # batched: (B, K, h, w) maps with (B, N, N) transitions, image by image
    tb = torch.stack([t, balanced_transition(attn.t().contiguous(), 3)])
    cb = torch.stack([cams, cams.flip(-1)])
    batched = caa_refine(cb, tb, 0.4, steps=2)
    for i in range(2):
        assert (batched[i] - caa_refine(cb[i], tb[i], 0.4, steps=2)).abs().max() < 1e-12


# ----------------------------------------------------------------------------- finding 9: batched maps
def test_batched_last_block_gradcam_and_caa_equal_per_image(toy_root, tiny_clip, tmp_path):
    ds = open_dataset("toy", toy_root, "train")
    cfg = CamConfig(dataset="toy", root=str(toy_root), split="train", out=str(tmp_path), model="x",
                    templates=TEMPLATE, precision="fp32", background="toy")
    engine = build_engine(cfg, ds.classes, tiny_clip)
    ids = ds.ids()[:4]
    keys = [list(ds.labels(i)) for i in ids]
    keys[1] = keys[1][:1]  # different target counts in one batch
    keys[2] = []  # and an image without labels
    same = [np.asarray(Image.fromarray(ds.load_image(i)).resize((150, 110))) for i in ids]  # one size
    items = [engine.prepare(im, i, k) for im, i, k in zip(same, ids, keys)]
    batched = engine.compute_batch(items)
    for item, (cam, caa) in zip(items, batched):
        alone_cam, alone_caa = engine.compute_batch([item])[0]
        assert cam.shape == alone_cam.shape == (len(item.keys), *engine.record_grid(item.work))
        assert np.abs(cam - alone_cam).max(initial=0) <= 1e-6
        assert np.abs(caa - alone_caa).max(initial=0) <= 2e-6  # the min-max after T @ (T @ v) amplifies the CAMs' rounding


# ----------------------------------------------------------------------------- finding 5: records
def test_multi_view_records_are_no_larger_than_single_view(toy_root, tiny_clip, tiny_clip_path, tmp_path):
    single = tmp_path / "single"
    generate_cams(_cfg(toy_root, tiny_clip_path, single, precision="fp32", limit=3), clip=tiny_clip, progress=False)
    for name, views in (("flip", {"flip": True}), ("ms", {"scales": (1.0, 0.5, 1.5), "flip": True})):
        out = tmp_path / name
        assert generate_cams(_cfg(toy_root, tiny_clip_path, out, precision="fp32", limit=3, **views),
                             clip=tiny_clip, progress=False).ok
        for f in sorted((single / "cam").glob("*.npz")):
            a, b = load_cam(f, full_size=False), load_cam(out / "cam" / f.name, full_size=False)
            assert b.cam.shape == a.cam.shape and b.caa.shape == a.caa.shape
            assert (out / "cam" / f.name).stat().st_size <= 1.25 * f.stat().st_size
            assert load_cam(out / "cam" / f.name).size == load_cam(f).size


def test_flip_average_at_the_grid_equals_the_average_at_full_size(toy_root, tiny_clip, tmp_path):
    """Bilinear upsampling commutes with a flip and is linear, so averaging the two views at the
    grid and upsampling (what the record does) equals the old full-size average."""
    ds = open_dataset("toy", toy_root, "train")
    cfg = CamConfig(dataset="toy", root=str(toy_root), split="train", out=str(tmp_path), model="x",
                    templates=TEMPLATE, precision="fp32", flip=True)
    engine = build_engine(cfg, ds.classes, tiny_clip)
    image_id = ds.ids()[0]
    item = engine.prepare(ds.load_image(image_id), image_id, list(ds.labels(image_id)))
    size = item.work
    views = [engine._batch_view(v, [item.keys], "batched") for v in item.views]
    old = sum(upsample(m.numpy()[0], size)[:, :, ::-1] if f else upsample(m.numpy()[0], size)
              for (m, _), f in zip(views, (False, True))) / 2
    new = upsample(engine.compute_batch([item])[0][0], size)
    assert np.abs(new - old).max() < 1e-5


def test_records_are_atomic_but_not_fsynced_and_the_manifest_is(tmp_path, monkeypatch):
    from clip_es import rundir

    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real(fd)))
    save_cam(tmp_path / "a.npz", [0], np.zeros((1, 2, 2)), np.zeros((1, 2, 2)), (2, 2))
    assert synced == [] and not list(tmp_path.glob(".*"))  # no temp file left behind
    rundir.atomic_write_json(tmp_path / "m.json", {"a": 1})
    assert len(synced) == 1


# ----------------------------------------------------------------------------- finding 9: workers
def test_workers_auto_is_zero_on_cpu_and_several_on_cuda(monkeypatch):
    monkeypatch.setattr(cam_run, "available_cpus", lambda: 16)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert resolve_workers("auto", "cpu") == 0
    assert resolve_workers("auto", "cuda:0") == 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert resolve_workers("auto", "cuda:1") == 3
    assert resolve_workers(2, "cuda:0") == 2 and resolve_workers("0", "cpu") == 0
    for bad in (-1, "many"):
        with pytest.raises(ConfigError):
            resolve_workers(bad, "cpu")


def test_label_passes_cam_workers_to_the_cam_stage(tmp_path, tiny_clip, monkeypatch):
    import cv2

    from clip_es import label

    (tmp_path / "imgs").mkdir()
    cv2.imwrite(str(tmp_path / "imgs" / "a.png"), np.zeros((32, 32, 3), np.uint8))
    (tmp_path / "labels.csv").write_text("a.png,cat\n")
    kw = dict(images=str(tmp_path / "imgs"), out=str(tmp_path / "o"), classes="cat,dog",
              labels=str(tmp_path / "labels.csv"))
    with pytest.raises(ConfigError, match="--workers"):
        label.LabelConfig(**kw, cam_workers="lots").validate()

    class Stop(Exception):
        pass

    def fake(cfg, clip=None, progress=True):
        raise Stop(cfg.workers)

    monkeypatch.setattr(cam_run, "generate_cams", fake)
    for workers in ("auto", 3):
        with pytest.raises(Stop) as e:
            label.label_folder(label.LabelConfig(**kw, cam_workers=workers), clip=tiny_clip, progress=False)
        assert e.value.args[0] == workers


# ----------------------------------------------------------------------------- issue 29, item 5: two ranks, one GPU
def _fake_torchrun(monkeypatch, local_rank: int, local_world: int, gpus: int, visible: str | None = None) -> None:
    monkeypatch.setenv("RANK", str(local_rank))
    monkeypatch.setenv("WORLD_SIZE", str(local_world))
    monkeypatch.setenv("LOCAL_RANK", str(local_rank))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local_world))
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: None)


@pytest.mark.parametrize("requested, local_rank, gpus, match", [
    ("auto", 1, 1, "2 ranks on this machine but it has 1 GPU"),  # LOCAL_RANK % 1: both on cuda:0
    ("cuda", 0, 1, "2 ranks on this machine but it has 1 GPU"),
    ("cuda:1", 0, 2, "--device cuda:1 under torchrun puts all 2 local ranks on one GPU"),
])
def test_two_local_ranks_on_one_gpu_are_refused_before_the_process_group(monkeypatch, tmp_path, requested,
                                                                        local_rank, gpus, match):
    """``clipes train`` under a (faked) torchrun with 2 local ranks: a ConfigError naming the fix,
    raised before ``init_process_group`` (so before NCCL's first collective)."""
    import torch.distributed as dist

    from clip_es.train.loop import TrainConfig, train_segmenter

    _fake_torchrun(monkeypatch, local_rank, 2, gpus)
    started = []
    monkeypatch.setattr(dist, "init_process_group", lambda *a, **k: started.append(a))
    with pytest.raises(ConfigError, match=match) as e:
        train_segmenter(TrainConfig(run=str(tmp_path / "run"), device=requested, steps=1), progress=False)
    assert "--nproc_per_node" in str(e.value) and "--device cpu" in str(e.value)
    assert started == []


def test_one_gpu_per_rank_and_the_cpu_pass(monkeypatch):
    from clip_es.train.distributed import DistInfo, check_one_gpu_per_rank

    two = DistInfo(rank=1, world=2, local_rank=1)
    check_one_gpu_per_rank(two, "auto", "cuda:1", 2, 2, False)  # one GPU each
    check_one_gpu_per_rank(two, "cpu", "cpu", 2, 1, False)
    check_one_gpu_per_rank(two, "cuda", "cuda:0", 2, 1, True)  # a per-rank CUDA_VISIBLE_DEVICES: compared later
    check_one_gpu_per_rank(DistInfo(), "cuda:0", "cuda:0", 1, 1, False)


def test_ranks_that_name_one_gpu_are_refused_after_comparing(monkeypatch):
    """With CUDA_VISIBLE_DEVICES set, the ranks exchange (host, GPU id) over gloo before any NCCL
    collective; two ranks naming one GPU get a ConfigError."""
    import torch.distributed as dist

    from clip_es.train import distributed as dd

    assert dd.duplicate_gpus([("a", "GPU-1"), ("a", "GPU-2"), ("b", "GPU-1"), ("a", "GPU-1")]) == [[0, 3]]
    assert dd.duplicate_gpus([("a", "GPU-1"), ("a", "GPU-2")]) == []
    monkeypatch.setattr(dd, "gpu_id", lambda device: "GPU-5b2c")
    monkeypatch.setattr(dist, "new_group", lambda backend: "gloo-group")
    destroyed = []
    monkeypatch.setattr(dist, "destroy_process_group", lambda group=None: destroyed.append(group))

    def gather(out, obj, group=None):
        assert group == "gloo-group"
        out[:] = [obj, obj]  # the other rank sees the same GPU

    monkeypatch.setattr(dist, "all_gather_object", gather)
    with pytest.raises(ConfigError, match="ranks 0 and 1 compute on one GPU"):
        dd._compare_gpus(dd.DistInfo(rank=0, world=2, local_rank=0), "cuda:0")
    assert destroyed == ["gloo-group"]


def test_the_process_group_outlives_what_training_left_in_cycles(monkeypatch):
    """A DDP wrapper survives its function in a reference cycle (its hooks); it is collected before
    the process group goes, never after it (a late collection aborted a gloo rank at exit)."""
    import gc
    import weakref

    import torch.distributed as dist

    from clip_es.train import distributed as dd

    state = {"up": False}
    monkeypatch.setattr(dist, "is_initialized", lambda: state["up"])
    monkeypatch.setattr(dist, "init_process_group", lambda backend: state.update(up=True))
    seen = []

    def destroy(group=None):
        seen.append(ref() is None)
        state["up"] = False

    monkeypatch.setattr(dist, "destroy_process_group", destroy)

    class Wrapper:  # stands in for DistributedDataParallel: it refers to itself
        def __init__(self):
            self.me = self

    def train():
        return weakref.ref(Wrapper())

    enabled = gc.isenabled()
    gc.disable()  # no collection by chance in between
    try:
        with dd.distributed(dd.DistInfo(rank=0, world=2, local_rank=0), "cpu"):
            ref = train()
            assert ref() is not None
    finally:
        if enabled:
            gc.enable()
    assert seen == [True]


# ----------------------------------------------------------------------------- issue 29, item 8: per-rank RNG
def _fake_world(monkeypatch, rank: int, other_rng: dict) -> list[int]:
    """``train_segmenter`` as rank ``rank`` of a faked 2-process torchrun (the collectives faked: the
    other rank's RNG state is ``other_rng``); returns the seeds ``torch.manual_seed`` was given."""
    import contextlib

    import torch.distributed as dist

    from clip_es.train import loop

    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", str(rank))
    monkeypatch.setattr(loop, "distributed", lambda info, device, requested=None: contextlib.nullcontext())
    monkeypatch.setattr(dist, "broadcast_object_list", lambda objs, src=0: None)
    monkeypatch.setattr(dist, "all_reduce", lambda t: None)
    monkeypatch.setattr(dist, "barrier", lambda: None)

    def gather_object(obj, out, dst=0):
        if out is not None:
            out[:] = [obj, other_rng] if rank == 0 else [other_rng, obj]

    monkeypatch.setattr(dist, "gather_object", gather_object)
    monkeypatch.setattr(torch.nn.parallel, "DistributedDataParallel", lambda model, device_ids=None: model)
    seeds: list[int] = []
    real_seed = torch.manual_seed
    monkeypatch.setattr(torch, "manual_seed", lambda s: (seeds.append(int(s)), real_seed(s))[1])
    return seeds


def test_every_ranks_rng_is_saved_and_each_rank_resumes_its_own(base_run, tmp_path, monkeypatch):  # noqa: F811
    """Under (faked) torchrun each rank seeds its dropout with seed + rank, every rank's RNG state
    goes into the checkpoint, and a resumed rank 1 restores rank 1's (before: rank 0's for all)."""
    import shutil

    from clip_es.train import loop
    from clip_es.train.checkpoint import rng_state
    from clip_es.train.loop import TrainConfig, train_segmenter
    from tests.test_segmenter import SMALL

    run = tmp_path / "run"
    shutil.copytree(base_run, run)
    torch.manual_seed(1234)
    other = rng_state()  # stands for rank 1's state at the save
    cfg = TrainConfig(run=str(run), steps=2, save_every=2, **{**SMALL, "seed": 7})
    with monkeypatch.context() as m:
        seeds = _fake_world(m, 0, other)
        train_segmenter(cfg, progress=False)
    assert seeds[-1] == 7  # rank 0: seed + 0 after the (shared) initial weights
    ck = torch.load(run / "segmenter" / "last.pt", map_location="cpu", weights_only=True)
    assert len(ck["rng_ranks"]) == 2 and torch.equal(ck["rng_ranks"][1]["torch"], other["torch"])
    assert not torch.equal(ck["rng_ranks"][0]["torch"], other["torch"])

    restored = []
    with monkeypatch.context() as m:
        seeds = _fake_world(m, 1, ck["rng_ranks"][0])
        m.setattr(loop, "set_rng_state", lambda st: restored.append(st))
        train_segmenter(TrainConfig(run=str(run), steps=3, save_every=2, resume=True, **{**SMALL, "seed": 7}),
                        progress=False)
    assert 8 in seeds  # rank 1: seed + 1
    assert len(restored) == 1 and torch.equal(restored[0]["torch"], other["torch"])


def test_a_checkpoint_with_rank_0s_rng_only_resumes_with_a_warning(caplog):
    from clip_es.train.checkpoint import rank_rng_state

    old = {"rng": {"torch": torch.zeros(3)}}
    with caplog.at_level(logging.WARNING):
        assert rank_rng_state(old, 1, 2) is old["rng"]
    assert "rank 1 resumes from rank 0's" in caplog.text
    caplog.clear()
    new = {"rng": "r0", "rng_ranks": ["r0", "r1"]}
    assert rank_rng_state(new, 1, 2) == "r1" and rank_rng_state({"rng": "r0", "rng_ranks": ["r0"]}, 0, 1) == "r0"
    assert not caplog.text


# ----------------------------------------------------------------------------- issue 29, item 7: training precision
def test_training_under_bf16_autocast_is_recorded_and_differs_from_fp32(base_run, tmp_path, monkeypatch):  # noqa: F811
    """``--precision bf16`` trains under autocast (its losses differ from fp32's, stay finite), the
    checkpoint records the resolved precision, and ``auto`` resolves per device (bf16 where native)."""
    import shutil

    from clip_es.train import loop
    from clip_es.train.loop import TrainConfig, train_segmenter
    from tests.test_segmenter import SMALL

    ck = {}
    for precision in ("fp32", "bf16", "auto"):
        run = tmp_path / precision
        shutil.copytree(base_run, run)
        if precision == "auto":
            monkeypatch.setattr(prec, "has_native_bf16", lambda device: False)  # a CPU without avx512_bf16/AMX
        res = train_segmenter(TrainConfig(run=str(run), steps=2, precision=precision, **SMALL), progress=False)
        assert res.last_loss is not None and np.isfinite(res.last_loss)
        ck[precision] = torch.load(run / "segmenter" / "last.pt", map_location="cpu", weights_only=True)
    assert [ck[p]["config"]["precision"] for p in ("fp32", "bf16", "auto")] == ["fp32", "bf16", "fp32"]
    assert ck["bf16"]["config"]["train"]["precision"] == "bf16" and "precision" not in ck["fp32"]["config"]["train"]
    assert ck["bf16"]["log"] != ck["fp32"]["log"] and ck["auto"]["log"] == ck["fp32"]["log"]
    with pytest.raises(ConfigError, match="--precision must be one of auto, fp32, bf16, fp16"):
        TrainConfig(run="r", precision="tf32").validate()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "GradScaler is enabled, but CUDA is not available" on this CPU
        amp, scaler = loop._mixed_precision("fp16", "cuda:0")
    assert amp is torch.float16 and scaler is not None
    assert loop._mixed_precision("bf16", "cuda:0") == (torch.bfloat16, None)
    assert loop._mixed_precision("fp32", "cpu") == (None, None)


# ----------------------------------------------------------------------------- issue 29, item 9: host side
def test_a_cuda_batch_is_concatenated_into_page_locked_memory(toy_root, tiny_clip, tiny_clip_path, tmp_path,
                                                             monkeypatch):
    """``torch.cat`` of pinned views makes a pageable tensor (its non_blocking copy is synchronous):
    for CUDA the views are concatenated into one page-locked buffer instead; the cam stage's batches
    go through that."""
    made = []

    def pinned_empty(shape, dtype):  # stands for torch.empty(..., pin_memory=True), which needs a GPU
        t = torch.empty(shape, dtype=dtype)
        made.append(t)
        return t

    monkeypatch.setattr(cam_run, "_pinned_empty", pinned_empty)
    views = [torch.randint(0, 255, (1, 3, 4, 5), dtype=torch.uint8, generator=torch.Generator().manual_seed(i))
             for i in range(3)]
    out = cam_run.cat_views(views, torch.device("cuda", 0))
    assert len(made) == 1 and out.data_ptr() == made[0].data_ptr() and torch.equal(out, torch.cat(views))
    assert torch.equal(cam_run.cat_views(views, torch.device("cpu")), out) and len(made) == 1  # the CPU: plain cat

    seen = []
    real = cam_run.cat_views
    monkeypatch.setattr(cam_run, "cat_views", lambda v, d: (seen.append(len(v)), real(v, d))[1])
    res = generate_cams(_same_size(toy_root, tmp_path, tiny_clip_path, 4, batch_size=2), clip=tiny_clip,
                        progress=False)
    assert res.ok and seen == [2, 2]
