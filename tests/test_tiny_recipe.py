"""The clipes-tiny recipe script and its attention diagnostic, on a shrunken model (seconds)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

TOY = Path(__file__).resolve().parents[1] / "pipelines" / "toy"
SMALL = ["--steps", "2", "--batch", "4", "--scenes", "6", "--held", "4", "--eval-every", "2",
         "--vision-width", "64", "--vision-layers", "2", "--threads", "1"]


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, TOY / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_recipe_is_deterministic_for_a_seed(tmp_path):
    train = _script("train_tiny_clip")
    for run in ("a", "b"):
        train.main(["--out", str(tmp_path / run)] + SMALL)
    a = torch.load(tmp_path / "a" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "last.pt", weights_only=True)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(v.dtype == torch.float16 for v in a.values() if v.is_floating_point())  # shipped as fp16
    platform = json.loads((tmp_path / "a" / "log.json").read_text())["platform"]  # the scope of "same bytes"
    assert platform["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert platform["torch"] == torch.__version__.split("+")[0]
    c_dir = tmp_path / "c"
    train.main(["--out", str(c_dir), "--seed", "1001"] + SMALL)
    c = torch.load(c_dir / "last.pt", weights_only=True)
    assert not torch.equal(a["visual.proj"], c["visual.proj"])


def test_shipped_terms_enter_the_loss(tmp_path):
    train = _script("train_tiny_clip")
    train.main(["--out", str(tmp_path), "--region-ml", "1", "--attn-region", "1", "--attn-consistency", "1"] + SMALL)
    rec = json.loads((tmp_path / "log.json").read_text())["evals"][-1]
    for key in ("mil", "region", "attn_region", "attn_consistency"):
        assert 0 <= rec[key] < 10, key
    assert 0 <= rec["map_mean"] <= 1 and 0 <= rec["map_cls"] <= 1


def test_recipe_holds_only_the_shipped_terms(tmp_path, capsys):
    train = _script("train_tiny_clip")
    for flag in ("--attn-sharpen", "--attn-purity", "--deep-mil", "--attn-avoid", "--attn-region-via"):
        with pytest.raises(SystemExit) as e:
            train.main(["--out", str(tmp_path), flag, "1"] + SMALL)
        assert e.value.code == 2 and "unrecognized arguments" in capsys.readouterr().err
    for flag in ("--qk-tied-init", "--shared-colours"):
        with pytest.raises(SystemExit):
            train.main(["--out", str(tmp_path), flag] + SMALL)
    assert not (tmp_path / "last.pt").exists()


def test_box_labels_name_what_the_view_shows_there():
    import cv2
    import numpy as np

    from clip_es.data.toy import TOY_CLASSES, scene_for

    train = _script("train_tiny_clip")
    k = len(TOY_CLASSES)
    rng = np.random.default_rng(0)
    flipped = negatives = 0
    for i in range(60):
        scene = scene_for(1000, i)
        size = train.SIZES[i % len(train.SIZES)]
        _, labels, _, geom = train.sample_view(scene, rng, size, full_p=0.4)
        y0, x0, y1, x1, flip = geom
        assert (train.visible_labels(scene.mask, (y0, x0, y1, x1), scene.background)[0] == labels).all()
        view_mask = cv2.resize(scene.mask[y0:y1, x0:x1], (size[1], size[0]), interpolation=cv2.INTER_NEAREST)
        view_mask = view_mask[:, ::-1] if flip else view_mask
        grid = (size[0] // 16, size[1] // 16)
        weights, box_labels = train.sample_regions(scene, geom, grid, rng, 3)
        for w, lab in zip(weights, box_labels):
            ys, xs = np.nonzero(w.reshape(grid))
            shown = set(np.unique(view_mask[ys.min() * 16:(ys.max() + 1) * 16, xs.min() * 16:(xs.max() + 1) * 16]))
            assert {c + 1 for c in np.nonzero(lab[:k] == 1)[0]} <= shown  # a positive is really in the box
            assert np.isclose(w.sum(), 1)
            negatives += int(((labels[:k] == 1) & (lab[:k] == 0)).sum())
        flipped += flip
    assert flipped > 10 and negatives > 20  # flips were exercised; boxes miss objects the view has


def test_attention_stats_are_shares(toy_root, tiny_clip_path):
    stats = _script("attn_stats").measure(str(tiny_clip_path), toy_root, "val", n=3)
    assert stats["objects"] > 0
    for key in ("area", "block1", "mean", "T", "from_background"):
        assert 0 <= stats[key] <= 1, key
    assert 0 < stats["perplexity/N"] <= 1


def test_leak_table_splits_false_positives_by_source():
    leaks = _script("leaks")
    # labels: background, ball, star; rows = ground truth, columns = prediction
    stage = {"per_class": {"star": 0.1, "background": 0.5, "ball": 0.2},  # stored sorted: order comes from labels
             "confusion": {"labels": ["background", "ball", "star"],
                           "counts": [[90, 6, 0], [0, 2, 0], [0, 2, 0]]}}
    rows = {r[0]: r[1:] for r in leaks.leak_table(stage)}
    assert rows["ball"] == (0.2, 0.6, 0.2, 1.0)  # own 2/10, background 6/10, star 2/10; recall 2/2
    assert rows["star"] == (0.0, 0.0, 0.0, 0.0)  # never predicted; recall 0/2
