"""The cam stage: GradCAM math, CAA, the stage runner, eval and prompt ranking."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from clip_es.cam.caa import balance_affinity, box_mask, caa_refine
from clip_es.cam.gradcam import analytic_supported, minmax, softmax_gradcam, softmax_gradcam_batch
from clip_es.cam.run import CamConfig, generate_cams
from clip_es.cam.store import load_cam
from clip_es.errors import ConfigError, RunDirError
from clip_es.evaluate import EvalOptions, confusion_matrix, evaluate_run, iou_report, scores_to_labels
from clip_es.model.dense import dense_forward

TEMPLATE = ("a photo of a {}.",)


def _cfg(toy_root, tiny_clip_path, out, **kw):
    kw.setdefault("templates", TEMPLATE)
    return CamConfig(dataset="toy", root=str(toy_root), split="train", out=str(out), model=str(tiny_clip_path), **kw)


def _penultimate(clip, h=64, w=96, seed=0):
    x = torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return dense_forward(clip.visual, x)


def test_batched_equals_looped(tiny_clip):
    d = _penultimate(tiny_clip)
    text = torch.nn.functional.normalize(torch.randn(6, 64, generator=torch.Generator().manual_seed(1)), dim=-1)
    for soft in (True, False):
        a = softmax_gradcam(tiny_clip.visual, d.penultimate, d.grid, text, 3, 50.0, use_softmax=soft)
        b = softmax_gradcam(tiny_clip.visual, d.penultimate, d.grid, text, 3, 50.0, use_softmax=soft, mode="loop")
        assert a.cam.shape == (3, 4, 6)
        assert float((a.cam - b.cam).abs().max()) <= 1e-4
        assert float(a.cam.min()) >= 0 and float(a.cam.max()) <= 1
    assert not torch.isnan(a.cam).any()


def _mixed_batch(visual, seed=0, dim=64):
    """Three images of one grid with 3, 1 and 0 targets and softmax sets of 7, 1 and 4 rows."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 3, 64, 96, generator=g)
    with torch.no_grad():
        d = dense_forward(visual, x)
    texts = [torch.nn.functional.normalize(torch.randn(m, dim, generator=g), dim=-1) for m in (7, 1, 4)]
    return d, texts, [3, 1, 0]


def _vit(**kw):
    import open_clip.transformer as oc

    torch.manual_seed(0)
    return oc.VisionTransformer(image_size=32, patch_size=16, width=64, layers=2, heads=4, mlp_ratio=4.0,
                                output_dim=48, **kw).eval()


@pytest.mark.parametrize("which", ["tiny", "gelu"])
def test_analytic_gradients_equal_autograd(tiny_clip, which):
    """The closed-form token-summed gradients (mode auto = analytic) give autograd's maps, logits and
    attention for a batch mixing target counts and softmax-set sizes, with and without the softmax;
    on the bundled tiny CLIP (QuickGELU) and an open_clip ViT with nn.GELU."""
    visual = tiny_clip.visual if which == "tiny" else _vit()
    assert analytic_supported(visual)
    d, texts, nt = _mixed_batch(visual, dim=visual.proj.shape[1])
    for soft in (True, False):
        fast = softmax_gradcam_batch(visual, d.penultimate, d.grid, texts, nt, 50.0, use_softmax=soft)
        ref = softmax_gradcam_batch(visual, d.penultimate, d.grid, texts, nt, 50.0, use_softmax=soft, mode="batched")
        assert fast.cam.shape == ref.cam.shape == (3, 3, *d.grid)
        assert float((fast.cam - ref.cam).abs().max()) <= 1e-5
        assert float(fast.cam[0].amax()) == 1.0 and float(fast.cam[1, 0].amax()) == 1.0  # real maps compared
        assert torch.equal(fast.cam[1, 1:], torch.zeros_like(fast.cam[1, 1:])) and not fast.cam[2].any()
        assert float((fast.attn_last - ref.attn_last).abs().max()) <= 1e-6
        assert torch.allclose(fast.logits, ref.logits, atol=1e-5)  # -inf padding at the same places


@pytest.mark.parametrize("mode", ["auto", "batched"])
def test_gradcam_inside_a_callers_autocast_region(mode):
    """Under a caller's CPU bf16 autocast (bench_cam.py [4]: the frozen blocks in bf16, so the tokens
    and text arrive in bf16) both entry points run the last block in fp32 on the bundled clipes-tiny:
    no 'mat1 and mat2 must have the same dtype', fp32 maps equal to the same call outside autocast."""
    from clip_es.model.resolve import load_clip

    visual = load_clip("clipes-tiny").visual
    x = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(3))
    dim = visual.proj.shape[1]
    texts = [torch.nn.functional.normalize(torch.randn(m, dim, generator=torch.Generator().manual_seed(m)), dim=-1)
             for m in (6, 3)]
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        d = dense_forward(visual, x)
    assert d.penultimate.dtype == torch.bfloat16  # what the closed form used to meet
    low = [t.bfloat16() for t in texts]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        one = softmax_gradcam(visual, d.penultimate[:1], d.grid, low[0], 3, 50.0, mode=mode)
        many = softmax_gradcam_batch(visual, d.penultimate, d.grid, low, [3, 2], 50.0, mode=mode)
    ref = softmax_gradcam_batch(visual, d.penultimate.float(), d.grid, [t.bfloat16().float() for t in texts],
                                [3, 2], 50.0, mode=mode)
    assert one.cam.dtype == many.cam.dtype == many.logits.dtype == torch.float32
    assert float(ref.cam.amax()) == 1.0
    assert float((many.cam - ref.cam).abs().max()) <= 1e-6
    assert float((one.cam - ref.cam[0, :3]).abs().max()) <= 1e-5


def test_analytic_refuses_blocks_it_does_not_cover(tiny_clip):
    """LayerScale or CLS pooling: ``auto`` falls back to autograd, an explicit analytic request is refused."""
    scaled = _vit(ls_init_value=0.5)
    assert not analytic_supported(scaled) and not analytic_supported(tiny_clip.visual, "cls")
    d, texts, nt = _mixed_batch(scaled, dim=48)
    auto = softmax_gradcam_batch(scaled, d.penultimate, d.grid, texts, nt, 50.0)
    ref = softmax_gradcam_batch(scaled, d.penultimate, d.grid, texts, nt, 50.0, mode="batched")
    assert torch.equal(auto.cam, ref.cam)
    with pytest.raises(ValueError, match="analytic"):
        softmax_gradcam_batch(scaled, d.penultimate, d.grid, texts, nt, 50.0, mode="analytic")
    with pytest.raises(ValueError, match="unknown mode"):
        softmax_gradcam_batch(scaled, d.penultimate, d.grid, texts, nt, 50.0, mode="fast")


def test_gradcam_does_not_modify_inputs(tiny_clip):
    d = _penultimate(tiny_clip)
    before = d.penultimate.clone()
    text = torch.nn.functional.normalize(torch.randn(4, 64), dim=-1)
    softmax_gradcam(tiny_clip.visual, d.penultimate, d.grid, text, 2, 50.0)
    assert torch.equal(before, d.penultimate)


def test_softmax_changes_the_maps(tiny_clip):
    d = _penultimate(tiny_clip)
    text = torch.nn.functional.normalize(torch.randn(5, 64, generator=torch.Generator().manual_seed(3)), dim=-1)
    a = softmax_gradcam(tiny_clip.visual, d.penultimate, d.grid, text, 2, 50.0)
    b = softmax_gradcam(tiny_clip.visual, d.penultimate, d.grid, text, 2, 50.0, use_softmax=False)
    assert not torch.allclose(a.cam, b.cam)


def test_single_target_without_background_uses_the_logit(tiny_clip):
    """One label and no background words: the softmax over one row is constant (zero gradient,
    an empty CAM); the logit's CAM is used instead, so single-label images still get a map."""
    d = _penultimate(tiny_clip)
    text = torch.nn.functional.normalize(torch.randn(1, 64, generator=torch.Generator().manual_seed(4)), dim=-1)
    a = softmax_gradcam(tiny_clip.visual, d.penultimate, d.grid, text, 1, 50.0)
    b = softmax_gradcam(tiny_clip.visual, d.penultimate, d.grid, text, 1, 50.0, use_softmax=False)
    assert float(a.cam.max()) == 1.0
    assert torch.equal(a.cam, b.cam)


def test_minmax_constant_map_is_zero():
    x = torch.stack([torch.full((3, 3), 2.0), torch.arange(9.0).reshape(3, 3)])
    y = minmax(x)
    assert torch.equal(y[0], torch.zeros(3, 3))
    assert float(y[1].min()) == 0 and float(y[1].max()) == 1


def test_box_mask_includes_border_row_and_column():
    cam = np.zeros((6, 7), np.float32)
    cam[3:, 4:] = 1.0  # object touching the bottom-right border
    m = box_mask(cam, 0.4)
    assert m[5, 6] == 1 and m[3, 4] == 1 and m[2, 4] == 0 and m.sum() == 3 * 3
    assert box_mask(np.zeros((4, 4), np.float32)).sum() == 0


def test_box_mask_nested_contours_fill_boxes():
    cam = np.zeros((10, 10), np.float32)
    cam[1:9, 1:9] = 1.0
    cam[3:7, 3:7] = 0.0  # a hole: the inner contour's box is filled too (inside the outer box anyway)
    assert box_mask(cam).sum() == 64


def test_affinity_balancing_is_symmetric_and_caa_respects_boxes():
    g = torch.Generator().manual_seed(0)
    attn = torch.rand(12, 12, generator=g).softmax(-1)
    t = balance_affinity(attn, 3)
    assert torch.allclose(t, t.t(), atol=1e-6)
    cams = torch.zeros(2, 3, 4)
    cams[0, 0, 0] = 1.0
    out = caa_refine(cams, t, 0.4)
    assert out.shape == cams.shape
    assert torch.equal(out[1], torch.zeros(3, 4))  # no pixel passes: all zero
    assert float(out[0].max()) == pytest.approx(1.0)


def test_affinity_balancing_batches_matrix_by_matrix_and_passes_gradients():
    g = torch.Generator().manual_seed(1)
    attn = torch.rand(3, 10, 10, generator=g).softmax(-1).requires_grad_()
    batched = balance_affinity(attn, 3)
    for i in range(3):
        assert torch.allclose(batched[i], balance_affinity(attn[i].detach(), 3), atol=1e-6)
    assert torch.allclose(batched.sum(-1), torch.ones(3, 10), atol=1e-3)  # still a transition
    batched[0, 0, 1].backward()
    assert attn.grad[0].abs().sum() > 0 and attn.grad[1:].abs().sum() == 0


def test_scores_to_labels_and_metrics():
    maps = np.zeros((2, 2, 3), np.float32)
    maps[0, 0, 0] = 0.9
    maps[1, 1, 2] = 0.8
    lab = scores_to_labels(np.array([2, 5]), maps)
    assert lab.tolist() == [[3, 0, 0], [0, 0, 6]]
    gt = lab.copy()
    gt[0, 1] = 255
    conf = confusion_matrix(gt, lab, 7)
    rep = iou_report(conf, [str(i) for i in range(7)])
    assert rep["miou"] == pytest.approx(1.0)
    assert rep["per_class"]["1"] is None


def test_generate_cams_writes_records_and_resumes(toy_root, tiny_clip_path, tmp_path):
    cfg = _cfg(toy_root, tiny_clip_path, tmp_path / "run")
    res = generate_cams(cfg, progress=False)
    assert res.ok and res.done == 9 and res.skipped == 0
    files = sorted((tmp_path / "run" / "cam").glob("*.npz"))
    assert len(files) == 9
    rec = load_cam(files[0])
    assert rec.cam.shape == rec.caa.shape and rec.cam.shape[0] == len(rec.keys)
    assert 0 <= rec.cam.min() and rec.cam.max() <= 1
    snapshot = {f.name: f.read_bytes() for f in files}
    for f in files[::2]:
        f.unlink()
    files[1].write_bytes(b"corrupt")  # a corrupt cache entry is recomputed, not crashed on
    res2 = generate_cams(cfg, progress=False)
    assert res2.done == 5 + 1 and res2.skipped == 3
    assert {f.name: f.read_bytes() for f in sorted((tmp_path / "run" / "cam").glob("*.npz"))} == snapshot
    man = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert man["stages"]["cam"]["status"] == "done" and man["model"]["sha256"]


def test_changed_parameter_is_refused(toy_root, tiny_clip_path, tmp_path):
    cfg = _cfg(toy_root, tiny_clip_path, tmp_path / "run", limit=2)
    generate_cams(cfg, progress=False)
    with pytest.raises(RunDirError, match="softmax"):
        generate_cams(replace(cfg, softmax=False), progress=False)
    # limit / shard / device do not change the outputs, so they are not part of the hash
    generate_cams(replace(cfg, limit=3), progress=False)


def test_shards_union_equals_full_run(toy_root, tiny_clip_path, tmp_path):
    generate_cams(_cfg(toy_root, tiny_clip_path, tmp_path / "full"), progress=False)
    for i in range(2):
        generate_cams(_cfg(toy_root, tiny_clip_path, tmp_path / "sharded", shard=(i, 2)), progress=False)
    full = {f.name: f.read_bytes() for f in (tmp_path / "full" / "cam").glob("*.npz")}
    sharded = {f.name: f.read_bytes() for f in (tmp_path / "sharded" / "cam").glob("*.npz")}
    assert full == sharded


def test_multiscale_flip_and_ablations(toy_root, tiny_clip, tiny_clip_path, tmp_path):
    res = generate_cams(_cfg(toy_root, tiny_clip_path, tmp_path / "ms", scales=(1.0, 0.5), flip=True, limit=2),
                        progress=False)
    assert res.ok
    rec = load_cam(next((tmp_path / "ms" / "cam").glob("*.npz")), full_size=False)
    with np.load(next((tmp_path / "ms" / "cam").glob("*.npz"))) as z:  # stored at the patch grid, as one view
        assert rec.cam.shape[1:] == tuple(-(-int(v) // tiny_clip.patch_size) for v in z["size"])
    res = generate_cams(_cfg(toy_root, tiny_clip_path, tmp_path / "nocaa", caa=False, softmax=False,
                             background="none", limit=2), progress=False)
    rec = load_cam(next((tmp_path / "nocaa" / "cam").glob("*.npz")))
    assert np.array_equal(rec.cam, rec.caa)


def test_bad_options_raise_config_error(toy_root, tiny_clip_path, tmp_path):
    for kw in ({"shard": (2, 2)}, {"scales": (0.0,)}, {"fusion": "avg"}, {"templates": ("no slot",)}):
        with pytest.raises(ConfigError):
            generate_cams(_cfg(toy_root, tiny_clip_path, tmp_path / "bad", **kw), progress=False)
    assert not (tmp_path / "bad").exists()


def test_eval_reports_cam_and_caa(toy_root, tiny_clip_path, tmp_path):
    generate_cams(_cfg(toy_root, tiny_clip_path, tmp_path / "run"), progress=False)
    rep = evaluate_run(tmp_path / "run", EvalOptions(stages=("cam", "caa")), progress=False)
    for stage in ("cam", "caa"):
        r = rep["stages"][stage]
        assert 0 <= r["miou"] <= 1 and r["images"] == 9
        assert set(r["per_class"]) >= {"background", "ball"}
        conf = np.array(r["confusion"]["counts"])  # the IoUs are read off the same matrix
        assert r["confusion"]["labels"][:2] == ["background", "ball"] and set(r["confusion"]["labels"]) == set(r["per_class"])
        for i, name in enumerate(r["confusion"]["labels"]):
            denom = conf[i].sum() + conf[:, i].sum() - conf[i, i]
            assert r["per_class"][name] == (pytest.approx(conf[i, i] / denom) if denom else None), name
    assert (tmp_path / "run" / "eval.json").is_file()


def test_prompt_ranking(toy_root, tiny_clip_path, tmp_path):
    from clip_es.cam.prompts import PromptsConfig, dispersion, format_ranking, rank_templates, spearman

    assert dispersion(np.array([0.5, 0.5])) == 0
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1)
    cfg = PromptsConfig(dataset="toy", root=str(toy_root), split="trainval", model=str(tiny_clip_path),
                        templates=("a photo of a {}.", "a clean origami {}.", "{}"), limit=5)
    rep = rank_templates(cfg, progress=False)
    sharp = [r["sharpness"] for r in rep["rows"]]
    assert sharp == sorted(sharp) and rep["selected"] == rep["rows"][0]["template"]
    assert all(0 <= r["cam_miou"] <= 1 for r in rep["rows"])
    assert "Spearman" in format_ranking(rep) or rep["spearman"] is None
