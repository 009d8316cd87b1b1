"""Recipes in pipelines/ parse into valid stage configs; zero-shot mAP helper."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from clip_es.errors import ConfigError
from clip_es.model.zeroshot import mean_average_precision, zero_shot_map
from clip_es.recipe import load_recipe, stage_configs

PIPELINES = Path(__file__).resolve().parents[1] / "pipelines"


@pytest.mark.parametrize("name", sorted(p.name for p in PIPELINES.glob("*.toml")))
def test_shipped_recipes_build_valid_configs(name, tmp_path):
    cfgs = stage_configs(load_recipe(PIPELINES / name), tmp_path / "root", tmp_path / "run")
    assert "cam" in cfgs and "refine" in cfgs
    cfgs["cam"].validate()
    cfgs["refine"].validate()
    if "train" in cfgs:
        cfgs["train"].validate()


def test_voc_and_coco_recipes_carry_clip_es_settings(tmp_path):
    voc = stage_configs(load_recipe(PIPELINES / "voc12.toml"), tmp_path, tmp_path)["cam"]
    coco = stage_configs(load_recipe(PIPELINES / "coco14.toml"), tmp_path, tmp_path)["cam"]
    assert voc.templates == ("a clean origami {}.",) and voc.background == "voc" and voc.caa_threshold == 0.4
    assert coco.background == "coco" and coco.caa_threshold == 0.7 and coco.dataset == "coco"


def test_unknown_keys_and_sections_are_refused(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[dataset]\nkind = "toy"\n[cam]\ntemplate = "x {}"\n')
    with pytest.raises(ConfigError, match="templates"):
        stage_configs(load_recipe(bad), tmp_path, tmp_path)
    bad.write_text('[dataset]\nkind = "toy"\n[camm]\n')
    with pytest.raises(ConfigError, match="camm"):
        stage_configs(load_recipe(bad), tmp_path, tmp_path)
    bad.write_text('[dataset\n')
    with pytest.raises(ConfigError, match="TOML"):
        load_recipe(bad)


def test_mean_average_precision():
    scores = np.array([[0.9, 0.1], [0.8, 0.7], [0.1, 0.2]])
    gts = np.array([[1, 0], [0, 1], [1, 0]])
    m, per = mean_average_precision(scores, gts)
    assert per[1] == pytest.approx(1.0)
    assert per[0] == pytest.approx((1 + 2 / 3) / 2)
    assert m == pytest.approx((per[0] + per[1]) / 2)
    assert mean_average_precision(scores, np.zeros_like(gts))[1] == [None, None]


def test_zero_shot_map_on_toy(tiny_clip, toy_root):
    from clip_es.data.registry import open_dataset

    ds = open_dataset("toy", toy_root, "train")
    for pooling in ("mean", "cls"):
        rep = zero_shot_map(tiny_clip, ds, ["a photo of a {}."], pooling=pooling)
        assert 0 <= rep["map"] <= 1 and rep["images"] == 9 and set(rep["per_class"]) == {c.name for c in ds.classes}

