"""What every export format shares: the run's classes and images, each image's confidence
figures, the order of a first batch to correct, and the way names written back by a tool
are matched to the run's images.

Label values are the refine stage's (:mod:`clip_es.refine.store`): 0 background, ``k + 1``
class ``k``, 255 unsure (the pixels whose refine confidence is under ``--conf``). Names a
tool sees: ``background``, the run's class names, and ``unsure`` (:data:`LABEL_NAMES`).

Confidence is the refine stage's ``max_c Q_c`` (CRF or PAMR), stored as
``RUN/refine/conf/<id>.png`` when the run was refined with ``--save-conf`` (``clipes label``
always saves it). Without those maps every confidence is unknown: a score is 1.0 in COCO,
left out in Label Studio, and images are ordered by their share of unsure pixels only.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Callable

import numpy as np

from clip_es.errors import ClipEsError, ConfigError, MaskImportError, RunDirError
from clip_es.refine.crf import IGNORE
from clip_es.refine.store import CONF, CRF, MASKS, STAGE, output_ids, output_path, read_output
from clip_es.rundir import RunDir

log = logging.getLogger(__name__)

BACKGROUND, UNSURE = "background", "unsure"


@dataclass
class ExportResult:
    """What an export wrote."""

    path: str
    images: int
    annotations: int = 0
    review: str | None = None
    note: str | None = None  # how to load it in its tool, when that needs more than the path

    def summary(self) -> str:
        extra = f", {self.annotations} annotations" if self.annotations else ""
        lines = [f"export: {self.images} images{extra} -> {self.path}"]
        if self.note:
            lines.append(self.note)
        if self.review:
            lines.append(f"review: {self.review} (least sure first)")
        return "\n".join(lines)


@dataclass
class RunImages:
    """A run with refine outputs, as the exports read it.

    Attributes:
        run: the run folder.
        classes: class names; class ``k`` is label value ``k + 1``.
        category_ids: the source dataset's id of each class (COCO ids for COCO, ``1..K`` otherwise).
        ids: every image id with a pseudo mask, sorted.
        entries: ``id -> (integer image number, file name with extension)`` (see :func:`open_run`).
        dataset: the run's dataset reopened, or ``None`` when it moved since the run.
    """

    run: RunDir
    classes: list[str]
    category_ids: list[int]
    ids: list[str]
    entries: dict[str, tuple[int, str]]
    dataset: Any = None
    _has_conf: bool | None = field(default=None, repr=False)

    def mask(self, image_id: str) -> np.ndarray:
        """``(H, W)`` uint8 pseudo mask."""
        return read_output(output_path(self.run, MASKS, image_id))

    def conf(self, image_id: str) -> np.ndarray | None:
        """``(H, W)`` uint8 confidence ``round(conf * 255)``, or ``None`` when not saved."""
        p = output_path(self.run, CONF, image_id)
        return read_output(p) if p.is_file() else None

    def crf(self, image_id: str) -> np.ndarray | None:
        """``(H, W)`` uint8 refine argmax without the unsure value, or ``None`` (``--no-crf``)."""
        p = output_path(self.run, CRF, image_id)
        return read_output(p) if p.is_file() else None

    def image_path(self, image_id: str) -> Path | None:
        """The image file, or ``None`` when the dataset cannot be reopened or lacks it."""
        if self.dataset is None:
            return None
        try:
            p = self.dataset.image_path(image_id)
        except ClipEsError:
            return None
        return p if p.is_file() else None

    def file_name(self, image_id: str) -> str:
        return self.entries[image_id][1]

    def has_conf(self) -> bool:
        if self._has_conf is None:
            self._has_conf = bool(output_ids(self.run, CONF))
            if not self._has_conf:
                log.warning("%s has no confidence maps (refine/conf): scores are unknown and images are ordered "
                            "by their share of unsure pixels; re-run 'clipes refine --run %s --save-conf' to get "
                            "them", self.run.path, self.run.path)
        return self._has_conf

    def label_values(self) -> dict[str, int]:
        """Names a tool may write back -> label value: background 0, classes ``k + 1``, unsure 255.

        Raises:
            ConfigError: a class named ``background`` or ``unsure`` (the tools would merge it with those).
        """
        for c in self.classes:
            if c in (BACKGROUND, UNSURE):
                raise ConfigError(f"the run has a class named {c!r}, a name the exports reserve for label value "
                                  f"{0 if c == BACKGROUND else IGNORE}; rename the class (class file) in a new run")
        return {BACKGROUND: 0, **{c: k + 1 for k, c in enumerate(self.classes)}, UNSURE: IGNORE}

    def label_names(self) -> dict[int, str]:
        """Label value -> name (the inverse of :meth:`label_values`)."""
        return {v: n for n, v in self.label_values().items()}


def open_run(run: str | Path | RunDir) -> RunImages:
    """Read a run's classes and images for export.

    Image numbers: COCO runs keep COCO's ids and file names; other runs number the images
    ``1..N`` in the dataset's order (the same numbers each time) and take the file name
    from the dataset; when the dataset cannot be reopened (moved or deleted since the run)
    the file name falls back to the id, with a warning.

    Raises:
        RunDirError: no manifest, inconsistent classes, or no pseudo masks.
    """
    from clip_es.data.registry import dataset_of_run

    rd = run if isinstance(run, RunDir) else RunDir(run)
    if not rd.manifest_path.is_file():
        raise RunDirError(f"{rd.path}: no manifest.json; is this a clipes run folder?")
    m = rd.read_manifest()
    classes, cat_ids = m.get("classes"), m.get("category_ids")
    if not classes or not cat_ids or len(classes) != len(cat_ids):
        raise RunDirError(f"{rd.manifest_path}: classes/category_ids missing or inconsistent; "
                          "re-run 'clipes cam' into a new run folder")
    ids = output_ids(rd, MASKS)
    if rd.stage_info(STAGE) is None or not ids:
        raise RunDirError(f"{rd.path}: no pseudo masks; run 'clipes refine --run {rd.path}' first")
    kind = (m.get("dataset") or {}).get("kind")
    try:
        ds = dataset_of_run(rd)
        order = {i: n for n, i in enumerate(ds.ids())}
    except ClipEsError as e:
        if kind == "coco":
            raise
        log.warning("the run's dataset cannot be reopened (%s); file_name is the image id without extension", e)
        return RunImages(rd, list(classes), [int(c) for c in cat_ids], ids,
                         {i: (n, i) for n, i in enumerate(ids, 1)}, None)
    if kind == "coco":
        entries = {i: (int(ds._coco_id(i)), ds.image_path(i).name) for i in ids}
    else:
        ranked = sorted(ids, key=lambda i: (order.get(i, len(order)), i))
        entries = {i: (n, _file_name(ds, i)) for n, i in enumerate(ranked, 1)}
    return RunImages(rd, list(classes), [int(c) for c in cat_ids], ids, entries, ds)


def _file_name(ds, image_id: str) -> str:
    try:
        return ds.image_path(image_id).name
    except ClipEsError:  # no longer in the split: the id is all there is
        return image_id


# ----------------------------------------------------------------------------- confidence
def region_score(conf: np.ndarray | None, region: np.ndarray) -> float | None:
    """Mean confidence in [0, 1] over the ``True`` pixels of ``region`` (``(H, W)`` bool);
    ``None`` without a confidence map or for an empty region."""
    if conf is None or not region.any():
        return None
    return round(float(conf[region].mean()) / 255.0, 6)


@dataclass(frozen=True)
class ImageStats:
    """How sure the refine stage was about one image.

    Attributes:
        image_id: the run's id.
        labels: names of the classes present in the pseudo mask.
        unsure_share: fraction of the image's pixels that are unsure (255), in [0, 1].
        lowest_conf: the lowest, over the classes the refinement gave pixels to (its argmax,
            unsure pixels included; background only when no class got any), of the mean
            confidence over that class's pixels; ``None`` without confidence maps.
        lowest_class: the class of ``lowest_conf``.
    """

    image_id: str
    labels: tuple[str, ...]
    unsure_share: float
    lowest_conf: float | None
    lowest_class: str | None

    @property
    def score(self) -> float:
        """One number per image, higher = surer: ``lowest_conf``, or ``1 - unsure_share`` without confidence."""
        return self.lowest_conf if self.lowest_conf is not None else round(1.0 - self.unsure_share, 6)


def image_stats(image_id: str, mask: np.ndarray, conf: np.ndarray | None, argmax: np.ndarray | None,
                classes: list[str]) -> ImageStats:
    """:class:`ImageStats` of one image.

    Args:
        mask: ``(H, W)`` uint8 pseudo mask (0 bg, ``k + 1`` class ``k``, 255 unsure).
        conf: ``(H, W)`` uint8 confidence or ``None``.
        argmax: ``(H, W)`` uint8 refine argmax without unsure (``RUN/refine/crf``), or ``None``
            (the mask's own regions are used).
    """
    present = [int(v) for v in np.unique(mask) if 0 < v <= len(classes)]
    labels = tuple(classes[v - 1] for v in present)
    unsure = round(float((mask == IGNORE).mean()), 6) if mask.size else 0.0
    lowest, lowest_class = None, None
    if conf is not None:
        src = argmax if argmax is not None and argmax.shape == mask.shape else mask
        values = [int(v) for v in np.unique(src) if 0 < v <= len(classes)] or [0]
        names = [BACKGROUND, *classes]
        for v in values:
            s = region_score(conf, src == v)
            if s is not None and (lowest is None or s < lowest):
                lowest, lowest_class = s, names[v]
    return ImageStats(image_id, labels, unsure, lowest, lowest_class)


def least_sure_key(s: ImageStats) -> tuple[float, float, str]:
    """Sort key: lowest score first, then the larger unsure share, then the id."""
    return (s.score, -s.unsure_share, s.image_id)


#: ``--order`` values: how the images of an export (and of ``--limit N``) are chosen.
ORDERS: dict[str, Callable[[list[ImageStats]], list[ImageStats]]] = {
    "dataset": lambda stats: list(stats),
    "least-sure": lambda stats: sorted(stats, key=least_sure_key),
}


def select(stats: list[ImageStats], order: str = "dataset", limit: int | None = None) -> list[ImageStats]:
    """The images to export, in ``order`` (a key of :data:`ORDERS`), the first ``limit`` of them."""
    if order not in ORDERS:
        raise ConfigError(f"unknown --order {order!r}; valid: {', '.join(ORDERS)}")
    if limit is not None and limit < 1:
        raise ConfigError(f"--limit must be at least 1, got {limit}")
    return ORDERS[order](stats)[:limit]


# ----------------------------------------------------------------------------- names written back
_DRIVE = re.compile(r"^[A-Za-z]:")


def safe_ref(ref: str, where: str) -> PurePosixPath:
    """``ref`` (an image path written in an import file) as a relative POSIX path.

    Raises:
        MaskImportError: an absolute path or one with ``..``: it points outside the run.
    """
    text = str(ref).replace("\\", "/")
    p = PurePosixPath(text)
    if not text or text.startswith("/") or _DRIVE.match(text) or ".." in p.parts:
        raise MaskImportError(f"{where}: image path {ref!r} points outside the run (absolute or with '..'); "
                              "name each image by its file name as exported")
    return p


class ImageIndex:
    """Matches an image name written back by a tool to the run's image id: the file name with
    its extension (``chien café.jpg``), the id (the file stem), or ``<id>.png``."""

    def __init__(self, rimgs: RunImages):
        self.ids = set(rimgs.ids)
        self.by_name = {name: i for i, (_, name) in rimgs.entries.items()}

    def resolve(self, ref: str, where: str) -> str:
        """The id of image ``ref``.

        Raises:
            MaskImportError: ``ref`` points outside the run or names no image of it.
        """
        name = safe_ref(ref, where).name
        for cand in (name, PurePosixPath(name).stem):
            if cand in self.by_name:
                return self.by_name[cand]
            if cand in self.ids:
                return cand
        example = next(iter(sorted(self.by_name)), "")
        raise MaskImportError(f"{where}: {ref!r} is not an image of the run ({len(self.ids)} images with pseudo "
                              f"masks, e.g. {example!r}); import masks of the run's own images")


def values_from_names(names: dict[Any, str], run_values: dict[str, int], where: str) -> dict[Any, int]:
    """Map a tool's ``{key: class name}`` to the run's label values.

    Raises:
        MaskImportError: a name that is not ``background``, a class of the run, or ``unsure``.
    """
    out = {}
    for key, name in names.items():
        if name not in run_values:
            raise MaskImportError(f"{where}: unknown class name {name!r}; the run's names are "
                                  f"{', '.join(run_values)}")
        out[key] = run_values[name]
    return out


def check_name_safe(name: str, what: str, forbidden: str) -> None:
    """Refuse an export when a class name holds a character the format cannot carry."""
    bad = [c for c in forbidden if c in name]
    if bad:
        raise ConfigError(f"class name {name!r} holds {bad[0]!r}, which {what} cannot carry; rename the class "
                          "(class file) or export another format")
