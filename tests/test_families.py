"""Segmenter families and the zero-shot protocol: registry, arch records in checkpoints, old
checkpoints, --unseen (inductive) and --transductive, calibration, seen/unseen/hIoU scoring."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from clip_es.errors import ConfigError, DatasetError, RegistryError
from clip_es.scoring import seen_unseen
from clip_es.train.families import FAMILIES, family_of, get_family
from tests.test_segmenter import SMALL, _one_thread, base_run, run_dir  # noqa: F401  (fixtures)


def test_registry_lists_valid_names():
    assert "fusion" in FAMILIES
    with pytest.raises(RegistryError, match="valid: fusion"):
        get_family("fuson")
    fam = get_family("fusion")
    assert fam.name == "fusion" and fam.trainable and fam.default_loss == "ce"
    assert family_of({}) is fam  # records written before families existed


def test_every_family_keeps_the_contract():
    """Each registered family names itself, and its module has the attributes inference asks for."""
    for name in FAMILIES:
        fam = get_family(name)
        assert fam.name == name
        assert isinstance(fam.trainable, bool) and isinstance(fam.default_loss, str)


def test_old_checkpoint_without_head_or_family_loads(tmp_path):
    """A checkpoint from before heads and families (fusion blocks at ``blocks.*``) predicts as it did."""
    from clip_es.train.checkpoint import WEIGHTS_FORMAT, save_checkpoint
    from clip_es.train.model import SegmenterArch, build_segmenter
    from clip_es.train.segment import load_segmenter, predict_logits

    torch.manual_seed(0)
    model = build_segmenter(SegmenterArch(backbone="test_resnet", text_dim=64, dim=32, fusion_blocks=2)).eval()
    with torch.no_grad():
        for p in model.context.parameters():
            p.add_(0.1 * torch.randn_like(p))
    old_state = {(k[len("context."):] if k.startswith("context.") else k): v for k, v in model.state_dict().items()}
    old_arch = {k: v for k, v in model.arch.to_dict().items() if k not in ("family", "head")}
    text = torch.nn.functional.normalize(torch.randn(3, 64), dim=-1)
    payload = {"classes": [["a"], ["b"], ["c"]], "embeddings": text, "templates": [], "fusion": "sentence",
               "clip": {"name": "x", "source": "bundled:x"}}
    path = tmp_path / "old.pt"
    save_checkpoint(path, {"format": WEIGHTS_FORMAT, "model": old_state, "step": 1,
                           "config": {"arch": old_arch, "train": {}}, "text": payload})
    seg = load_segmenter(path)
    assert seg.model.arch.head == "fusion"
    img = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    with torch.no_grad():
        want = model(torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255, text)[0]
    assert torch.allclose(predict_logits(seg, img), want, atol=1e-5)


def test_head_recorded_and_no_fusion_alias(run_dir):  # noqa: F811
    from clip_es.train.loop import TrainConfig, train_segmenter

    train_segmenter(TrainConfig(run=str(run_dir), steps=1, head="plain", **SMALL), progress=False)
    ck = torch.load(run_dir / "segmenter" / "last.pt", weights_only=True)
    assert ck["config"]["arch"]["family"] == "fusion" and ck["config"]["arch"]["head"] == "plain"
    assert not any(k.startswith("context.") for k in ck["model"])
    with pytest.raises(RegistryError, match="--head"):
        train_segmenter(TrainConfig(run=str(run_dir), name="s2", steps=1, head="nope", **SMALL), progress=False)


# ----------------------------------------------------------------------------- protocol pieces
def test_class_split_and_label_map():
    from clip_es.train.loop import class_split, label_map

    seen, unseen = class_split(["a", "b", "c", "d"], ("b", "d"))
    assert seen == [0, 2] and unseen == [1, 3]
    lut = label_map(seen)
    y = torch.tensor([0, 1, 2, 3, 4, 255])
    assert lut[y].tolist() == [0, 1, 255, 2, 255, 255]
    with pytest.raises(ConfigError, match="valid: a, b"):
        class_split(["a", "b"], ("z",))
    with pytest.raises(ConfigError, match="at least one"):
        class_split(["a"], ("a",))


def test_self_train_targets_label_only_pending_pixels_by_the_unseen_argmax():
    from clip_es.train.loop import PENDING, label_map, self_train_targets

    lut = label_map([0, 1, 2], pending=[2])          # classes 0, 1 seen; class 2 unseen (channel 3)
    assert lut[torch.tensor([0, 1, 2, 3, 255])].tolist() == [0, 1, 2, PENDING, 255]
    logits = torch.zeros(1, 5, 1, 5)
    logits[0, 3, 0, :] = 5.0   # unseen channel 3 everywhere...
    logits[0, 4, 0, 1] = 6.0   # ...but unseen channel 4 higher at pixel 1
    logits[0, 1, 0, :] = 9.0   # a seen class is the overall argmax everywhere: it never wins a pending pixel
    target = torch.tensor([[[PENDING, PENDING, 255, 2, 0]]])
    unseen = torch.tensor([3, 4])
    assert self_train_targets(logits, target, unseen, started=False).tolist() == [[[255, 255, 255, 2, 0]]]
    assert self_train_targets(logits, target, unseen).tolist() == [[[3, 4, 255, 2, 0]]]


def test_transductive_supervises_unseen_only_by_self_training(run_dir, monkeypatch):  # noqa: F811
    """Spy on every step's targets: before the self-training start no pixel is supervised with an unseen
    class; afterwards an unseen class only where the model itself scores it highest among the unseen."""
    from clip_es.train import loop

    seen_steps = []
    real = loop.training_loss

    def spy(loss_fn, logits, extras, y):
        seen_steps.append((logits.detach().clone(), y.clone()))
        return real(loss_fn, logits, extras, y)

    monkeypatch.setattr(loop, "training_loss", spy)
    loop.train_segmenter(loop.TrainConfig(run=str(run_dir), steps=6, unseen=("ring", "fish"), transductive=True,
                                          self_train_from=0.5, **SMALL), progress=False)
    ck = torch.load(run_dir / "segmenter" / "last.pt", weights_only=True)
    names = [c[0] for c in ck["text"]["classes"]]
    ring, fish = names.index("ring") + 1, names.index("fish") + 1   # channels once every name is in
    assert len(seen_steps) == 6
    labelled_after = 0
    for step, (logits, y) in enumerate(seen_steps):
        if step < 3:   # inductive first: the seen names only (an unseen channel could only meet negatives)
            assert logits.shape[1] == 1 + len(names) - 2, f"step {step}: unseen names before self-training"
        else:
            assert logits.shape[1] == 1 + len(names)
            on_unseen = (y == ring) | (y == fish)
            pick = torch.where(logits[:, ring] >= logits[:, fish], ring, fish)
            assert torch.equal(y[on_unseen], pick[on_unseen])
            labelled_after += int(on_unseen.sum())
    assert labelled_after > 0  # the crops did hold unseen objects, and self-training labelled them


def test_transductive_never_started_is_inductive(run_dir):  # noqa: F811
    """--self-train-from 1: the unseen names never join, so the weights equal an inductive run's."""
    from clip_es.train import loop

    weights = {}
    for name, extra in (("ind", {}), ("trans", {"transductive": True, "self_train_from": 1.0})):
        loop.train_segmenter(loop.TrainConfig(run=str(run_dir), name=name, steps=3, unseen=("ring", "fish"),
                                              **extra, **SMALL), progress=False)
        weights[name] = torch.load(run_dir / name / "model.pt", weights_only=True)["model"]
    assert weights["ind"].keys() == weights["trans"].keys()
    for k, v in weights["ind"].items():
        assert torch.equal(v, weights["trans"][k]), k


def test_seen_unseen_arithmetic():
    per = {"background": 0.9, "a": 0.7, "b": 0.5, "c": None, "d": 0.2}
    z = seen_unseen(per, ["b", "d"])
    assert z["seen"] == pytest.approx(0.8)          # background and a (c undefined)
    assert z["unseen"] == pytest.approx(0.35)
    assert z["hiou"] == pytest.approx(2 * 0.8 * 0.35 / 1.15)
    assert seen_unseen({"background": 1.0, "a": 0.0}, ["a"])["hiou"] == 0.0
    objects_only = seen_unseen(per, ["b", "d"], seen_background=False)   # ZegCLIP's VOC convention
    assert objects_only["seen"] == pytest.approx(0.7) and objects_only["background_counted"] == "no"
    assert np.isnan(seen_unseen({"background": 0.9, "a": 0.7, "b": None}, ["b"])["hiou"])  # unseen undefined
    assert np.isnan(seen_unseen({"background": 0.9, "b": 0.5}, ["b"], seen_background=False)["seen"])
    with pytest.raises(DatasetError, match="valid: a"):
        seen_unseen({"background": 1.0, "a": 0.0}, ["zz"])


def train_and_spy_text(monkeypatch, module_cls, run_dir, **cfg) -> dict:
    """Train 2 steps with ``--unseen ring,fish`` while recording every forward's class text; assert that
    each forward got the 6 seen classes and none of the held-out rows; return the checkpoint."""
    from clip_es.train.loop import TrainConfig, train_segmenter

    rows = []
    real = module_cls.forward

    def spy(self, x, text, return_extras=False):
        rows.append(text.detach().clone())
        return real(self, x, text, return_extras)

    monkeypatch.setattr(module_cls, "forward", spy)
    train_segmenter(TrainConfig(run=str(run_dir), steps=2, unseen=("ring", "fish"), **cfg), progress=False)
    ck = torch.load(run_dir / "segmenter" / "last.pt", weights_only=True)
    emb, names = ck["text"]["embeddings"], [c[0] for c in ck["text"]["classes"]]
    held = emb[[names.index("ring"), names.index("fish")]]
    assert len(rows) == 2
    for t in rows:
        assert t.shape[0] == 6 and not any(torch.allclose(t[i], u) for i in range(6) for u in held)
    assert ck["config"]["train"]["unseen"] == ["ring", "fish"]
    return ck


def test_inductive_unseen_names_never_reach_the_model(run_dir, monkeypatch):  # noqa: F811
    """Every training forward gets only the seen classes' text; the checkpoint records --unseen."""
    from clip_es.train.model import Segmenter

    train_and_spy_text(monkeypatch, Segmenter, run_dir, **SMALL)


def test_unseen_protocol_end_to_end(run_dir, tmp_path):  # noqa: F811
    """Train with --unseen, then segment with the held-out names and eval --unseen (CLI)."""
    from tests.conftest import run_cli

    argv = ["train", "--run", str(run_dir), "--labels", "gt", "--steps", "2", "--batch-size", "2", "--crop-size",
            "64", "--backbone", "test_resnet", "--dim", "32", "--device", "cpu", "--unseen", "ring,fish"]
    assert run_cli(argv) == 0
    seg_out = tmp_path / "pred"
    from clip_es.train.segment import load_segmenter

    seg = load_segmenter(run_dir / "segmenter" / "model.pt")
    assert "ring" not in seg.trained and "ball" in seg.trained
    assert seg.offset == 0.0  # the family's default (CNN: no calibration)
    seg2 = load_segmenter(run_dir / "segmenter" / "model.pt", calibration=0.2)
    assert seg2.offset == 0.2
    only_trained = seg2.with_classes([c for c in seg2.classes if c.name in seg2.trained])
    assert only_trained.offset == 0.0  # nothing untrained asked for: no shift
    root = json.loads((run_dir / "manifest.json").read_text())["dataset"]["root"]
    assert run_cli(["segment", "-c", str(run_dir / "segmenter" / "model.pt"), "-o", str(seg_out), "-d", "toy",
                    "-r", root, "-s", "val", "--calibration", "0.1", "--device", "cpu"]) == 0
    assert json.loads((seg_out / "segment.json").read_text())["calibration"] == 0.1
    assert run_cli(["eval", "--run", str(run_dir), "--stage", "segmenter", "--unseen", "ring,fish"]) == 0
    rep = json.loads((run_dir / "eval.json").read_text())["stages"]["segmenter"]
    assert set(rep["zero_shot"]) >= {"seen", "unseen", "hiou"}


def test_transductive_needs_unseen_and_trains(run_dir):  # noqa: F811
    from clip_es.train.loop import TrainConfig, train_segmenter

    with pytest.raises(ConfigError, match="--unseen"):
        train_segmenter(TrainConfig(run=str(run_dir), steps=2, transductive=True, **SMALL), progress=False)
    res = train_segmenter(TrainConfig(run=str(run_dir), steps=3, unseen=("ring",), transductive=True,
                                      self_train_from=0.3, **SMALL), progress=False)
    assert res.step == 3 and np.isfinite(res.last_loss)


def test_older_runs_keep_their_train_hash():
    """Fields added with the families are left out of the parameters at their defaults."""
    from clip_es.train.loop import TrainConfig, stage_params

    p = stage_params(TrainConfig(run="r"))
    assert not {"arch", "head", "unseen", "transductive", "self_train_from"} & set(p)
    assert p["loss"] == "ce"
    assert stage_params(TrainConfig(run="r", unseen=("a",)))["unseen"] == ["a"]



def test_eval_refuses_an_unknown_unseen_name_before_evaluating(run_dir, monkeypatch):  # noqa: F811
    from clip_es import evaluate

    def boom(*a, **k):
        raise AssertionError("a stage was evaluated")

    monkeypatch.setattr(evaluate, "score_predictions", boom)
    with pytest.raises(DatasetError, match="--unseen rng: not a class; valid: ball"):
        evaluate.evaluate_run(run_dir, evaluate.EvalOptions(unseen=("rng",)), progress=False)


def test_bad_unseen_name_leaves_no_stage_behind(run_dir):  # noqa: F811
    """A refused --unseen records nothing, so the corrected command runs."""
    from clip_es.train.loop import TrainConfig, train_segmenter

    with pytest.raises(ConfigError, match="--unseen rng"):
        train_segmenter(TrainConfig(run=str(run_dir), steps=1, unseen=("rng",), **SMALL), progress=False)
    assert "segmenter" not in json.loads((run_dir / "manifest.json").read_text())["stages"]
    train_segmenter(TrainConfig(run=str(run_dir), steps=1, unseen=("ring",), **SMALL), progress=False)
