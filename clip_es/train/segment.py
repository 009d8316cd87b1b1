"""Inference with a trained segmenter (``clipes segment``), also used by ``clipes eval``.

Predictions are ``(H, W)`` uint8 label maps at the image's own size: 0 = background,
``k + 1`` = class ``k`` of the class list used (the training classes by default).

Open vocabulary: ``classes`` may name classes the segmenter never trained on. They are
embedded with the CLIP, templates and synonym fusion recorded in the checkpoint (the CLIP
is loaded for that; trained classes reuse their stored embeddings). What to expect: the
head scores pixels by cosine similarity to the projected text, so an unseen class is
found to the extent its CLIP text embedding lies near trained ones with similar
appearance (a synonym or close relative of a trained class transfers well; an unrelated
concept mostly does not, since a small CNN trained on K classes never learnt its
appearance). Dropping classes from the list is always safe.
"""

from __future__ import annotations

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
from clip_es.train.checkpoint import load_checkpoint
from clip_es.train.model import STRIDE, Segmenter, SegmenterArch
from clip_es.train.text import lists_to_specs, specs_to_lists, text_for_classes

log = logging.getLogger(__name__)

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
#: Default working-resolution cap (pixels, longer side) of :func:`predict_labels`.
MAX_SIDE = 2048


@dataclass
class LoadedSegmenter:
    """A segmenter ready for inference.

    Attributes:
        model: eval-mode :class:`Segmenter` on ``device``.
        text: ``(K, D)`` embeddings of ``classes`` on ``device``.
        classes: the class list ``text`` encodes.
        payload: the checkpoint's text record (CLIP, templates, fusion, trained classes).
        checkpoint: the file it came from; ``step``: its training step.
    """

    model: Segmenter
    text: torch.Tensor
    classes: list[ClassSpec]
    payload: dict[str, Any]
    checkpoint: str
    step: int
    device: str

    def with_classes(self, classes: Sequence[ClassSpec] | None, clip_model: str | None = None,
                     clip_pretrained: str | None = None) -> "LoadedSegmenter":
        """The same model predicting another class list (open vocabulary)."""
        if not classes:
            return self
        names = [c.name for c in classes]
        if len(set(names)) != len(names):
            raise ConfigError(f"duplicate class names in {names}")
        text = text_for_classes(self.payload, classes, clip_model, clip_pretrained, self.device)
        return LoadedSegmenter(self.model, text.to(self.device), list(classes), self.payload, self.checkpoint,
                               self.step, self.device)


def load_segmenter(path: str | Path, device: str = "cpu") -> LoadedSegmenter:
    """Rebuild a trained segmenter from a checkpoint (no network, random-init backbone replaced).

    Raises:
        WeightsError: not a readable segmenter checkpoint.
    """
    ck = load_checkpoint(path)
    arch = SegmenterArch.from_dict(ck["config"]["arch"])
    model = Segmenter(arch)
    model.load_state_dict(ck["model"])
    model.eval().to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    payload = ck["text"]
    return LoadedSegmenter(model, payload["embeddings"].to(device), lists_to_specs(payload["classes"]), payload,
                           str(path), int(ck["step"]), device)


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


def pad_to_stride(x: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """The one padding rule of inference: ``(B, 3, H, W)`` RGB in [0, 1] padded at the bottom
    and right to multiples of :data:`STRIDE` with the normalisation ``mean`` (zero after
    normalising, as training pads). :func:`predict_logits` and the ONNX graph
    (:mod:`clip_es.train.onnx_export`) both use it, so they agree at every size. Traceable:
    the pad amounts follow the input's dynamic height and width in an exported graph."""
    H, W = x.shape[-2], x.shape[-1]
    ph, pw = (STRIDE - H % STRIDE) % STRIDE, (STRIDE - W % STRIDE) % STRIDE
    mean = mean.to(x.dtype)
    return F.pad(x - mean, (0, pw, 0, ph)) + mean


@torch.no_grad()
def predict_logits(seg: LoadedSegmenter, image: np.ndarray) -> torch.Tensor:
    """``(H, W, 3)`` uint8 RGB -> ``(K+1, H, W)`` float logits (input padded by :func:`pad_to_stride`)."""
    H, W = image.shape[:2]
    x = torch.from_numpy(np.array(image, dtype=np.uint8)).to(seg.device).permute(2, 0, 1)[None].float() / 255
    if H % STRIDE or W % STRIDE:
        x = pad_to_stride(x, seg.model.mean)
    return seg.model(x, seg.text)[0, :, :H, :W]


def predict_labels(seg: LoadedSegmenter, image: np.ndarray, max_side: int | None = MAX_SIDE) -> np.ndarray:
    """``(H, W, 3)`` uint8 RGB -> ``(H, W)`` uint8 labels (0 background, ``k + 1`` class ``k``).

    Images whose longer side exceeds ``max_side`` are predicted on an area-downscaled copy
    (longer side ``max_side``) and the labels resized back (nearest), which bounds memory;
    ``None`` = always native size.
    """
    H, W = image.shape[:2]
    labels = predict_logits(seg, fit_image(image, max_side)).argmax(0).to(torch.uint8).cpu().numpy()
    if labels.shape != (H, W):
        labels = cv2.resize(labels, (W, H), interpolation=cv2.INTER_NEAREST)
    return labels


@dataclass(frozen=True)
class SegmentConfig:
    """Options of ``clipes segment``.

    Attributes:
        checkpoint: segmenter checkpoint (``RUN/segmenter/model.pt`` or ``last.pt``).
        out: folder for ``<id>.png`` palette predictions (plus ``classes.txt``, ``segment.json``).
        images: a folder of images (alternative to a dataset).
        dataset, root, split: a dataset split to predict on.
        classes: comma-separated class names (open vocabulary); ``class_file``: a class file.
        device: ``cpu``, ``cuda`` or ``auto``.
        limit: only the first ``limit`` images.
        clip_model, clip_pretrained: CLIP override for embedding new class names.
        max_side: images with a longer side above it are predicted downscaled (``None``: never).
        overlay: also write ``OUT/<id>.overlay.jpg``: the image with the predicted label
            colours blended over it and region outlines (display colours, see
            :func:`~clip_es.draw.display_palette`; the PNG masks keep the VOC palette).
        threads: CPU threads (``None``: see :func:`clip_es.threads.default_threads`).
    """

    checkpoint: str
    out: str
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
    overlay: bool = False
    threads: int | None = None

    def validate(self) -> "SegmentConfig":
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
    seg = load_segmenter(cfg.checkpoint, resolve_device(cfg.device))
    seg = seg.with_classes(parse_classes(cfg.classes, cfg.class_file), cfg.clip_model, cfg.clip_pretrained)
    if len(seg.classes) > 254:
        raise ConfigError(f"{len(seg.classes)} classes do not fit a uint8 label map (max 254)")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    record = {"checkpoint": str(Path(cfg.checkpoint).resolve()), "sha256": file_sha256(cfg.checkpoint),
              "classes": specs_to_lists(seg.classes)}
    meta = out / "segment.json"
    if meta.is_file():
        old = json.loads(meta.read_text())
        if old.get("sha256") != record["sha256"] or old.get("classes") != record["classes"]:
            raise RunDirError(f"{out} holds predictions of another checkpoint or class list; use a new --out")
    atomic_write_json(meta, record)
    atomic_write_bytes(out / "classes.txt", "".join(", ".join(c) + "\n" for c in record["classes"]).encode())
    res = StageResult("segment", str(out))
    found = None
    if cfg.images is not None:  # files whose names are no usable id: listed as failures, the rest go on
        found, refused = _folder_checked(cfg.images)
        for name, reason in refused.items():
            res.failed[name] = reason
            log.warning("%s", reason)
    for image_id, load in tqdm(list(_sources(cfg, found)), desc="segment", unit="img", disable=not progress):
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
                          ids: Sequence[str] | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """``(id, labels)`` for every image of ``ds`` (or of ``ids``) with the checkpoint's trained classes (for eval).

    The checkpoint's classes must be the dataset's (same names, same order).
    """
    seg = load_segmenter(checkpoint, resolve_device(device))
    names = [c.name for c in seg.classes]
    if names != [c.name for c in ds.classes]:
        raise RunDirError(f"{checkpoint} predicts classes {names}, but the dataset has "
                          f"{[c.name for c in ds.classes]}")
    for image_id in ds.ids() if ids is None else ids:
        yield image_id, predict_labels(seg, ds.load_image(image_id))
