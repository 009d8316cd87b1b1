"""``clipes tags``: image-level tags only, for a folder or a dataset, scored against the
ground truth when there is some, so a CLIP can be checked on a class list before any
mask is made.

::

    clipes tags IMAGES --classes "cat,dog" [--labels truth.csv] --out OUT
    clipes tags --dataset toy --root data/toy --split val --out OUT

Writes ``OUT/tags.csv`` (the labels CSV ``clipes label --labels`` reads), ``OUT/tags_scores.json``
(every class's score, TagCLIP's local and crop parts), ``OUT/tag_text.npz`` (the cached text
embeddings) and, with ground truth, ``OUT/tags_metrics.json`` (mAP, precision, recall, F1).
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm import tqdm

from clip_es.errors import ConfigError, DatasetError
from clip_es.model.text import DEFAULT_TEMPLATE, check_templates
from clip_es.model.zeroshot import ZERO_SHOT_THRESHOLD
from clip_es.tag.registry import DEFAULT_TAGGER, check_tagger

log = logging.getLogger(__name__)

TAGS_FILE = "tags.csv"
SCORES_FILE = "tags_scores.json"
METRICS_FILE = "tags_metrics.json"


@dataclass(frozen=True)
class TagsConfig:
    """Options of ``clipes tags``.

    Attributes:
        out: folder for the tags, scores, metrics and the text cache (created).
        images: a folder of images (an ``images/`` sub-folder is used when present); with
            ``classes`` or ``class_file``. Or ``dataset`` + ``root`` + ``split``: a registered
            dataset (its classes and image-level labels, the labels as ground truth).
        labels: ground-truth labels file (CSV or JSON) of ``images`` (optional).
        tagger: ``blend``, ``tagclip`` or ``global`` (:data:`~clip_es.tag.registry.TAGGERS`).
        threshold: the global tagger's probability threshold.
        templates: the global tagger's class prompts (TagCLIP uses its 85 templates).
        background: background words TagCLIP scores beside the classes (``voc``, ``coco``,
            ``toy``, ``none`` or a word file).
        limit: tag at most this many images (``None``: all).
    """

    out: str
    images: str | None = None
    classes: str | None = None
    class_file: str | None = None
    labels: str | None = None
    dataset: str | None = None
    root: str | None = None
    split: str | None = None
    tagger: str = DEFAULT_TAGGER
    threshold: float = ZERO_SHOT_THRESHOLD
    model: str = "clipes-tiny"
    pretrained: str | None = None
    templates: tuple[str, ...] = (DEFAULT_TEMPLATE,)
    background: str = "voc"
    max_side: int | None = 1024
    device: str = "auto"
    threads: int | None = None
    limit: int | None = None

    def validate(self) -> "TagsConfig":
        check_tagger(self.tagger)
        check_templates(self.templates)
        if (self.images is None) == (self.dataset is None):
            raise ConfigError("pass either IMAGES (a folder, with --classes or --class-file) or --dataset KIND "
                              "--root ROOT --split SPLIT")
        if self.dataset is not None and (not self.root or not self.split):
            raise ConfigError("--dataset needs --root and --split")
        if self.images is not None:
            if bool(self.classes) == bool(self.class_file):
                raise ConfigError("with IMAGES pass the class list with either --classes \"cat,dog\" or "
                                  "--class-file FILE (exactly one of them)")
            if not Path(self.images).is_dir():
                raise DatasetError(f"IMAGES {self.images} is not a folder; pass the folder that holds your images")
            if self.labels is not None and not Path(self.labels).is_file():
                raise DatasetError(f"--labels {self.labels} does not exist; pass a CSV or JSON labels file (the "
                                   "ground truth), or leave it out to tag without scoring")
        elif self.labels or self.classes or self.class_file:
            raise ConfigError("--labels and --classes go with IMAGES; a --dataset brings its own")
        if not 0.0 < self.threshold <= 1.0:
            raise ConfigError(f"--threshold must be in (0, 1], got {self.threshold}")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"--limit must be at least 1, got {self.limit}")
        if Path(self.out).exists() and not Path(self.out).is_dir():
            raise ConfigError(f"--out {self.out} exists and is not a folder; pass a folder")
        return self


@dataclass
class TagsResult:
    """What :func:`tag_images` did."""

    out: str
    tagger: str
    images: int
    seconds: float
    text_seconds: float
    metrics: dict | None = None
    failed: dict[str, str] = field(default_factory=dict)

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else float("nan")

    def summary(self) -> str:
        out = Path(self.out)
        lines = [f"tagged {self.images} image(s) with {self.tagger} in {self.seconds:.1f} s "
                 f"({self.images_per_second:.2f} img/s; text embeddings {self.text_seconds:.1f} s)"]
        if self.failed:
            lines.append(f"{len(self.failed)} image(s) could not be read (e.g. {next(iter(self.failed.values()))})")
        m = self.metrics
        if m:
            lines.append(f"against ground truth ({m['images']} images): mAP {100 * m['map']:.1f}  precision "
                         f"{100 * m['precision']:.1f}  recall {100 * m['recall']:.1f}  F1 {100 * m['f1']:.1f}  "
                         f"exact {100 * m['exact']:.1f} %")
        else:
            lines.append("no ground truth: pass --labels (or a --dataset) to score the tags")
        lines.append(f"tags         {out / TAGS_FILE}  (clipes label ... --labels {out / TAGS_FILE})")
        lines.append(f"scores       {out / SCORES_FILE}")
        if m:
            lines.append(f"metrics      {out / METRICS_FILE}")
        return "\n".join(lines)


def _sources(cfg: TagsConfig, tmp: Path):
    """``(classes, [(id, path or None)], loader(id) -> image, truth {id: keys} or None)``."""
    from clip_es.data.image_io import read_image

    if cfg.dataset is not None:
        from clip_es.data.registry import open_dataset

        ds = open_dataset(cfg.dataset, cfg.root, cfg.split)
        ids = ds.ids()
        return ds.classes, [(i, None) for i in ids], ds.load_image, {i: tuple(ds.labels(i)) for i in ids}
    from clip_es.data.base import write_class_file
    from clip_es.data.folder import FolderDataset, scan_images
    from clip_es.label import LabelConfig

    classes = LabelConfig(images=cfg.images, out=cfg.out, classes=cfg.classes, class_file=cfg.class_file).class_list()
    root = Path(cfg.images)
    images_dir = root / "images" if (root / "images").is_dir() else root
    found, _ = scan_images(images_dir)
    if not found:
        raise DatasetError(f"{images_dir} holds no images (.jpg .jpeg .png .bmp .webp)")
    truth = None
    if cfg.labels is not None:
        write_class_file(tmp / "classes.txt", classes)
        ds = FolderDataset(root, str(Path(cfg.labels).resolve()), class_file=tmp / "classes.txt")
        truth = {i: tuple(ds.labels(i)) for i in ds.ids()}
    paths = dict(found)
    return classes, found, lambda i: read_image(paths[i]), truth


def tag_images(cfg: TagsConfig, clip=None, progress: bool = True) -> TagsResult:
    """Tag every image of a folder or dataset; score the tags when ground truth is known.

    Raises:
        ConfigError: bad options (an unknown tagger lists the valid ones).
        DatasetError: no usable images, or malformed labels/class files.
        WeightsError: the CLIP cannot be loaded.
    """
    import numpy as np

    from clip_es.data.classes import background_words
    from clip_es.label import _labels_csv, score_tables
    from clip_es.model.resolve import load_clip
    from clip_es.rundir import atomic_write_bytes, atomic_write_json
    from clip_es.stage import resolve_device
    from clip_es.tag.metrics import tag_metrics
    from clip_es.tag.registry import build_tagger
    from clip_es.threads import use_threads

    cfg = cfg.validate()
    with tempfile.TemporaryDirectory() as tmp:
        classes, items, load, truth = _sources(cfg, Path(tmp))
    items = items[:cfg.limit] if cfg.limit else items
    names = [c.name for c in classes]
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    with use_threads(cfg.threads):
        clip = clip or load_clip(cfg.model, cfg.pretrained, device=resolve_device(cfg.device))
        t0 = time.perf_counter()
        tagger = build_tagger(cfg.tagger, clip, classes, templates=cfg.templates,
                              background=background_words(cfg.background), threshold=cfg.threshold,
                              max_side=cfg.max_side, cache_dir=out)
        text_seconds = getattr(tagger, "text_info", {}).get("seconds", time.perf_counter() - t0)
        results, failed = {}, {}
        t0 = time.perf_counter()
        for image_id, _ in tqdm(items, desc=f"tags ({cfg.tagger})", unit="img", disable=not progress):
            try:
                results[image_id] = tagger.tag(load(image_id))
            except DatasetError as e:
                failed[image_id] = str(e)
                log.warning("%s", e)
        seconds = time.perf_counter() - t0
    file_of = {i: (p.name if p is not None else i) for i, p in items}
    rows = [(file_of[i], [names[k] for k in r.keys]) for i, r in results.items()]
    atomic_write_bytes(out / TAGS_FILE, _labels_csv(rows, f"Tags predicted by CLIP ({clip.name}, tagger "
                                                          f"{cfg.tagger}). Pass to clipes label --labels."))
    scores = {"tagger": cfg.tagger, "model": clip.name, "rule": tagger.describe(), **score_tables(results, names)}
    atomic_write_bytes(out / SCORES_FILE, json.dumps(scores, indent=1, ensure_ascii=False).encode("utf-8"))
    res = TagsResult(str(out), cfg.tagger, len(results), seconds, float(text_seconds), failed=failed)
    scored = [i for i in results if truth is not None and i in truth]
    if scored:
        res.metrics = tag_metrics(np.stack([results[i].scores for i in scored]), [results[i].keys for i in scored],
                                  [truth[i] for i in scored], names)
        atomic_write_json(out / METRICS_FILE, {**res.metrics, "tagger": cfg.tagger, "model": clip.name,
                                               "images_per_second": res.images_per_second,
                                               "text_seconds": res.text_seconds, "config": asdict(cfg)})
    return res


# ----------------------------------------------------------------------------- the recipes' [label] stage
@dataclass(frozen=True)
class LabelStageConfig:
    """The ``[label]`` stage of a recipe: zero-shot labels for a folder dataset that has none.

    The images of ROOT (``images/`` when present) are tagged into ``OUT/labels_zeroshot.csv``
    (with ``labels_zeroshot_scores.json`` and the cached text embeddings), and the ``[cam]``
    stage reads its labels from that file. Re-running tags only images not yet in the file.

    Attributes:
        root, out: the dataset root and the run folder (set by ``clipes run``).
        class_file: the class file (default ``ROOT/classes.txt``).
        tagger, threshold, background, max_side: as ``clipes label``.
        model, pretrained, templates, device, threads: from ``[model]`` / ``[cam]``.
    """

    root: str
    out: str
    class_file: str | None = None
    tagger: str = DEFAULT_TAGGER
    threshold: float = ZERO_SHOT_THRESHOLD
    background: str = "voc"
    max_side: int | None = 1024
    model: str = "clipes-tiny"
    pretrained: str | None = None
    templates: tuple[str, ...] = (DEFAULT_TEMPLATE,)
    device: str = "auto"
    threads: int | None = None

    def validate(self) -> "LabelStageConfig":
        check_tagger(self.tagger)
        check_templates(self.templates)
        if not 0.0 < self.threshold <= 1.0:
            raise ConfigError(f"[label] threshold must be in (0, 1], got {self.threshold}")
        return self

    @property
    def labels_file(self) -> Path:
        """Where the stage writes the labels the cam stage reads."""
        from clip_es.label import ZERO_SHOT_LABELS

        return Path(self.out) / ZERO_SHOT_LABELS


def label_stage(cfg: LabelStageConfig, clip=None, progress: bool = True):
    """Run the ``[label]`` stage; a :class:`~clip_es.stage.StageResult` (``done``: images tagged now).

    Raises:
        ConfigError: bad options; DatasetError: no images or a malformed class file.
    """
    from clip_es.data.base import read_class_file
    from clip_es.data.folder import scan_images
    from clip_es.label import _read_labels, write_zero_shot_files
    from clip_es.model.resolve import load_clip
    from clip_es.stage import StageResult, resolve_device
    from clip_es.threads import use_threads

    cfg = cfg.validate()
    root = Path(cfg.root)
    class_file = Path(cfg.class_file) if cfg.class_file else root / "classes.txt"
    classes = read_class_file(class_file)
    images_dir = root / "images" if (root / "images").is_dir() else root
    found, _ = scan_images(images_dir)
    if not found:
        raise DatasetError(f"{images_dir} holds no images (.jpg .jpeg .png .bmp .webp) for the [label] stage")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    table = _read_labels(root, cfg.labels_file, class_file) if cfg.labels_file.is_file() else {}
    todo = [(i, p) for i, p in found if i not in table]
    res = StageResult("label", str(out), skipped=len(found) - len(todo))
    if not todo:
        return res
    from clip_es.label import predict_tags

    with use_threads(cfg.threads):
        clip = clip or load_clip(cfg.model, cfg.pretrained, device=resolve_device(cfg.device))
        pred, results, failed, rule = predict_tags(clip, todo, classes, cfg.tagger, cfg.templates, cfg.threshold,
                                                   cfg.max_side, cfg.background, out, progress)
    names = [c.name for c in classes]
    table.update({i: [names[k] for k in ks] for i, ks in pred.items()})
    header = (f"Labels predicted by CLIP ({clip.name}, zero-shot, tagger {cfg.tagger}) for the recipe's "
              f"[label] stage.\nThe cam stage reads them from here.")
    write_zero_shot_files(out, found, table, results, names, cfg.tagger, rule, cfg.threshold, clip.name, header)
    res.done, res.failed = len(pred), failed
    return res
