"""The ``cam`` stage: per image, softmax-GradCAM and CAA maps into ``RUN/cam/<id>.npz``.

Working resolution. Images whose longer side exceeds ``CamConfig.max_side`` (default
1024 px) are first downscaled (area interpolation, aspect kept) so that side is
``max_side``; scales, flips and the CLIP forward then run on that working image, and
multi-view maps are averaged at its size. The record keeps the original ``(H, W)`` and
:func:`~clip_es.cam.store.load_cam` upsamples to it, so every reader still gets maps of
the original size. This bounds the token count (a 8000x6000 photo at native size would
be a 500x375 grid = 187,500 tokens, whose N x N attention alone is 140 GB); images
below the cap are processed exactly as without it. Decoding is capped separately at
:data:`~clip_es.data.image_io.MAX_SIDE`. Memory: one 8000x6000 JPEG with the default
cap adds 0.83 GB to the process on CPU with the test-size CLIP (peak RSS 1.56 GB, of
which 0.73 GB is importing torch; decoding the JPEG takes 0.46 GB, at most one decoded
image is alive at a time); a larger CLIP adds its weights and activations at
``max_side`` (see ``tests/test_reliability.py``, which asserts the bound).

Failures. Per-image problems (:class:`~clip_es.errors.DatasetError`: unreadable image,
bad label XML, bad GT when labels come from it; or out of memory on one image) are
recorded in ``manifest.json`` (``stages.cam.failed``: id -> reason naming the file) and
the stage goes on. Problems that would hit every image (options, class or labels file,
weights, an unwritable run folder) raise before or during the loop.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from tqdm import tqdm

from clip_es.cam.caa import balance_affinity, caa_refine
from clip_es.cam.gradcam import softmax_gradcam
from clip_es.cam.store import is_valid_cam, save_cam, upsample
from clip_es.data.base import ClassSpec
from clip_es.data.registry import DEFAULT_BACKGROUND, background_words, open_dataset
from clip_es.errors import ConfigError, DatasetError
from clip_es.model.dense import dense_forward
from clip_es.model.resolve import ClipModel, load_clip
from clip_es.model.text import DEFAULT_TEMPLATE, background_embeddings, check_templates, class_embeddings
from clip_es.rundir import RunDir
from clip_es.stage import StageResult, completion_status, dist_shard, fit_image, resolve_device, select_ids

log = logging.getLogger(__name__)
STAGE = "cam"


@dataclass(frozen=True)
class CamConfig:
    """Everything the cam stage needs. Saved as ``RUN/cam/config.json``.

    Attributes:
        dataset, root, split, class_file: which images (see :func:`open_dataset`).
        ann_file: COCO only: the instances JSON (default ``ROOT/annotations/instances_SPLIT.json``);
            recorded in the manifest, so later stages reopen the dataset with it.
        out: the run directory.
        model, pretrained: CLIP to use (see :func:`clip_es.model.load_clip`).
        templates: prompt templates; several are averaged.
        fusion: synonym fusion, ``sentence`` or ``mean``.
        background: background set: ``voc``, ``coco``, ``toy``, ``none`` or a word file;
            ``None`` = the dataset kind's default.
        scales: input scales; maps are averaged at full size when more than one.
        flip: also run the horizontally flipped image and average.
        softmax: GradCAM on the softmax probability (``False``: on the raw logit).
        caa: compute CAA maps (``False``: ``caa`` = ``cam``).
        caa_threshold: box threshold of CAA's class-aware mask.
        caa_blocks: how many last blocks' attention make the affinity.
        sinkhorn_iters: balancing rounds.
        pooling: image embedding pooling, ``mean`` (CLIP-ES) or ``cls``.
        max_side: working-resolution cap in pixels: images whose longer side exceeds it
            are downscaled to it for the CLIP forward (maps are still read back at the
            original size); ``None`` = no cap (native size; memory grows with the 4th
            power of the side).
        device: ``cpu``, ``cuda`` or ``auto``.
        limit: only the first ``limit`` images of the split.
        shard: ``(i, n)``: process images ``i, i+n, i+2n, ...``.
    """

    dataset: str
    root: str
    split: str
    out: str
    class_file: str | None = None
    ann_file: str | None = None
    model: str = "clipes-tiny"
    pretrained: str | None = None
    templates: tuple[str, ...] = (DEFAULT_TEMPLATE,)
    fusion: str = "sentence"
    background: str | None = None
    scales: tuple[float, ...] = (1.0,)
    flip: bool = False
    softmax: bool = True
    caa: bool = True
    caa_threshold: float = 0.4
    caa_blocks: int = 8
    sinkhorn_iters: int = 3
    pooling: str = "mean"
    max_side: int | None = 1024
    device: str = "auto"
    limit: int | None = None
    shard: tuple[int, int] = (0, 1)

    def validate(self) -> "CamConfig":
        check_templates(self.templates)
        if self.fusion not in ("sentence", "mean"):
            raise ConfigError(f"--fusion must be sentence or mean, got {self.fusion!r}")
        if not self.scales or any(s <= 0 for s in self.scales):
            raise ConfigError(f"--scales must be positive numbers, got {self.scales}")
        i, n = self.shard
        if n < 1 or not 0 <= i < n:
            raise ConfigError(f"--shard must be I/N with 0 <= I < N, got {i}/{n}")
        if not 0 <= self.caa_threshold < 1:
            raise ConfigError(f"--caa-threshold must be in [0, 1), got {self.caa_threshold}")
        if self.pooling not in ("mean", "cls"):
            raise ConfigError(f"--pooling must be mean or cls, got {self.pooling!r}")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"--limit must be at least 1, got {self.limit}")
        if self.max_side is not None and self.max_side < 1:
            raise ConfigError(f"--max-side must be a positive number of pixels (0 on the command line: no cap), "
                              f"got {self.max_side}")
        return self


def preprocess(image: np.ndarray, scale: float, patch: int, mean, std, flip: bool = False) -> torch.Tensor:
    """``(H, W, 3)`` uint8 -> ``(1, 3, h*p, w*p)`` normalised, bicubic to the patch-multiple size."""
    H, W = image.shape[:2]
    h = max(1, math.ceil(scale * H / patch)) * patch
    w = max(1, math.ceil(scale * W / patch)) * patch
    img = image[:, ::-1] if flip else image
    x = cv2.resize(np.ascontiguousarray(img), (w, h), interpolation=cv2.INTER_CUBIC).astype(np.float32) / 255.0
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return torch.from_numpy(x).permute(2, 0, 1)[None].contiguous()


@dataclass
class CamEngine:
    """The per-image computation with the text side prepared once.

    Attributes:
        clip: the loaded CLIP.
        class_text: ``(C, D)`` embeddings of all dataset classes.
        bg_text: ``(B, D)`` embeddings of the background words.
        cfg: stage parameters.
    """

    clip: ClipModel
    class_text: torch.Tensor
    bg_text: torch.Tensor
    cfg: CamConfig

    @torch.no_grad()
    def _one_view(self, x: torch.Tensor, keys: list[int], mode: str) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.cfg
        visual = self.clip.visual
        d = dense_forward(visual, x.to(self.clip.device), attn_blocks=cfg.caa_blocks if cfg.caa else 0)
        text = torch.cat([self.class_text[keys], self.bg_text], 0)
        g = softmax_gradcam(visual, d.penultimate, d.grid, text, len(keys), self.clip.logit_scale,
                            pooling=cfg.pooling, use_softmax=cfg.softmax, mode=mode)
        if not cfg.caa or not keys:
            return g.cam, g.cam.clone()
        aff = (d.attn_sum[0] + g.attn_last) / (d.attn_count + 1) if d.attn_sum is not None else g.attn_last
        trans = balance_affinity(aff, cfg.sinkhorn_iters)
        return g.cam, caa_refine(g.cam, trans, cfg.caa_threshold)

    def working_image(self, image: np.ndarray) -> np.ndarray:
        """``image`` itself, or an area-downscaled copy whose longer side is ``cfg.max_side``.

        Idempotent, so a caller may downscale first (and free the original) before :meth:`compute`.
        """
        return fit_image(image, self.cfg.max_side)

    def compute(self, image: np.ndarray, keys: list[int], mode: str = "batched"
                ) -> tuple[np.ndarray, np.ndarray]:
        """Maps for one image.

        Args:
            image: ``(H, W, 3)`` uint8 RGB.
            keys: 0-based class indices (the targets).

        Returns:
            ``(cam, caa)``, each ``(K, h, w)`` at the patch grid for a single
            unflipped scale, else ``(K, H', W')`` averaged over views, where ``(H', W')``
            is the working size (``(H, W)`` unless the image exceeds ``cfg.max_side``).
        """
        image = self.working_image(image)
        H, W = image.shape[:2]
        views = [(s, f) for s in self.cfg.scales for f in ((False, True) if self.cfg.flip else (False,))]
        p = self.clip.patch_size
        if len(views) == 1:
            s, _ = views[0]
            cam, caa = self._one_view(preprocess(image, s, p, self.clip.mean, self.clip.std), keys, mode)
            return cam.cpu().numpy(), caa.cpu().numpy()
        acc_cam = np.zeros((len(keys), H, W), np.float32)
        acc_caa = np.zeros_like(acc_cam)
        for s, f in views:
            cam, caa = self._one_view(preprocess(image, s, p, self.clip.mean, self.clip.std, f), keys, mode)
            cam, caa = upsample(cam.cpu().numpy(), (H, W)), upsample(caa.cpu().numpy(), (H, W))
            if f:
                cam, caa = cam[:, :, ::-1], caa[:, :, ::-1]
            acc_cam += cam
            acc_caa += caa
        return acc_cam / len(views), acc_caa / len(views)


def build_engine(cfg: CamConfig, classes: list[ClassSpec], clip: ClipModel | None = None) -> CamEngine:
    """Load the CLIP (unless given) and embed classes and background words once."""
    clip = clip or load_clip(cfg.model, cfg.pretrained, device=resolve_device(cfg.device))
    bg = background_words(cfg.background or "none")
    return CamEngine(clip, class_embeddings(clip, classes, cfg.templates, cfg.fusion),
                     background_embeddings(clip, bg, cfg.templates), cfg)


def stage_params(cfg: CamConfig, clip: ClipModel, classes: list[ClassSpec]) -> dict[str, Any]:
    """The parameters that decide the outputs (hashed into the manifest)."""
    p = {k: v for k, v in asdict(cfg).items() if k not in ("out", "device", "limit", "shard", "root")}
    if p.get("ann_file") is None:  # runs made before --ann-file existed keep their hash
        p.pop("ann_file", None)
    p["model"] = clip.describe()
    p["background_words"] = background_words(cfg.background or "none")
    p["classes"] = [[c.name, *c.synonyms] for c in classes]
    p["templates"] = list(cfg.templates)
    p["scales"] = list(cfg.scales)
    return p


def generate_cams(cfg: CamConfig, clip: ClipModel | None = None, progress: bool = True) -> StageResult:
    """Run the cam stage (resumable). The Python-API twin of ``clipes cam``.

    Returns:
        A :class:`StageResult`; per-image failures are listed, not raised.

    Raises:
        ClipEsError subclasses for fatal problems (bad options, dataset, weights, run dir).
    """
    cfg = cfg.validate()
    if cfg.background is None:
        cfg = replace(cfg, background=DEFAULT_BACKGROUND.get(cfg.dataset, "none"))
    ds = open_dataset(cfg.dataset, cfg.root, cfg.split, cfg.class_file, **dataset_options(cfg))
    all_ids = ds.ids()  # a malformed labels/split file fails here, before the run folder is touched
    run = RunDir(cfg.out)
    precheck_run(cfg, run, ds.classes)  # refusals that need no model come before its (slow) load
    engine = build_engine(cfg, ds.classes, clip)
    run.ensure()
    top = dict(dataset={"kind": cfg.dataset, "root": str(Path(cfg.root).resolve()), "split": cfg.split,
                        "class_file": str(Path(cfg.class_file).resolve()) if cfg.class_file else None,
                        **dataset_options(cfg)},
               classes=[c.name for c in ds.classes], category_ids=list(ds.category_ids),
               model=engine.clip.describe())
    out = run.begin_stage(STAGE, stage_params(cfg, engine.clip, ds.classes), top=top)
    shard = dist_shard(cfg.shard)
    ids = select_ids(all_ids, cfg.limit, shard)
    res = StageResult(STAGE, str(run.path))
    done_ids: list[str] = []
    bar = tqdm(ids, desc=f"cam {shard[0]}/{shard[1]}" if shard[1] > 1 else "cam", unit="img",
               disable=not progress)
    try:
        for image_id in bar:
            path = out / f"{image_id}.npz"
            if path.exists() and is_valid_cam(path):
                res.skipped += 1
                continue
            reason = _cam_one(engine, ds, image_id, path)
            if reason is not None:  # per-image: record and go on
                res.failed[image_id] = reason
                log.warning("%s", reason)
                continue
            res.done += 1
            done_ids.append(image_id)
    finally:
        bar.close()
    expected = select_ids(all_ids, cfg.limit, (0, 1))
    run.record(STAGE, failed=res.failed, done=done_ids,
               status=lambda st: completion_status(st, out, ".npz", expected))
    return res



def dataset_options(cfg: CamConfig) -> dict[str, str]:
    """Reader options beyond kind/root/split/class_file (``ann_file`` for COCO), as recorded in the manifest."""
    if not cfg.ann_file:
        return {}
    if cfg.dataset != "coco":
        raise ConfigError(f"--ann-file is for COCO datasets (-d coco), not {cfg.dataset!r}")
    return {"ann_file": str(Path(cfg.ann_file).resolve())}


class _ModelNotLoaded:
    """Stands in for the CLIP in :func:`stage_params` before it is loaded (its record: ``None``)."""

    def describe(self) -> None:
        return None


def precheck_run(cfg: CamConfig, run: RunDir, classes: list[ClassSpec]) -> None:
    """Refuse, before the model load and writing nothing, a run folder that cannot be written or
    whose cam stage ran with other parameters (every parameter but the model, which
    :meth:`RunDir.begin_stage` compares once it is loaded)."""
    run.check_writable()
    run.check_params(STAGE, stage_params(cfg, _ModelNotLoaded(), classes), ignore=("model",))


def _cam_one(engine: CamEngine, ds, image_id: str, path: Path) -> str | None:
    """Compute and write one record; ``None`` on success, else the per-image failure reason.

    Raises:
        OutputWriteError: the record cannot be written (fatal for the stage).
    """
    try:
        keys = list(ds.labels(image_id))
        image = ds.load_image(image_id)
        size = image.shape[:2]
        image = engine.working_image(image)  # the full-size decode is freed before the forward
        cam, caa = engine.compute(image, keys)
        del image
    except DatasetError as e:  # unreadable image, bad label XML, bad GT the labels come from
        return str(e)
    except OSError as e:  # an input file that cannot be opened (permissions, I/O error)
        return f"{image_id}: cannot read its files ({e})"
    except (MemoryError, torch.cuda.OutOfMemoryError) as e:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return (f"{image_id}: out of memory ({type(e).__name__}); lower --max-side "
                f"(now {engine.cfg.max_side}) or --scales")
    save_cam(path, keys, cam, caa, size)
    return None

