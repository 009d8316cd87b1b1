"""The toy recipe and the end-to-end demo path."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from clip_es.demo import TOY_RECIPE, DemoConfig, demo_recipe, run_demo
from clip_es.model.tiny import TINY_CHECKPOINT
from clip_es.recipe import load_recipe, run_recipe

PIPELINES = Path(__file__).resolve().parents[1] / "pipelines"


def test_toy_toml_equals_demo_recipe():
    assert load_recipe(PIPELINES / "toy.toml") == TOY_RECIPE


def test_demo_overrides_do_not_touch_the_shared_recipe():
    r = demo_recipe(DemoConfig(train_steps=7, device="cpu"))
    assert r["train"]["steps"] == 7 and TOY_RECIPE["train"]["steps"] != 7
    assert "device" not in TOY_RECIPE["cam"]


def test_recipe_runs_every_stage_and_resumes(toy_root, tiny_clip_path, tmp_path):
    recipe = copy.deepcopy(TOY_RECIPE)
    recipe["model"] = {"model": str(tiny_clip_path)}
    recipe["cam"]["templates"] = ["a photo of a {}."]
    recipe["refine"]["workers"] = 1
    recipe["train"].update(steps=2, batch_size=2, crop_size=64, device="cpu")
    res = run_recipe(recipe, toy_root, tmp_path / "run", progress=False)
    stages = res["eval"]["stages"]
    assert {"cam", "caa", "crf", "masks", "segmenter"} <= set(stages)
    assert stages["segmenter"]["images"] == 3  # the val split
    assert 0 <= stages["masks"]["coverage"] <= 1
    again = run_recipe(recipe, toy_root, tmp_path / "run", progress=False)
    assert again["cam"].done == 0 and again["cam"].skipped == 9


@pytest.mark.slow
@pytest.mark.skipif(not TINY_CHECKPOINT.is_file(), reason="bundled weights not built")
def test_demo_small_end_to_end(tmp_path):
    lines = []
    res = run_demo(DemoConfig(out=str(tmp_path / "demo"), n=20, train_steps=3, device="cpu"), progress=False,
                   echo=lines.append)
    assert [r["stage"] for r in res.rows] == ["CAM", "CAA", "CRF", "pseudo masks", "segmenter"]
    assert res.sheet.is_file() and "mIoU" in res.table()
