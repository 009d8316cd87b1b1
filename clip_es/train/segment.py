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

from clip_es.data.base import ClassSpec, check_id, read_class_file
from clip_es.data.image_io import mask_to_png_bytes, read_image
from clip_es.errors import ConfigError, DatasetError, ImageError, RunDirError
from clip_es.rundir import atomic_write_bytes, atomic_write_json, file_sha256
from clip_es.stage import StageResult, fit_image, resolve_device
from clip_es.threads import threads_from_config
from clip_es.train.loop import load_checkpoint
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


@torch.no_grad()
def predict_logits(seg: LoadedSegmenter, image: np.ndarray) -> torch.Tensor:
    """``(H, W, 3)`` uint8 RGB -> ``(K+1, H, W)`` float logits (input padded to a multiple of 32)."""
    H, W = image.shape[:2]
    x = torch.from_numpy(np.array(image, dtype=np.uint8)).to(seg.device).permute(2, 0, 1)[None].float() / 255
    ph, pw = (-H) % STRIDE, (-W) % STRIDE
    if ph or pw:  # pad with the normalisation mean (zero after normalising), as training pads
        mean = seg.model.mean.to(x.dtype)
        x = F.pad(x - mean, (0, pw, 0, ph)) + mean
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
        checkpoint: segmenter checkpoint (``RUN/segmenter/last.pt``).
        out: folder for ``<id>.png`` palette predictions (plus ``classes.txt``, ``segment.json``).
        images: a folder of images (alternative to a dataset).
        dataset, root, split: a dataset split to predict on.
        classes: comma-separated class names (open vocabulary); ``class_file``: a class file.
        device: ``cpu``, ``cuda`` or ``auto``.
        limit: only the first ``limit`` images.
        clip_model, clip_pretrained: CLIP override for embedding new class names.
        max_side: images with a longer side above it are predicted downscaled (``None``: never).
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
    """``(id, path)`` of the images directly in ``folder`` (sorted; ids must be unique)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"--images {folder} is not a folder")
    out: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.suffix.lower() in IMAGE_EXTS:
            check_id(p.stem, str(folder))
            if p.stem in out:
                raise DatasetError(f"{folder}: two images share the id {p.stem!r} ({out[p.stem].name}, {p.name})")
            out[p.stem] = p
    if not out:
        raise DatasetError(f"--images {folder} holds no images ({', '.join(IMAGE_EXTS)})")
    return list(out.items())


def _sources(cfg: SegmentConfig) -> Iterator[tuple[str, Any]]:
    if cfg.images is not None:
        for image_id, path in folder_images(cfg.images)[: cfg.limit]:
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
    for image_id, load in tqdm(list(_sources(cfg)), desc="segment", unit="img", disable=not progress):
        target = out / f"{image_id}.png"
        if target.is_file():
            res.skipped += 1
            continue
        try:
            pred = predict_labels(seg, load(), cfg.max_side)
        except ImageError as e:
            res.failed[image_id] = str(e)
            log.warning("%s", e)
            continue
        atomic_write_bytes(target, mask_to_png_bytes(pred))
        res.done += 1
    if res.failed:
        atomic_write_json(out / "failed.json", res.failed)
    return res


def segmenter_predictions(checkpoint: str | Path, ds, device: str = "auto") -> Iterator[tuple[str, np.ndarray]]:
    """``(id, labels)`` for every image of ``ds`` with the checkpoint's trained classes (for eval).

    The checkpoint's classes must be the dataset's (same names, same order).
    """
    seg = load_segmenter(checkpoint, resolve_device(device))
    names = [c.name for c in seg.classes]
    if names != [c.name for c in ds.classes]:
        raise RunDirError(f"{checkpoint} predicts classes {names}, but the dataset has "
                          f"{[c.name for c in ds.classes]}")
    for image_id in ds.ids():
        yield image_id, predict_labels(seg, ds.load_image(image_id))
