"""``clipes eval`` / ``prompts`` on a folder dataset where only some images have a mask, and an
eval whose run folder cannot be written (issue 16, items 4 and 8)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from clip_es.errors import DatasetError
from clip_es.evaluate import EvalOptions, evaluate_run, format_report
from tests.conftest import run_cli

N_GT = 3  # the first three images have a mask, the other three none


@pytest.fixture(scope="module")
def partial_root(toy_root, tmp_path_factory) -> Path:
    """A folder dataset of six toy images (labels in labels.csv); masks for the first three only."""
    from clip_es.data.registry import open_dataset

    toy = open_dataset("toy", toy_root, "trainval")
    root = tmp_path_factory.mktemp("partial") / "mine"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    shutil.copy(toy_root / "classes.txt", root / "classes.txt")
    rows = ["image,labels"]
    for n, image_id in enumerate(toy.ids()[:6]):
        shutil.copy(toy.image_path(image_id), root / "images" / f"{image_id}.jpg")
        rows.append(f"{image_id}.jpg," + ";".join(toy.classes[k].name for k in toy.labels(image_id)))
        if n < N_GT:
            shutil.copy(toy.gt_path(image_id), root / "masks" / f"{image_id}.png")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root


@pytest.fixture(scope="module")
def partial_run(partial_root, tiny_clip_path, tmp_path_factory) -> Path:
    """CAMs of the six images, and a segmenter trained two steps on the three masks."""
    from clip_es.cam.run import CamConfig, generate_cams
    from clip_es.train.loop import TrainConfig, train_segmenter

    out = tmp_path_factory.mktemp("partial_run") / "run"
    generate_cams(CamConfig(dataset="folder", root=str(partial_root), split="labels", out=str(out),
                            model=str(tiny_clip_path), device="cpu"), progress=False)
    torch.set_num_threads(1)
    train_segmenter(TrainConfig(run=str(out), labels="gt", steps=2, batch_size=2, crop_size=64,
                                backbone="test_resnet", dim=32, heads=4, device="cpu"), progress=False)
    return out


def test_eval_scores_the_images_with_ground_truth(partial_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(partial_run, run)
    rep = evaluate_run(run, EvalOptions(split="labels"), progress=False)
    for stage in ("cam", "caa", "segmenter"):
        r = rep["stages"][stage]
        assert r["images"] == N_GT and r["images_without_gt"] == 6 - N_GT, stage
        assert 0 <= r["miou"] <= 1
    assert json.loads((run / "eval.json").read_text())["stages"]["cam"]["images_without_gt"] == 3
    table = format_report(rep)
    assert "without GT" in table and table.splitlines()[-3].split()[1:] == ["3", "3", "3"]


def test_eval_cli_prints_the_counts(partial_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(partial_run, run)
    assert run_cli(["eval", "--run", str(run), "--stage", "cam"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split()[-1] for line in out.splitlines() if line.strip()}
    assert rows["images"] == "3" and rows["without"] == "3"


def test_eval_without_any_ground_truth_says_so(partial_run, partial_root, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(partial_run, run)
    masks = partial_root / "masks"
    hidden = partial_root / "masks_hidden"
    masks.rename(hidden)
    try:
        with pytest.raises(DatasetError, match="ground truth"):
            evaluate_run(run, EvalOptions(stages=("cam",)), progress=False)
    finally:
        hidden.rename(masks)


def test_prompts_score_the_images_with_ground_truth(partial_root, tiny_clip_path):
    from clip_es.cam.prompts import PromptsConfig, format_ranking, rank_templates
    from clip_es.data.registry import open_dataset

    ds = open_dataset("folder", partial_root, "labels")
    multi = [i for i in ds.ids() if len(ds.labels(i)) >= 2]
    with_gt = [i for i in multi if ds.gt_path(i) is not None]
    assert 0 < len(with_gt) < len(multi)  # the fixture mixes both kinds among the ranked images
    rep = rank_templates(PromptsConfig(dataset="folder", root=str(partial_root), split="labels",
                                       model=str(tiny_clip_path), templates=("a photo of a {}.", "{}"), device="cpu"),
                         progress=False)
    assert rep["images"] == len(multi) and rep["gt_images"] == len(with_gt)
    assert all(0 <= r["cam_miou"] <= 1 for r in rep["rows"]) and rep["best_by_miou"] is not None
    assert f"on the {len(with_gt)} of them with ground truth" in format_ranking(rep)


def test_recipe_eval_scores_the_images_with_ground_truth(partial_root, tiny_clip_path, tmp_path):
    from clip_es.recipe import load_recipe, run_recipe

    recipe = tmp_path / "mine.toml"
    recipe.write_text(f'[dataset]\nkind = "folder"\nsplit = "labels"\n[model]\nmodel = "{tiny_clip_path}"\n'
                      '[cam]\ndevice = "cpu"\n[eval]\nstages = ["cam", "caa"]\n')
    res = run_recipe(load_recipe(recipe), partial_root, tmp_path / "run", progress=False)
    for stage in ("cam", "caa"):
        assert res["eval"]["stages"][stage]["images"] == N_GT
        assert res["eval"]["stages"][stage]["images_without_gt"] == 6 - N_GT


# ----------------------------------------------------------------------------- unwritable run folder
def test_eval_prints_the_table_before_a_failed_write(partial_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(partial_run, run)
    (run / "eval.json").mkdir()  # cannot be replaced by a file, whoever runs the test
    cmd = ["eval", "--run", str(run), "--stage", "cam", "--limit", str(N_GT)]  # images with GT only
    proc = subprocess.run([sys.executable, "-m", "clip_es", *cmd],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode != 0
    errors = [line for line in proc.stdout.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: cannot write") and "eval.json" in errors[0]
    assert "Traceback" not in proc.stdout
    assert 0 <= proc.stdout.index("mIoU") < proc.stdout.index("error:")  # the table first, then the failure


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores folder permissions")
def test_eval_on_a_read_only_run_folder(partial_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(partial_run, run)
    run.chmod(0o555)
    try:
        assert run_cli(["eval", "--run", str(run), "--stage", "cam", "--limit", str(N_GT)]) != 0
    finally:
        run.chmod(0o755)
    cap = capsys.readouterr()
    assert "mIoU" in cap.out and "error: cannot write" in cap.err and not (run / "eval.json").exists()
