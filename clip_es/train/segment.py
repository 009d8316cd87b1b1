"""Inference with a trained segmenter (``clipes segment``), also used by ``clipes eval``.

Predictions are ``(H, W)`` uint8 label maps at the image's own size: 0 = background,
``k + 1`` = class ``k`` of the class list used (the training classes by default).

Open vocabulary: ``classes`` may name classes the segmenter never trained on. They are
embedded with the CLIP, templates and synonym fusion recorded in the checkpoint (the CLIP
is loaded for that; trained classes reuse their stored embeddings). What to expect depends
on the family (:mod:`clip_es.train.families`): the CNN segmenter scores pixels by cosine
similarity to the projected text, so an unseen class is found to the extent its CLIP text
embedding lies near trained ones with similar appearance (a synonym or close relative of a
trained class transfers well; an unrelated concept mostly does not, since a small CNN
trained on K classes never learnt its appearance). ``zegclip`` keeps the CLIP's image encoder
frozen, so its patch features stay aligned with the text space and a class it never trained on
is found (pipelines/toy/ZEROSHOT.md); ``clip`` needs no training at all. Dropping classes is
always safe.

Calibration: when the list holds names the segmenter was not trained on (names held out
with ``clipes train --unseen``, or new ones) next to trained ones, the trained classes'
scores (softmax or sigmoid, per family) are lowered by an offset before the argmax, as
ZegCLIP does; ``calibration=None`` takes the family's measured default.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from clip_es.data.base import ClassSpec, read_class_file
from clip_es.data.image_io import mask_to_png_bytes, read_image
from clip_es.errors import ConfigError, DatasetError, ImageError, RunDirError
from clip_es.rundir import atomic_write_bytes, atomic_write_json, file_sha256
from clip_es.stage import StageResult, fit_image, resolve_device
from clip_es.threads import threads_from_config
from clip_es.train.checkpoint import load_checkpoint, load_model_state
from clip_es.train.families import BuildContext, family_of, get_family, scores_fn
from clip_es.train.text import embed, lists_to_specs, specs_to_lists, text_for_classes

log = logging.getLogger(__name__)

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
#: Default working-resolution cap (pixels, longer side) of :func:`predict_labels`.
MAX_SIDE = 2048


@dataclass
class LoadedSegmenter:
    """A segmenter ready for inference.

    Attributes:
        model: eval-mode segmenter module of its family on ``device``.
        text: ``(K, D)`` embeddings of ``classes`` on ``device``.
        classes: the class list ``text`` encodes.
        payload: the checkpoint's text record (CLIP, templates, fusion, the run's classes).
        checkpoint: the file it came from; ``step``: its training step.
        trained: names of the classes the segmenter trained on (the run's classes less ``--unseen``).
        calibration: offset subtracted from the trained classes' scores when ``classes`` also
            holds untrained names (``None``: the family's default, ``model.calibration``).
    """

    model: torch.nn.Module
    text: torch.Tensor
    classes: list[ClassSpec]
    payload: dict[str, Any]
    checkpoint: str
    step: int
    device: str
    trained: tuple[str, ...] = ()
    calibration: float | None = None

    @property
    def offset(self) -> float:
        """The calibration offset in force: 0 unless ``classes`` mixes trained and untrained names."""
        flags = [c.name in self.trained for c in self.classes]
        if all(flags) or not any(flags):
            return 0.0
        return float(self.model.calibration if self.calibration is None else self.calibration)

    def with_classes(self, classes: Sequence[ClassSpec] | None, clip_model: str | None = None,
                     clip_pretrained: str | None = None) -> "LoadedSegmenter":
        """The same model predicting another class list (open vocabulary)."""
        if not classes:
            return self
        names = [c.name for c in classes]
        if len(set(names)) != len(names):
            raise ConfigError(f"duplicate class names in {names}")
        text = text_for_classes(self.payload, classes, clip_model, clip_pretrained, self.device)
        return dataclasses.replace(self, text=text.to(self.device), classes=list(classes))


def load_segmenter(path: str | Path, device: str = "cpu", calibration: float | None = None,
                   clip_model: str | None = None, clip_pretrained: str | None = None) -> LoadedSegmenter:
    """Rebuild a trained segmenter of any family from a checkpoint (no network for the CNN family;
    a family on a frozen CLIP loads the CLIP its text record names, or the override).

    Raises:
        WeightsError: not a readable segmenter checkpoint, or weights that do not fit its record.
    """
    ck = load_checkpoint(path)
    record = ck["config"]["arch"]
    family = family_of(record)
    payload = ck["text"]
    ctx = BuildContext(text=payload, device=device, clip_model=clip_model, clip_pretrained=clip_pretrained)
    model = family.build(family.arch_from_dict(record), ctx)
    load_model_state(model, family.upgrade_state(record, ck["model"]), path)
    _for_inference(model, device)
    unseen = set((ck["config"].get("train") or {}).get("unseen") or ())
    trained = tuple(str(c[0]) for c in payload["classes"] if str(c[0]) not in unseen)
    return LoadedSegmenter(model, payload["embeddings"].to(device), lists_to_specs(payload["classes"]), payload,
                           str(path), int(ck["step"]), device, trained, calibration)


def untrained_segmenter(arch: str, classes: Sequence[ClassSpec] | None, device: str = "cpu",
                        clip_model: str | None = None, clip_pretrained: str | None = None) -> LoadedSegmenter:
    """A segmenter of a family that needs no training (e.g. ``clip``), without a checkpoint: the
    classes are embedded with the given CLIP (default: the bundled one), the default template and
    ``sentence`` synonym fusion, and the family's default record is built on that CLIP.

    Raises:
        ConfigError: a family that needs training, or no classes.
        RegistryError: unknown family.
    """
    from clip_es.model.resolve import load_clip
    from clip_es.model.tiny import TINY_NAME
    from clip_es.train.loop import TrainConfig

    family = get_family(arch)
    if family.trainable:
        raise ConfigError(f"--arch {arch} needs training: run 'clipes train --arch {arch}' and pass its --checkpoint")
    if not classes:
        raise ConfigError(f"--arch {arch} without a checkpoint needs --classes or --class-file")
    clip = load_clip(clip_model or TINY_NAME, clip_pretrained, device)
    emb = embed(clip, classes, [], "sentence")
    payload = {"classes": specs_to_lists(classes), "embeddings": emb, "templates": [], "fusion": "sentence",
               "clip": clip.describe()}
    record = family.arch_from_config(TrainConfig(run="", arch=arch), int(emb.shape[1]))
    ctx = BuildContext(text=payload, device=device, clip_model=clip_model, clip_pretrained=clip_pretrained)
    model = _for_inference(family.build(record, ctx), device)
    return LoadedSegmenter(model, emb.to(device), list(classes), payload, "", 0, device)


def _for_inference(model: torch.nn.Module, device: str) -> torch.nn.Module:
    """``model`` in eval mode on ``device`` with every parameter frozen (returned for chaining)."""
    model.eval().to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def parse_classes(classes: str | None = None, class_file: str | Path | None = None) -> list[ClassSpec] | None:
    """``--classes "a,b,c"`` (names only) or ``--class-file`` (with synonyms); ``None`` = trained classes."""
    if classes and class_file:
        raise ConfigError("pass either --classes or --class-file, not both")
    if class_file:
        return read_class_file(class_file)
    if classes:
        names = [c.strip() for c in classes.split(",") if c.strip()]
        if not names:
            raise ConfigError(f"--classes needs comma-separated names, got {classes!r}")
        return [ClassSpec(n) for n in names]
    return None


def pad_to_stride(x: torch.Tensor, mean: torch.Tensor, stride: int) -> torch.Tensor:
    """The one padding rule of inference: ``(B, 3, H, W)`` RGB in [0, 1] padded at the bottom
    and right to multiples of ``stride`` (the module's) with the normalisation ``mean`` (zero after
    normalising, as training pads). :func:`predict_logits` and the ONNX graph
    (:mod:`clip_es.train.onnx_export`) both use it, so they agree at every size. Traceable:
    the pad amounts follow the input's dynamic height and width in an exported graph."""
    H, W = x.shape[-2], x.shape[-1]
    ph, pw = (stride - H % stride) % stride, (stride - W % stride) % stride
    mean = mean.to(x.dtype)
    return F.pad(x - mean, (0, pw, 0, ph)) + mean


@torch.no_grad()
def predict_logits(seg: LoadedSegmenter, image: np.ndarray) -> torch.Tensor:
    """``(H, W, 3)`` uint8 RGB -> ``(K+1, H, W)`` float logits (input padded by :func:`pad_to_stride`)."""
    H, W = image.shape[:2]
    x = torch.from_numpy(np.array(image, dtype=np.uint8)).to(seg.device).permute(2, 0, 1)[None].float() / 255
    stride = int(seg.model.stride)
    if H % stride or W % stride:
        x = pad_to_stride(x, seg.model.mean, stride)
    return seg.model(x, seg.text)[0, :, :H, :W]


def calibrated_labels(seg: LoadedSegmenter, logits: torch.Tensor) -> torch.Tensor:
    """``(K+1, H, W)`` logits -> ``(H, W)`` int64 labels; with :attr:`LoadedSegmenter.offset` > 0 the
    trained classes' scores are lowered by it first (channel 0, background, is never shifted)."""
    offset = seg.offset
    if not offset:
        return logits.argmax(0)
    scores = scores_fn(seg.model.score_kind)(logits[None])[0]
    shift = torch.tensor([0.0] + [offset if c.name in seg.trained else 0.0 for c in seg.classes],
                         dtype=scores.dtype, device=scores.device)
    return (scores - shift[:, None, None]).argmax(0)


def predict_labels(seg: LoadedSegmenter, image: np.ndarray, max_side: int | None = MAX_SIDE) -> np.ndarray:
    """``(H, W, 3)`` uint8 RGB -> ``(H, W)`` uint8 labels (0 background, ``k + 1`` class ``k``).

    Images whose longer side exceeds ``max_side`` are predicted on an area-downscaled copy
    (longer side ``max_side``) and the labels resized back (nearest), which bounds memory;
    ``None`` = always native size.
    """
    H, W = image.shape[:2]
    labels = calibrated_labels(seg, predict_logits(seg, fit_image(image, max_side))).to(torch.uint8).cpu().numpy()
    if labels.shape != (H, W):
        labels = cv2.resize(labels, (W, H), interpolation=cv2.INTER_NEAREST)
    return labels


@dataclass(frozen=True)
class SegmentConfig:
    """Options of ``clipes segment``.

    Attributes:
        checkpoint: segmenter checkpoint (``RUN/segmenter/model.pt`` or ``last.pt``).
        arch: instead of a checkpoint, a family that needs no training (``clip``; with ``classes``).
        out: folder for ``<id>.png`` palette predictions (plus ``classes.txt``, ``segment.json``).
        images: a folder of images (alternative to a dataset).
        dataset, root, split: a dataset split to predict on.
        classes: comma-separated class names (open vocabulary); ``class_file``: a class file.
        device: ``cpu``, ``cuda`` or ``auto``.
        limit: only the first ``limit`` images.
        clip_model, clip_pretrained: CLIP override for embedding new class names.
        max_side: images with a longer side above it are predicted downscaled (``None``: never).
        calibration: offset subtracted from the trained classes' scores when the class list also
            holds untrained names (``None``: the family's default; see the module docstring).
        overlay: also write ``OUT/<id>.overlay.jpg``: the image with the predicted label
            colours blended over it and region outlines (display colours, see
            :func:`~clip_es.draw.display_palette`; the PNG masks keep the VOC palette).
        threads: CPU threads (``None``: see :func:`clip_es.threads.default_threads`).
    """

    checkpoint: str | None = None
    out: str = ""
    arch: str | None = None
    images: str | None = None
    dataset: str | None = None
    root: str | None = None
    split: str = "val"
    classes: str | None = None
    class_file: str | None = None
    device: str = "auto"
    limit: int | None = None
    clip_model: str | None = None
    clip_pretrained: str | None = None
    max_side: int | None = MAX_SIDE
    calibration: float | None = None
    overlay: bool = False
    threads: int | None = None

    def validate(self) -> "SegmentConfig":
        if (self.checkpoint is None) == (self.arch is None):
            raise ConfigError("pass either --checkpoint or --arch (a family that needs no training, e.g. clip)")
        if not self.out:
            raise ConfigError("--out is required")
        if (self.images is None) == (self.dataset is None):
            raise ConfigError("pass either --images DIR or --dataset/--root/--split")
        if self.dataset is not None and not self.root:
            raise ConfigError("--dataset needs --root")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"--limit must be at least 1, got {self.limit}")
        if self.max_side is not None and self.max_side < 32:
            raise ConfigError(f"--max-side must be at least 32 pixels, got {self.max_side}")
        return self


def folder_images(folder: str | Path) -> list[tuple[str, Path]]:
    """``(id, path)`` of the images directly in ``folder`` (sorted by name; see
    :func:`~clip_es.data.folder.scan_images`, which also says which files were left out)."""
    from clip_es.data.folder import scan_images

    found, _ = scan_images(folder)
    return found


def _folder_checked(folder: str | Path) -> tuple[list[tuple[str, Path]], dict[str, str]]:
    """:func:`scan_images` for ``--images``: refused only when no image at all is usable."""
    from clip_es.data.folder import scan_images

    try:
        found, refused = scan_images(folder)
    except DatasetError as e:
        raise DatasetError(f"--images {folder} is not a folder") from e
    if not found:
        why = f"; left out: {'; '.join(list(refused.values())[:3])}" if refused else ""
        raise DatasetError(f"--images {folder} holds no images ({', '.join(IMAGE_EXTS)}){why}")
    return found, refused


def _sources(cfg: SegmentConfig, found: list[tuple[str, Path]] | None = None) -> Iterator[tuple[str, Any]]:
    """``(id, load)`` of the images to predict: ``found`` (``--images``, scanned by the caller) or the dataset's."""
    if cfg.images is not None:
        for image_id, path in (found or [])[: cfg.limit]:
            yield image_id, (lambda p=path: read_image(p))
        return
    from clip_es.data.registry import open_dataset

    ds = open_dataset(cfg.dataset, cfg.root, cfg.split)
    for image_id in ds.ids()[: cfg.limit]:
        yield image_id, (lambda i=image_id: ds.load_image(i))


@threads_from_config
def segment(cfg: SegmentConfig, progress: bool = True) -> StageResult:
    """Predict every image and write ``OUT/<id>.png`` (VOC palette). Resumable.

    ``OUT/segment.json`` records the checkpoint (sha256) and class list; re-running into
    the same folder skips existing predictions, and a different checkpoint or class list
    is refused so predictions never mix.
    """
    cfg = cfg.validate()
    classes = parse_classes(cfg.classes, cfg.class_file)
    if cfg.checkpoint is None:
        seg = untrained_segmenter(str(cfg.arch), classes, resolve_device(cfg.device), cfg.clip_model,
                                  cfg.clip_pretrained)
        made_by = {"arch": cfg.arch, "clip": seg.payload["clip"], "sha256": seg.payload["clip"].get("sha256")}
    else:
        seg = load_segmenter(cfg.checkpoint, resolve_device(cfg.device), cfg.calibration, cfg.clip_model,
                             cfg.clip_pretrained).with_classes(classes, cfg.clip_model, cfg.clip_pretrained)
        made_by = {"checkpoint": str(Path(cfg.checkpoint).resolve()), "sha256": file_sha256(cfg.checkpoint)}
    if len(seg.classes) > 254:
        raise ConfigError(f"{len(seg.classes)} classes do not fit a uint8 label map (max 254)")
    out = Path(cfg.out)
    res = StageResult("segment", str(out))
    found = None
    if cfg.images is not None:  # files whose names are no usable id: listed as failures, the rest go on
        found, refused = _folder_checked(cfg.images)
        for name, reason in refused.items():
            res.failed[name] = reason
            log.warning("%s", reason)
    sources = list(_sources(cfg, found))  # bad --images or dataset: refused before OUT is written
    out.mkdir(parents=True, exist_ok=True)
    record = {**made_by, "classes": specs_to_lists(seg.classes)}
    if seg.offset:
        record["calibration"] = seg.offset
    meta = out / "segment.json"
    if meta.is_file():
        old = json.loads(meta.read_text())
        if old.get("sha256") != record["sha256"] or old.get("classes") != record["classes"]:
            raise RunDirError(f"{out} holds predictions of another checkpoint or class list; use a new --out")
        if old.get("calibration", 0.0) != record.get("calibration", 0.0):
            raise RunDirError(f"{out} holds predictions made with another --calibration; use a new --out")
    atomic_write_json(meta, record)
    atomic_write_bytes(out / "classes.txt", "".join(", ".join(c) + "\n" for c in record["classes"]).encode())
    for image_id, load in tqdm(sources, desc="segment", unit="img", disable=not progress):
        target = out / f"{image_id}.png"
        overlay = out / f"{image_id}{OVERLAY_SUFFIX}"
        if target.is_file() and (not cfg.overlay or overlay.is_file()):
            res.skipped += 1
            continue
        try:
            image = load()
            if target.is_file():  # an earlier run without --overlay: draw the saved prediction
                from clip_es.data.image_io import read_mask

                pred, fresh = read_mask(target), False
            else:
                pred, fresh = predict_labels(seg, image, cfg.max_side), True
        except ImageError as e:
            res.failed[image_id] = str(e)
            log.warning("%s", e)
            continue
        if cfg.overlay:
            atomic_write_bytes(overlay, overlay_jpeg(image, pred))
        if fresh:
            atomic_write_bytes(target, mask_to_png_bytes(pred))
            res.done += 1
        else:
            res.skipped += 1
    if res.failed:
        atomic_write_json(out / "failed.json", res.failed)
    return res


#: File name ending of ``--overlay`` pictures: ``OUT/<id>.overlay.jpg`` next to ``OUT/<id>.png``.
OVERLAY_SUFFIX = ".overlay.jpg"


def overlay_jpeg(image: np.ndarray, labels: np.ndarray, quality: int = 90) -> bytes:
    """JPEG bytes of ``image`` (``(H, W, 3)`` uint8 RGB) with ``labels`` blended over it in
    the display colours, region outlines drawn."""
    from clip_es.draw import mask_overlay

    ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(mask_overlay(image, labels, 0.5, grey=False)[..., ::-1]),
                           [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:  # pragma: no cover - OpenCV encodes any uint8 3-channel array
        raise ImageError(f"could not encode an overlay of {image.shape[1]}x{image.shape[0]}")
    return buf.tobytes()


def segmenter_predictions(checkpoint: str | Path, ds, device: str = "auto",
                          ids: Sequence[str] | None = None, calibration: float | None = None
                          ) -> Iterator[tuple[str, np.ndarray]]:
    """``(id, labels)`` for every image of ``ds`` (or of ``ids``) with the run's classes (for eval).

    The checkpoint's classes must be the dataset's (same names, same order). Classes held out
    in training (``--unseen``) are predicted too, with the calibration offset (``None``: the
    family's default).
    """
    seg = load_segmenter(checkpoint, resolve_device(device), calibration)
    names = [c.name for c in seg.classes]
    if names != [c.name for c in ds.classes]:
        raise RunDirError(f"{checkpoint} predicts classes {names}, but the dataset has "
                          f"{[c.name for c in ds.classes]}")
    for image_id in ds.ids() if ids is None else ids:
        yield image_id, predict_labels(seg, ds.load_image(image_id))
