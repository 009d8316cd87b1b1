"""``clipes``: the command line. Thin: parse options, build a config, call one library
function, turn known errors into a one-line message and an exit code.

Exit codes: 0 ok; 1 the stage finished but some images failed (listed in the run
manifest); 2 bad input or options (one-line message; ``--debug`` shows the traceback).
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import List, Optional

import typer

from clip_es.errors import ClipEsError

app = typer.Typer(
    help="CLIP-ES: pixel-accurate pseudo segmentation masks from image-level labels with a frozen CLIP, "
         "and a small segmenter trained on them. Stages cache to a run folder; re-running resumes.",
    no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
toy_app = typer.Typer(help="The procedural toy world (exact ground truth, for testing the pipeline).",
                      no_args_is_help=True)
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
TemplateOpt = typer.Option(None, "--template", "-t", help="Prompt template with one {} (repeatable; several are "
                                                          "averaged). Default: 'a clean origami {}.'")
TemplatesFileOpt = typer.Option(None, "--templates", help="File with one template per line (adds to --template).")
DeviceOpt = typer.Option("auto", "--device", help="cpu, cuda or auto (cuda when available).")


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors."),
          verbose: bool = typer.Option(False, "--verbose", "-v", help="Log progress details.")) -> None:
    _STATE["debug"] = debug
    _setup_logging(verbose)


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
        class_file: Optional[Path] = ClassFileOpt, model: str = ModelOpt, pretrained: Optional[str] = PretrainedOpt,
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
        device: str = DeviceOpt,
        limit: Optional[int] = typer.Option(None, "--limit", help="Only the first N images of the split."),
        shard: str = typer.Option("0/1", "--shard", help="I/N: process every N-th image starting at I.")) -> None:
    """Softmax-GradCAM + CAA maps for every image of a split, cached per image in OUT/cam/."""
    from clip_es.cam.run import CamConfig, generate_cams

    cfg = CamConfig(dataset=dataset, root=str(root), split=split, out=str(out),
                    class_file=str(class_file) if class_file else None, model=model, pretrained=pretrained,
                    templates=_templates(template, templates), fusion=fusion, background=background,
                    scales=_floats(scales, "--scales"), flip=flip, softmax=not no_softmax, caa=not no_caa,
                    caa_threshold=caa_threshold, device=device, limit=limit, shard=_parse_shard(shard))
    _finish_stage(generate_cams(cfg))


def _floats(text: str, opt: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ClipEsError(f"{opt} must be comma-separated numbers, got {text!r}") from None


# ----------------------------------------------------------------------------- eval
@app.command("eval")
def eval_cmd(run: Path = typer.Option(..., "--run", help="Run folder to evaluate."),
             alpha: float = typer.Option(1.0, "--alpha", help="Background power: bg = (1 - max score) ** alpha."),
             stage: Optional[List[str]] = typer.Option(None, "--stage", help="Only this stage (repeatable)."),
             split: Optional[str] = typer.Option(None, "--split", help="Split for the segmenter (default val)."),
             limit: Optional[int] = typer.Option(None, "--limit", help="Only the first N images per stage."),
             as_json: bool = typer.Option(False, "--json", help="Print JSON instead of the table.")) -> None:
    """Per-class IoU and mIoU against ground truth for every stage in RUN (saved to RUN/eval.json)."""
    from clip_es.evaluate import EvalOptions, evaluate_run, format_report

    rep = evaluate_run(run, EvalOptions(alpha=alpha, stages=tuple(stage) if stage else None, split=split,
                                        limit=limit))
    typer.echo(json.dumps(rep, indent=2) if as_json else format_report(rep))


# ----------------------------------------------------------------------------- entry point
def main(argv: Optional[List[str]] = None) -> None:
    """Console entry point: run the app, map library errors to one line + exit code."""
    try:
        app(args=argv, standalone_mode=False)
    except ClipEsError as e:
        if _STATE["debug"]:
            raise
        typer.echo(f"error: {e}", err=True)
        sys.exit(e.exit_code)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort:
        typer.echo("aborted", err=True)
        sys.exit(130)
    except KeyboardInterrupt:
        typer.echo("interrupted; re-run the same command to resume", err=True)
        sys.exit(130)
    except Exception as e:  # click usage errors come through here in non-standalone mode
        import click

        if isinstance(e, click.ClickException):
            e.show()
            sys.exit(e.exit_code)
        raise


if __name__ == "__main__":
    main()
