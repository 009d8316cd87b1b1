"""Recipes: one TOML file per dataset or experiment that runs every stage in order.

    clipes run pipelines/voc12.toml --root VOCdevkit/VOC2012 --out runs/voc

A recipe has the sections ``[dataset]`` (``kind``, ``split``, optional ``class_file``
relative to the recipe, ``eval_split``), ``[model]`` (``model``, ``pretrained``), and
one section per stage whose keys are the fields of that stage's config dataclass
(``[cam]`` -> :class:`~clip_es.cam.run.CamConfig`, ``[refine]`` (+ ``[refine.crf]``) ->
:class:`~clip_es.refine.run.RefineConfig`, ``[train]`` -> :class:`~clip_es.train.loop.TrainConfig`,
``[eval]`` -> :class:`~clip_es.evaluate.EvalOptions`). Unknown keys are refused with the
list of valid ones. Stages run in the order cam, refine, train, eval; a stage missing
from the recipe is not run. Every stage resumes: work already in the run folder (same
parameters) is skipped, so re-running a recipe after an interruption continues it.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import tomllib
from pathlib import Path
from typing import Any, Callable

from clip_es.errors import ClipEsError, ConfigError

log = logging.getLogger(__name__)

STAGE_ORDER = ("cam", "refine", "train", "eval")


def load_recipe(path: str | Path) -> dict[str, Any]:
    """Parse a recipe file; relative ``class_file`` / ``background`` paths resolve against it."""
    path = Path(path)
    try:
        recipe = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise ConfigError(f"recipe {path} does not exist; see pipelines/ for examples") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"recipe {path} is not valid TOML: {e}") from e
    ds = recipe.get("dataset", {})
    if ds.get("class_file"):
        ds["class_file"] = str((path.parent / ds["class_file"]).resolve())
    bg = recipe.get("cam", {}).get("background")
    if bg and (path.parent / bg).is_file():
        recipe["cam"]["background"] = str((path.parent / bg).resolve())
    return recipe


def _build(cls: type, values: dict[str, Any], section: str) -> Any:
    """``cls(**values)`` with lists turned into tuples and unknown keys refused."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"recipe section [{section}]: unknown key(s) {', '.join(unknown)}; "
                          f"valid: {', '.join(sorted(fields))}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def stage_configs(recipe: dict[str, Any], root: str | Path, out: str | Path) -> dict[str, Any]:
    """The config object of every stage the recipe names, in run order."""
    known = {"dataset", "model", *STAGE_ORDER}
    extra = sorted(set(recipe) - known)
    if extra:
        raise ConfigError(f"recipe: unknown section(s) {', '.join(extra)}; valid: {', '.join(sorted(known))}")
    ds = dict(recipe.get("dataset", {}))
    if "kind" not in ds:
        raise ConfigError("recipe: [dataset] needs kind = voc | coco | folder | toy")
    eval_split = ds.pop("eval_split", None)
    base = {"dataset": ds.pop("kind"), "split": ds.pop("split", "train"), "class_file": ds.pop("class_file", None)}
    if ds:
        raise ConfigError(f"recipe section [dataset]: unknown key(s) {', '.join(sorted(ds))}; "
                          "valid: kind, split, class_file, eval_split")
    model = dict(recipe.get("model", {}))
    out_cfgs: dict[str, Any] = {}
    if "cam" in recipe:
        from clip_es.cam.run import CamConfig

        out_cfgs["cam"] = _build(CamConfig, {**base, "root": str(root), "out": str(out), **model, **recipe["cam"]},
                                 "cam")
    if "refine" in recipe:
        from clip_es.refine.crf import CrfParams
        from clip_es.refine.run import RefineConfig

        sec = dict(recipe["refine"])
        crf = sec.pop("crf", None)
        if crf is not None:
            sec["crf_params"] = _build(CrfParams, crf, "refine.crf")
        out_cfgs["refine"] = _build(RefineConfig, {"run": str(out), **sec}, "refine")
    if "train" in recipe:
        from clip_es.train.loop import TrainConfig

        out_cfgs["train"] = _build(TrainConfig, {"run": str(out), **recipe["train"]}, "train")
    if "eval" in recipe:
        from clip_es.evaluate import EvalOptions

        sec = dict(recipe["eval"])
        if eval_split and "split" not in sec:
            sec["split"] = eval_split
        out_cfgs["eval"] = _build(EvalOptions, sec, "eval")
    return out_cfgs


def _did_work(res: Any) -> bool:
    """Whether a stage run computed anything (``False``: every output was already there)."""
    if hasattr(res, "done"):  # StageResult
        return bool(res.done)
    if hasattr(res, "resumed_from") and hasattr(res, "steps"):  # TrainResult
        return res.resumed_from is None or res.resumed_from < res.steps
    return True


def _manifest_stage(stage: str, cfg: Any) -> str:
    return getattr(cfg, "name", stage) if stage == "train" else stage


def _compute_seconds(out: str | Path, stage: str, dt: float, worked: bool) -> float | None:
    """Seconds the stage's outputs took to compute, kept in the manifest (``compute_seconds``): this
    run's ``dt`` added when it computed something, else what an earlier run recorded."""
    from clip_es.rundir import RunDir

    rd = RunDir(out)
    info = rd.stage_info(stage) or {}
    total = info.get("compute_seconds")
    if worked:
        total = float(total or 0.0) + dt
        try:
            rd.record(stage, compute_seconds=round(total, 3))
        except (KeyError, OSError, ClipEsError) as e:  # the time is a report, never a reason to fail
            log.warning("could not record %s's compute time in the manifest: %s", stage, e)
    return total


def run_recipe(recipe: dict[str, Any], root: str | Path, out: str | Path, progress: bool = True,
               on_stage: Callable[[str, float, Any], None] | None = None) -> dict[str, Any]:
    """Run the recipe's stages in order; return ``{stage: result}`` plus ``"seconds": {stage: s}``
    (this run's wall time per stage), ``"compute_seconds": {stage: s}`` (what computing the stage's
    outputs took, kept in the manifest, so a resumed run reports it rather than the time it took to
    skip them) and ``"resumed": {stage: bool}`` (every output was already there).

    Raises:
        ClipEsError subclasses on fatal errors; a stage with per-image failures stops the
        recipe with :class:`~clip_es.errors.StageFailures` after it finishes.
    """
    from clip_es.errors import StageFailures

    cfgs = stage_configs(recipe, root, out)
    results: dict[str, Any] = {"seconds": {}, "compute_seconds": {}, "resumed": {}}
    for stage in STAGE_ORDER:
        if stage not in cfgs:
            continue
        t0 = time.perf_counter()
        if stage == "eval":
            from clip_es.evaluate import evaluate_run

            res = evaluate_run(out, cfgs[stage], progress=progress)
        else:
            res = _RUNNERS[stage](cfgs[stage], progress)
        dt = time.perf_counter() - t0
        results[stage] = res
        results["seconds"][stage] = dt
        if stage != "eval":
            worked = _did_work(res)
            results["resumed"][stage] = not worked
            results["compute_seconds"][stage] = _compute_seconds(out, _manifest_stage(stage, cfgs[stage]), dt,
                                                                 worked)
        if on_stage:
            on_stage(stage, dt, res)
        if getattr(res, "failed", None):  # on_stage showed the reasons; the error is the first line
            raise StageFailures(res.summary(reasons=0))
    return results


def _run_cam(cfg, progress):
    from clip_es.cam.run import generate_cams

    return generate_cams(cfg, progress=progress)


def _run_refine(cfg, progress):
    from clip_es.refine.run import refine_masks

    return refine_masks(cfg, progress=progress)


def _run_train(cfg, progress):
    from clip_es.train.loop import train_segmenter

    last = Path(cfg.run) / cfg.name / "last.pt"
    if last.is_file() and not cfg.resume:
        cfg = dataclasses.replace(cfg, resume=True)
    return train_segmenter(cfg, progress=progress)


#: Stage name -> runner ``(config, progress) -> result``.
_RUNNERS: dict[str, Callable[[Any, bool], Any]] = {"cam": _run_cam, "refine": _run_refine, "train": _run_train}
