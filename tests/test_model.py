"""CLIP loading (resolver) and the dense forward."""

from __future__ import annotations

import os
import time

import pytest
import torch

from clip_es.errors import RegistryError, WeightsError
from clip_es.model import dense
from clip_es.model.resolve import load_clip, read_state_dict
from clip_es.model.tiny import TINY_CHECKPOINT


def test_dense_embedding_equals_open_clip_both_poolings(tiny_clip):
    model = tiny_clip.model
    visual = model.visual
    size = visual.positional_embedding.shape[0] - 1
    side = int(size ** 0.5) * tiny_clip.patch_size
    x = torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours_cls = dense.encode_image(visual, x, "cls")
        theirs_cls = model.encode_image(x)
        old = visual.pool_type
        try:
            visual.pool_type = "avg"  # open_clip's own mean-of-patch-tokens pooling
            theirs_mean = model.encode_image(x)
        finally:
            visual.pool_type = old
        ours_mean = dense.encode_image(visual, x, "mean")
    assert torch.allclose(ours_cls, theirs_cls, atol=1e-5)
    assert torch.allclose(ours_mean, theirs_mean, atol=1e-5)


def test_text_side_equals_encode_text(tiny_clip):
    tokens = tiny_clip.tokenizer(["a photo of a star.", "a clean origami person with clothes, people, human.", ""])
    with torch.no_grad():
        assert torch.allclose(dense.encode_text(tiny_clip.model, tokens), tiny_clip.model.encode_text(tokens),
                              atol=1e-5)


def test_position_embedding_interpolation():
    pos = torch.randn(1 + 16, 8)
    assert dense.interpolate_pos_embed(pos, (4, 4)) is pos
    out = dense.interpolate_pos_embed(pos, (3, 7))
    assert out.shape == (1 + 21, 8)
    assert torch.equal(out[0], pos[0])  # CLS kept


def test_dense_forward_any_patch_multiple(tiny_clip):
    x = torch.randn(1, 3, 48, 80)
    with torch.no_grad():
        d = dense.dense_forward(tiny_clip.visual, x, attn_blocks=8)
    n = 3 * 5
    assert d.grid == (3, 5)
    assert d.penultimate.shape == (1, 1 + n, tiny_clip.visual.conv1.out_channels)
    layers = len(tiny_clip.visual.transformer.resblocks)
    assert d.attn_count == layers - 1  # all blocks but the last fall in the last 8
    # head-averaged softmax rows over all tokens sum to 1; the patch part sums to <= 1
    assert torch.all(d.attn_sum.sum(-1) <= d.attn_count + 1e-5)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        dense.embed(tiny_clip.visual, torch.randn(1, 3, 50, 64))


def test_resolver_loads_path_and_records_checksum(tiny_clip_path):
    clip = load_clip(str(tiny_clip_path))
    assert clip.sha256 and len(clip.sha256) == 64
    assert clip.patch_size == 16
    assert not any(p.requires_grad for p in clip.model.parameters())
    # the same file through --pretrained PATH (default --model clipes-tiny names no architecture)
    clip2 = load_clip("clipes-tiny", str(tiny_clip_path))
    assert clip2.sha256 == clip.sha256 and clip2.name == tiny_clip_path.stem
    # naming an open_clip architecture it is not is refused with the differing shapes
    with pytest.raises(WeightsError, match="vision width 64 .not 768."):
        load_clip("ViT-B-16", str(tiny_clip_path))


def test_openai_layout_loads_with_open_clip_builder(tiny_clip_path):
    from open_clip.model import build_model_from_openai_state_dict

    sd = torch.load(tiny_clip_path, map_location="cpu", weights_only=True)
    model = build_model_from_openai_state_dict(sd, cast_dtype=torch.float32)
    assert model.visual.conv1.kernel_size == (16, 16)


@pytest.mark.skipif(not TINY_CHECKPOINT.is_file(), reason="bundled weights not built")
def test_bundled_tiny_loads_offline_and_is_openai_layout():
    clip = load_clip("clipes-tiny")
    assert clip.name == "clipes-tiny"
    assert TINY_CHECKPOINT.stat().st_size <= 25 * 1024 * 1024
    sd = torch.load(TINY_CHECKPOINT, map_location="cpu", weights_only=True)
    from open_clip.model import build_model_from_openai_state_dict

    m = build_model_from_openai_state_dict(sd, cast_dtype=torch.float32)
    assert m.visual.transformer.resblocks[0].mlp.gelu.__class__.__name__ == "QuickGELU"
    assert sd["token_embedding.weight"].shape[0] == 49408 and sd["positional_embedding"].shape[0] == 77


def test_offline_tag_fails_fast(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.time()
    with pytest.raises(WeightsError, match="--pretrained /path/to/checkpoint"):
        load_clip("ViT-B-16", "openai", cache_dir=str(tmp_path))
    assert time.time() - t0 < 10


def test_unknown_model_and_tag_list_choices():
    with pytest.raises(RegistryError, match="ViT-B-16"):
        load_clip("ViT-B-61", "openai")
    with pytest.raises(RegistryError, match="openai"):
        load_clip("ViT-B-16", "not-a-tag")


class _Boom:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_code_carrying_pickle_is_refused(tmp_path):
    bad = tmp_path / "evil.pt"
    torch.save({"visual.conv1.weight": torch.zeros(1), "x": _Boom()}, bad)
    with pytest.raises(WeightsError, match="refused"):
        read_state_dict(bad)


def test_truncated_and_missing_checkpoint(tmp_path, tiny_clip_path):
    cut = tmp_path / "cut.pt"
    cut.write_bytes(tiny_clip_path.read_bytes()[:1000])
    with pytest.raises(WeightsError, match="cut.pt"):
        load_clip(str(cut))
    with pytest.raises(WeightsError, match="does not exist"):
        load_clip("ViT-B-16", str(tmp_path / "nope.pt"))


def test_wrong_architecture_is_a_clear_error(tmp_path):
    sd = {"visual.trunk.weight": torch.zeros(2, 2)}
    p = tmp_path / "other.pt"
    torch.save(sd, p)
    with pytest.raises(WeightsError, match="ViT-B-16"):
        load_clip("ViT-B-16", str(p))
    with pytest.raises(WeightsError, match="--model"):
        load_clip(str(p))
