"""Recipes: one TOML file per dataset or experiment that runs every stage in order.

    clipes run pipelines/voc12.toml --root VOCdevkit/VOC2012 --out runs/voc

A recipe has the sections ``[dataset]`` (``kind``, ``split``, optional ``class_file``
relative to the recipe, ``eval_split``), ``[model]`` (``model``, ``pretrained``), and
one section per stage whose keys are the fields of that stage's config dataclass
(``[cam]`` -> :class:`~clip_es.cam.run.CamConfig`, ``[refine]`` (+ ``[refine.crf]``) ->
:class:`~clip_es.refine.run.RefineConfig`, ``[train]`` -> :class:`~clip_es.train.loop.TrainConfig`,
``[eval]`` -> :class:`~clip_es.evaluate.EvalOptions`). A folder dataset without labels takes
a ``[label]`` section (:class:`~clip_es.tag.run.LabelStageConfig`: ``tagger``, ``threshold``,
``background``, ``max_side``, ``device``, ``threads``): its images are tagged zero-shot into
``OUT/labels_zeroshot.csv`` and the cam stage reads its labels from there. Unknown keys are
refused with the list of valid ones. Stages run in the order label, cam, refine, train, eval; a stage missing
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

STAGE_ORDER = ("label", "cam", "refine", "train", "eval")


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


#: Keys of ``[dataset]`` and ``[model]`` (the stage sections' keys are their config dataclasses' fields).
DATASET_KEYS = ("kind", "split", "class_file", "eval_split")
MODEL_KEYS = ("model", "pretrained")
#: Config fields a recipe section does not set (``clipes run`` fills them from --root/--out/[dataset]).
_NOT_SETTABLE = {"label": {"root", "out", "class_file", "model", "pretrained", "templates"},
                 "cam": {"dataset", "root", "split", "out", "class_file"},
                 "refine": {"run", "crf_params", "pamr_params"},
                 "train": {"run"}}


def _section_fields(section: str) -> dict[str, str]:
    """``{key: type annotation}`` of a recipe section (``refine.crf`` included)."""
    if section == "dataset":
        return {k: "str" for k in DATASET_KEYS}
    if section == "model":
        return {"model": "str", "pretrained": "str | None"}
    if section == "cam":
        from clip_es.cam.run import CamConfig as cls
    elif section == "refine":
        from clip_es.refine.run import RefineConfig as cls
    elif section == "refine.crf":
        from clip_es.refine.crf import CrfParams as cls
    elif section == "train":
        from clip_es.train.loop import TrainConfig as cls
    elif section == "label":
        from clip_es.tag.run import LabelStageConfig as cls
    elif section == "eval":
        from clip_es.evaluate import EvalOptions as cls
    else:
        raise KeyError(section)
    skip = _NOT_SETTABLE.get(section, set())
    return {f.name: str(f.type) for f in dataclasses.fields(cls) if f.name not in skip}


def _toml_value(text: str) -> Any:
    """``text`` read as a TOML value (``3``, ``0.5``, ``true``, ``[1.0, 0.75]``, ``"a b"``), else the text."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _typed(item: str, raw: str, annotation: str) -> Any:
    """``raw`` parsed for a field annotated ``annotation`` (``float``, ``int | None``, ``tuple[float, ...]``...)."""
    kinds = {part.strip().split("[")[0] for part in annotation.split("|")}
    value = _toml_value(raw)
    # "none" is a value of some text keys (cam.background=none): for those only "null" means None
    if "None" in kinds and isinstance(value, str) and value.lower() in (("null",) if "str" in kinds
                                                                        else ("none", "null", "")):
        return None
    if "bool" in kinds:
        if isinstance(value, bool):
            return value
    elif isinstance(value, bool):
        pass  # true/false for a number or text: refused below
    elif "int" in kinds and isinstance(value, int):
        return value
    elif "float" in kinds and isinstance(value, (int, float)):
        return float(value)
    if "tuple" in kinds or "list" in kinds:
        items = value if isinstance(value, list) else [_toml_value(v.strip()) for v in raw.split(",") if v.strip()]
        inner = annotation.split("[", 1)[1] if "[" in annotation else "str"
        if inner.startswith(("float", "int")):
            whole = inner.startswith("int")
            if not all(isinstance(v, int if whole else (int, float)) and not isinstance(v, bool) for v in items):
                raise ConfigError(f"--set {item}: expects a list of {'whole ' if whole else ''}numbers such as "
                                  f"{'0,2' if whole else '1.0,0.75'}, got {raw!r}")
            return [v if whole else float(v) for v in items]
        return [str(v) for v in items]
    if "str" in kinds:
        return value if isinstance(value, str) else raw
    _refuse(item, raw, annotation)


def _refuse(item: str, raw: str, annotation: str):
    want = {"float": "a number", "int": "a whole number", "bool": "true or false"}.get(annotation.split(" |")[0],
                                                                                       annotation)
    raise ConfigError(f"--set {item}: expects {want}"
                      + (" or none" if "None" in annotation and want != annotation else "") + f", got {raw!r}")


def apply_overrides(recipe: dict[str, Any], sets: list[str]) -> dict[str, Any]:
    """The recipe with ``SECTION.KEY=VALUE`` overrides (``clipes run --set``) applied; a new dict.

    ``cam.model=ViT-B-16``, ``refine.conf=0.9``, ``refine.crf.iters=5``, ``cam.scales=1.0,0.75``,
    ``train.steps=500``, ``model.pretrained=/models/ViT-B-16.pt``. Values are parsed for the key's
    type (a number, true/false, a list as ``a,b`` or ``[a, b]``, else text; ``none`` unsets a number
    such as ``cam.limit``, ``null`` a text such as ``model.pretrained``).

    Raises:
        ConfigError: malformed item, unknown section or key (the message lists the valid ones), a
            value of the wrong type, or a stage the recipe does not run.
    """
    import copy

    out = copy.deepcopy(recipe)
    sections = ("dataset", "model", *STAGE_ORDER)
    for item in sets:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or "." not in key:
            raise ConfigError(f"--set {item!r}: expected SECTION.KEY=VALUE, e.g. cam.model=ViT-B-16")
        section, name = key.rsplit(".", 1)
        if section not in (*sections, "refine.crf"):
            raise ConfigError(f"--set {key}: unknown section {section!r}; valid: {', '.join(sections)}, refine.crf")
        fields = _section_fields(section)
        if name not in fields:
            raise ConfigError(f"--set {key}: unknown key {name!r} in [{section}]; valid: {', '.join(sorted(fields))}")
        stage = section.split(".")[0]
        if stage in STAGE_ORDER and stage not in out:
            raise ConfigError(f"--set {key}: the recipe has no [{stage}] section, so it does not run {stage}; "
                              "add the section to the recipe to run it")
        target = out.setdefault(stage, {})
        if section == "refine.crf":
            target = target.setdefault("crf", {})
        target[name] = _typed(key, raw.strip(), fields[name])
    return out


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
    if "label" in recipe:
        from clip_es.tag.run import LabelStageConfig

        if base["dataset"] != "folder":
            raise ConfigError(f"recipe: a [label] stage tags a folder of images; [dataset] kind is "
                              f"{base['dataset']!r} (use kind = \"folder\", or drop [label]: {base['dataset']} "
                              "brings its own labels)")
        sec = dict(recipe["label"])
        bad = sorted(set(sec) & _NOT_SETTABLE["label"])
        if bad:
            raise ConfigError(f"recipe section [label]: {', '.join(bad)} come from [dataset], [model] and [cam]")
        cam_sec = recipe.get("cam", {})
        extra = {k: tuple(cam_sec[k]) for k in ("templates",) if k in cam_sec}
        if "background" in cam_sec and "background" not in sec:
            sec["background"] = cam_sec["background"]
        for k in ("device", "threads", "max_side"):
            if k in cam_sec and k not in sec:
                sec[k] = cam_sec[k]
        out_cfgs["label"] = _build(LabelStageConfig, {"root": str(root), "out": str(out),
                                                      "class_file": base["class_file"], **model, **extra, **sec},
                                   "label")
        base["split"] = str(out_cfgs["label"].labels_file.resolve())  # the cam stage reads the guessed labels
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
        if "unseen" not in sec and (recipe.get("train") or {}).get("unseen"):
            sec["unseen"] = recipe["train"]["unseen"]  # the held-out classes: seen / unseen / hIoU in the table
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


def _run_label(cfg, progress):
    from clip_es.tag.run import label_stage

    return label_stage(cfg, progress=progress)


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
_RUNNERS: dict[str, Callable[[Any, bool], Any]] = {"label": _run_label, "cam": _run_cam, "refine": _run_refine,
                                                   "train": _run_train}
