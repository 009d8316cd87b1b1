"""``clipes eval``: per-class IoU and mIoU of every stage present in a run.

Each stage contributes an evaluator to :data:`STAGE_EVALUATORS`: a function
``(run, options) -> StagePredictions | None`` (``None`` when the stage is absent) that
names the dataset split it predicts on and yields ``(image_id, prediction)`` pairs,
predictions being ``(H, W)`` uint8 label maps (0 = background, ``k + 1`` = class ``k``,
255 = no prediction / ignored). Metrics are computed here, once, for all stages.

mIoU is the mean over background + classes of ``TP / (TP + FP + FN)`` on pixels whose
ground truth is not 255; classes absent from both GT and prediction are left out.
For predictions with ignored pixels (confidence-guided masks) the report adds
``coverage`` (share of GT-valid pixels predicted) and ``precision`` (share of predicted
pixels that are right); mIoU is then computed on predicted pixels only.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
from tqdm import tqdm

from clip_es.cam.store import load_cam
from clip_es.data.registry import open_dataset
from clip_es.errors import ClipEsError, DatasetError, RunDirError
from clip_es.rundir import RunDir, atomic_write_json

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalOptions:
    """Options of ``clipes eval``.

    Attributes:
        alpha: background power for score maps: ``bg = (1 - max_k score_k) ** alpha``.
        stages: only these stages (default: all present).
        split: evaluation split for stages that predict on another split (the segmenter).
        limit: evaluate only the first ``limit`` images of a stage.
    """

    alpha: float = 1.0
    stages: tuple[str, ...] | None = None
    split: str | None = None
    limit: int | None = None


@dataclass
class StagePredictions:
    """What an evaluator returns: the dataset it predicts on and ``(id, pred)`` pairs."""

    dataset: Any
    items: Iterator[tuple[str, np.ndarray]]
    extra: dict[str, Any] = field(default_factory=dict)


def confusion_matrix(gt: np.ndarray, pred: np.ndarray, n: int) -> np.ndarray:
    """``(n, n)`` counts ``[gt, pred]`` over pixels where neither is 255.

    Args:
        gt, pred: ``(H, W)`` integer label maps of the same shape.
        n: number of labels (background + classes).
    """
    if gt.shape != pred.shape:
        raise DatasetError(f"prediction {pred.shape} and ground truth {gt.shape} differ in size")
    valid = (gt != 255) & (pred != 255) & (gt < n) & (pred < n)
    idx = gt[valid].astype(np.int64) * n + pred[valid].astype(np.int64)
    return np.bincount(idx, minlength=n * n).reshape(n, n)


def iou_report(conf: np.ndarray, names: list[str]) -> dict[str, Any]:
    """Per-class IoU (``None`` where undefined) and mIoU from a confusion matrix."""
    tp = np.diag(conf).astype(np.float64)
    denom = conf.sum(0) + conf.sum(1) - tp
    per = {name: (float(tp[i] / denom[i]) if denom[i] > 0 else None) for i, name in enumerate(names)}
    vals = [v for v in per.values() if v is not None]
    return {"miou": float(np.mean(vals)) if vals else float("nan"), "per_class": per,
            "pixel_acc": float(tp.sum() / max(conf.sum(), 1))}


def scores_to_labels(keys: np.ndarray, maps: np.ndarray, alpha: float = 1.0) -> np.ndarray:
    """Argmax of ``[bg, maps]`` with ``bg = (1 - max maps) ** alpha``, mapped to label ids.

    Args:
        keys: ``(K,)`` 0-based class indices.
        maps: ``(K, H, W)`` scores in [0, 1].

    Returns:
        ``(H, W)`` uint8: 0 background, ``keys[k] + 1`` otherwise.
    """
    if len(keys) == 0:
        return np.zeros(maps.shape[1:], np.uint8)
    bg = (1.0 - maps.max(0)) ** alpha
    stack = np.concatenate([bg[None], maps], 0)
    lut = np.concatenate([[0], np.asarray(keys) + 1]).astype(np.uint8)
    return lut[stack.argmax(0)]


def dataset_of_run(run: RunDir, split: str | None = None):
    """Reopen the dataset recorded in the run's manifest (optionally another split)."""
    m = run.read_manifest()
    d = m.get("dataset")
    if not d:
        raise RunDirError(f"{run.path}: no dataset recorded in the manifest; run 'clipes cam' into it first")
    extra = {"ann_file": d["ann_file"]} if d.get("ann_file") and (split or d["split"]) == d["split"] else {}
    return open_dataset(d["kind"], d["root"], split or d["split"], d.get("class_file"), **extra)


def _cam_evaluator(which: str) -> Callable[[RunDir, EvalOptions], StagePredictions | None]:
    def evaluate(run: RunDir, opts: EvalOptions) -> StagePredictions | None:
        folder = run.stage_dir("cam")
        if run.stage_info("cam") is None or not folder.is_dir():
            return None
        ds = dataset_of_run(run)
        files = sorted(folder.glob("*.npz"))

        def items() -> Iterator[tuple[str, np.ndarray]]:
            for f in files:
                maps = load_cam(f)
                yield f.stem, scores_to_labels(maps.keys, getattr(maps, which), opts.alpha)

        return StagePredictions(ds, items())

    return evaluate


def _refine_evaluator(kind: str) -> Callable[[RunDir, EvalOptions], StagePredictions | None]:
    """Evaluator of the refine stage's PNGs: ``crf`` (CRF argmax, no ignore) or ``masks``
    (the pseudo masks; 255 = low confidence, so the report adds coverage and precision)."""

    def evaluate(run: RunDir, opts: EvalOptions) -> StagePredictions | None:
        from clip_es.refine.store import STAGE, output_ids, output_path, read_output

        ids = output_ids(run, kind)
        if run.stage_info(STAGE) is None or not ids:
            return None
        ds = dataset_of_run(run)

        def items() -> Iterator[tuple[str, np.ndarray]]:
            for image_id in ids:
                yield image_id, read_output(output_path(run, kind, image_id))

        return StagePredictions(ds, items())

    return evaluate


def _heldout_dataset(run: RunDir, split: str | None):
    """The split a segmenter is evaluated on: ``split`` if given, else the run's split with
    ``train`` replaced by ``val`` (``train2014`` -> ``val2014``), else ``val``."""
    if split:
        return dataset_of_run(run, split)
    recorded = str((run.read_manifest().get("dataset") or {}).get("split", ""))
    tried = []
    for cand in dict.fromkeys([recorded.replace("train", "val"), "val"]):
        if not cand or cand == recorded:
            continue
        tried.append(cand)
        try:
            ds = dataset_of_run(run, cand)
            ds.ids()
            return ds
        except DatasetError:
            continue
    raise DatasetError(f"{run.path}: no held-out split to evaluate the segmenter on (tried {', '.join(tried) or '-'}); "
                       "pass --split")


def _segmenter_evaluator(name: str) -> Callable[[RunDir, EvalOptions], StagePredictions | None]:
    """Evaluator of a trained segmenter: predicts with ``RUN/<name>/last.pt`` (its trained classes)
    on a held-out split (``EvalOptions.split``; default see :func:`_heldout_dataset`)."""

    def evaluate(run: RunDir, opts: EvalOptions) -> StagePredictions | None:
        ckpt = run.stage_dir(name) / "last.pt"
        if not ckpt.is_file():
            return None
        from clip_es.train.segment import segmenter_predictions

        ds = _heldout_dataset(run, opts.split)
        return StagePredictions(ds, segmenter_predictions(ckpt, ds), {"split": ds.split})

    return evaluate


#: Stage name -> evaluator. Later stages register theirs here (plain dict, no import magic).
STAGE_EVALUATORS: dict[str, Callable[[RunDir, EvalOptions], StagePredictions | None]] = {
    "cam": _cam_evaluator("cam"),
    "caa": _cam_evaluator("caa"),
    "crf": _refine_evaluator("crf"),
    "masks": _refine_evaluator("masks"),
    "segmenter": _segmenter_evaluator("segmenter"),
}


def run_evaluators(run: RunDir) -> dict[str, Callable[[RunDir, EvalOptions], StagePredictions | None]]:
    """:data:`STAGE_EVALUATORS` plus every other segmenter the run holds (``clipes train --name X``:
    a manifest stage whose folder has a ``last.pt``), e.g. the ``--no-fusion`` ablation."""
    out = dict(STAGE_EVALUATORS)
    for name in run.read_manifest().get("stages", {}):
        if name not in out and (run.stage_dir(name) / "last.pt").is_file():
            out[name] = _segmenter_evaluator(name)
    return out


def score_predictions(preds: StagePredictions, limit: int | None = None, desc: str = "eval",
                      progress: bool = False) -> dict[str, Any]:
    """Accumulate the confusion matrix of ``preds`` against the dataset's ground truth."""
    ds = preds.dataset
    names = ["background"] + [c.name for c in ds.classes]
    n = len(names)
    conf = np.zeros((n, n), np.int64)
    valid_px = predicted_px = 0
    count = 0
    for image_id, pred in tqdm(preds.items, desc=desc, disable=not progress, unit="img"):
        gt = ds.load_gt(image_id)
        if gt is None:
            raise DatasetError(f"{image_id}: no ground truth in {ds.root}; eval needs GT masks")
        conf += confusion_matrix(gt, pred, n)
        gv = gt != 255
        valid_px += int(gv.sum())
        predicted_px += int((gv & (pred != 255)).sum())
        count += 1
        if limit and count >= limit:
            break
    rep = iou_report(conf, names)
    rep["confusion"] = {"labels": names, "counts": conf.tolist()}  # counts[gt][pred], pixels
    rep["images"] = count
    if predicted_px < valid_px:
        rep["coverage"] = predicted_px / max(valid_px, 1)
        rep["precision"] = float(np.diag(conf).sum() / max(conf.sum(), 1))
    rep.update(preds.extra)
    return rep


def evaluate_run(run: str | Path, options: EvalOptions = EvalOptions(), progress: bool = True) -> dict[str, Any]:
    """Evaluate every stage present in ``run``; save ``RUN/eval.json``; return the report.

    Returns:
        ``{stage: {"miou", "per_class", "pixel_acc", "confusion", "images", [coverage, precision]}}``;
        ``confusion`` is ``{"labels": [...], "counts": [[...]]}``: ``counts[g][p]`` pixels of
        ground-truth label ``labels[g]`` predicted as ``labels[p]``.
    """
    rd = RunDir(run)
    if not rd.manifest_path.is_file():
        raise RunDirError(f"{run}: no manifest.json; is this a clipes run folder?")
    evaluators = run_evaluators(rd)
    wanted = options.stages or tuple(evaluators)
    unknown = [s for s in wanted if s not in evaluators]
    if unknown:
        raise ClipEsError(f"unknown stage(s) {', '.join(unknown)}; valid: {', '.join(evaluators)}")
    report: dict[str, Any] = {}
    for stage in wanted:
        preds = evaluators[stage](rd, options)
        if preds is None:
            continue
        report[stage] = score_predictions(preds, options.limit, desc=f"eval {stage}", progress=progress)
    if not report:
        raise RunDirError(f"{run}: no stage outputs to evaluate; run 'clipes cam' first")
    report_all = {"alpha": options.alpha, "stages": report}
    atomic_write_json(rd.path / "eval.json", report_all)
    return report_all


def format_report(report: dict[str, Any]) -> str:
    """A plain-text table: one row per class, one column per stage, mIoU last."""
    stages = list(report["stages"])
    if not stages:
        return "(nothing evaluated)"
    names = list(report["stages"][stages[0]]["per_class"])
    w = max(12, *(len(n) for n in names))
    head = f"{'class':<{w}} " + " ".join(f"{s:>9}" for s in stages)
    lines = [head, "-" * len(head)]
    for n in names:
        cells = []
        for s in stages:
            v = report["stages"][s]["per_class"].get(n)
            cells.append(f"{v * 100:9.1f}" if v is not None else f"{'-':>9}")
        lines.append(f"{n:<{w}} " + " ".join(cells))
    lines.append("-" * len(head))
    lines.append(f"{'mIoU':<{w}} " + " ".join(f"{report['stages'][s]['miou'] * 100:9.1f}" for s in stages))
    for extra in ("coverage", "precision"):
        if any(extra in report["stages"][s] for s in stages):
            lines.append(f"{extra:<{w}} " + " ".join(
                f"{report['stages'][s][extra] * 100:9.1f}" if extra in report["stages"][s] else f"{'-':>9}"
                for s in stages))
    lines.append(f"{'images':<{w}} " + " ".join(f"{report['stages'][s]['images']:>9}" for s in stages))
    return "\n".join(lines)
