"""The CNN segmenter's heads (plain, denseclip, fusion): DenseCLIP's pieces, open vocabulary, reload, ONNX."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clip_es.train.denseclip import AUX_TEMPERATURE, AUX_WEIGHT, GAMMA_INIT, SCORE_CHANNELS, DenseClipHead
from clip_es.train.losses import ce_loss
from clip_es.train.model import HEADS, Segmenter, SegmenterArch
from tests.conftest import run_cli
from tests.test_segmenter import SMALL, _one_thread, base_run, check_onnx_parity  # noqa: F401  (fixtures)

D = 64


def _model(head: str = "denseclip", seed: int = 0) -> Segmenter:
    torch.manual_seed(seed)
    return Segmenter(SegmenterArch(backbone="test_resnet", head=head, text_dim=D, dim=32,
                                   fusion_blocks=2 if head == "fusion" else 0)).eval()


def _text(k: int, seed: int = 0) -> torch.Tensor:
    return F.normalize(torch.randn(k, D, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_denseclip_shapes_for_any_class_count():
    model = _model()
    assert isinstance(model.context, DenseClipHead)
    chs = [c for i, c in enumerate(model.backbone.feature_info.channels()) if i in model.feature_idx]
    assert model.neck.lateral[2].in_channels == chs[2] + SCORE_CHANNELS
    x = torch.rand(2, 3, 96, 64)
    for k in (3, 7):  # the class count changes at inference: nothing in the head is sized by it
        with torch.no_grad():
            logits, extras = model(x, _text(k), return_extras=True)
        assert logits.shape == (2, k + 1, 96, 64) and torch.isfinite(logits).all()
        [(weight, aux)] = extras["aux"]
        assert weight == AUX_WEIGHT and aux.shape == (2, k + 1, 3, 2)
        # aux = cosine / 0.07: within [-1/0.07, 1/0.07]
        assert aux.abs().max() <= 1 / AUX_TEMPERATURE + 1e-4


def test_denseclip_gamma_starts_at_1e_4():
    model = _model()
    head = model.context
    assert torch.equal(head.gamma, torch.full((D,), GAMMA_INIT))
    tok = model.class_tokens(_text(5), 2)                                    # (2, 6, D), unit-norm rows
    z = torch.randn(2, D, 3, 2)
    with torch.no_grad():
        new = head.update_text(z, tok)
        local = z.flatten(2).transpose(1, 2)
        delta = head.decoder(tok, torch.cat([local.mean(1, keepdim=True), local], 1))
    torch.testing.assert_close(new - tok, GAMMA_INIT * delta, atol=1e-7, rtol=0)  # float32 rounding of t + 1e-5
    rel = ((new - tok).norm(dim=-1) / tok.norm(dim=-1)).mean()
    # |delta| is O(1) per token (LN -> Linear of std 0.02), so the update is ~1e-4 of the text
    assert 1e-5 < rel < 1e-3, rel


def test_aux_loss_ignores_pixels():
    from clip_es.train.loop import training_loss

    model = _model()
    x = torch.rand(2, 3, 64, 64)
    logits, extras = model(x, _text(3), return_extras=True)
    y = torch.randint(0, 4, (2, 64, 64))
    y[0, :40] = 255
    y[1] = 255
    total = training_loss(ce_loss, logits, extras, y)
    aux = F.interpolate(extras["aux"][0][1], size=(64, 64), mode="bilinear", align_corners=False)
    valid = y != 255
    by_hand = F.cross_entropy(aux.permute(0, 2, 3, 1)[valid], y[valid])
    torch.testing.assert_close(total, ce_loss(logits, y) + AUX_WEIGHT * by_hand)
    # the aux term trains the score map's path: its gradient reaches the visual projection and gamma
    total.backward()
    assert model.context.visual_proj.weight.grad.abs().sum() > 0 and model.context.gamma.grad.abs().sum() > 0
    # a target with every pixel ignored adds nothing
    all_ignored = torch.full_like(y, 255)
    assert float(training_loss(ce_loss, logits.detach(), {"aux": [(AUX_WEIGHT, aux.detach())]}, all_ignored)) == 0


def test_plain_and_fusion_heads_have_no_aux_and_every_head_is_registered():
    assert set(HEADS) >= {"plain", "fusion", "denseclip"}
    for head in ("plain", "fusion"):
        _, extras = _model(head)(torch.rand(1, 3, 64, 64), _text(2), return_extras=True)
        assert not extras.get("aux")


@pytest.fixture(scope="module")
def trained_heads(base_run, tmp_path_factory) -> Path:  # noqa: F811
    """One run with a segmenter per head, 3 steps each (read-only for tests)."""
    from clip_es.train.loop import TrainConfig, train_segmenter

    dst = tmp_path_factory.mktemp("heads") / "run"
    shutil.copytree(base_run, dst)
    torch.set_num_threads(1)
    for head in HEADS:
        train_segmenter(TrainConfig(run=str(dst), name=f"seg_{head}", steps=3, head=head, **SMALL), progress=False)
    return dst


@pytest.mark.parametrize("head", list(HEADS))
def test_checkpoint_reloads_to_same_predictions(trained_heads, head):
    from clip_es.train.checkpoint import load_checkpoint
    from clip_es.train.segment import load_segmenter, pad_to_stride, predict_logits

    folder = trained_heads / f"seg_{head}"
    assert load_checkpoint(folder / "last.pt")["config"]["arch"]["head"] == head
    image = np.random.default_rng(0).integers(0, 256, (70, 90, 3), dtype=np.uint8)
    a = predict_logits(load_segmenter(folder / "last.pt"), image)
    b = predict_logits(load_segmenter(folder / "model.pt"), image)
    assert a.shape == (9, 70, 90) and torch.equal(a, b)
    # the same weights in a freshly built model (strict load) predict the same
    seg = load_segmenter(folder / "last.pt")
    fresh = Segmenter(seg.model.arch).eval()
    fresh.load_state_dict(load_checkpoint(folder / "last.pt")["model"], strict=True)
    with torch.no_grad():
        x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
        x = pad_to_stride(x, fresh.mean, fresh.stride)
        torch.testing.assert_close(fresh(x, seg.text)[0, :, :70, :90], a)


@pytest.mark.parametrize("head", list(HEADS))
def test_segment_names_never_trained_on(trained_heads, toy_root, tmp_path, head):
    from clip_es.data.image_io import read_mask

    out = tmp_path / "pred"
    code = run_cli(["segment", "--checkpoint", str(trained_heads / f"seg_{head}" / "model.pt"), "--images",
                    str(toy_root / "JPEGImages"), "--out", str(out), "--classes", "zebra,kite,lamp,tree",
                    "--limit", "2", "--device", "cpu"])
    assert code == 0
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) == 2 and all(read_mask(p).max() <= 4 for p in pngs)


def test_denseclip_onnx_export_parity(trained_heads, tmp_path):
    check_onnx_parity(trained_heads / "seg_denseclip" / "last.pt", tmp_path / "m.onnx")
