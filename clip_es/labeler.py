"""Pseudo masks for images held in memory: :class:`Labeler`.

::

    import clip_es

    labeler = clip_es.Labeler(classes=["cat", "dog", "sofa"], model="ViT-B-16", pretrained="openai")
    out = labeler(image, labels=["cat", "sofa"])   # PIL image, (H, W, 3) uint8 array or a path
    out.mask                                       # (H, W) uint8: 0 background, k = classes[k - 1], 255 unsure
    for out in labeler.label_many(images):         # batched, in order; labels predicted zero-shot
        ...

A :class:`Labeler` loads the CLIP and embeds the classes and background words once, then
runs, per image, exactly what ``clipes label`` runs through its run folder: the zero-shot
tags of the ``tagger`` (:mod:`clip_es.tag`: by default ``blend``, the global softmax and TagCLIP agreeing) when none are given, the cam
stage's :class:`~clip_es.cam.run.CamEngine` (GradCAM + CAA) and the refine stage's
:func:`~clip_es.refine.run.refine_image` (dense CRF + the confidence rule). Nothing is
written to disk.

Equal to the run folder. The cam stage stores its maps as float16 at the patch grid (or
the working size for multi-view runs) and every reader upsamples them; the Labeler rounds
its maps the same way before upsampling and refining, so ``cam``/``caa`` equal what
:func:`~clip_es.cam.store.load_cam` reads from ``RUN/cam/<id>.npz`` and ``mask`` equals
``RUN/refine/masks/<id>.png`` for the same image and options (``tests/test_labeler.py``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from clip_es.data.base import ClassSpec
from clip_es.data.image_io import as_rgb_image
from clip_es.errors import ConfigError, LabelError
from clip_es.model.zeroshot import ZERO_SHOT_THRESHOLD
from clip_es.tag.registry import DEFAULT_TAGGER, check_tagger

log = logging.getLogger(__name__)

#: CamConfig fields a Labeler does not take: which images, where outputs go, the loader.
_CAM_SKIP = ("dataset", "root", "split", "out", "class_file", "ann_file", "model", "pretrained", "limit", "shard",
             "workers")
#: RefineConfig fields a Labeler does not take (files, processes, selection).
_REFINE_SKIP = ("run", "save_conf", "workers", "limit", "shard")
#: Where the Labeler's defaults differ from :class:`~clip_es.cam.run.CamConfig`'s: those of ``clipes label``.
LABEL_DEFAULTS: dict[str, Any] = {"background": "voc"}


@dataclass
class PseudoMask:
    """What :class:`Labeler` returns for one image.

    Attributes:
        labels: the image-level labels used (class names, in the order of the Labeler's
            classes); the maps' channels follow it.
        keys: ``(K,)`` int64 0-based indices of ``labels`` in the Labeler's classes.
        cam: ``(K, H, W)`` float32 softmax-GradCAM maps in [0, 1] at the image's size.
        caa: ``(K, H, W)`` float32 CAA-refined maps in [0, 1] (``cam`` when ``caa=False``).
        mask: ``(H, W)`` uint8 pseudo mask: 0 background, ``k`` = ``classes[k - 1]``, 255
            unsure (CRF confidence below ``conf``).
        crf: ``(H, W)`` uint8 CRF argmax without the 255 (``mask`` when ``crf=False``).
        confidence: ``(H, W)`` float32 ``max_c Q_c`` of the CRF, ``None`` when ``crf=False``.
        probabilities: class name -> the tagger's score when the labels were predicted, else
            ``None`` (``global``: the softmax probability over the classes; ``tagclip``: 0.5 x local
            + 0.5 x crop score; ``blend``: the geometric mean of those two; as
            ``labels_zeroshot_scores.json`` holds them).
    """

    labels: list[str]
    keys: np.ndarray
    cam: np.ndarray
    caa: np.ndarray
    mask: np.ndarray
    crf: np.ndarray
    confidence: np.ndarray | None = None
    probabilities: dict[str, float] | None = None


def as_class_specs(classes: str | Sequence[str | ClassSpec]) -> list[ClassSpec]:
    """``"cat,dog"``, ``["cat", "dog"]`` or ``ClassSpec`` items -> a checked class list."""
    if isinstance(classes, str):
        classes = [c.strip() for c in classes.split(",") if c.strip()]
    specs = []
    for c in classes:
        if isinstance(c, ClassSpec):
            specs.append(c)
        elif isinstance(c, str) and c.strip():
            specs.append(ClassSpec(c.strip()))
        else:
            raise ConfigError(f"classes: {c!r} is not a class name; pass names such as [\"cat\", \"dog\"] "
                              "(or ClassSpec(name, synonyms))")
    names = [c.name for c in specs]
    if not names:
        raise ConfigError("classes is empty; pass the class names, e.g. classes=[\"cat\", \"dog\", \"sofa\"]")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"classes lists {', '.join(dup)} twice; name each class once")
    return specs


def split_options(options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Keyword options -> ``(CamConfig fields, RefineConfig fields)`` with ``clipes label``'s defaults.

    ``max_side`` and ``threads`` go to both stages, as ``clipes label`` passes them.

    Raises:
        ConfigError: a name that is neither; the message lists the valid ones.
    """
    from clip_es.cam.run import CamConfig
    from clip_es.refine.run import RefineConfig

    cam_names = [f.name for f in fields(CamConfig) if f.name not in _CAM_SKIP]
    refine_names = [f.name for f in fields(RefineConfig) if f.name not in _REFINE_SKIP]
    unknown = sorted(set(options) - set(cam_names) - set(refine_names))
    if unknown:
        valid = ", ".join(sorted(set(cam_names) | set(refine_names) | {"threshold", "tagger"}))
        raise ConfigError(f"Labeler got unknown option(s) {', '.join(unknown)}; valid: {valid}")
    opts = {**LABEL_DEFAULTS, **options}
    cam = {k: v for k, v in opts.items() if k in cam_names}
    refine = {k: v for k, v in opts.items() if k in refine_names}
    for key in ("templates", "scales"):
        if key in cam and isinstance(cam[key], (str, int, float)):
            cam[key] = (cam[key],)
        elif key in cam:
            cam[key] = tuple(cam[key])
    return cam, refine


class Labeler:
    """CLIP-ES pseudo masks for images in memory, the text side prepared once.

    Args:
        classes: the class list (``["cat", "dog", "sofa"]``, ``"cat,dog,sofa"`` or
            :class:`~clip_es.data.base.ClassSpec` items with synonyms). Mask value ``k`` is
            ``classes[k - 1]``.
        model, pretrained: the CLIP, as :func:`clip_es.model.load_clip` takes them (default
            the bundled toy ``clipes-tiny``, which knows only the toy world's names).
        tagger: the zero-shot tagger for images given without labels (as ``clipes label
            --tagger``): ``blend`` (default), ``global`` or ``tagclip``; its text is embedded once, on first use.
        threshold: the ``blend`` / ``global`` tagger's presence threshold (as ``clipes label --threshold``).
            Its scores use the cam stage's class text (``templates``, ``fusion``), which at the
            defaults is what ``clipes label`` predicts with.
        clip: an already loaded :class:`~clip_es.model.resolve.ClipModel` to use instead.
        **options: any :class:`~clip_es.cam.run.CamConfig` or
            :class:`~clip_es.refine.run.RefineConfig` field that decides the outputs or the
            speed, with ``clipes label``'s defaults: ``templates``, ``fusion``,
            ``background`` (``"voc"``), ``scales``, ``flip``, ``softmax``, ``caa``,
            ``caa_threshold``, ``caa_blocks``, ``sinkhorn_iters``, ``pooling``,
            ``max_side`` (both stages, 1024), ``device`` (``"auto"``), ``precision``
            (``"auto"``), ``batch_size`` (1, for :meth:`label_many`), ``threads``, ``crf``,
            ``conf`` (the method's default: 0.95 for the CRF), ``alpha``, ``method`` (``crf``, ``pamr``),
            ``crf_params``, ``pamr_params``, ``device`` (of a torch refinement method).

    Raises:
        ConfigError: bad classes or options (before the CLIP is loaded); an unknown ``tagger``
            (:class:`~clip_es.errors.RegistryError`, listing the valid names).
        WeightsError, RegistryError: the CLIP cannot be resolved.
    """

    def __init__(self, classes: str | Sequence[str | ClassSpec], model: str = "clipes-tiny",
                 pretrained: str | None = None, *, tagger: str = DEFAULT_TAGGER,
                 threshold: float = ZERO_SHOT_THRESHOLD, clip=None, **options: Any):
        from clip_es.cam.run import CamConfig, build_engine
        from clip_es.refine.run import RefineConfig
        from clip_es.threads import use_threads

        self.classes = as_class_specs(classes)
        if not 0.0 < threshold <= 1.0:
            raise ConfigError(f"threshold must be in (0, 1], got {threshold}")
        self.threshold = threshold
        self.tagger_name = check_tagger(tagger)
        self._tagger = None
        cam, refine = split_options(options)
        # no dataset and no run folder: the engine reads none of those fields
        self.cam_config = CamConfig(dataset="memory", root="", split="", out="", model=model, pretrained=pretrained,
                                    **cam).validate()
        self.refine_config = RefineConfig(run="", **refine).validate()
        self._refine_device = self.refine_config.refine_device()
        with use_threads(self.cam_config.threads):
            self.engine = build_engine(self.cam_config, self.classes, clip)

    @property
    def tagger(self):
        """The zero-shot tagger (built, and its text embedded, on first use)."""
        if self._tagger is None:
            from clip_es.data.classes import background_words
            from clip_es.tag.registry import build_tagger

            cfg = self.cam_config
            self._tagger = build_tagger(self.tagger_name, self.clip, self.classes, templates=cfg.templates,
                                        background=background_words(cfg.background), threshold=self.threshold,
                                        max_side=cfg.max_side, fusion=cfg.fusion, pooling=cfg.pooling,
                                        text=self.engine.class_text)
        return self._tagger

    @property
    def clip(self):
        """The loaded :class:`~clip_es.model.resolve.ClipModel`."""
        return self.engine.clip

    @property
    def names(self) -> list[str]:
        """The class names, in order (mask value ``k`` is ``names[k - 1]``)."""
        return [c.name for c in self.classes]

    def __repr__(self) -> str:
        return (f"Labeler(classes={self.names}, model={self.clip.name!r}, tagger={self.tagger_name!r}, background="
                f"{self.cam_config.background!r}, precision={self.engine.precision!r})")

    def keys_for(self, labels: str | Sequence[str], what: str = "labels") -> list[int]:
        """Class names -> sorted 0-based indices into :attr:`classes`.

        Raises:
            LabelError: a name not in the classes, or one given twice.
        """
        if isinstance(labels, str):
            labels = [n.strip() for n in labels.split(",") if n.strip()]
        names = self.names
        keys = []
        for n in labels:
            if n not in names:
                raise LabelError(f"{what}: {n!r} is not one of the Labeler's classes ({', '.join(names)}); pass "
                                 "names from that list, or make a Labeler whose classes include it")
            if names.index(n) in keys:
                raise LabelError(f"{what}: {n!r} is given twice; name each label once")
            keys.append(names.index(n))
        return sorted(keys)

    def __call__(self, image, labels: str | Sequence[str] | None = None) -> PseudoMask:
        """Pseudo mask of one image.

        Args:
            image: a PIL image, an ``(H, W, 3)`` uint8 RGB array, or an image file path.
            labels: the image's class names; ``None`` = predicted zero-shot (as ``clipes label``).

        Raises:
            ImageError: the image cannot be read or has the wrong shape/dtype.
            LabelError: a label not in the classes.
        """
        return next(self.label_many([image], None if labels is None else [labels]))

    def label_many(self, images: Iterable, labels: Iterable[str | Sequence[str] | None] | None = None
                   ) -> Iterator[PseudoMask]:
        """Pseudo masks of many images, yielded in order.

        ``batch_size`` images at a time share the frozen CLIP forward (those of one working
        size; in fp32 the outputs do not depend on the batching), then are refined one by one
        in this process. A generator: wrap it in ``tqdm`` for a progress bar.

        Args:
            images: an iterable of images (each as :meth:`__call__` takes it).
            labels: an iterable of label lists, one per image (``None`` items: predict that
                image's labels), or ``None``: predict every image's labels.

        Raises:
            ImageError, LabelError: as :meth:`__call__`, naming the image's position.
        """
        from clip_es.threads import use_threads

        batch_size = self.cam_config.batch_size
        label_iter = iter(labels) if labels is not None else None
        chunk: list[tuple[np.ndarray, list[int] | None]] = []
        for i, image in enumerate(images):
            lab = next(label_iter, None) if label_iter is not None else None
            what = f"image {i}"
            keys = None if lab is None else self.keys_for(lab, f"labels of {what}")
            chunk.append((as_rgb_image(image, what), keys))
            if len(chunk) == batch_size:
                with use_threads(self.cam_config.threads):
                    yield from self._label_chunk(chunk)
                chunk = []
        if chunk:
            with use_threads(self.cam_config.threads):
                yield from self._label_chunk(chunk)

    def _label_chunk(self, chunk: list[tuple[np.ndarray, list[int] | None]]) -> list[PseudoMask]:
        from clip_es.cam.store import upsample
        from clip_es.refine.run import refine_image

        cfg, rcfg, names = self.cam_config, self.refine_config, self.names
        probs: list[np.ndarray | None] = []
        items = []
        for image, keys in chunk:
            p = None
            if keys is None:
                tagged = self.tagger.tag(image)
                p, keys = tagged.scores, list(tagged.keys)
            probs.append(p)
            items.append(self.engine.prepare(image, keys=keys))
        maps: list[Any] = [None] * len(items)
        buckets: dict[tuple, list[int]] = {}
        for j, it in enumerate(items):
            buckets.setdefault(it.bucket, []).append(j)
        for idx in buckets.values():
            for j, m in zip(idx, self.engine.compute_batch([items[j] for j in idx])):
                maps[j] = m
        out = []
        for (image, _), it, (cam, caa), p in zip(chunk, items, maps, probs):
            keys = np.asarray(it.keys, np.int64)
            cam, caa = (np.asarray(a, np.float16).astype(np.float32) for a in (cam, caa))  # the store's precision
            crf, confidence, mask = refine_image(caa, keys, it.size, image, crf=rcfg.crf, conf=rcfg.conf,
                                                 alpha=rcfg.alpha, method=rcfg.method, params=rcfg.method_params(),
                                                 max_side=rcfg.max_side, device=self._refine_device)
            out.append(PseudoMask([names[k] for k in keys], keys, upsample(cam, it.size), upsample(caa, it.size),
                                  mask, crf, confidence,
                                  None if p is None else {n: float(v) for n, v in zip(names, p)}))
        return out

