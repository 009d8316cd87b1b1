"""``clipes eval``: per-class IoU and mIoU of every stage present in a run.

Each stage contributes an evaluator to :data:`STAGE_EVALUATORS`: a function
``(run, options) -> StagePredictions | None`` (``None`` when the stage is absent) that
names the dataset split it predicts on and yields ``(image_id, prediction)`` pairs,
predictions being ``(H, W)`` uint8 label maps (0 = background, ``k + 1`` = class ``k``,
255 = no prediction / ignored). Metrics are computed once, for all stages, by the pure
scoring layer (:mod:`clip_es.scoring`, re-exported here).

mIoU is the mean over background + classes of ``TP / (TP + FP + FN)`` on pixels whose
ground truth is not 255; classes absent from both GT and prediction are left out.
Images without ground truth (a folder dataset where only some images have a mask) are
skipped and counted: ``images`` is the number scored, ``images_without_gt`` the rest.
For predictions with ignored pixels (confidence-guided masks) the report adds
``coverage`` (share of GT-valid pixels predicted) and ``precision`` (share of predicted
pixels that are right); mIoU is then computed on predicted pixels only.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from clip_es.cam.store import load_cam
from clip_es.data.registry import dataset_of_run
from clip_es.errors import ClipEsError, DatasetError, RunDirError
from clip_es.rundir import RunDir, atomic_write_json
# the pure scoring layer, re-exported: ``from clip_es.evaluate import confusion_matrix`` keeps working
from clip_es.scoring import (StagePredictions, confusion_matrix, iou_report, score_predictions,  # noqa: F401
                             scores_to_labels, seen_unseen)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalOptions:
    """Options of ``clipes eval``.

    Attributes:
        alpha: background power for score maps: ``bg = (1 - max_k score_k) ** alpha``.
        stages: only these stages (default: all present).
        split: evaluation split for stages that predict on another split (the segmenter).
        limit: evaluate only the first ``limit`` images of a stage.
        unseen: class names held out of training (``clipes train --unseen``): every stage's
            report adds ``zero_shot`` = seen mIoU, unseen mIoU and hIoU (see
            :func:`clip_es.scoring.seen_unseen`).
        seen_background: count background among the seen classes (VOC-21 convention); ``False``:
            seen mIoU over the seen object classes only, as ZegCLIP's VOC tables.
        calibration: offset on trained classes' scores for segmenters predicting untrained
            names (``None``: each family's default).
    """

    alpha: float = 1.0
    stages: tuple[str, ...] | None = None
    split: str | None = None
    limit: int | None = None
    unseen: tuple[str, ...] = ()
    seen_background: bool = True
    calibration: float | None = None


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
    """Evaluator of a trained segmenter: predicts with ``RUN/<name>/last.pt`` (or ``model.pt``; its
    trained classes) on a held-out split (``EvalOptions.split``; default see :func:`_heldout_dataset`).
    Only images with ground truth are predicted; the others are counted."""

    def evaluate(run: RunDir, opts: EvalOptions) -> StagePredictions | None:
        from clip_es.train.checkpoint import segmenter_file

        ckpt = segmenter_file(run.stage_dir(name))
        if ckpt is None:
            return None
        from clip_es.train.segment import segmenter_predictions

        ds = _heldout_dataset(run, opts.split)
        ids = ds.ids()
        gt_path = getattr(ds, "gt_path", None)  # readers with mask files: skip images without one unread
        with_gt = ids if gt_path is None else [i for i in ids if gt_path(i) is not None]
        return StagePredictions(ds, segmenter_predictions(ckpt, ds, ids=with_gt, calibration=opts.calibration),
                                {"split": ds.split, "images_without_gt": len(ids) - len(with_gt)})

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
    a manifest stage whose folder has a ``last.pt`` or ``model.pt``), e.g. the ``--no-fusion`` ablation."""
    from clip_es.train.checkpoint import segmenter_file  # torch, only when a run is evaluated

    out = dict(STAGE_EVALUATORS)
    for name in run.read_manifest().get("stages", {}):
        if name not in out and segmenter_file(run.stage_dir(name)) is not None:
            out[name] = _segmenter_evaluator(name)
    return out


def evaluate_run(run: str | Path, options: EvalOptions = EvalOptions(), progress: bool = True,
                 on_report: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Evaluate every stage present in ``run``; save ``RUN/eval.json``; return the report.

    Args:
        on_report: called with the report before ``eval.json`` is written, so a caller can
            show it even when the write then fails (``clipes eval`` prints the table there).

    Returns:
        ``{"alpha", "stages": {stage: {"miou", "per_class", "pixel_acc", "confusion", "images",
        "images_without_gt", [coverage, precision]}}}``; ``images`` counts the images scored
        (those with ground truth). ``confusion`` is ``{"labels": [...], "counts": [[...]]}``:
        ``counts[g][p]`` pixels of ground-truth label ``labels[g]`` predicted as ``labels[p]``.

    Raises:
        OutputWriteError: ``RUN/eval.json`` cannot be written (after ``on_report``).
    """
    rd = RunDir(run)
    if not rd.manifest_path.is_file():
        raise RunDirError(f"{run}: no manifest.json; is this a clipes run folder?")
    if options.unseen:  # refused before any stage is evaluated
        names = [c.name for c in dataset_of_run(rd).classes]
        seen_unseen(dict.fromkeys(["background", *names]), options.unseen)
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
        if options.unseen:
            report[stage]["zero_shot"] = seen_unseen(report[stage]["per_class"], options.unseen,
                                                     options.seen_background)
    if not report:
        raise RunDirError(f"{run}: no stage outputs to evaluate; run 'clipes cam' first")
    report_all = {"alpha": options.alpha, "stages": report}
    if on_report is not None:
        on_report(report_all)
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
    zs = [s for s in stages if "zero_shot" in report["stages"][s]]
    if zs:
        for key, label in (("seen", "seen mIoU"), ("unseen", "unseen mIoU"), ("hiou", "hIoU")):
            lines.append(f"{label:<{w}} " + " ".join(
                f"{report['stages'][s]['zero_shot'][key] * 100:9.1f}"
                if s in zs and math.isfinite(report['stages'][s]['zero_shot'][key]) else f"{'-':>9}"
                for s in stages))
    lines.append(f"{'images':<{w}} " + " ".join(f"{report['stages'][s]['images']:>9}" for s in stages))
    if any(report["stages"][s].get("images_without_gt") for s in stages):
        lines.append(f"{'without GT':<{w}} " + " ".join(
            f"{report['stages'][s].get('images_without_gt', 0):>9}" for s in stages))
        lines.append("(images = images scored; images without a ground-truth mask are not scored)")
    if zs:
        zero = report["stages"][zs[0]]["zero_shot"]
        counted = ("counts background with the seen classes" if zero.get("background_counted", "with the seen "
                   "classes") != "no" else "is over the seen object classes only (background left out)")
        lines.append(f"(unseen: {', '.join(zero['unseen_classes'])}; seen mIoU {counted}, "
                     "hIoU = 2 S U / (S + U))")
    return "\n".join(lines)
