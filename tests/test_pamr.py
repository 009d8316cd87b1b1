"""PAMR, the refine stage's second method: the pure core against a plain per-pixel reference,
its invariants, the method registry, and ``clipes refine --method pamr`` on the toy fixture.
The device tests run on every device this machine has (cuda when available)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from clip_es.errors import ConfigError
from clip_es.refine.crf import IGNORE, scores_to_probs
from clip_es.refine.methods import DEFAULT_METHOD, METHODS, get_method
from clip_es.refine.pamr import PamrParams, pamr
from clip_es.refine.run import RefineConfig, refine_masks, stage_params
from clip_es.refine.store import CONF, CRF, MASKS, output_ids, output_path, read_output
from clip_es.rundir import RunDir
from tests.conftest import run_cli
from tests.test_refine import _copy_run, _outputs, cam_run  # noqa: F401  (cam_run is a fixture)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _reference_pamr(image: np.ndarray, probs: np.ndarray, params: PamrParams) -> np.ndarray:
    """PAMR written pixel by pixel from its definition (float64; indices clamped at the border)."""
    x = image.astype(np.float64).transpose(2, 0, 1) / 255.0
    c, h, w = probs.shape
    offs = [(d * dy, d * dx) for d in params.dilations for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx]
    aff = np.zeros((len(offs), h, w))
    for i in range(h):
        for j in range(w):
            nb = [(min(max(i + dy, 0), h - 1), min(max(j + dx, 0), w - 1)) for dy, dx in offs]
            window = np.array([x[:, a, b] for a, b in nb] + [x[:, i, j]] * len(params.dilations))  # (9D, 3)
            std = window.std(0, ddof=1)
            logit = np.array([-np.mean(np.abs(x[:, i, j] - x[:, a, b]) / (1e-8 + params.sigma * std))
                              for a, b in nb])
            e = np.exp(logit - logit.max())
            aff[:, i, j] = e / e.sum()
    m = probs.astype(np.float64)
    for _ in range(params.iters):
        new = np.zeros_like(m)
        for p, (dy, dx) in enumerate(offs):
            rows = np.clip(np.arange(h) + dy, 0, h - 1)
            cols = np.clip(np.arange(w) + dx, 0, w - 1)
            new += aff[p] * m[:, rows][:, :, cols]
        m = new
    return m


def _random_inputs(seed: int, c: int, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    image[:, : w // 2] //= 8  # a dark half: a colour edge with texture on both sides
    return image, scores_to_probs(rng.random((c, h, w)).astype(np.float32))


# ============================================================================ pure core


@pytest.mark.parametrize("device", DEVICES)
def test_pamr_equals_per_pixel_reference(device: str) -> None:
    image, probs = _random_inputs(0, 3, 9, 13)
    params = PamrParams(dilations=(1, 2, 4), iters=3)
    q = pamr(image, probs, params, device)
    np.testing.assert_allclose(q, _reference_pamr(image, probs, params), atol=2e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_pamr_is_a_distribution_and_leaves_inputs_alone(device: str) -> None:
    image, probs = _random_inputs(1, 4, 40, 56)
    image.flags.writeable = False  # read-only inputs (as np.load / cv2 can hand out) are fine
    before = (image.copy(), probs.copy())
    q = pamr(image, probs, device=device)  # default dilations up to 24 px > the 40 px image: clamped
    assert q.shape == probs.shape and q.dtype == np.float32 and np.isfinite(q).all()
    assert q.min() >= 0 and q.max() <= 1
    np.testing.assert_allclose(q.sum(0), 1.0, atol=1e-4)
    assert (image == before[0]).all() and (probs == before[1]).all()
    np.testing.assert_array_equal(q, pamr(image, probs, device=device))  # deterministic


def test_pamr_follows_the_colour_edge() -> None:
    """Scores that spill 4 px over a colour edge are pulled back to it; a flat image only smooths."""
    h, w = 24, 40
    image = np.zeros((h, w, 3), np.uint8)
    image[:, 20:] = 200
    fg = np.full((h, w), 0.3, np.float32)
    fg[:, :24] = 0.7  # class 1 on columns 0..23; the colour edge is at column 20
    probs = np.stack([1 - fg, fg])
    q = pamr(image, probs)
    assert (q.argmax(0)[:, :20] == 1).all() and (q.argmax(0)[:, 20:] == 0).all()
    assert (probs.argmax(0)[:, 20:24] == 1).all()  # wrong before
    flat = pamr(np.full((h, w, 3), 90, np.uint8), probs)
    np.testing.assert_allclose(flat.sum(0), 1.0, atol=1e-5)
    assert flat[1].std() < probs[1].std()  # no edge to keep: it smooths


def test_pamr_single_label_bad_shapes_and_params() -> None:
    image, probs = _random_inputs(2, 2, 8, 8)
    np.testing.assert_array_equal(pamr(image, probs[:1]), np.ones((1, 8, 8), np.float32))
    with pytest.raises(ValueError, match="uint8"):
        pamr(image.astype(np.float32), probs)
    with pytest.raises(ValueError, match="probs"):
        pamr(image, probs[:, :4])
    for bad in (PamrParams(dilations=()), PamrParams(dilations=(0, 1)), PamrParams(iters=0), PamrParams(sigma=0)):
        with pytest.raises(ConfigError):
            bad.validate()


def test_registry_lists_methods_and_refuses_unknown() -> None:
    assert DEFAULT_METHOD == "crf" and set(METHODS) == {"crf", "pamr"}
    for name, m in METHODS.items():
        assert m.name == name and hasattr(RefineConfig(run="x"), m.params_field)
    with pytest.raises(ConfigError, match="crf, pamr"):
        get_method("bogus")


# ============================================================================ config and hash


def test_default_method_keeps_the_old_stage_params() -> None:
    """A CRF run made before --method existed hashes the same (no 'method' key, conf 0.95)."""
    p = stage_params(RefineConfig(run="x"), "abc")
    assert "method" not in p and "pamr_params" not in p and p["conf"] == 0.95 and "crf_params" in p
    q = stage_params(RefineConfig(run="x", method="pamr"), "abc")
    assert q["method"] == "pamr" and q["conf"] == 0.44 and "crf_params" not in q
    assert list(q["pamr_params"]["dilations"]) == [1, 2, 4, 8, 12, 24] and q["pamr_params"]["iters"] == 10
    assert stage_params(RefineConfig(run="x", method="pamr", device="cpu"), "abc") == q  # device: not hashed
    assert stage_params(RefineConfig(run="x", method="pamr", conf=0.9), "abc")["conf"] == 0.9


def test_config_refuses_crf_on_cuda_and_method_without_refinement() -> None:
    with pytest.raises(ConfigError, match="CPU only.*pamr"):
        RefineConfig(run="x", device="cuda").validate()
    with pytest.raises(ConfigError, match="--no-crf"):
        RefineConfig(run="x", crf=False, method="pamr").validate()
    with pytest.raises(ConfigError, match="--method"):
        RefineConfig(run="x", method="densecrf").validate()
    with pytest.raises(ConfigError, match="iterations"):
        RefineConfig(run="x", method="pamr", pamr_params=PamrParams(iters=0)).validate()


# ============================================================================ the stage


@pytest.mark.parametrize("device", DEVICES)
def test_refine_pamr_outputs_on_toy(cam_run: Path, tmp_path: Path, device: str) -> None:
    run = _copy_run(cam_run, tmp_path / "run")
    res = refine_masks(RefineConfig(run=str(run), method="pamr", device=device, workers=1, save_conf=True),
                       progress=False)
    assert res.ok and res.done == 9
    info = RunDir(run).stage_info("refine")
    assert info["params"]["method"] == "pamr" and info["params"]["conf"] == 0.44
    ids = output_ids(run, MASKS)
    assert len(ids) == 9
    for image_id in ids:
        mask, labels, conf = (read_output(output_path(run, kind, image_id)) for kind in (MASKS, CRF, CONF))
        assert mask.shape == labels.shape == conf.shape
        keep = mask != IGNORE  # conf is stored as round(conf * 255)
        np.testing.assert_array_equal(mask[keep], labels[keep])
        assert (conf[~keep] < round(0.44 * 255) + 1).all() and (conf[keep] >= round(0.44 * 255) - 1).all()
    # a second refine with the CRF into the same run is refused (other parameters), resuming PAMR is not
    with pytest.raises(Exception, match="parameters|refine"):
        refine_masks(RefineConfig(run=str(run), workers=1), progress=False)
    again = refine_masks(RefineConfig(run=str(run), method="pamr", device=device, workers=1, save_conf=True),
                         progress=False)
    assert again.ok and again.skipped == 9


def test_refine_pamr_workers_2_identical_to_in_process(cam_run: Path, tmp_path: Path) -> None:
    cfg = RefineConfig(run=str(_copy_run(cam_run, tmp_path / "one")), method="pamr", device="cpu", workers=1,
                       limit=4)
    assert refine_masks(cfg, progress=False).ok
    two = replace(cfg, run=str(_copy_run(cam_run, tmp_path / "two")), workers=2, threads=2)
    assert refine_masks(two, progress=False).ok
    assert _outputs(Path(cfg.run)) == _outputs(Path(two.run)) and len(_outputs(Path(cfg.run))) == 8


def test_cli_refine_method(cam_run: Path, tmp_path: Path, capsys) -> None:
    run = _copy_run(cam_run, tmp_path / "run")
    assert run_cli(["refine", "--run", str(run), "--method", "bogus"]) == 2
    assert "crf, pamr" in capsys.readouterr().err
    assert run_cli(["refine", "--run", str(run), "--method", "pamr", "--pamr-dilations", "1,x"]) == 2
    assert "--pamr-dilations" in capsys.readouterr().err
    assert run_cli(["refine", "--run", str(run), "--method", "pamr", "--device", "cpu", "--pamr-iters", "3",
                    "--pamr-dilations", "1,2", "--workers", "1"]) == 0
    params = RunDir(run).stage_info("refine")["params"]
    assert params["pamr_params"]["iters"] == 3 and list(params["pamr_params"]["dilations"]) == [1, 2]
