"""``clipes``: the command line. Thin: parse options, build a config, call one library
function, turn known errors into a one-line message and an exit code.

Exit codes: 0 ok; 1 the stage finished but some images failed (listed in the run
manifest, the first reasons printed); 2 bad input or options (one-line message; ``--debug``
shows the traceback; a command-line mistake prints click's usage paragraph); 130
interrupted (Ctrl-C: "interrupted; re-run the same command to resume").
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import List, Optional

import typer

from clip_es.errors import ClipEsError, ConfigError

app = typer.Typer(
    help="CLIP-ES: pixel-accurate pseudo segmentation masks from image-level labels with a frozen CLIP, "
         "and a small segmenter trained on them. Stages cache to a run folder; re-running resumes.",
    no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False, rich_markup_mode=None)
# rich_markup_mode=None: click's plain help layout (flags shown as flags, no "<bool>" metavar, on every
# typer version); help strings are plain text, so brackets in them are printed as written.
toy_app = typer.Typer(help="The procedural toy world (exact ground truth, for testing the pipeline).",
                      no_args_is_help=True, rich_markup_mode=None)
app.add_typer(toy_app, name="toy")

_STATE = {"debug": False}

# ----------------------------------------------------------------------------- shared options
DatasetOpt = typer.Option(..., "--dataset", "-d", help="Dataset kind: voc, coco, folder or toy.")
RootOpt = typer.Option(..., "--root", "-r", help="Dataset root folder (see data/README.md for layouts).")
SplitOpt = typer.Option("train", "--split", "-s", help="Split name (VOC/toy: ImageSets file; COCO: e.g. val2014; "
                                                        "folder: labels file stem).")
ClassFileOpt = typer.Option(None, "--class-file", help="Class file (one class per line, synonyms after the name, "
                                                       "comma-separated). Default: the dataset's own.")
ModelOpt = typer.Option("clipes-tiny", "--model", "-m", help="clipes-tiny (bundled), an open_clip name such as "
                                                             "ViT-B-16, or a checkpoint path.")
PretrainedOpt = typer.Option(None, "--pretrained", help="open_clip pretrained tag (e.g. openai) or a local "
                                                        "checkpoint file. Offline: pass a file.")
TemplateOpt = typer.Option(None, "--template", "-t", metavar="TEXT", help="Prompt template with one {} (repeatable; several are "
                                                          "averaged). Default: 'a clean origami {}.'")
TemplatesFileOpt = typer.Option(None, "--templates", help="File with one template per line (adds to --template).")
DeviceOpt = typer.Option("auto", "--device", help="cpu, cuda, cuda:N or auto (cuda when available); under torchrun "
                          "auto and cuda give each local rank its own GPU (LOCAL_RANK % GPUs).")
ThreadsOpt = typer.Option(None, "--threads", help="CPU threads for the computation (default: OMP_NUM_THREADS if "
                                                  "set, else torch's default (the physical cores) capped at the CPUs "
                                                  "this process may use). On a machine shared "
                                                  "with other jobs, fewer is often faster.")


_LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"


class _TqdmHandler(logging.Handler):
    """Log records to stderr through ``tqdm.write``: a warning printed while a progress bar is drawn
    gets a line of its own (the bar is cleared and redrawn below it) instead of sharing the bar's line."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # pragma: no cover - logging must never raise
            self.handleError(record)


def _setup_logging(verbose: bool, log_file: Optional[Path] = None) -> None:
    """Console logging (tqdm-safe) at WARNING, INFO with ``--verbose``; ``--log-file`` gets INFO and up,
    with times, whatever the console level."""
    root = logging.getLogger()
    for h in [h for h in root.handlers if getattr(h, "_clipes", False)]:
        root.removeHandler(h)
        h.close()
    console = _TqdmHandler(level=logging.INFO if verbose else logging.WARNING)
    console.setFormatter(logging.Formatter(_LOG_FORMAT))
    handlers: list[logging.Handler] = [console]
    if log_file is not None:
        try:
            log_file.parent.mkdir(parents=True, exist_ok=True)
            fh = logging.FileHandler(log_file, encoding="utf-8")
        except OSError as e:
            raise ClipEsError(f"--log-file {log_file}: cannot open it for writing ({e.strerror or e}); "
                              "choose a writable path") from None
        fh.setLevel(logging.INFO)
        fh.setFormatter(logging.Formatter("%(asctime)s " + _LOG_FORMAT))
        handlers.append(fh)
    for h in handlers:
        h._clipes = True  # type: ignore[attr-defined]
        root.addHandler(h)
    root.setLevel(min(h.level for h in handlers))


def _version() -> str:
    import importlib.metadata as md

    try:
        return md.version("clip_es")
    except md.PackageNotFoundError:  # pragma: no cover - running from a source tree without install
        return "unknown"


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"clipes {_version()}")
        raise typer.Exit()


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors."),
          verbose: bool = typer.Option(False, "--verbose", "-v", help="Log progress details."),
          log_file: Optional[Path] = typer.Option(None, "--log-file", help="Also write the log (INFO and up, "
                                                  "with times) to this file, appending."),
          version: bool = typer.Option(False, "--version", is_eager=True, callback=_print_version,
                                       help="Print the version and exit.")) -> None:
    _STATE["debug"] = debug
    _setup_logging(verbose, log_file)


def _templates(template: Optional[List[str]], templates_file: Optional[Path]) -> tuple[str, ...]:
    from clip_es.model.text import DEFAULT_TEMPLATE

    out = list(template or [])
    if templates_file:
        from clip_es.data.base import read_word_list

        out += read_word_list(templates_file)
    return tuple(out) or (DEFAULT_TEMPLATE,)


def _parse_shard(shard: str) -> tuple[int, int]:
    try:
        i, n = (int(v) for v in shard.split("/"))
    except ValueError:
        raise ClipEsError(f"--shard must look like I/N (e.g. 0/4), got {shard!r}") from None
    return i, n


ForceOpt = typer.Option(False, "--force", help="Replace this stage's outputs (to try other parameters in the "
                        "same run folder): the previous ones, and every later stage computed from them, move to "
                        "RUN/stale/ and their manifest entries to its 'stale' list. Not with --shard or torchrun.")


def _force(run: Path, stage: str, shard: str) -> None:
    """``--force``: move the stage's previous outputs (and its downstream stages') out of the way."""
    import os

    from clip_es.rundir import RunDir

    if shard != "0/1" or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ClipEsError("--force cannot be combined with --shard or torchrun (each process would move the "
                          "others' outputs away); run once with --force and without sharding")
    names, dest = RunDir(run).retire_stage(stage)
    if names:
        typer.echo(f"--force: moved the previous {', '.join(names)} outputs to {dest}", err=True)


def _finish_stage(res) -> None:
    typer.echo(res.summary())
    if not res.ok:
        raise typer.Exit(1)


# ----------------------------------------------------------------------------- toy
@toy_app.command("make")
def toy_make(out: Path = typer.Option(..., "--out", "-o", help="Folder to write the dataset to (VOC layout)."),
             n: int = typer.Option(1000, "--n", help="Number of images."),
             seed: int = typer.Option(1, "--seed", help="World seed; the same seed gives the same images."),
             val_fraction: float = typer.Option(0.2, "--val-fraction", help="Share of images in the val split.")
             ) -> None:
    """Write a toy dataset: JPEG images, palette PNG ground truth, XML labels, splits, class file."""
    from clip_es.data.toy import make_toy

    root = make_toy(out, n=n, seed=seed, val_fraction=val_fraction)
    typer.echo(f"wrote {n} images to {root} (splits: train, val, trainval)")


# ----------------------------------------------------------------------------- cam
@app.command()
def cam(dataset: str = DatasetOpt, root: Path = RootOpt, split: str = SplitOpt,
        out: Path = typer.Option(..., "--out", "-o", help="Run folder (created; re-running resumes)."),
        class_file: Optional[Path] = ClassFileOpt,
        ann_file: Optional[Path] = typer.Option(None, "--ann-file", help="COCO only: the instances JSON "
                                                "(default ROOT/annotations/instances_SPLIT.json); recorded in the "
                                                "run, so refine and eval reopen the dataset with it."),
        model: str = ModelOpt, pretrained: Optional[str] = PretrainedOpt,
        template: Optional[List[str]] = TemplateOpt, templates: Optional[Path] = TemplatesFileOpt,
        fusion: str = typer.Option("sentence", "--fusion", help="Synonym fusion: sentence (all synonyms in one "
                                                                "prompt) or mean (average per-synonym embeddings)."),
        background: Optional[str] = typer.Option(None, "--background", "-b", help="Class-related background set: "
                                                 "voc, coco, toy, none, or a word file. Default: the dataset's."),
        scales: str = typer.Option("1.0", "--scales", help="Comma-separated input scales, e.g. 1.0,0.75,1.25."),
        flip: bool = typer.Option(False, "--flip", help="Also use the horizontally flipped image."),
        no_softmax: bool = typer.Option(False, "--no-softmax", help="Ablation: GradCAM on the raw logit."),
        no_caa: bool = typer.Option(False, "--no-caa", help="Ablation: skip CAA (caa maps = cam maps)."),
        caa_threshold: float = typer.Option(0.4, "--caa-threshold", help="CAA box threshold (0.4 VOC, 0.7 COCO)."),
        max_side: int = typer.Option(1024, "--max-side", help="Working-resolution cap (pixels): larger images are "
                                     "downscaled to this longer side for CLIP (maps stay at the original size); "
                                     "0 = no cap."),
        device: str = DeviceOpt,
        precision: str = typer.Option("auto", "--precision", help="Precision of the frozen CLIP forward: auto "
                                      "(bf16 where it is native: GPUs of compute capability 8.0 and newer, CPUs "
                                      "with avx512_bf16 or AMX; else fp32), fp32, bf16 or fp16. Gradients and CAA "
                                      "stay fp32/fp64."),
        batch_size: int = typer.Option(1, "--batch-size", help="Images per forward (grouped by working size): "
                                       "frozen blocks, last block, GradCAM and CAA; fp32 maps equal batch 1's "
                                       "to rounding (within 2e-6)."),
        workers: str = typer.Option("auto", "--workers", "-j", help="Data-loader processes decoding and resizing "
                                    "images ahead: a number (0: in this process) or auto (0 on a CPU, up to 8 on "
                                    "CUDA)."),
        threads: Optional[int] = ThreadsOpt,
        limit: Optional[int] = typer.Option(None, "--limit", help="Only the first N images of the split."),
        shard: str = typer.Option("0/1", "--shard", help="I/N: process every N-th image starting at I."),
        force: bool = ForceOpt) -> None:
    """Softmax-GradCAM + CAA maps for every image of a split, cached per image in OUT/cam/."""
    from clip_es.cam.run import CamConfig, generate_cams

    cfg = CamConfig(dataset=dataset, root=str(root), split=split, out=str(out),
                    class_file=str(class_file) if class_file else None,
                    ann_file=str(ann_file) if ann_file else None, model=model, pretrained=pretrained,
                    templates=_templates(template, templates), fusion=fusion, background=background,
                    scales=_floats(scales, "--scales"), flip=flip, softmax=not no_softmax, caa=not no_caa,
                    caa_threshold=caa_threshold, max_side=max_side or None, device=device, limit=limit,
                    shard=_parse_shard(shard), precision=precision, batch_size=batch_size, workers=workers,
                    threads=threads)
    if force:
        cfg.validate()
        _force(out, "cam", shard)
    _finish_stage(generate_cams(cfg))


def _floats(text: str, opt: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ClipEsError(f"{opt} must be comma-separated numbers, got {text!r}") from None


# ----------------------------------------------------------------------------- prompts
@app.command()
def prompts(dataset: str = DatasetOpt, root: Path = RootOpt, split: str = SplitOpt,
            templates: Path = typer.Option(..., "--templates", help="File with one candidate template per line."),
            class_file: Optional[Path] = ClassFileOpt, model: str = ModelOpt,
            pretrained: Optional[str] = PretrainedOpt,
            background: Optional[str] = typer.Option(None, "--background", "-b", help="Background set (as in cam)."),
            fusion: str = typer.Option("sentence", "--fusion", help="Synonym fusion: sentence or mean."),
            limit: int = typer.Option(100, "--limit", help="Use at most N images with two or more labels."),
            device: str = DeviceOpt,
            json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the ranking as JSON here.")
            ) -> None:
    """Rank candidate templates by sharpness (lower = better multi-class CAMs), with each template's CAM mIoU
    beside it where ground truth exists, and their rank correlation."""
    from clip_es.cam.prompts import PromptsConfig, format_ranking, rank_templates
    from clip_es.data.base import read_word_list
    from clip_es.rundir import atomic_write_json

    cfg = PromptsConfig(dataset=dataset, root=str(root), split=split, templates=tuple(read_word_list(templates)),
                        class_file=str(class_file) if class_file else None, model=model, pretrained=pretrained,
                        background=background, fusion=fusion, limit=limit, device=device)
    rep = rank_templates(cfg)
    typer.echo(format_ranking(rep))
    if json_out:
        atomic_write_json(json_out, rep)


# ----------------------------------------------------------------------------- demo / run
@app.command()
def demo(out: Path = typer.Option(Path("demo"), "--out", "-o", help="Folder for the toy data, the run and the "
                                                                     "contact sheet (re-running resumes)."),
         n: int = typer.Option(1000, "--n", help="Toy images (the last 20% are the held-out val split)."),
         seed: int = typer.Option(1, "--seed", help="Toy world seed."),
         train_steps: Optional[int] = typer.Option(None, "--train-steps", help="Segmenter steps (default: "
                                                                               "the toy recipe's)."),
         device: str = DeviceOpt, threads: Optional[int] = ThreadsOpt) -> None:
    """The whole pipeline on the toy world with the bundled tiny CLIP (no network, no arguments needed):
    toy make -> cam -> refine -> train -> eval, then one table of mIoU per stage with timings."""
    from clip_es.demo import DemoConfig, run_demo

    res = run_demo(DemoConfig(out=str(out), n=n, seed=seed, train_steps=train_steps, device=device,
                                 threads=threads), echo=typer.echo)
    typer.echo("")
    typer.echo(res.table())
    typer.echo(f"\nlook at: {res.sheet} (clipes show contact sheet), per-class IoU: clipes eval --run {res.run}")


@app.command("run")
def run_cmd(recipe: Path = typer.Argument(..., metavar="RECIPE", help="Recipe file (see pipelines/*.toml)."),
            root: Path = RootOpt,
            out: Path = typer.Option(..., "--out", "-o", help="Run folder (re-running resumes and skips "
                                                              "finished stages)."),
            sets: Optional[List[str]] = typer.Option(None, "--set", metavar="SECTION.KEY=VALUE", help="Override a recipe value: SECTION.KEY="
                                                     "VALUE, e.g. cam.model=ViT-B-16, refine.conf=0.9, "
                                                     "refine.crf.iters=5, cam.scales=1.0,0.75 (repeatable).")
            ) -> None:
    """Run every stage of a recipe in order (cam, refine, train, eval); finished work is skipped."""
    from clip_es.evaluate import format_report
    from clip_es.recipe import apply_overrides, load_recipe, run_recipe

    def on_stage(stage, dt, res):
        typer.echo(f"{res.summary() if hasattr(res, 'summary') else stage + ' done'} ({dt:.0f}s)")

    results = run_recipe(apply_overrides(load_recipe(recipe), list(sets or [])), root, out, on_stage=on_stage)
    if "eval" in results:
        typer.echo(format_report(results["eval"]))


# ----------------------------------------------------------------------------- eval
@app.command("eval")
def eval_cmd(run: Path = typer.Option(..., "--run", help="Run folder to evaluate."),
             alpha: float = typer.Option(1.0, "--alpha", help="Background power: bg = (1 - max score) ** alpha."),
             stage: Optional[List[str]] = typer.Option(None, "--stage", help="Only this stage (repeatable)."),
             split: Optional[str] = typer.Option(None, "--split", help="Split for the segmenter (default val)."),
             limit: Optional[int] = typer.Option(None, "--limit", help="Only the first N images per stage."),
             unseen: Optional[str] = typer.Option(None, "--unseen", help="Comma-separated classes held out of "
                                                  "training: adds seen mIoU, unseen mIoU and hIoU to every stage."),
             seen_background: bool = typer.Option(True, "--seen-background/--no-seen-background",
                                                  help="With --unseen: count background among the seen classes "
                                                  "(VOC-21 convention) or not (seen object classes only, as "
                                                  "ZegCLIP's VOC tables)."),
             calibration: Optional[float] = typer.Option(None, "--calibration", help="Offset on trained classes' "
                                                         "scores for segmenters predicting untrained names "
                                                         "(default: each family's)."),
             as_json: bool = typer.Option(False, "--json", help="Print JSON instead of the table.")) -> None:
    """Per-class IoU and mIoU against ground truth for every stage in RUN (saved to RUN/eval.json)."""
    from clip_es.evaluate import EvalOptions, evaluate_run, format_report

    def show(rep):  # before eval.json is written: a folder that cannot be written still gets its table
        typer.echo(json.dumps(rep, indent=2) if as_json else format_report(rep))

    evaluate_run(run, EvalOptions(alpha=alpha, stages=tuple(stage) if stage else None, split=split, limit=limit,
                                  unseen=_names(unseen, "--unseen"), seen_background=seen_background,
                                  calibration=calibration), on_report=show)


# ----------------------------------------------------------------------------- refine
@app.command()
def refine(run: Path = typer.Option(..., "--run", "--run-dir", help="Run folder holding a cam stage "
                                     "(--run-dir: the same, for use under torchrun)."),
           method: str = typer.Option("crf", "--method", help="Refinement: crf (dense CRF, CPU) or pamr (PAMR, "
                                      "torch on --device; see docs/refine.md)."),
           no_crf: bool = typer.Option(False, "--no-crf", help="Skip refinement: argmax of the background and CAA "
                                       "scores (no ignore)."),
           conf: Optional[float] = typer.Option(None, "--conf", help="Confidence threshold: pixels with max_c Q_c "
                                                "below it become 255 (ignore) in the pseudo mask (default: the "
                                                "method's, 0.95 for crf)."),
           alpha: float = typer.Option(1.0, "--alpha", help="Background power: bg = (1 - max_k caa_k) ** alpha."),
           gauss_sxy: float = typer.Option(1.0, "--gauss-sxy", help="CRF Gaussian kernel spatial std (pixels)."),
           gauss_compat: float = typer.Option(3.0, "--gauss-compat", help="CRF Gaussian kernel weight."),
           bi_sxy: float = typer.Option(67.0, "--bi-sxy", help="CRF bilateral kernel spatial std (pixels)."),
           bi_srgb: float = typer.Option(3.0, "--bi-srgb", help="CRF bilateral kernel colour std (0-255 units)."),
           bi_compat: float = typer.Option(4.0, "--bi-compat", help="CRF bilateral kernel weight."),
           iters: int = typer.Option(10, "--iters", help="CRF mean-field iterations."),
           pamr_iters: int = typer.Option(10, "--pamr-iters", help="PAMR propagation steps."),
           pamr_dilations: str = typer.Option("1,2,4,8,12,24", "--pamr-dilations",
                                              help="PAMR 3x3-neighbourhood dilations (pixels), comma-separated."),
           device: str = typer.Option("auto", "--device", help="Device of a torch method (pamr): cpu, cuda or auto "
                                      "(cuda when available). The CRF runs on the CPU."),
           save_conf: bool = typer.Option(False, "--save-conf", help="Also write RUN/refine/conf/<id>.png "
                                                                    "(uint8 round(conf * 255))."),
           max_side: int = typer.Option(1024, "--max-side", help="Working-resolution cap (pixels): larger images "
                                        "are refined at this longer side and the masks scaled back (nearest) to "
                                        "the original size; 0 = no cap."),
           workers: Optional[int] = typer.Option(None, "--workers", "-j", help="Processes, one thread each "
                                                 "(default and maximum: the --threads budget)."),
           threads: Optional[int] = typer.Option(None, "--threads", help="CPU thread budget (default: every CPU "
                                                 "this process may use); worker processes never exceed it."),
           limit: Optional[int] = typer.Option(None, "--limit", help="Only the first N images with cam outputs."),
           shard: str = typer.Option("0/1", "--shard", help="I/N: refine every N-th image starting at I "
                                                            "(under torchrun: set from the rank)."),
           force: bool = ForceOpt) -> None:
    """Dense CRF (or PAMR) on the cam stage's CAA maps -> confidence-guided pseudo masks in RUN/refine/masks/
    (palette PNGs, 255 = ignore), refined argmax in RUN/refine/crf/. Resumable; parallel over images."""
    from clip_es.refine.crf import CrfParams
    from clip_es.refine.pamr import PamrParams
    from clip_es.refine.run import RefineConfig, refine_masks

    try:
        dilations = tuple(int(d) for d in pamr_dilations.split(","))
    except ValueError:
        raise ConfigError(f"--pamr-dilations must be comma-separated whole pixels, e.g. 1,2,4, "
                          f"got {pamr_dilations!r}") from None
    cfg = RefineConfig(run=str(run), crf=not no_crf, conf=conf, alpha=alpha, method=method, device=device,
                       crf_params=CrfParams(gauss_sxy=gauss_sxy, gauss_compat=gauss_compat, bi_sxy=bi_sxy,
                                            bi_srgb=bi_srgb, bi_compat=bi_compat, iters=iters),
                       pamr_params=PamrParams(dilations=dilations, iters=pamr_iters),
                       save_conf=save_conf, max_side=max_side or None, workers=workers, limit=limit,
                       shard=_parse_shard(shard), threads=threads)
    if force:
        cfg.validate()
        _force(run, "refine", shard)
    res = refine_masks(cfg)
    typer.echo(res.summary())
    if not res.ok:  # StageFailures -> exit code 1 through main()
        from clip_es.errors import StageFailures

        raise StageFailures(f"{len(res.failed)} image(s) failed (reasons in {run}/manifest.json, "
                            "stages.refine.failed); fix them and re-run the same command to finish")


# ----------------------------------------------------------------------------- export
@app.command()
def export(run: Path = typer.Option(..., "--run", help="Run folder with refine outputs (clipes label's OUT is one)."),
           fmt: str = typer.Option("coco", "--format", "-f", help="coco (one JSON file, one RLE per image and "
                                   "class, with scores; CVAT 'COCO 1.0' reads it too), png (palette PNGs + "
                                   "classes.txt), cvat (CVAT 'Segmentation mask 1.1': a .zip or a folder), "
                                   "labelstudio (tasks.json with brush pre-annotations + labeling_config.xml) or "
                                   "fiftyone (ImageSegmentationDirectory + mask_targets.json)."),
           out: Path = typer.Option(..., "--out", "-o", help="coco: the JSON file; cvat: a .zip file or a folder; "
                                    "png, labelstudio, fiftyone: the folder."),
           limit: Optional[int] = typer.Option(None, "--limit", help="Only the first N images in --order: a first "
                                               "batch to correct."),
           order: str = typer.Option("dataset", "--order", help="dataset (the dataset's order) or least-sure "
                                     "(lowest refine confidence first, then most unsure pixels): with --limit, "
                                     "correct the doubtful images first."),
           review: bool = typer.Option(True, "--review/--no-review", help="Also write review.csv (image, labels, "
                                       "share of unsure pixels, lowest class confidence, overlay path; least sure "
                                       "first) and an overlay picture per image: inside the png, labelstudio or "
                                       "fiftyone folder; beside a coco file or cvat export. --no-review skips the "
                                       "overlays (one image decode each) on a large run.")) -> None:
    """Export the pseudo masks for a labelling tool (CVAT, Label Studio, FiftyOne) or as COCO / PNG, with a
    confidence per image and mask. Confidence needs the run refined with --save-conf (clipes label saves it)."""
    from clip_es.export import export_run

    typer.echo(export_run(run, fmt, out, limit=limit, order=order, review=review).summary())


@app.command("import-masks")
def import_masks_cmd(run: Path = typer.Option(..., "--run", help="Run folder the masks were exported from."),
                     src: Path = typer.Option(..., "--from", help="What the tool exported: cvat: the "
                                              "'Segmentation mask 1.1' zip (or its folder); labelstudio: the "
                                              "project's JSON export; coco: a COCO JSON; png: a folder of "
                                              "<id>.png; fiftyone: an ImageSegmentationDirectory."),
                     fmt: str = typer.Option(..., "--format", "-f", help="cvat, labelstudio, coco, png or "
                                             "fiftyone.")) -> None:
    """Store corrected masks in the run (RUN/corrected) for 'clipes train --labels corrected'. Everything is
    checked first: a bad file, size or class name changes nothing."""
    from clip_es.export import import_masks

    typer.echo(import_masks(run, src, fmt).summary())


# ----------------------------------------------------------------------------- label, tags
def _tagger_opt():
    from clip_es.tag.registry import DEFAULT_TAGGER

    return typer.Option(DEFAULT_TAGGER, "--tagger", help="Zero-shot tagger for images without labels: blend (default: "
                        "a class is kept when the global softmax and TagCLIP agree, the geometric mean of their scores "
                        ">= --threshold; on 5 held-out toy worlds precision 97-99 %, recall 93-95 %, the masks closest "
                        "to the true labels'), global (one softmax over the classes, probability >= --threshold; "
                        "about 4x faster than blend, misses small objects beside large ones: recall 81-84 %) or "
                        "tagclip (TagCLIP's local-to-global rule alone: recall 86-91 % at precision 94-96 %). Pick "
                        "global when speed matters more than small objects.")


TaggerOpt = _tagger_opt()


@app.command()
def label(images: Path = typer.Argument(..., help="Folder of images (.jpg .jpeg .png .bmp .webp; any file name)."),
          out: Path = typer.Option(..., "--out", "-o", help="Run folder for labels, masks and COCO file (created; "
                                   "re-running resumes)."),
          classes: Optional[str] = typer.Option(None, "--classes", help="Comma-separated class names, e.g. "
                                                "\"cat,dog,sofa\"."),
          class_file: Optional[Path] = typer.Option(None, "--class-file", help="Class file instead of --classes "
                                                    "(one class per line, synonyms after the name)."),
          labels: Optional[Path] = typer.Option(None, "--labels", help="Image-level labels: CSV 'image,label1;label2' "
                                                "or JSON {\"image\": [\"label\"]}. Default: CLIP predicts them "
                                                "(zero-shot), saved to OUT/labels_zeroshot.csv to review and pass "
                                                "back here."),
          tagger: str = TaggerOpt,
          threshold: float = typer.Option(0.05, "--threshold", help="Keep a class whose score is at least this "
                                          "(the most likely class is always kept): --tagger blend the geometric "
                                          "mean of the softmax probability and TagCLIP's score, --tagger global "
                                          "the softmax probability over the classes. Lower it when classes are "
                                          "missed, raise it (up to 1: one label per image) when extra ones "
                                          "appear. --tagger tagclip's rule is relative and does not read it."),
          model: str = ModelOpt, pretrained: Optional[str] = PretrainedOpt,
          template: Optional[List[str]] = TemplateOpt, templates: Optional[Path] = TemplatesFileOpt,
          background: str = typer.Option("voc", "--background", "-b", help="Background words that join the CAM "
                                         "softmax (and TagCLIP's): voc (CLIP-ES's 25 generic scene words: ground, "
                                         "grass, sky, water, road, ...), coco, none, or a word file."),
          conf: float = typer.Option(0.95, "--conf", help="Mask confidence: pixels below it become 255 (unsure)."),
          max_side: int = typer.Option(1024, "--max-side", help="Working-resolution cap (pixels); 0 = no cap."),
          workers: Optional[int] = typer.Option(None, "--workers", "-j", help="Refine processes, one thread each "
                                                "(default and maximum: the --threads budget)."),
          device: str = DeviceOpt,
          precision: str = typer.Option("auto", "--precision", help="Precision of the frozen CLIP forward (as in "
                                        "cam): auto, fp32, bf16 or fp16."),
          batch_size: int = typer.Option(1, "--batch-size", help="Images per forward of the frozen blocks (as in "
                                         "cam)."),
          cam_workers: str = typer.Option("auto", "--cam-workers", help="Data-loader processes of the cam step (as "
                                          "cam's --workers): a number or auto (0 on a CPU, up to 8 on CUDA)."),
          threads: Optional[int] = ThreadsOpt) -> None:
    """Label a folder of images in one command: labels (yours, or CLIP's zero-shot guess), CAMs, refined masks,
    exported as PNGs and one COCO file."""
    from clip_es.label import LabelConfig, label_folder

    cfg = LabelConfig(images=str(images), out=str(out), classes=classes,
                      class_file=str(class_file) if class_file else None, labels=str(labels) if labels else None,
                      tagger=tagger, threshold=threshold, model=model, pretrained=pretrained,
                      templates=_templates(template, templates), background=background, conf=conf,
                      max_side=max_side or None, workers=workers, device=device, precision=precision,
                      batch_size=batch_size, cam_workers=cam_workers, threads=threads)
    res = label_folder(cfg)
    typer.echo(res.summary())
    if not res.ok:
        raise typer.Exit(1)


@app.command()
def tags(images: Optional[Path] = typer.Argument(None, help="Folder of images (or use --dataset)."),
         out: Path = typer.Option(..., "--out", "-o", help="Folder for tags.csv, tags_scores.json, tags_metrics.json "
                                  "and the cached text embeddings (created)."),
         classes: Optional[str] = typer.Option(None, "--classes", help="Comma-separated class names (with IMAGES)."),
         class_file: Optional[Path] = typer.Option(None, "--class-file", help="Class file instead of --classes."),
         labels: Optional[Path] = typer.Option(None, "--labels", help="Ground-truth labels of IMAGES (CSV or JSON, "
                                               "as clipes label reads them): the tags are scored against them."),
         dataset: Optional[str] = typer.Option(None, "--dataset", "-d", help="Instead of IMAGES: a dataset kind "
                                               "(voc, coco, folder, toy); its labels are the ground truth."),
         root: Optional[Path] = typer.Option(None, "--root", "-r", help="Dataset root (with --dataset)."),
         split: Optional[str] = typer.Option(None, "--split", "-s", help="Dataset split (with --dataset)."),
         tagger: str = TaggerOpt,
         threshold: float = typer.Option(0.05, "--threshold", help="Score a class needs (the most likely class is "
                                         "always kept): --tagger blend the geometric mean of the softmax "
                                         "probability and TagCLIP's score, --tagger global the softmax "
                                         "probability; tagclip's rule is relative."),
         model: str = ModelOpt, pretrained: Optional[str] = PretrainedOpt,
         template: Optional[List[str]] = TemplateOpt, templates: Optional[Path] = TemplatesFileOpt,
         background: str = typer.Option("voc", "--background", "-b", help="Background words TagCLIP scores beside "
                                        "the classes: voc, coco, toy, none, or a word file."),
         max_side: int = typer.Option(1024, "--max-side", help="Working-resolution cap (pixels); 0 = no cap."),
         limit: Optional[int] = typer.Option(None, "--limit", help="Tag at most N images."),
         device: str = DeviceOpt, threads: Optional[int] = ThreadsOpt) -> None:
    """Image-level tags only (no masks), scored with mAP / precision / recall / F1 when ground truth is known:
    check a CLIP on your classes before generating masks."""
    from clip_es.tag.run import TagsConfig, tag_images

    cfg = TagsConfig(out=str(out), images=str(images) if images else None, classes=classes,
                     class_file=str(class_file) if class_file else None, labels=str(labels) if labels else None,
                     dataset=dataset, root=str(root) if root else None, split=split, tagger=tagger,
                     threshold=threshold, model=model, pretrained=pretrained,
                     templates=_templates(template, templates), background=background, max_side=max_side or None,
                     device=device, threads=threads, limit=limit)
    res = tag_images(cfg)
    typer.echo(res.summary())
    if res.failed:
        raise typer.Exit(1)


# ----------------------------------------------------------------------------- show
@app.command()
def show(run: Path = typer.Option(..., "--run", help="Run folder (cam stage needed; refine and GT shown if there)."),
         out: Path = typer.Option(..., "--out", "-o", help="PNG file to write."),
         image_id: Optional[List[str]] = typer.Option(None, "--id", help="Image id (repeatable). One id with "
                                                                          "--n K: K images starting there."),
         n: int = typer.Option(1, "--n", help="Number of images (a contact sheet, one row per image)."),
         tile: int = typer.Option(200, "--tile", help="Tile width in pixels (height is 4/5 of it).")) -> None:
    """Picture of image, ground truth, pseudo mask, CRF, the trained segmenter's prediction and each class's CAM
    and CAA heatmaps, with a legend."""
    from clip_es.visualize import show_run

    typer.echo(f"wrote {show_run(run, out, ids=list(image_id) if image_id else None, n=n, tile=tile)}")


# ----------------------------------------------------------------------------- train / segment / export-onnx
@app.command()
def train(run: Path = typer.Option(..., "--run", "--run-dir", help="Run folder (cam stage, and refine unless "
                                   "--labels says otherwise). Under torchrun write --run-dir: torchrun's own parser "
                                   "rejects --run as an ambiguous prefix of its --run-path."),
          labels: str = typer.Option("refine", "--labels", help="Training masks: refine (RUN/refine/masks, 255 = "
                                     "ignored by the loss), corrected (masks stored by clipes import-masks, the "
                                     "refine mask elsewhere), crf (RUN/refine/crf), gt (dataset ground truth) or a "
                                     "folder of <id>.png."),
          name: str = typer.Option("segmenter", "--name", help="Output folder RUN/NAME and manifest stage "
                                   "(clipes eval reports every segmenter in the run)."),
          steps: Optional[int] = typer.Option(None, "--steps", help="Optimizer steps [default: the --arch's "
                                              "recipe: 2000 for fusion and zegclip]."),
          batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Images per step and process "
                                                   "[default: fusion 8, zegclip 4]."),
          crop_size: Optional[int] = typer.Option(None, "--crop-size", help="Training crop side in pixels; 0 = the "
                                                  "images' median shorter side, rounded down to 32, in 128-512 "
                                                  "[default: fusion 320, zegclip 0]."),
          lr: Optional[float] = typer.Option(None, "--lr", help="Peak AdamW learning rate [default: fusion 1e-3; "
                                             "zegclip 2e-4, ZegCLIP's 2e-5 times its lr_mult 10 on prompts and "
                                             "head]."),
          weight_decay: Optional[float] = typer.Option(None, "--weight-decay", help="AdamW weight decay, never on "
                                                       "norms and biases [default: fusion 1e-4, zegclip 0.01]."),
          schedule: Optional[str] = typer.Option(None, "--schedule", help="LR schedule after the warm-up: cosine "
                                                 "(to 0) or poly (power 0.9 to 1e-6 for zegclip, ZegCLIP's) "
                                                 "[default: fusion cosine, zegclip poly]."),
          backbone_lr_mult: float = typer.Option(1.0, "--backbone-lr-mult", help="Backbone LR multiplier "
                                                 "(e.g. 0.1 with pretrained weights)."),
          loss: Optional[str] = typer.Option(None, "--loss", help="ce (softmax cross-entropy) or sigmoid (per-class "
                                             "focal + dice, non-mutually-exclusive); default: the --arch's own."),
          arch: str = typer.Option("fusion", "--arch", help="Segmenter family: fusion (timm CNN + CLIP-text head, "
                                   "small and fast), zegclip (frozen CLIP ViT + deep prompts + decoder: classes never "
                                   "labelled), clip (training-free CLIP patch-text similarity)."),
          head: str = typer.Option("fusion", "--head", help="Head of the CNN segmenter: fusion (Jin & Yang's "
                                   "two-way fusion blocks), denseclip (DenseCLIP's context decoder + score map) "
                                   "or plain (text matching only)."),
          unseen: Optional[str] = typer.Option(None, "--unseen", help="Comma-separated classes to hold out "
                                               "(zero-shot protocol): their pixels are ignored and their names "
                                               "never reach the model; segment/eval can still ask for them."),
          transductive: bool = typer.Option(False, "--transductive", help="With --unseen: inductive until "
                                            "--self-train-from, then the unseen names join and each pixel the "
                                            "masks give to an unseen class is labelled with the unseen class "
                                            "the model scores highest there (ZegCLIP's self-training)."),
          self_train_from: float = typer.Option(0.5, "--self-train-from", help="With --transductive: fraction of "
                                                "--steps before self-training starts (1 = never: the same "
                                                "as inductive)."),
          prompts: int = typer.Option(10, "--prompts", help="zegclip: deep visual prompt tokens per block (0 = none)."),
          input_scale: Optional[int] = typer.Option(None, "--input-scale", help="zegclip and clip: the frozen ViT sees "
                                                    "each input this many times larger, a finer patch grid (time "
                                                    "and memory about scale^2); 0 = from the images: the least "
                                                    "scale giving 20 patches along their median shorter side (VOC "
                                                    "with ViT-B/16: 1, the toy world: 2) [default: zegclip 0, clip "
                                                    "1; fusion does not read it]."),
          background_query: Optional[str] = typer.Option(None, "--background-query", help="zegclip: how the "
                                                         "background is scored. text = CLIP's text of the cam "
                                                         "stage's background words (clipes cam --background; voc's "
                                                         "25 generic scene words when it had none), a pixel's "
                                                         "background score its best-matching word's; learnt = one "
                                                         "trained embedding, which can absorb unseen classes that "
                                                         "look like a background [default: text]."),
          no_relation: bool = typer.Option(False, "--no-relation", help="zegclip: class queries from the text "
                                           "alone (no relationship descriptor with the image's CLS)."),
          dense_path: str = typer.Option("value", "--dense-path", help="clip: the last block's value path "
                                         "(MaskCLIP) or the plain block."),
          backbone: str = typer.Option("resnet18", "--backbone", help="timm CNN (features_only), e.g. resnet18, "
                                       "mobilenetv3_large_100."),
          backbone_weights: Optional[Path] = typer.Option(None, "--backbone-weights", help="Local state dict of the "
                                                          "timm model (loaded with weights_only=True)."),
          backbone_pretrained: bool = typer.Option(False, "--backbone-pretrained", help="Download timm's pretrained "
                                                   "weights (needs network; default random init)."),
          dim: int = typer.Option(128, "--dim", help="Width of the stride-8 map and text tokens."),
          fusion_blocks: int = typer.Option(2, "--fusion-blocks", help="Number of fusion blocks."),
          scale_range: Optional[str] = typer.Option(None, "--scale-range", help="Random rescale range MIN,MAX "
                                                    "before cropping [default: 0.5,2.0 for fusion and zegclip]."),
          warmup: Optional[int] = typer.Option(None, "--warmup", help="Linear LR warm-up steps, at most a fifth "
                                               "of --steps [default: fusion 100, zegclip 150 (ZegCLIP's 7.5 %)]."),
          no_fusion: bool = typer.Option(False, "--no-fusion", help="Alias of --head plain: the plain "
                                         "text-matching head (use with --name segmenter_nofusion)."),
          device: str = DeviceOpt,
          seed: int = typer.Option(0, "--seed", help="Initialisation, sample order and augmentation seed."),
          workers: int = typer.Option(0, "--workers", help="Dataloader worker processes."),
          train_precision: str = typer.Option("fp32", "--precision", help="Training precision: fp32 (IEEE, no "
                                              "TF32), bf16 or fp16 autocast (fp16 with loss scaling on CUDA), or "
                                              "auto (bf16 on an Ampere+ GPU or a CPU with native bf16, else fp32). "
                                              "Pick auto on a GPU: several times faster; the resolved value is "
                                              "recorded in the checkpoint."),
          save_every: int = typer.Option(200, "--save-every", help="Checkpoint period (steps)."),
          resume: bool = typer.Option(False, "--resume", help="Continue from RUN/NAME/last.pt."),
          clip_model: Optional[str] = typer.Option(None, "--clip-model", help="CLIP to embed the classes "
                                                   "(default: the one the cam stage recorded)."),
          clip_pretrained: Optional[str] = typer.Option(None, "--clip-pretrained", help="Its pretrained tag or file."),
          threads: Optional[int] = ThreadsOpt) -> None:
    """Train a segmenter on the run's pseudo masks: the lightweight CNN + CLIP-text fusion (default) or
    ZegCLIP. Options left unset take the --arch's own recipe (shown in each option's help; recorded in
    RUN/NAME/config.json). Multi-process: torchrun --standalone --nproc_per_node N -m clip_es train
    --run-dir RUN ... (DDP; gloo on CPU, nccl on CUDA)."""
    from clip_es.train.loop import DistInfo, TrainConfig, train_segmenter

    cfg = TrainConfig(run=str(run), name=name, labels=labels, steps=steps, batch_size=batch_size,
                      crop_size=crop_size, lr=lr, weight_decay=weight_decay, backbone_lr_mult=backbone_lr_mult,
                      loss=loss, backbone=backbone, backbone_weights=str(backbone_weights) if backbone_weights else None,
                      backbone_pretrained=backbone_pretrained, dim=dim, fusion_blocks=fusion_blocks,
                      arch=arch, head="plain" if no_fusion else head, unseen=_names(unseen, "--unseen"),
                      transductive=transductive, self_train_from=self_train_from, prompts=prompts, input_scale=input_scale,
                      background_query=background_query,
                      relation=not no_relation, dense_path=dense_path, device=device, seed=seed, workers=workers, precision=train_precision, save_every=save_every, resume=resume,
                      clip_model=clip_model, clip_pretrained=clip_pretrained, warmup=warmup,
                      scale_range=_pair(scale_range, "--scale-range") if scale_range else None, schedule=schedule,
                      threads=threads)
    res = train_segmenter(cfg)
    if DistInfo.from_env().main:
        typer.echo(res.summary())


def _names(text: Optional[str], opt: str) -> tuple[str, ...]:
    """``"a, b"`` -> ``("a", "b")``; ``None`` -> ``()``."""
    if text is None:
        return ()
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    if not names:
        raise ClipEsError(f"{opt} needs comma-separated class names, got {text!r}")
    return names


def _pair(text: str, opt: str) -> tuple[float, float]:
    vals = _floats(text, opt)
    if len(vals) != 2:
        raise ClipEsError(f"{opt} must be two comma-separated numbers MIN,MAX, got {text!r}")
    return vals[0], vals[1]


@app.command()
def segment(checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", "-c", help="Segmenter checkpoint "
                                                      "(RUN/segmenter/model.pt, or last.pt)."),
            arch: Optional[str] = typer.Option(None, "--arch", help="Instead of --checkpoint: a family that needs "
                                               "no training (clip: CLIP patch-text similarity; with --classes and "
                                               "--clip-model/--clip-pretrained, default the bundled CLIP)."),
            out: Path = typer.Option(..., "--out", "-o", help="Folder for <id>.png palette predictions."),
            images: Optional[Path] = typer.Option(None, "--images", help="A folder of images to segment."),
            dataset: Optional[str] = typer.Option(None, "--dataset", "-d", help="Or a dataset kind: voc, coco, "
                                                  "folder, toy."),
            root: Optional[Path] = typer.Option(None, "--root", "-r", help="Dataset root (with --dataset)."),
            split: str = typer.Option("val", "--split", "-s", help="Dataset split (with --dataset)."),
            classes: Optional[str] = typer.Option(None, "--classes", help="Comma-separated class names to segment; "
                                                  "may include names never trained on (open vocabulary: embedded "
                                                  "with the recorded CLIP). Default: the trained classes."),
            class_file: Optional[Path] = typer.Option(None, "--class-file", help="Class file (names with synonyms) "
                                                      "instead of --classes."),
            device: str = DeviceOpt,
            limit: Optional[int] = typer.Option(None, "--limit", help="Only the first N images."),
            max_side: int = typer.Option(2048, "--max-side", help="Predict images whose longer side is above this "
                                         "on a downscaled copy (bounds memory); 0 = always native size."),
            clip_model: Optional[str] = typer.Option(None, "--clip-model", help="CLIP override for new class names "
                                                     "(with --arch: the CLIP to segment with)."),
            clip_pretrained: Optional[str] = typer.Option(None, "--clip-pretrained", help="Its pretrained tag or "
                                                          "file."),
            overlay: bool = typer.Option(False, "--overlay", help="Also write OUT/<id>.overlay.jpg: the image with "
                                         "the predicted classes' colours blended over it."),
            calibration: Optional[float] = typer.Option(None, "--calibration", help="When --classes mixes trained "
                                                        "and untrained names: lower the trained classes' scores by "
                                                        "this before the argmax (default: the family's measured "
                                                        "value)."),
            threads: Optional[int] = ThreadsOpt) -> None:
    """Predict label maps with a trained segmenter: OUT/<id>.png (0 background, k+1 = k-th class of
    OUT/classes.txt). Resumable."""
    from clip_es.train.segment import SegmentConfig, segment as run_segment

    cfg = SegmentConfig(checkpoint=str(checkpoint) if checkpoint else None, arch=arch, out=str(out),
                        images=str(images) if images else None,
                        dataset=dataset, root=str(root) if root else None, split=split, classes=classes,
                        class_file=str(class_file) if class_file else None, device=device, limit=limit,
                        clip_model=clip_model, clip_pretrained=clip_pretrained, max_side=max_side or None,
                        overlay=overlay, threads=threads, calibration=calibration)
    _finish_stage(run_segment(cfg))


@app.command("export-onnx")
def export_onnx_cmd(checkpoint: Path = typer.Option(..., "--checkpoint", "-c", help="Segmenter checkpoint "
                                                    "(RUN/segmenter/model.pt, or last.pt)."),
                    out: Path = typer.Option(..., "--out", "-o", help="ONNX file to write."),
                    classes: Optional[str] = typer.Option(None, "--classes", help="Comma-separated classes to bake "
                                                          "in (default: the trained ones)."),
                    class_file: Optional[Path] = typer.Option(None, "--class-file", help="Class file instead."),
                    height: int = typer.Option(512, "--height", help="Example input height for tracing."),
                    width: int = typer.Option(512, "--width", help="Example input width for tracing."),
                    opset: int = typer.Option(17, "--opset", help="ONNX opset."),
                    static: bool = typer.Option(False, "--static", help="Fixed input size (default: dynamic H, W)."),
                    clip_model: Optional[str] = typer.Option(None, "--clip-model", help="CLIP override for new "
                                                             "class names."),
                    clip_pretrained: Optional[str] = typer.Option(None, "--clip-pretrained", help="Its tag or file.")
                    ) -> None:
    """Export a segmenter to ONNX with its class text baked in: input image (1,3,H,W) RGB in [0,1],
    output logits (1,K+1,H,W)."""
    from clip_es.train.onnx_export import export_onnx
    from clip_es.train.segment import parse_classes

    path = export_onnx(checkpoint, out, parse_classes(classes, class_file), height=height, width=width, opset=opset,
                       dynamic=not static, clip_model=clip_model, clip_pretrained=clip_pretrained)
    typer.echo(f"wrote {path}")


# ----------------------------------------------------------------------------- entry point
def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


INTERRUPTED = "interrupted; re-run the same command to resume"
PROG = "clipes"


def _is_usage_error(e: BaseException) -> bool:
    """A click usage/parameter error, from whichever click runs the parser.

    typer 0.29+ bundles its own copy of click (``typer._click``), so ``isinstance`` against
    the separate ``click`` package no longer matches; every click copy's ``ClickException``
    has an integer ``exit_code`` and a ``show()`` that prints the usual usage paragraph.
    """
    return isinstance(getattr(e, "exit_code", None), int) and callable(getattr(e, "show", None))


def _invoke(argv: Optional[List[str]]) -> int:
    """Parse ``argv`` and run the command through click's public API (``make_context`` + ``invoke``).

    Not ``app(...)``/``main(...)``: those differ between typer versions in what they do with
    usage errors (print or raise) and Ctrl-C (typer 0.29 turns ``KeyboardInterrupt`` into a silent
    exit 130). Here every exception reaches :func:`main` as raised. Returns the exit code of a
    ``typer.Exit``/``click.exceptions.Exit`` (``--help``, ``--version``, ``_finish_stage``), else 0.
    """
    cmd = typer.main.get_command(app)
    args = sys.argv[1:] if argv is None else list(argv)
    try:
        with cmd.make_context(PROG, args) as ctx:
            cmd.invoke(ctx)
    except Exception as e:
        # click's and typer's ``Exit`` (several classes across versions): an exit code, no message
        code = getattr(e, "exit_code", None)
        if type(e).__name__ == "Exit" and isinstance(code, int):
            return code
        if _is_usage_error(e) and hasattr(e, "ctx") and e.ctx is None:
            _attach_context(e, cmd, args)
        raise
    return 0


def _attach_context(e: Exception, cmd, args: List[str]) -> None:
    """Give a usage error raised without a context (typer 0.29's parser does so for ``--opt`` missing
    its value) the context of the command ``args`` name, so ``show()`` prints the usage paragraph."""
    ctx = cmd.context_class(cmd, info_name=PROG)
    for a in args:
        sub = getattr(ctx.command, "commands", {}).get(a)
        if sub is None:
            if not a.startswith("-"):
                break
            continue
        ctx = sub.context_class(sub, info_name=a, parent=ctx)
    e.ctx = ctx  # type: ignore[attr-defined]
    e.cmd = ctx.command  # type: ignore[attr-defined]


def main(argv: Optional[List[str]] = None) -> None:
    """Console entry point: run the app, map errors to one message + exit code.

    Exit codes: 0 ok; 1 some images failed; 2 bad input or options (a usage error prints click's
    usual usage paragraph); 130 interrupted (Ctrl-C).
    """
    try:
        rc = _invoke(argv)
    except ClipEsError as e:
        if _STATE["debug"]:
            raise
        typer.echo(f"error: {_one_line(e)}", err=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        typer.echo(INTERRUPTED, err=True)
        sys.exit(130)
    except OSError as e:  # a file problem the library did not foresee: still one line, not a traceback
        if _STATE["debug"]:
            raise
        typer.echo(f"error: {_one_line(e)} (--debug shows the traceback)", err=True)
        sys.exit(2)
    except Exception as e:
        if _is_usage_error(e):  # missing/unknown option, bad value, unknown command
            e.show()  # type: ignore[attr-defined]
            sys.exit(e.exit_code)  # type: ignore[attr-defined]
        if type(e).__name__ == "Abort":  # click's/typer's Abort: EOF at a prompt
            typer.echo("aborted", err=True)
            sys.exit(130)
        raise
    if rc:
        sys.exit(rc)


if __name__ == "__main__":
    main()
