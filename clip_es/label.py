"""``clipes label``: one command from a folder of photos to segmentation masks.

::

    clipes label IMAGES --classes "cat,dog,sofa" --out OUT [--labels FILE]

IMAGES is a plain folder of images (``.jpg .jpeg .png .bmp .webp``, any case; no class
file needed; an ``images/`` sub-folder is used instead when there is one, as for the
``folder`` dataset). Any file name works: the image id is the name without its
extension (``chien café.jpg`` -> ``chien café``), and every output keeps it.

Image-level labels come from ``--labels FILE`` (CSV ``image,label1;label2`` or JSON
``{"image": ["label", ...]}``, as the ``folder`` dataset reads them; see data/README.md),
or, without it, from CLIP's zero-shot tags over the class list (``--tagger``, see
:mod:`clip_es.tag`): ``global`` is one softmax over the classes of the whole
image, a class kept when its probability is at least ``threshold`` (default
:data:`~clip_es.model.zeroshot.ZERO_SHOT_THRESHOLD`); ``tagclip`` scores every patch and
looks again at each candidate's crop, so small objects beside large ones are found;
``blend`` (default) keeps a class when the geometric mean of the two scores is at least
``threshold``. The most likely class is always kept. The predictions are written to ``OUT/labels_zeroshot.csv`` (with every
score in ``OUT/labels_zeroshot_scores.json``; for TagCLIP also each class's local and crop
score): review and correct that file, then pass it back with ``--labels`` into the same OUT;
only the images whose labels changed are computed again. TagCLIP's text embeddings are
cached in ``OUT/tag_text.npz``.

Then the cam and refine stages run into OUT (a normal run folder: ``clipes show``,
``clipes train``, ``clipes eval`` work on it), and the pseudo masks are exported as
palette PNGs (``OUT/masks/<id>.png`` with ``classes.txt``) and as one COCO file
(``OUT/annotations.json``). Re-running the same command resumes.

The library function is :func:`label_folder`; the command line is a thin wrapper.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import shlex
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from clip_es.data.base import ClassSpec, check_id, read_class_file, write_class_file
from clip_es.data.folder import FolderDataset, printable_name, scan_images
from clip_es.errors import ConfigError, DatasetError, RunDirError
from clip_es.export import ExportResult, export_run
from clip_es.model.text import DEFAULT_TEMPLATE, check_templates
from clip_es.model.zeroshot import ZERO_SHOT_THRESHOLD
from clip_es.rundir import RunDir, atomic_write_bytes, atomic_write_json
from clip_es.stage import StageResult
from clip_es.tag.registry import DEFAULT_TAGGER, check_tagger

log = logging.getLogger(__name__)

#: Files ``label_folder`` writes at the top of OUT.
CLASS_FILE = "classes.txt"
ZERO_SHOT_LABELS = "labels_zeroshot.csv"
ZERO_SHOT_SCORES = "labels_zeroshot_scores.json"
RECORD = "label.json"
#: The labels the stages read (written by ``label_folder`` from ``--labels`` or the zero-shot
#: file): one fixed path, so a corrected labels file re-runs only the images it changes.
LABELS_USED = "labels_used.json"
PNG_DIR = "masks"
COCO_FILE = "annotations.json"


@dataclass(frozen=True)
class LabelConfig:
    """Options of ``clipes label``.

    Attributes:
        images: folder of images (an ``images/`` sub-folder is used when present).
        out: run folder (created; re-running resumes).
        classes: comma-separated class names (``"cat,dog,sofa"``); or ``class_file``: a
            class file (one class per line, synonyms after the name). Exactly one of them.
        labels: image-level labels file (CSV or JSON); ``None`` = CLIP's zero-shot tags.
        tagger: which zero-shot tagger guesses the labels (:data:`~clip_es.tag.registry.TAGGERS`):
            ``blend`` (default: the global softmax and TagCLIP must agree), ``global`` (one
            softmax, the cheapest; misses small objects beside large ones) or ``tagclip``.
            See :data:`~clip_es.tag.registry.DEFAULT_TAGGER` for why.
        threshold: the presence threshold (the most likely class is always kept): ``blend``
            on the geometric mean of the two scores, ``global`` on the softmax probability.
            TagCLIP's rule is relative (above the middle of the image's score range) and does
            not read it.
        model, pretrained: the CLIP (see :func:`clip_es.model.load_clip`).
        templates: prompt templates (several are averaged).
        background: background words for the cam stage (``voc``, ``coco``, ``none`` or a word
            file). Default ``voc``: CLIP-ES's 25 generic scene words (ground, grass, sky, water,
            road, wall, ...), which suit everyday photos; on the toy world they score as well as
            the toy's own set (CAM/CAA 58.7/55.1 on toy val) and ``none`` scores 44.2/40.3.
        conf: refine confidence threshold (pixels below it become 255, "ignore").
        max_side: working-resolution cap (pixels) of cam, zero-shot and refine; ``None`` = none.
        workers: refine processes (``None`` = the thread budget; never more than it).
        device: ``cpu``, ``cuda`` or ``auto``.
        precision, batch_size, threads: the cam stage's speed options (see :class:`CamConfig`);
            ``threads`` also bounds refine.
        cam_workers: the cam stage's loader processes (``auto``: 0 on a CPU, several on CUDA;
            see :func:`clip_es.cam.run.resolve_workers`).
    """

    images: str
    out: str
    classes: str | None = None
    class_file: str | None = None
    labels: str | None = None
    tagger: str = DEFAULT_TAGGER
    threshold: float = ZERO_SHOT_THRESHOLD
    model: str = "clipes-tiny"
    pretrained: str | None = None
    templates: tuple[str, ...] = (DEFAULT_TEMPLATE,)
    background: str = "voc"
    conf: float = 0.95
    max_side: int | None = 1024
    workers: int | None = None
    device: str = "auto"
    precision: str = "auto"
    batch_size: int = 1
    cam_workers: int | str = "auto"
    threads: int | None = None

    def validate(self) -> "LabelConfig":
        if bool(self.classes) == bool(self.class_file):
            raise ConfigError("pass the class list with either --classes \"cat,dog\" or --class-file FILE "
                              "(exactly one of them)")
        check_tagger(self.tagger)
        if not 0.0 < self.threshold <= 1.0:
            raise ConfigError(f"--threshold must be in (0, 1], got {self.threshold}")
        if not 0.0 <= self.conf <= 1.0:
            raise ConfigError(f"--conf must be in [0, 1], got {self.conf}")
        if self.max_side is not None and self.max_side < 1:
            raise ConfigError(f"--max-side must be a positive number of pixels, got {self.max_side}")
        if self.workers is not None and self.workers < 1:
            raise ConfigError(f"--workers must be at least 1, got {self.workers}")
        check_templates(self.templates)
        from clip_es.cam.run import resolve_workers

        resolve_workers(self.cam_workers, "cpu")
        if not Path(self.images).is_dir():
            raise DatasetError(f"IMAGES {self.images} is not a folder; pass the folder that holds your images")
        if self.labels is not None and not Path(self.labels).is_file():
            raise DatasetError(f"--labels {self.labels} does not exist; pass a CSV or JSON labels file, or leave "
                               "--labels out to let CLIP predict the labels")
        if Path(self.out).exists() and not Path(self.out).is_dir():
            raise ConfigError(f"--out {self.out} exists and is not a folder; pass a folder for the run")
        return self

    def class_list(self) -> list[ClassSpec]:
        """The classes from ``classes`` or ``class_file``."""
        if self.class_file:
            return read_class_file(self.class_file)
        names = [c.strip() for c in (self.classes or "").split(",") if c.strip()]
        if not names:
            raise ConfigError(f"--classes needs comma-separated class names, got {self.classes!r}")
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ConfigError(f"--classes lists {', '.join(dup)} twice; name each class once")
        return [ClassSpec(n) for n in names]


@dataclass
class LabelResult:
    """What :func:`label_folder` did and where everything is."""

    run: str
    images: int
    labels_file: str
    labels_source: str  # "file" or "zero-shot"
    left_out: dict[str, str] = field(default_factory=dict)
    recomputed: list[str] = field(default_factory=list)
    cam: StageResult | None = None
    refine: StageResult | None = None
    png: ExportResult | None = None
    coco: ExportResult | None = None

    @property
    def ok(self) -> bool:
        return (not self.left_out and self.png is not None
                and all(r is None or r.ok for r in (self.cam, self.refine)))

    def summary(self) -> str:
        """Lines for the terminal: stages, then where every output is."""
        out = Path(self.run)
        lines = []
        if self.left_out:
            lines.append(f"{len(self.left_out)} file(s) left out:")
            lines += [f"  {reason}" for reason in list(self.left_out.values())[:5]]
            if len(self.left_out) > 5:
                lines.append(f"  ... and {len(self.left_out) - 5} more")
        if self.recomputed:
            lines.append(f"labels changed for {len(self.recomputed)} image(s); their masks were computed again")
        for r in (self.cam, self.refine):
            if r is not None:
                lines.append(r.summary())
        lines.append("")
        src = ("predicted by CLIP (zero-shot): review and correct it, then re-run with --labels "
               f"{self.labels_file}" if self.labels_source == "zero-shot" else "from your labels file")
        lines.append(f"labels       {self.labels_file}  ({src})")
        if self.png is not None:
            lines.append(f"masks (PNG)  {self.png.path}/<id>.png  ({self.png.images} images; 0 background, "
                         f"k = k-th line of {Path(self.png.path) / 'classes.txt'}, 255 unsure)")
        if self.png is None:
            lines.append(f"masks        none: no image got a mask (failures: {out / 'manifest.json'})")
        if self.coco is not None:
            lines.append(f"masks (COCO) {self.coco.path}  ({self.coco.images} images, {self.coco.annotations} "
                         "annotations, RLE)")
        lines.append(f"run folder   {out}  (look: clipes show --run {out} --n 8 --out {out / 'sheet.png'})")
        return "\n".join(lines)


# ----------------------------------------------------------------------------- labels
def _labels_csv(rows: list[tuple[str, list[str]]], header: str) -> bytes:
    """A labels CSV the folder dataset reads: comment lines, ``image,labels``, then one row per image.

    File names are quoted when the CSV needs it, and always when they start with ``#``
    (an unquoted ``#`` starts a comment).
    """
    buf = io.StringIO()
    for line in header.splitlines():
        buf.write(f"# {line}\n")
    buf.write("image,labels\n")
    w = csv.writer(buf, lineterminator="\n")
    for name, labels in rows:
        if name.startswith("#"):
            buf.write('"' + name.replace('"', '""') + '",' + ";".join(labels) + "\n")
        else:
            w.writerow([name, ";".join(labels)])
    return buf.getvalue().encode("utf-8")


def predict_zero_shot(clip, images: list[tuple[str, Path]], classes: list[ClassSpec],
                      templates: tuple[str, ...] = (DEFAULT_TEMPLATE,), threshold: float = ZERO_SHOT_THRESHOLD,
                      max_side: int | None = 1024, progress: bool = True, tagger: str = "global",
                      background: str = "voc", cache_dir: str | Path | None = None
                      ) -> tuple[dict[str, tuple[int, ...]], dict[str, list[float]], dict[str, str]]:
    """CLIP's zero-shot tags for each image (see :func:`predict_tags`; default the global tagger).

    Returns:
        ``(labels, scores, failed)``: id -> sorted class indices, id -> per-class scores
        (the global tagger: softmax probabilities), id -> reason for images that could not be read.
    """
    labels, results, failed, _ = predict_tags(clip, images, classes, tagger, templates, threshold, max_side,
                                              background, cache_dir, progress)
    return labels, {i: [round(float(v), 6) for v in r.scores] for i, r in results.items()}, failed


def predict_tags(clip, images: list[tuple[str, Path]], classes: list[ClassSpec], tagger: str = DEFAULT_TAGGER,
                 templates: tuple[str, ...] = (DEFAULT_TEMPLATE,), threshold: float = ZERO_SHOT_THRESHOLD,
                 max_side: int | None = 1024, background: str = "voc", cache_dir: str | Path | None = None,
                 progress: bool = True):
    """Zero-shot tags of image files with a tagger of :data:`~clip_es.tag.registry.TAGGERS`.

    Returns:
        ``(labels, results, failed, rule)``: id -> sorted class indices, id -> :class:`~clip_es.tag.base.TagResult`,
        id -> reason for images that could not be read, and the tagger's rule in words (its ``describe()``).
    """
    from clip_es.data.classes import background_words
    from clip_es.data.image_io import read_image
    from clip_es.tag.registry import build_tagger

    tg = build_tagger(tagger, clip, classes, templates=templates, background=background_words(background),
                      threshold=threshold, max_side=max_side, cache_dir=cache_dir)
    labels: dict[str, tuple[int, ...]] = {}
    results = {}
    failed: dict[str, str] = {}
    for image_id, path in tqdm(images, desc=f"zero-shot labels ({tagger})", unit="img", disable=not progress):
        try:
            r = tg.tag(read_image(path))
        except DatasetError as e:
            failed[image_id] = str(e)
            log.warning("%s", e)
            continue
        labels[image_id] = r.keys
        results[image_id] = r
    return labels, results, failed, tg.describe()


def _rounded(values, names: list[str]) -> dict[str, float | None]:
    """name -> score rounded to 6 digits (``None`` for NaN: a part not computed for that class)."""
    return {n: (None if v != v else round(float(v), 6)) for n, v in zip(names, values)}


def score_tables(results: dict, names: list[str]) -> dict[str, dict[str, dict[str, float | None]]]:
    """The review file's score tables of tag ``results`` (id -> :class:`~clip_es.tag.base.TagResult`):
    ``images`` (each class's score) and each score part a tagger gives (TagCLIP: ``local``, ``crop``)."""
    tables = {"images": {i: _rounded(r.scores, names) for i, r in results.items()}}
    for part in sorted({p for r in results.values() for p in r.parts}):
        tables[part] = {i: _rounded(r.parts[part], names) for i, r in results.items() if part in r.parts}
    return tables


def _read_labels(root: Path, labels_file: Path, class_file: Path) -> dict[str, list[str]]:
    """id -> class names from a labels file (validated by the folder dataset's reader)."""
    ds = FolderDataset(root, str(labels_file), class_file=class_file)
    names = [c.name for c in ds.classes]
    return {i: [names[k] for k in ds.labels(i)] for i in ds.ids()}


def _class_option(cfg: LabelConfig) -> str:
    if cfg.class_file:
        return f"--class-file {shlex.quote(str(cfg.class_file))}"
    return f"--classes {shlex.quote(cfg.classes or '')}"


def _forget(run: Path, image_id: str) -> None:
    """Delete one image's cam and refine outputs so the next stages compute it again."""
    from clip_es.refine.store import CONF, CRF, MASKS, output_path

    check_id(image_id, str(run))
    targets = [run / "cam" / f"{image_id}.npz"] + [output_path(run, k, image_id) for k in (MASKS, CRF, CONF)]
    targets += [run / PNG_DIR / f"{image_id}.png"]
    for p in targets:
        p.unlink(missing_ok=True)


def write_zero_shot_files(out: Path, found: list[tuple[str, Path]], table: dict[str, list[str]], results: dict,
                          names: list[str], tagger: str, rule: str, threshold: float, model_name: str,
                          header: str) -> None:
    """Write ``OUT/labels_zeroshot.csv`` (every image of ``table``) and update the scores file with ``results``.

    The scores file keeps what earlier runs wrote for other images: ``images`` (each class's
    score), for TagCLIP ``local`` and ``crop`` (``null`` where CWR did not look), and the rule.
    """
    scores_path = out / ZERO_SHOT_SCORES
    scores = json.loads(scores_path.read_text(encoding="utf-8")) if scores_path.is_file() else {}
    for key, per_image in score_tables(results, names).items():
        scores.setdefault(key, {}).update(per_image)
    scores.update({"tagger": tagger, "threshold": threshold, "model": model_name, "rule": rule})
    file_of = {i: p.name for i, p in found}
    rows = [(file_of.get(i, i), table[i]) for i in sorted(table, key=lambda i: file_of.get(i, i))]
    atomic_write_bytes(out / ZERO_SHOT_LABELS, _labels_csv(rows, header))
    atomic_write_bytes(scores_path, json.dumps(scores, indent=1, ensure_ascii=False).encode("utf-8"))


# ----------------------------------------------------------------------------- the command
def label_folder(cfg: LabelConfig, clip=None, progress: bool = True) -> LabelResult:
    """Label a folder of images: labels (given or zero-shot), cam, refine, PNG and COCO export.

    Args:
        cfg: the options.
        clip: an already loaded CLIP to use instead of loading ``cfg.model``.
        progress: show progress bars.

    Returns:
        A :class:`LabelResult` (per-image failures are listed in it and in OUT/manifest.json).

    Raises:
        ConfigError: bad options, or OUT was made with another class list.
        DatasetError: no usable image in IMAGES, or a malformed labels or class file.
        WeightsError: the CLIP cannot be loaded.
    """
    from clip_es.cam.run import CamConfig, generate_cams
    from clip_es.model.resolve import load_clip
    from clip_es.refine.run import RefineConfig, refine_masks
    from clip_es.stage import resolve_device

    cfg = cfg.validate()
    classes = cfg.class_list()
    root = Path(cfg.images)
    images_dir = root / "images" if (root / "images").is_dir() else root
    found, left_out = scan_images(images_dir)
    if not found:
        why = f" (left out: {'; '.join(list(left_out.values())[:3])})" if left_out else ""
        raise DatasetError(f"{images_dir} holds no images (.jpg .jpeg .png .bmp .webp){why}; pass the folder "
                           "that holds your photos")
    out = Path(cfg.out)
    if out.resolve() in (root.resolve(), images_dir.resolve()):
        raise ConfigError(f"--out {out} is the image folder; pass another folder for the run (e.g. {root}-labelled)")
    class_file = out / CLASS_FILE
    rec_path = out / RECORD
    old = json.loads(rec_path.read_text(encoding="utf-8")) if rec_path.is_file() else None
    want = [[c.name, *c.synonyms] for c in classes]
    if old is not None and old.get("classes") != want:
        raise ConfigError(f"{out} was labelled with the classes {[c[0] for c in old.get('classes', [])]}; "
                          "a different class list needs a new --out folder")
    if old is None and (out / "manifest.json").is_file():
        raise RunDirError(f"{out} already holds a run not made by 'clipes label'; pass a new --out folder")
    names = [c.name for c in classes]
    zs_file = out / ZERO_SHOT_LABELS
    with tempfile.TemporaryDirectory() as tmp:  # labels checked before OUT is touched or the CLIP loaded
        write_class_file(Path(tmp) / CLASS_FILE, classes)
        if cfg.labels is not None:
            labels_file, source = Path(cfg.labels).resolve(), "file"
            table = _read_labels(root, labels_file, Path(tmp) / CLASS_FILE)
        else:
            labels_file, source = zs_file.resolve(), "zero-shot"
            table = _read_labels(root, labels_file, Path(tmp) / CLASS_FILE) if zs_file.is_file() else {}
    if cfg.labels is not None:
        missing = [i for i, _ in found if i not in table]
        if missing:
            log.warning("%d image(s) in %s are not in %s and are not labelled (e.g. %s)", len(missing), images_dir,
                        labels_file, printable_name(missing[0]))
    out.mkdir(parents=True, exist_ok=True)
    write_class_file(class_file, classes)

    clip = clip or load_clip(cfg.model, cfg.pretrained, device=resolve_device(cfg.device))
    if cfg.labels is None:
        todo = [(i, p) for i, p in found if i not in table]
        scores_path = out / ZERO_SHOT_SCORES
        scores = json.loads(scores_path.read_text(encoding="utf-8")) if scores_path.is_file() else {}
        if todo and table and scores.get("tagger", "global") != cfg.tagger:
            log.warning("%s holds labels guessed by the %s tagger; only the %d new image(s) are tagged with %s "
                        "(a new --out re-tags every image)", zs_file, scores.get("tagger", "global"), len(todo),
                        cfg.tagger)
        if todo:  # new images (or a first run): predict them, keep what the file already says
            pred, results, failed, rule = predict_tags(clip, todo, classes, cfg.tagger, cfg.templates,
                                                       cfg.threshold, cfg.max_side, cfg.background, out, progress)
            left_out.update(failed)
            for i, ks in pred.items():
                table[i] = [names[k] for k in ks]
            how = "relative rule" if cfg.tagger == "tagclip" else f"threshold {cfg.threshold}"
            model_name = clip.describe().get("name", cfg.model)
            header = (f"Labels predicted by CLIP ({model_name}, zero-shot, tagger {cfg.tagger}, {how}).\n"
                      f"Review and correct them, then run: clipes label {shlex.quote(str(cfg.images))} "
                      f"{_class_option(cfg)} --labels {shlex.quote(str(labels_file))} "
                      f"--out {shlex.quote(str(cfg.out))}\n"
                      f"Scores per class: {scores_path.name}")
            write_zero_shot_files(out, found, table, results, names, cfg.tagger, rule, cfg.threshold, model_name,
                                  header)
    # images whose labels differ from the ones their outputs were made with are computed again
    before = (old or {}).get("labels", {})
    recomputed = sorted(i for i in before if table.get(i) != before[i])
    for image_id in recomputed:
        _forget(out, image_id)
    if recomputed:
        log.info("labels changed for %d image(s); recomputing them", len(recomputed))
    file_of = {i: p.name for i, p in found}
    used = out / LABELS_USED
    atomic_write_bytes(used, json.dumps({file_of.get(i, i): table[i] for i in table}, indent=1,
                                        ensure_ascii=False).encode("utf-8"))
    atomic_write_json(rec_path, {"images": str(images_dir.resolve()), "classes": want,
                                 "labels_file": str(labels_file), "labels_source": source, "labels": table})

    res = LabelResult(str(out), len(found), str(labels_file), source, left_out, recomputed)
    res.cam = generate_cams(CamConfig(dataset="folder", root=str(root.resolve()), split=str(used.resolve()),
                                      out=str(out), class_file=str(class_file.resolve()), model=cfg.model,
                                      pretrained=cfg.pretrained, templates=cfg.templates,
                                      background=cfg.background, max_side=cfg.max_side, device=cfg.device,
                                      precision=cfg.precision, batch_size=cfg.batch_size, workers=cfg.cam_workers,
                                      threads=cfg.threads),
                            clip=clip, progress=progress)
    res.refine = refine_masks(RefineConfig(run=str(out), conf=cfg.conf, max_side=cfg.max_side, workers=cfg.workers,
                                           save_conf=True,  # confidence per mask and image in the exports
                                           threads=cfg.threads), progress=progress)
    from clip_es.refine.store import MASKS, output_ids

    if not output_ids(RunDir(out), MASKS):  # every image failed: nothing to export (the failures are listed)
        log.warning("no image got a mask; nothing exported (see %s)", out / "manifest.json")
        return res
    res.png = export_run(out, "png", out / PNG_DIR, progress=progress)
    res.coco = export_run(out, "coco", out / COCO_FILE, progress=progress)
    return res
