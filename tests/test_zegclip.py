"""The ``zegclip`` family (frozen CLIP ViT + deep prompts + relationship descriptor + decoder), its
focal + dice loss, and the training-free ``clip`` family, on the test-size CLIP."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from clip_es.data.toy import TOY_BACKGROUNDS as TOY_BG
from clip_es.errors import ConfigError
from clip_es.train.clipdense import ClipDenseArch, ClipDenseSegmenter
from clip_es.train.losses import IGNORE, focal_dice_loss
from clip_es.train.zegclip import ZegClipArch, ZegClipSegmenter, decoder_heads
from tests.conftest import TEST_CLIP, run_cli
from tests.test_segmenter import _one_thread, base_run, resume_matches_uninterrupted, run_dir  # noqa: F401

ZEG = dict(labels="gt", batch_size=2, crop_size=64, device="cpu", log_every=1, warmup=2, arch="zegclip")


def _text(k: int, d: int = TEST_CLIP.embed_dim, seed: int = 0) -> torch.Tensor:
    return F.normalize(torch.randn(k, d, generator=torch.Generator().manual_seed(seed)), dim=-1)


def _model(tiny_clip, **kw) -> ZegClipSegmenter:
    torch.manual_seed(0)
    d = TEST_CLIP.embed_dim
    return ZegClipSegmenter(ZegClipArch(text_dim=d, heads=decoder_heads(d), **kw), tiny_clip.model.visual)


# ----------------------------------------------------------------------------- model
def test_heads_divide_the_width():
    assert decoder_heads(512) == 8 and decoder_heads(128) == 8 and decoder_heads(96) == 8
    assert decoder_heads(60) == 6 and decoder_heads(7) == 7


@pytest.mark.parametrize("relation", [True, False])
def test_relationship_descriptor_and_output_shapes(tiny_clip, relation):
    model = _model(tiny_clip, relation=relation).eval()
    d = TEST_CLIP.embed_dim
    g = F.normalize(torch.randn(2, d), dim=-1)
    fresh = model.queries(_text(5), g)
    assert torch.allclose(fresh[:, 1:], _text(5)[None].expand(2, -1, -1), atol=1e-6)  # starts as q_c = t_c
    with torch.no_grad():
        model.relation.weight.add_(0.1 * torch.randn_like(model.relation.weight))  # as after training
    q = model.queries(_text(5), g)
    assert q.shape == (2, 6, d)  # background query first
    assert model.relation.in_features == (2 * d if relation else d) and model.relation.out_features == d
    if relation:  # the query depends on the image's CLS, per image
        assert not torch.allclose(q[0], q[1])
    else:
        assert torch.allclose(q[0], q[1])
    x = torch.rand(2, 3, 64, 96)
    out = model(x, _text(5))
    assert out.shape == (2, 6, 64, 96) and torch.isfinite(out).all()
    assert model(x, _text(2, seed=3)).shape == (2, 3, 64, 96)  # any class list (open vocabulary)
    with pytest.raises(ConfigError, match="CLIP embeddings"):
        model(x, torch.randn(3, d + 1))
    patches, g2, grid = model.encode((x - model.mean) / model.std)
    assert grid == (4, 6) and patches.shape == (2, 24, d)
    assert torch.allclose(patches.norm(dim=-1), torch.ones(2, 24), atol=1e-5)
    assert torch.allclose(g2.norm(dim=-1), torch.ones(2), atol=1e-5)


def test_input_scale_makes_the_grid_finer_and_keeps_the_output_size(tiny_clip, monkeypatch):
    from clip_es.train.zegclip import FAMILY

    x = torch.rand(2, 3, 64, 96)
    grids = []
    real = ZegClipSegmenter.encode
    monkeypatch.setattr(ZegClipSegmenter, "encode", lambda self, v: grids.append(v.shape[-2:]) or real(self, v))
    one, two = _model(tiny_clip).eval(), _model(tiny_clip, input_scale=2).eval()
    assert one(x, _text(3)).shape == two(x, _text(3)).shape == (2, 4, 64, 96)
    assert grids == [(64, 96), (128, 192)]  # the ViT saw the input twice as large: a 8x12 patch grid, not 4x6
    assert not torch.allclose(one(x, _text(3)), two(x, _text(3)))
    with pytest.raises(ConfigError, match="input scale must be >= 1"):
        ZegClipArch(input_scale=0).validate()
    assert FAMILY.arch_from_dict({"text_dim": 64, "heads": 8}).input_scale == 1  # older records: 1
    # the LayerNorm's eps changed with the decoder (records with an activation): older ones trained with 1e-5
    assert FAMILY.arch_from_dict({"text_dim": 64, "heads": 8}).norm_eps == 1e-5
    assert FAMILY.arch_from_dict({"text_dim": 64, "heads": 8, "activation": "relu"}).norm_eps == 1e-6
    assert _model(tiny_clip, norm_eps=1e-5).out_norm.eps == 1e-5 and _model(tiny_clip).out_norm.eps == 1e-6
    free1 = ClipDenseSegmenter(ClipDenseArch(text_dim=TEST_CLIP.embed_dim), tiny_clip.model.visual).eval()
    free2 = ClipDenseSegmenter(ClipDenseArch(text_dim=TEST_CLIP.embed_dim, input_scale=2), tiny_clip.model.visual).eval()
    with torch.no_grad():
        a, b = free1(x, _text(3)), free2(x, _text(3))
    assert a.shape == b.shape == (2, 4, 64, 96) and not torch.allclose(a, b)


def test_auto_input_scale_rule():
    from clip_es.train.loop import auto_input_scale

    assert auto_input_scale(164, 16) == 2  # the toy world's median shorter side: 10 patches -> 20
    assert auto_input_scale(320, 16) == 1 and auto_input_scale(319, 16) == 2
    assert auto_input_scale(375, 16) == 1  # VOC with a ViT-B/16: 23 patches at native size
    assert auto_input_scale(100, 16) == 4 and auto_input_scale(20, 16) == 4  # at most 4
    assert auto_input_scale(None, 16) == auto_input_scale(164, None) == 1


def test_prompts_are_the_only_encoder_parameters_that_train(tiny_clip):
    model = _model(tiny_clip).train()
    assert not model.visual.training  # the frozen CLIP runs as at inference
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    y = torch.randint(0, 4, (2, 64, 64))
    focal_dice_loss(model(torch.rand(2, 3, 64, 64), _text(3)), y).backward()
    assert all(p.grad is None for p in model.visual.parameters())
    assert model.prompts.tokens.grad.abs().sum() > 0  # gradients reach the prompts through the frozen blocks
    opt.step()
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert not {k for k in changed if k.startswith("visual.")}
    assert {"prompts.tokens", "prompts.proj.weight"} <= changed
    assert model.prompts.tokens.shape == (TEST_CLIP.vision_layers, 10, TEST_CLIP.vision_width)
    bound = (6 / (3 * 16 * 16 + TEST_CLIP.vision_width)) ** 0.5
    assert before["prompts.tokens"].abs().max() <= bound


def test_no_prompts_keeps_the_clip_features(tiny_clip):
    """prompts=0 and a fresh LayerNorm: the patch tokens are CLIP's own (ln_post + proj of the last block)."""
    from clip_es.model.dense import final_tokens

    model = _model(tiny_clip, prompts=0).eval()
    x = torch.rand(1, 3, 64, 64)
    z = (x - model.mean) / model.std
    patches, _, _ = model.encode(z)
    tok = final_tokens(model.visual, z)
    ref = F.normalize(model.visual.ln_post(tok[:, 1:]) @ model.visual.proj, dim=-1)
    assert torch.allclose(patches, ref, atol=1e-4)
    assert model.prompts is None


# ----------------------------------------------------------------------------- loss
def test_focal_dice_on_synthetic_maps():
    target = torch.zeros(1, 4, 4, dtype=torch.int64)
    target[0, :2] = 1                       # class 1 present, class 2 absent
    target[0, 3, 3] = IGNORE
    onehot = F.one_hot(target.clamp(max=2), 3).permute(0, 3, 1, 2).float() * (target != IGNORE)
    good = (onehot * 2 - 1) * 12           # confident and right (the ignored pixel: negative everywhere)
    assert focal_dice_loss(good, target) < 0.05
    bad = -good
    assert focal_dice_loss(bad, target) > 10 * focal_dice_loss(good, target)
    # an absent class only enters the focal term: without it, its logits change nothing
    moved = good.clone()
    moved[:, 2] = -2.0
    dice_only = dict(focal_weight=0.0)
    assert torch.allclose(focal_dice_loss(good, target, **dice_only), focal_dice_loss(moved, target, **dice_only))
    assert focal_dice_loss(moved, target) > focal_dice_loss(good, target)
    # ignored pixels count nowhere by default; as negatives they are pushed down on every channel
    noisy = good.clone()
    noisy[0, :, 3, 3] = torch.tensor([5.0, -3.0, 7.0])
    assert torch.allclose(focal_dice_loss(noisy, target), focal_dice_loss(good, target))
    z = noisy.clone().requires_grad_(True)
    focal_dice_loss(z, target, unsure="negative").backward()
    assert (z.grad[0, :, 3, 3] > 0).all()
    assert focal_dice_loss(noisy, target, unsure="negative") > focal_dice_loss(good, target, unsure="negative")
    # nothing counted: exactly 0 with a zero gradient
    z = torch.randn(1, 3, 4, 4, requires_grad=True)
    loss = focal_dice_loss(z, torch.full((1, 4, 4), IGNORE))
    loss.backward()
    assert loss.item() == 0 and torch.isfinite(z.grad).all() and z.grad.abs().sum() == 0
    with pytest.raises(ConfigError, match="ignore"):
        focal_dice_loss(good, target, unsure="maybe")


# ----------------------------------------------------------------------------- training protocol
def test_unseen_names_never_reach_a_zegclip_forward(run_dir, monkeypatch):  # noqa: F811
    from tests.test_families import train_and_spy_text

    ck = train_and_spy_text(monkeypatch, ZegClipSegmenter, run_dir, **ZEG)
    assert ck["config"]["arch"]["family"] == "zegclip"
    assert ck["config"]["train"]["loss"] == "focal_dice"


def test_checkpoint_has_no_clip_and_segments_new_names(run_dir, tmp_path):  # noqa: F811
    from clip_es.train.loop import TrainConfig, train_segmenter
    from clip_es.train.segment import load_segmenter, predict_logits

    train_segmenter(TrainConfig(run=str(run_dir), steps=2, unseen=("ring",), **ZEG), progress=False)
    for f in ("last.pt", "model.pt"):
        ck = torch.load(run_dir / "segmenter" / f, weights_only=True)
        assert ck["config"]["arch"]["input_scale"] == 2  # zegclip's default 0 resolved from the toy images
        assert ck["config"]["train"]["input_scale"] == 2
        assert ck["model"] and not any(k.startswith("visual.") for k in ck["model"])
        assert {k.split(".")[0] for k in ck["model"]} == {"prompts", "out_norm", "bg_text", "relation", "memory",
                                                          "decoder", "scorer"}
        assert ck["config"]["arch"]["background"] == "text"  # zegclip's default: the cam stage's words
        words = ck["config"]["arch"]["background_words"]
        assert list(words) == list(ck["config"]["train"]["background_words"]) == list(TOY_BG)
        assert ck["model"]["bg_text"].shape == (len(TOY_BG), TEST_CLIP.embed_dim)
    seg = load_segmenter(run_dir / "segmenter" / "model.pt")
    assert seg.model.score_kind == "sigmoid" and "ring" not in seg.trained
    image = (torch.rand(40, 56, 3) * 255).to(torch.uint8).numpy()
    assert predict_logits(seg, image).shape == (9, 40, 56)
    from clip_es.data.base import ClassSpec

    new = seg.with_classes([ClassSpec("ball"), ClassSpec("zebra"), ClassSpec("teapot")])
    assert new.offset == new.model.calibration  # trained and untrained names mixed
    assert predict_logits(new, image).shape == (4, 40, 56)
    root = json.loads((run_dir / "manifest.json").read_text())["dataset"]["root"]
    out = tmp_path / "pred"
    assert run_cli(["segment", "-c", str(run_dir / "segmenter" / "model.pt"), "-o", str(out), "-d", "toy", "-r", root,
                    "-s", "val", "--classes", "ball,zebra", "--calibration", "0.1", "--device", "cpu"]) == 0
    assert len(list(out.glob("*.png"))) == 3
    assert json.loads((out / "segment.json").read_text())["calibration"] == 0.1
    with pytest.raises(ConfigError, match="does not export"):
        seg.model.export_module(seg.text)


def test_text_background_is_the_best_matching_word(tiny_clip):
    words = ("grass", "sky", "wall")
    bg = _text(3, seed=5)
    model = _model(tiny_clip, background="text", background_words=words, prompts=2).eval()
    model.bg_text.copy_(bg)  # the buffer as given (unit rows already)
    assert not any("bg" in n for n, _ in model.named_parameters())  # fixed text: nothing to learn
    text = _text(4)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        patches, g, grid = model.encode(x)
        per_word = model.decode(patches, g, torch.cat([bg, text]), grid, grid, background=False)
        out = model.decode(patches, g, text, grid, grid)
        assert model(x, text).shape == (2, 5, 32, 32)
    assert out.shape == (2, 5, *grid)
    # queries are a set: each word scored as a class, the background channel is the best of them
    torch.testing.assert_close(out[:, :1], per_word[:, :3].amax(1, keepdim=True), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[:, 1:], per_word[:, 3:], atol=1e-5, rtol=1e-5)
    with pytest.raises(ConfigError, match="background words"):
        ZegClipArch(text_dim=TEST_CLIP.embed_dim, heads=1, background="text").validate()
    with pytest.raises(ConfigError, match="background-query"):
        ZegClipArch(text_dim=TEST_CLIP.embed_dim, heads=1, background="sky").validate()
    with pytest.raises(ConfigError, match="must be"):
        ZegClipSegmenter(ZegClipArch(text_dim=TEST_CLIP.embed_dim, heads=decoder_heads(TEST_CLIP.embed_dim),
                                     background="text", background_words=words), tiny_clip.model.visual,
                         background_text=_text(2))


def test_background_query_options_train_and_reload(run_dir, tmp_path):  # noqa: F811
    """learnt: one trained embedding; text without a cam-stage word list: voc's words; a bad value:
    a one-line usage error before anything is written."""
    from clip_es.data.classes import background_words
    from clip_es.train.loop import TrainConfig, train_segmenter
    from clip_es.train.segment import load_segmenter, predict_logits

    train_segmenter(TrainConfig(run=str(run_dir), steps=2, background_query="learnt", **ZEG), progress=False)
    ck = torch.load(run_dir / "segmenter" / "model.pt", weights_only=True)
    assert "bg_token" in ck["model"] and "bg_text" not in ck["model"]
    assert ck["config"]["arch"]["background"] == "learnt" and not ck["config"]["arch"]["background_words"]

    m = json.loads((run_dir / "manifest.json").read_text())
    m["stages"]["cam"]["params"]["background_words"] = []
    (run_dir / "manifest.json").write_text(json.dumps(m))
    train_segmenter(TrainConfig(run=str(run_dir), name="seg_voc", steps=2, **ZEG), progress=False)
    path = run_dir / "seg_voc" / "model.pt"
    ck = torch.load(path, weights_only=True)
    assert list(ck["config"]["arch"]["background_words"]) == background_words("voc")
    seg = load_segmenter(path)  # the buffer comes back from the checkpoint, not from a re-embedding
    torch.testing.assert_close(seg.model.bg_text, ck["model"]["bg_text"])
    assert predict_logits(seg, (torch.rand(40, 56, 3) * 255).to(torch.uint8).numpy()).shape == (9, 40, 56)

    r = subprocess.run([sys.executable, "-m", "clip_es", "train", "--run", str(run_dir), "--name", "bad",
                        "--arch", "zegclip", "--background-query", "sky", "--steps", "1", "--device", "cpu"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "--background-query" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (run_dir / "bad").exists()


def test_zegclip_resume_matches_uninterrupted(run_dir, tmp_path):  # noqa: F811
    """As for fusion, with the prompts' dropout drawing from the restored RNG."""
    a, _ = resume_matches_uninterrupted(run_dir, tmp_path, dict(steps=5, save_every=2, **ZEG), kill_at=3)
    assert "prompts.tokens" in a["model"]


def test_ablation_options_are_recorded(run_dir):  # noqa: F811
    from clip_es.train.loop import TrainConfig, stage_params, train_segmenter

    assert not {"prompts", "relation", "dense_path"} & set(stage_params(TrainConfig(run="r")))
    train_segmenter(TrainConfig(run=str(run_dir), steps=1, prompts=0, relation=False, loss="ce", **ZEG),
                    progress=False)
    ck = torch.load(run_dir / "segmenter" / "model.pt", weights_only=True)
    assert ck["config"]["arch"]["prompts"] == 0 and ck["config"]["arch"]["relation"] is False
    assert not any(k.startswith("prompts.") for k in ck["model"])


def test_zegclip_torchrun_two_processes(base_run, tmp_path):  # noqa: F811
    """DDP (2 CPU processes) runs zegclip like one process over the same samples: every trainable parameter
    is used (no unused-parameter error) and rank 0 writes one checkpoint."""
    run = tmp_path / "run"
    shutil.copytree(base_run, run)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "clip_es",
           "train", "--run-dir", str(run), "--arch", "zegclip", "--labels", "gt", "--steps", "3", "--batch-size",
           "1", "--crop-size", "64", "--device", "cpu", "--save-every", "2"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ck = torch.load(run / "segmenter" / "last.pt", map_location="cpu", weights_only=True)
    assert ck["step"] == 3 and ck["config"]["world_size"] == 2
    assert not any(k.startswith(("module.", "visual.")) for k in ck["model"])
    assert len((run / "segmenter" / "log.csv").read_text().splitlines()) == 4


# ----------------------------------------------------------------------------- the training-free family
def test_clip_family_paths_and_background_rule(tiny_clip):
    d = TEST_CLIP.embed_dim
    x = torch.rand(1, 3, 64, 64)
    value = ClipDenseSegmenter(ClipDenseArch(text_dim=d), tiny_clip.model.visual).eval()
    plain = ClipDenseSegmenter(ClipDenseArch(text_dim=d, path="plain"), tiny_clip.model.visual).eval()
    a, b = value(x, _text(3)), plain(x, _text(3))
    assert a.shape == b.shape == (1, 4, 64, 64) and not torch.allclose(a, b)
    cos = a[:, 1:] / value.arch.scale
    assert cos.abs().max() <= 1 + 1e-5
    assert torch.allclose(a[:, 0], torch.full_like(a[:, 0], value.arch.scale * value.arch.threshold))
    never = ClipDenseSegmenter(ClipDenseArch(text_dim=d, threshold=1.5), tiny_clip.model.visual).eval()
    assert (never(x, _text(3)).argmax(1) == 0).all()  # no class can exceed a cosine of 1.5
    with pytest.raises(ConfigError, match="valid: value, plain"):
        ClipDenseArch(text_dim=d, path="mean").validate()


def test_clip_family_train_is_instant_and_segment_needs_no_checkpoint(run_dir, tiny_clip_path, toy_root,  # noqa: F811
                                                                       tmp_path):
    from clip_es.train.loop import TrainConfig, train_segmenter

    res = train_segmenter(TrainConfig(run=str(run_dir), steps=50, arch="clip", labels="gt", device="cpu"),
                          progress=False)
    assert res.step == 50
    ck = torch.load(run_dir / "segmenter" / "model.pt", weights_only=True)
    assert ck["model"] == {} and ck["config"]["arch"]["family"] == "clip"
    assert run_cli(["eval", "--run", str(run_dir), "--stage", "segmenter", "--unseen", "ring"]) == 0
    out = tmp_path / "free"
    argv = ["segment", "--arch", "clip", "--clip-model", str(tiny_clip_path), "--classes", "ball,zebra", "-o",
            str(out), "-d", "toy", "-r", str(toy_root), "-s", "val", "--device", "cpu"]
    assert run_cli(argv) == 0
    assert len(list(out.glob("*.png"))) == 3
    meta = json.loads((out / "segment.json").read_text())
    assert meta["arch"] == "clip" and [c[0] for c in meta["classes"]] == ["ball", "zebra"]
    assert run_cli(argv) == 0  # resumable: same arch, CLIP and classes
    assert run_cli(["segment", "--arch", "zegclip", "--classes", "a", "-o", str(tmp_path / "x"), "--images",
                    str(tmp_path)]) == 2
    assert run_cli(["segment", "--arch", "clip", "-o", str(tmp_path / "y"), "--images", str(tmp_path)]) == 2


def test_zero_shot_recipe_holds_out_classes_in_train_and_eval(tmp_path):
    from pathlib import Path

    from clip_es.recipe import load_recipe, stage_configs

    path = Path(__file__).resolve().parents[1] / "pipelines" / "toy_zeroshot.toml"
    cfgs = stage_configs(load_recipe(path), tmp_path / "root", tmp_path / "run")
    train = cfgs["train"].validate()
    assert train.arch == "zegclip" and train.unseen == ("ring", "fish") and train.resolved_loss() == "focal_dice"
    assert cfgs["eval"].unseen == ("ring", "fish")  # [eval] takes [train]'s held-out classes


def test_zero_shot_recipe_runs_end_to_end_and_prints_the_table(toy_root, tmp_path, capsys):
    from pathlib import Path

    recipe = Path(__file__).resolve().parents[1] / "pipelines" / "toy_zeroshot.toml"
    argv = ["run", str(recipe), "--root", str(toy_root), "--out", str(tmp_path / "run"), "--set", "train.steps=2",
            "--set", "train.crop_size=64", "--set", "train.batch_size=2", "--set", "train.device=cpu"]
    assert run_cli(argv) == 0
    out = capsys.readouterr().out
    assert "seen mIoU" in out and "unseen mIoU" in out and "hIoU" in out and "ring, fish" in out
