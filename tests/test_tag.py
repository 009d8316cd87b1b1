"""Zero-shot taggers (clip_es/tag): TagCLIP's local-to-global rule, the registry, the CLI choice."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from clip_es.cam.caa import box_mask
from clip_es.data.base import ClassSpec
from clip_es.errors import ConfigError, RegistryError
from clip_es.tag.base import relative_tags
from clip_es.tag.blend import blend_scores, blend_tags
from clip_es.tag.registry import DEFAULT_TAGGER, TAGGERS, build_tagger
from clip_es.tag.tagclip import crop_box, tagclip_scores
from tests.conftest import run_cli

CLASSES = "ball,star,heart,ring,boat,kite,flower,fish"


def test_relative_rule():
    assert relative_tags(np.array([0.1, 0.9, 0.6, 0.4])) == (1, 2)  # above 0.1 + 0.5 * 0.8 = 0.5
    assert relative_tags(np.array([0.3, 0.3])) == (0,)  # nothing above the middle: the argmax alone
    assert relative_tags(np.array([0.1, 0.9, 0.6, 0.4]), 0.7) == (1,)


def test_release_box_rule():
    m = np.zeros((5, 6))
    m[1:3, 2:6] = 1.0  # touches the right border
    ours = box_mask(m, 0.5)
    rel = box_mask(m, 0.5, release=True)
    assert ours[1:3, 2:6].all() and ours.sum() == 8
    assert rel[1:3, 2:5].all() and rel.sum() == 6  # the release drops the last column
    # uint8 quantisation: 0.502 * 255 = 128 > int(0.5 * 255) = 127 passes, 0.499 -> 127 does not
    q = np.array([[1.0, 0.502, 0.499, 0.0, 0.0], [0.0] * 5])
    assert box_mask(q, 0.5, release=True).tolist() == [[1, 1, 0, 0, 0], [0] * 5]
    assert crop_box(np.array([[0, 0, 0], [0, 1, 0], [0, 0, 0]], float)) == (1, 2, 1, 2)
    assert crop_box(np.zeros((3, 3))) is None
    assert crop_box(np.array([[0, 0, 1]], float)) is None  # clipped to nothing: the release stops CWR


def test_small_object_beside_large_found_locally_not_globally():
    """Toy scene (world 77, #18): a ball covering 12 % of the image and a flower covering 2 %.

    The global softmax gives the flower 0.9 % (dominated by the ball); TagCLIP's per-patch
    scores give it 0.84 locally and tag both.
    """
    from clip_es.data.classes import background_words
    from clip_es.data.toy import TOY_CLASSES, scene_for
    from clip_es.model.resolve import load_clip

    scene = scene_for(77, 18)
    ball, flower = TOY_CLASSES.index("ball"), TOY_CLASSES.index("flower")
    assert sorted(c - 1 for c in scene.labels) == [ball, flower]
    assert (scene.mask == flower + 1).mean() < 0.03 < 0.1 < (scene.mask == ball + 1).mean()
    clip = load_clip("clipes-tiny", device="cpu")
    classes = [ClassSpec(c) for c in TOY_CLASSES]
    g = build_tagger("global", clip, classes, templates=("a clean origami {}.",)).tag(scene.image)
    t = build_tagger("tagclip", clip, classes, templates=("a clean origami {}.",),
                     background=background_words("voc")).tag(scene.image)
    assert g.keys == (ball,) and g.scores[flower] < 0.05
    assert t.keys == (ball, flower)
    assert t.parts["local"][flower] > 0.5 > 10 * g.scores[flower]


def test_blend_rule():
    g = np.array([0.90, 0.01, 0.0, 0.09])
    t = np.array([0.80, 0.64, 0.95, 0.0])
    s = blend_scores(g, t)
    assert np.allclose(s, [np.sqrt(0.72), 0.08, 0.0, 0.0])
    assert blend_tags(s) == (0, 1)  # 0.08 >= 0.05; a class either tagger calls 0 is never kept
    assert blend_tags(s, 0.9) == (0,)  # nothing reaches it: the most likely class alone
    assert blend_scores(np.array([-1e-9]), np.array([0.5]))[0] == 0.0


def test_blend_keeps_what_both_see_and_drops_what_one_invents():
    """Toy scene (world 5, #130): a large kite and a small flower. The global softmax misses the
    flower (0.5 %); TagCLIP finds it but also tags a fish that is not there (0.54, the global view
    0.0); the blend tags exactly kite and flower."""
    from clip_es.data.classes import background_words
    from clip_es.data.toy import TOY_CLASSES, scene_for
    from clip_es.model.resolve import load_clip

    scene = scene_for(5, 130)
    kite, flower, fish = (TOY_CLASSES.index(c) for c in ("kite", "flower", "fish"))
    assert sorted(c - 1 for c in scene.labels) == [kite, flower]
    clip = load_clip("clipes-tiny", device="cpu")
    classes = [ClassSpec(c) for c in TOY_CLASSES]
    opts = dict(templates=("a clean origami {}.",), background=background_words("voc"))
    g = build_tagger("global", clip, classes, **opts).tag(scene.image)
    t = build_tagger("tagclip", clip, classes, **opts).tag(scene.image)
    b = build_tagger("blend", clip, classes, **opts).tag(scene.image)
    assert g.keys == (kite,) and fish in t.keys and flower in t.keys
    assert b.keys == (kite, flower)
    assert np.allclose(b.parts["global"], g.scores) and np.allclose(b.parts["tagclip"], t.scores)
    assert np.allclose(b.scores, np.sqrt(g.scores * t.scores), atol=1e-6)
    assert np.allclose(b.parts["local"], t.parts["local"])


def test_tagclip_scores_invariants(tiny_clip):
    torch.manual_seed(0)
    x = torch.randn(1, 3, 48, 80)
    x0 = x.clone()
    text = torch.nn.functional.normalize(torch.randn(7, tiny_clip.model.text_projection.shape[1]), dim=-1)
    s, local, crop = tagclip_scores(tiny_clip.visual, x, text, 4, tiny_clip.logit_scale)
    assert torch.equal(x, x0)  # the input is not changed
    assert s.shape == local.shape == crop.shape == (4,)
    assert np.isfinite(s).all() and np.isfinite(local).all() and (s >= 0).all() and (s <= 1).all()
    looked = ~np.isnan(crop)
    assert np.allclose(s[looked], 0.5 * local[looked] + 0.5 * crop[looked], atol=1e-6)
    assert np.array_equal(s[~looked], local[~looked])
    again = tagclip_scores(tiny_clip.visual, x, text, 4, tiny_clip.logit_scale)
    assert np.array_equal(again[0], s)  # deterministic


def test_registry_lists_valid_names(tiny_clip):
    assert DEFAULT_TAGGER in TAGGERS and set(TAGGERS) == {"blend", "tagclip", "global"}
    with pytest.raises(RegistryError, match="unknown tagger 'nope'; valid: blend, global, tagclip"):
        build_tagger("nope", tiny_clip, [ClassSpec("ball")], templates=("a {}.",))
    from clip_es.label import LabelConfig
    from clip_es.labeler import Labeler

    with pytest.raises(ConfigError, match="valid: blend, global, tagclip"):
        LabelConfig(images=".", out="o", classes="a", tagger="nope").validate()
    with pytest.raises(ConfigError, match="valid: blend, global, tagclip"):
        Labeler(["ball"], model="no-such-model", tagger="nope")  # refused before any CLIP is loaded


@pytest.fixture
def photos(toy_root, tmp_path) -> Path:
    folder = tmp_path / "photos"
    folder.mkdir()
    for src in sorted((toy_root / "JPEGImages").glob("*.jpg"))[:3]:
        shutil.copy(src, folder / src.name)
    return folder


def test_label_cli_tagger_choice(photos, tmp_path, tiny_clip_path, capsys):
    base = ["label", str(photos), "--classes", CLASSES, "--model", str(tiny_clip_path), "--device", "cpu",
            "--workers", "1", "--threads", "1"]
    assert run_cli([*base, "--out", str(tmp_path / "g")]) == 0  # the default
    g = json.loads((tmp_path / "g" / "labels_zeroshot_scores.json").read_text())
    assert g["tagger"] == DEFAULT_TAGGER == "blend"
    assert set(g["global"]) == set(g["tagclip"]) == set(g["local"]) == set(g["images"])
    for i, sc in g["images"].items():
        for name, v in sc.items():
            assert v == pytest.approx((g["global"][i][name] * g["tagclip"][i][name]) ** 0.5, abs=2e-6)
    assert run_cli([*base, "--out", str(tmp_path / "gl"), "--tagger", "global"]) == 0
    gl = json.loads((tmp_path / "gl" / "labels_zeroshot_scores.json").read_text())
    assert gl["tagger"] == "global" and "local" not in gl and not (tmp_path / "gl" / "tag_text.npz").exists()
    assert run_cli([*base, "--out", str(tmp_path / "t"), "--tagger", "tagclip"]) == 0
    t = json.loads((tmp_path / "t" / "labels_zeroshot_scores.json").read_text())
    assert t["tagger"] == "tagclip"
    assert set(t["local"]) == set(t["crop"]) == set(t["images"]) and len(t["images"]) == 3
    for i, sc in t["images"].items():
        for name, v in sc.items():
            c = t["crop"][i][name]
            want = t["local"][i][name] if c is None else 0.5 * t["local"][i][name] + 0.5 * c
            assert v == pytest.approx(want, abs=2e-6)
    assert (tmp_path / "t" / "tag_text.npz").is_file()
    text = (tmp_path / "t" / "labels_zeroshot.csv").read_text()
    assert "tagger tagclip" in text
    # a corrected labels file: only the changed image is computed again
    rows = text.splitlines()
    first = next(k for k, ln in enumerate(rows) if ln.endswith(".jpg") or ".jpg," in ln)
    name, old = rows[first].split(",", 1)
    rows[first] = f"{name},{'star' if old != 'star' else 'ball'}"
    fixed = tmp_path / "fixed.csv"
    fixed.write_text("\n".join(rows) + "\n")
    capsys.readouterr()
    assert run_cli([*base, "--out", str(tmp_path / "t"), "--tagger", "tagclip", "--labels", str(fixed)]) == 0
    printed = capsys.readouterr().out
    assert "labels changed for 1 image(s)" in printed and "cam: 1 done" in printed, printed
    assert run_cli([*base, "--out", str(tmp_path / "x"), "--tagger", "nope"]) == 2
    err = capsys.readouterr().err
    assert "unknown tagger 'nope'; valid: blend, global, tagclip" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()  # nothing half-written


def test_labeler_tagclip_equals_label_command(photos, tmp_path, tiny_clip_path):
    from clip_es.labeler import Labeler

    out = tmp_path / "out"
    assert run_cli(["label", str(photos), "--classes", CLASSES, "--out", str(out), "--model", str(tiny_clip_path),
                    "--device", "cpu", "--precision", "fp32", "--tagger", "tagclip", "--workers", "1",
                    "--threads", "1"]) == 0
    used = json.loads((out / "labels_used.json").read_text())
    scores = json.loads((out / "labels_zeroshot_scores.json").read_text())["images"]
    labeler = Labeler(CLASSES, model=str(tiny_clip_path), tagger="tagclip", device="cpu", precision="fp32",
                      threads=1)
    assert "tagger='tagclip'" in repr(labeler)
    files = sorted(photos.glob("*.jpg"))
    for f, res in zip(files, labeler.label_many(str(f) for f in files)):
        assert res.labels == used[f.name]
        assert np.allclose(list(res.probabilities.values()), list(scores[f.stem].values()), atol=1e-6)


def test_text_cache_reused_and_keyed(tiny_clip, tmp_path):
    from clip_es.tag.text import tag_text

    cls = [ClassSpec("ball"), ClassSpec("star")]
    a, ia = tag_text(tiny_clip, cls, ["sky"], ("a {}.", "the {}."), cache_dir=tmp_path)
    b, ib = tag_text(tiny_clip, cls, ["sky"], ("a {}.", "the {}."), cache_dir=tmp_path)
    assert not ia["cached"] and ib["cached"] and torch.equal(a, b) and a.shape[0] == 3
    c, ic = tag_text(tiny_clip, cls, ["grass"], ("a {}.", "the {}."), cache_dir=tmp_path)
    assert not ic["cached"] and not torch.equal(a, c)  # other texts: recomputed


def test_tags_cli_scores_against_truth(toy_root, tmp_path, tiny_clip_path, capsys):
    from clip_es.data.registry import open_dataset
    from clip_es.model.zeroshot import mean_average_precision

    out = tmp_path / "tags"
    assert run_cli(["tags", "--dataset", "toy", "--root", str(toy_root), "--split", "train", "--out", str(out),
                    "--model", str(tiny_clip_path), "--device", "cpu", "--threads", "1", "--tagger", "global"]) == 0
    printed = capsys.readouterr().out
    m = json.loads((out / "tags_metrics.json").read_text())
    assert "mAP" in printed and m["images"] == 9 and m["tagger"] == "global"
    scores = json.loads((out / "tags_scores.json").read_text())["images"]
    ds = open_dataset("toy", toy_root, "train")
    gts = np.zeros((9, 8))
    for r, i in enumerate(ds.ids()):
        gts[r, list(ds.labels(i))] = 1
    want, _ = mean_average_precision(np.array([list(scores[i].values()) for i in ds.ids()]), gts)
    assert m["map"] == pytest.approx(want, abs=1e-5)
    assert 0 <= m["precision"] <= 1 and 0 <= m["recall"] <= 1
    # the tags file is a labels file clipes label reads
    assert (out / "tags.csv").read_text().splitlines()[1] == "image,labels"
    assert run_cli(["tags", str(tmp_path), "--out", str(out)]) == 2  # folder without a class list


def test_recipe_label_stage_tags_a_folder_then_cam_reads_it(photos, tmp_path, tiny_clip_path):
    from clip_es.recipe import run_recipe, stage_configs

    (photos / "classes.txt").write_text(CLASSES.replace(",", "\n") + "\n")
    recipe = {"dataset": {"kind": "folder"}, "model": {"model": str(tiny_clip_path)},
              "label": {"tagger": "tagclip"}, "cam": {"device": "cpu", "threads": 1}}
    out = tmp_path / "run"
    res = run_recipe(recipe, photos, out, progress=False)
    assert res["label"].done == 3 and res["cam"].done == 3
    scores = json.loads((out / "labels_zeroshot_scores.json").read_text())
    assert scores["tagger"] == "tagclip" and len(scores["local"]) == 3
    assert stage_configs(recipe, photos, out)["cam"].split == str((out / "labels_zeroshot.csv").resolve())
    again = run_recipe(recipe, photos, out, progress=False)
    assert again["label"].done == 0 and again["label"].skipped == 3 and again["cam"].done == 0
    with pytest.raises(ConfigError, match="valid: blend, global, tagclip"):
        stage_configs({**recipe, "label": {"tagger": "nope"}}, photos, out)["label"].validate()
    with pytest.raises(ConfigError, match="tags a folder of images"):
        stage_configs({**recipe, "dataset": {"kind": "toy"}}, photos, out)


def test_crop_looks_batched_equal_looped(tiny_clip):
    from clip_es.tag.tagclip import crop_probabilities

    torch.manual_seed(1)
    x = torch.randn(1, 3, 64, 96)
    text = torch.nn.functional.normalize(torch.randn(5, tiny_clip.model.text_projection.shape[1]), dim=-1)
    m1 = np.zeros((4, 6), bool)
    m1[0:2, 1:4] = True
    m2 = np.zeros((4, 6), bool)
    m2[1:3, 3:5] = True
    m2[2, 1] = True
    looks = [(m1, crop_box(m1)), (m2, crop_box(m2))]
    both = crop_probabilities(tiny_clip.visual, x, looks, text, tiny_clip.logit_scale)
    for j, look in enumerate(looks):
        one = crop_probabilities(tiny_clip.visual, x, [look], text, tiny_clip.logit_scale)
        assert torch.allclose(both[j], one[0], atol=1e-6)
    assert both.shape == (2, 5) and torch.allclose(both.sum(-1), torch.ones(2))
    assert not torch.allclose(both[0], both[1])  # different crops, different answers
