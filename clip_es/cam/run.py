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
``max_side`` (see ``tests/test_reliability.py``, which asserts the bound). With
``batch_size`` B and ``workers`` N, up to about ``4B`` preprocessed inputs wait for a
batch and each loader worker holds a few decoded images ahead.

Speed (``precision``, ``batch_size``, ``workers``, ``threads``; see ``docs/cam.md``).
The frozen blocks may run under autocast; the last block, GradCAM and CAA never do (a
reduced-precision batch whose activations are not finite is computed again in fp32, with
one warning). Images are grouped by working size into batches; the frozen blocks, the last
block with its GradCAM backward and CAA (``T @ (T @ v)`` in float64, never the N x N
square) each run once per batch, and the maps leave the device once per batch. Loader
workers send uint8 inputs, normalised on the model's device. Records are written by a
small thread pool (each write atomic, in any order, not fsynced; the first write error
stops the stage and is raised here).

Devices. :func:`~clip_es.stage.resolve_device` picks the device (``cuda:LOCAL_RANK % GPUs``
under torchrun) and :func:`~clip_es.stage.bind_device` makes it current. Out of memory on
a batch (also cuBLAS/cuDNN allocation failures) retries its images one by one once the
failed attempt is freed; an image that does not fit alone is recorded as failed.

Failures. Per-image problems (:class:`~clip_es.errors.DatasetError`: unreadable image,
bad label XML, bad GT when labels come from it; or out of memory on one image) are
recorded in ``manifest.json`` (``stages.cam.failed``: id -> reason naming the file) and
the stage goes on. Problems that would hit every image (options, class or labels file,
weights, an unwritable run folder) raise before or during the loop.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from clip_es.cam.caa import balanced_transition, caa_refine
from clip_es.cam.gradcam import softmax_gradcam_batch
from clip_es.cam.store import is_valid_cam, save_cam
from clip_es.data.base import ClassSpec, worker_view
from clip_es.data.registry import DEFAULT_BACKGROUND, background_words, open_dataset
from clip_es.errors import ConfigError, DatasetError
from clip_es.model.dense import dense_forward
from clip_es.model.inputs import input_size, normalise, preprocess, resize_input  # noqa: F401 (preprocess re-exported)
from clip_es.model.precision import PRECISIONS, autocast, autocast_dtype, exact_fp32, resolve_precision
from clip_es.model.resolve import ClipModel, load_clip
from clip_es.model.text import DEFAULT_TEMPLATE, background_embeddings, check_templates, class_embeddings
from clip_es.rundir import RunDir
from clip_es.stage import (StageResult, bind_device, completion_status, dist_shard, fit_image, hold_for_test,
                            is_out_of_memory, resolve_device, select_ids)
from clip_es.threads import available_cpus, resolve_threads, use_threads

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
        precision: the frozen forward's precision: ``auto`` (bf16 where the device computes
            it natively, else fp32; see :mod:`clip_es.model.precision`), ``fp32``, ``bf16`` or
            ``fp16``. The last block, the gradients and CAA always run in fp32/fp64. The
            resolved value is recorded in the manifest.
        limit: only the first ``limit`` images of the split.
        shard: ``(i, n)``: process images ``i, i+n, i+2n, ...``.
        batch_size: images per forward (grouped by working size): the frozen blocks, the last
            block with its GradCAM backward and CAA all run on the batch at once. fp32 maps
            equal batch 1's to rounding (within 2e-6).
        workers: data-loader processes decoding and resizing images ahead (0 = in this
            process); ``auto`` = 0 on a CPU (decoding is a small share there and spawned
            workers compete for the cores), several on CUDA (:func:`resolve_workers`).
            Records are written by a small thread pool either way.
        threads: CPU threads for the computation; ``None`` = ``OMP_NUM_THREADS`` if set,
            else every CPU this process may use (see :mod:`clip_es.threads`).
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
    precision: str = "auto"
    batch_size: int = 1
    workers: int | str = "auto"
    threads: int | None = None

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
        if self.precision not in PRECISIONS:
            raise ConfigError(f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size must be at least 1, got {self.batch_size}")
        resolve_workers(self.workers, "cpu")
        resolve_threads(self.threads)
        return self


#: The most loader workers ``--workers auto`` starts per process on CUDA.
AUTO_WORKERS_MAX = 8


def resolve_workers(workers: int | str, device: str) -> int:
    """Loader processes for ``--workers`` on ``device``: an integer as given; ``auto`` = 0 on a CPU,
    on CUDA ``min(8, CPUs / local processes - 1)`` (at least 1; ``LOCAL_WORLD_SIZE`` under torchrun).

    Raises:
        ConfigError: a negative number or another word.
    """
    if workers == "auto":
        if not str(device).startswith("cuda"):
            return 0
        import os

        local = os.environ.get("LOCAL_WORLD_SIZE", "1")
        per_rank = available_cpus() // max(1, int(local) if local.isdigit() else 1)
        return max(1, min(AUTO_WORKERS_MAX, per_rank - 1))
    try:
        n = int(workers)
    except (TypeError, ValueError):
        raise ConfigError(f"--workers must be auto or a number >= 0, got {workers!r}") from None
    if n < 0:
        raise ConfigError(f"--workers must be auto or a number >= 0, got {workers!r}")
    return n


#: CamConfig fields that do not change the outputs (left out of the manifest's parameters).
_RUNTIME_FIELDS = ("out", "device", "limit", "shard", "root", "batch_size", "workers", "threads")


@dataclass
class Prepared:
    """One image decoded, downscaled to its working size and preprocessed (a data-loader item).

    Attributes:
        id: image id.
        keys: 0-based class indices (the targets).
        size: original ``(H, W)`` (what the record stores).
        work: working ``(H', W')`` (the original unless above ``max_side``).
        views: one ``(1, 3, h, w)`` uint8 input per (scale, flip) view (resized, not yet
            normalised: the engine normalises on its device, so loader workers send a
            quarter of the float32 bytes through shared memory).
        error: per-image failure reason; then the other fields are empty.
    """

    id: str
    keys: list[int] = field(default_factory=list)
    size: tuple[int, int] = (0, 0)
    work: tuple[int, int] = (0, 0)
    views: list[torch.Tensor] = field(default_factory=list)
    error: str | None = None

    @property
    def bucket(self) -> tuple:
        """Images with the same bucket key can share a batched forward."""
        return self.work, tuple(tuple(v.shape) for v in self.views)


@dataclass
class CamEngine:
    """The per-image computation with the text side prepared once.

    Attributes:
        clip: the loaded CLIP.
        class_text: ``(C, D)`` embeddings of all dataset classes.
        bg_text: ``(B, D)`` embeddings of the background words.
        cfg: stage parameters.
        precision: resolved precision of the frozen forward (``fp32``, ``bf16`` or ``fp16``).
    """

    clip: ClipModel
    class_text: torch.Tensor
    bg_text: torch.Tensor
    cfg: CamConfig
    precision: str = "fp32"
    #: precision of the last block's forward and backward (``fp32``; ``bf16``/``fp16`` only for
    #: measurements: see docs/cam.md, "the last block in reduced precision")
    last_block: str = "fp32"
    #: set once a reduced-precision batch had to be redone in fp32 (warned once per engine)
    redone_fp32: bool = field(default=False, repr=False)

    def _views(self) -> list[tuple[float, bool]]:
        return [(s, f) for s in self.cfg.scales for f in ((False, True) if self.cfg.flip else (False,))]

    def _frozen(self, x: torch.Tensor):
        """The frozen blocks on ``x`` ``(B, 3, h, w)`` normalised; a reduced-precision result that
        is not finite (fp16 overflows in the residual stream) is computed again in fp32."""
        attn_blocks = self.cfg.caa_blocks if self.cfg.caa else 0
        visual = self.clip.visual
        with autocast(self.precision, self.clip.device):
            d = dense_forward(visual, x, attn_blocks=attn_blocks)
        if self.precision == "fp32":
            return d
        # a non-finite value makes the fp32 sum non-finite (finite values cannot overflow it:
        # |activations| stay far below 3e38 / numel); one reduction and one host sync per batch
        total = d.penultimate.float().sum()
        if d.attn_sum is not None:
            total = total + d.attn_sum.sum()
        if bool(torch.isfinite(total)):
            return d
        if not self.redone_fp32:
            log.warning("cam: a --precision %s batch overflowed (non-finite activations); such batches are "
                        "computed again in fp32 (warned once)", self.precision)
            self.redone_fp32 = True
        with autocast("fp32", self.clip.device):
            return dense_forward(visual, x, attn_blocks=attn_blocks)

    @torch.no_grad()
    def _batch_view(self, x: torch.Tensor, keys: list[list[int]], mode: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Maps of one view for the batch ``x`` ``(B, 3, h, w)`` uint8 (on any device).

        Normalised on the model's device; the frozen blocks, the last block with its GradCAM
        backward and CAA each run once for the whole batch.

        Returns:
            ``(cam, caa)``, each ``(B, K, h, w)`` at the patch grid, ``K = max len(keys)``; the
            rows past an image's own ``len(keys[i])`` are zero padding.
        """
        cfg = self.cfg
        c = self.clip
        x = normalise(x.to(c.device, non_blocking=True), c.mean, c.std)
        d = self._frozen(x)
        texts = [torch.cat([self.class_text[k], self.bg_text], 0) for k in keys]
        with exact_fp32(str(c.device)) if self.last_block == "fp32" else contextlib.nullcontext():  # no TF32
            g = softmax_gradcam_batch(c.visual, d.penultimate.float(), d.grid, texts, [len(k) for k in keys],
                                      c.logit_scale, pooling=cfg.pooling, use_softmax=cfg.softmax, mode=mode,
                                      autocast_dtype=autocast_dtype(self.last_block))
        if not cfg.caa or g.cam.shape[1] == 0:
            return g.cam, g.cam.clone()
        last = g.attn_last.double()
        aff = (d.attn_sum.double() + last) / (d.attn_count + 1) if d.attn_sum is not None else last
        trans = balanced_transition(aff, cfg.sinkhorn_iters)  # float64 T; CAA applies T @ (T @ v)
        return g.cam, caa_refine(g.cam, trans, cfg.caa_threshold, steps=2)

    def preparer(self) -> "_Preparer":
        """The decode-side work (working size, resize), picklable for loader workers."""
        return _Preparer(self.cfg.max_side, tuple(self._views()), self.clip.patch_size)

    def prepare(self, image: np.ndarray, image_id: str = "", keys=(), size: tuple[int, int] | None = None
                ) -> Prepared:
        """Working image and the uint8 model input of every view (what data-loader workers compute ahead)."""
        return self.preparer()(image, image_id, keys, size)

    def record_grid(self, work: tuple[int, int]) -> tuple[int, int]:
        """The ``(h, w)`` a record stores for a working size: the scale-1 patch grid, also for
        multi-view runs (whose views are averaged there), so their records are no larger."""
        p = self.clip.patch_size
        h, w = input_size(work, 1.0, p)
        return h // p, w // p

    def compute_batch(self, items: list[Prepared], mode: str = "auto") -> list[tuple[np.ndarray, np.ndarray]]:
        """Maps for images of one bucket (same working size), computed as one batch.

        Returns:
            Per image ``(cam, caa)``, each ``(K, h, w)`` float32 at the scale-1 patch grid
            (:meth:`record_grid`); with several views (scales, flip) each view's maps are
            resized there (bilinear), flipped back and averaged. In fp32 the outputs do not
            depend on how the images are batched beyond rounding (within 2e-6).
        """
        if len({it.bucket for it in items}) > 1:
            raise ValueError("compute_batch needs images of one working size; group them by Prepared.bucket")
        keys = [it.keys for it in items]
        views = self._views()
        gh, gw = self.record_grid(items[0].work)
        acc = None
        for j, (_, f) in enumerate(views):
            cam, caa = self._batch_view(cat_views([it.views[j] for it in items], self.clip.device), keys, mode)
            both = torch.stack([cam, caa]).float()  # (2, B, K, h, w)
            if tuple(both.shape[-2:]) != (gh, gw):
                both = resize_maps(both, (gh, gw))
            if f:
                both = both.flip(-1)
            acc = both if acc is None else acc + both
        out = (acc / len(views) if len(views) > 1 else acc).cpu().numpy()  # one device-to-host copy per batch
        return [(out[0, i, :len(k)], out[1, i, :len(k)]) for i, k in enumerate(keys)]

    def compute(self, image: np.ndarray, keys: list[int], mode: str = "auto"
                ) -> tuple[np.ndarray, np.ndarray]:
        """Maps for one image (see :meth:`compute_batch`).

        Args:
            image: ``(H, W, 3)`` uint8 RGB.
            keys: 0-based class indices (the targets).
        """
        return self.compute_batch([self.prepare(image, keys=keys)], mode)[0]


def _pinned_empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised page-locked host tensor (a function so tests can stand in for CUDA's)."""
    return torch.empty(shape, dtype=dtype, pin_memory=True)


def cat_views(views: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """The batch ``(B, 3, h, w)`` of ``B`` one-image views, on the host.

    For a CUDA ``device`` the views are concatenated straight into page-locked memory, so the
    ``non_blocking`` host-to-device copy that follows is really asynchronous: ``torch.cat`` of
    pinned views would make a new pageable tensor, whose copy is synchronous (the loader
    therefore does not pin the single views: one pinned copy per batch, not two)."""
    if torch.device(device).type != "cuda":
        return torch.cat(views)
    out = _pinned_empty((sum(v.shape[0] for v in views), *views[0].shape[1:]), views[0].dtype)
    return torch.cat(views, out=out)


def resize_maps(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize (``align_corners=False``, as OpenCV's) of ``(..., h, w)`` maps to ``(..., H, W)``."""
    lead, (h, w) = maps.shape[:-2], maps.shape[-2:]
    if maps.numel() == 0:
        return maps.new_zeros((*lead, *size))
    flat = maps.reshape(-1, 1, h, w)
    return torch.nn.functional.interpolate(flat, size=size, mode="bilinear", align_corners=False).reshape(*lead, *size)


def build_engine(cfg: CamConfig, classes: list[ClassSpec], clip: ClipModel | None = None) -> CamEngine:
    """Load the CLIP (unless given), resolve the precision, embed classes and background words once."""
    clip = clip or load_clip(cfg.model, cfg.pretrained, device=resolve_device(cfg.device))
    bg = background_words(cfg.background or "none")
    return CamEngine(clip, class_embeddings(clip, classes, cfg.templates, cfg.fusion),
                     background_embeddings(clip, bg, cfg.templates), cfg,
                     resolve_precision(cfg.precision, str(clip.device)))


def stage_params(cfg: CamConfig, clip: ClipModel, classes: list[ClassSpec], precision: str | None = None
                 ) -> dict[str, Any]:
    """The parameters that decide the outputs (hashed into the manifest).

    ``precision`` is the resolved one (``auto`` never reaches the manifest); batch size,
    workers and threads are left out like device, limit and shard.
    """
    p = {k: v for k, v in asdict(cfg).items() if k not in _RUNTIME_FIELDS}
    if p.get("ann_file") is None:  # runs made before --ann-file existed keep their hash
        p.pop("ann_file", None)
    p["precision"] = precision or resolve_precision(cfg.precision, str(clip.device))
    p["model"] = clip.describe()
    p["background_words"] = background_words(cfg.background or "none")
    p["classes"] = [[c.name, *c.synonyms] for c in classes]
    p["templates"] = list(cfg.templates)
    p["scales"] = list(cfg.scales)
    return p


def generate_cams(cfg: CamConfig, clip: ClipModel | None = None, progress: bool = True) -> StageResult:
    """Run the cam stage (resumable). The Python-API twin of ``clipes cam``.

    Images are decoded and preprocessed ahead (in ``cfg.workers`` data-loader processes,
    or inline), grouped by working size into batches of ``cfg.batch_size`` for the frozen
    forward, and their records are written by a small thread pool (atomically, as
    before); a write error stops the stage at once, with the records already written kept.

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
    precheck_run(cfg, run, ds.classes, clip)  # refusals that need no model come before its (slow) load
    with use_threads(cfg.threads) as threads:
        engine = build_engine(cfg, ds.classes, clip)
        device = str(engine.clip.device)
        bind_device(device)
        workers = resolve_workers(cfg.workers, device)
        run.ensure()
        top = dict(dataset={"kind": cfg.dataset, "root": str(Path(cfg.root).resolve()), "split": cfg.split,
                            "class_file": str(Path(cfg.class_file).resolve()) if cfg.class_file else None,
                            **dataset_options(cfg)},
                   classes=[c.name for c in ds.classes], category_ids=list(ds.category_ids),
                   model=engine.clip.describe())
        out = run.begin_stage(STAGE, stage_params(cfg, engine.clip, ds.classes, engine.precision), top=top)
        log.info("cam: %s, precision %s (asked: %s), batch size %d, %d loader worker(s) (asked: %s), %d thread(s)",
                 device, engine.precision, cfg.precision, cfg.batch_size, workers, cfg.workers, threads)
        shard = dist_shard(cfg.shard)
        ids = select_ids(all_ids, cfg.limit, shard)
        res = StageResult(STAGE, str(run.path))
        done_ids: list[str] = []
        bar = tqdm(total=len(ids), desc=f"cam {shard[0]}/{shard[1]}" if shard[1] > 1 else "cam", unit="img",
                   disable=not progress)
        try:
            todo = []
            for image_id in ids:
                path = out / f"{image_id}.npz"
                if path.exists() and is_valid_cam(path):
                    res.skipped += 1
                    bar.update(1)
                else:
                    todo.append(image_id)
            _run_images(engine, ds, todo, out, res, done_ids, bar, workers)
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


def precheck_run(cfg: CamConfig, run: RunDir, classes: list[ClassSpec], clip: ClipModel | None = None) -> None:
    """Refuse, before the model load and writing nothing, a run folder that cannot be written or
    whose cam stage ran with other parameters (every parameter but the model, which
    :meth:`RunDir.begin_stage` compares once it is loaded)."""
    run.check_writable()
    if clip is not None:
        device = str(clip.device)
    else:
        device = resolve_device(cfg.device)
    params = stage_params(cfg, _ModelNotLoaded(), classes, resolve_precision(cfg.precision, device))
    run.check_params(STAGE, params, ignore=("model",))


@dataclass(frozen=True)
class _Preparer:
    """Decode-side work of one image, picklable for data-loader workers (no model inside)."""

    max_side: int | None
    views: tuple[tuple[float, bool], ...]
    patch: int

    def __call__(self, image: np.ndarray, image_id: str = "", keys=(), size: tuple[int, int] | None = None
                 ) -> Prepared:
        size = size or image.shape[:2]
        image = fit_image(image, self.max_side)
        views = [resize_input(image, s, self.patch, f) for s, f in self.views]
        return Prepared(image_id, list(keys), tuple(size), tuple(image.shape[:2]), views)

    def load(self, ds, image_id: str) -> Prepared:
        """Read, downscale and preprocess one image; a per-image problem becomes ``Prepared.error``."""
        try:
            keys = list(ds.labels(image_id))
            image = ds.load_image(image_id)
            size = image.shape[:2]
            image = fit_image(image, self.max_side)  # the full-size decode is freed before preprocessing
            return self(image, image_id, keys, size)
        except DatasetError as e:  # unreadable image, bad label XML, bad GT the labels come from
            return Prepared(image_id, error=str(e))
        except OSError as e:  # an input file that cannot be opened (permissions, I/O error)
            return Prepared(image_id, error=f"{image_id}: cannot read its files ({e})")
        except MemoryError as e:
            return Prepared(image_id, error=_oom_reason(image_id, e, self.max_side))


def _oom_reason(image_id: str, what: BaseException | str, max_side: int | None) -> str:
    what = what if isinstance(what, str) else type(what).__name__
    return f"{image_id}: out of memory ({what}); lower --max-side (now {max_side}) or --scales"


class _Inputs(torch.utils.data.Dataset):
    """``Prepared`` items of ``ids`` in order, for a ``DataLoader`` (``batch_size=None``)."""

    def __init__(self, ds, ids: list[str], prep: _Preparer):
        self.ds, self.ids, self.prep = ds, ids, prep

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> Prepared:
        return self.prep.load(self.ds, self.ids[i])


def _init_loader_worker(_worker_id: int) -> None:
    """Loader workers decode and resize: one torch and one OpenCV thread each."""
    import cv2

    torch.set_num_threads(1)
    cv2.setNumThreads(1)


def _inputs(engine: CamEngine, ds, ids: list[str], workers: int):
    """Prepared images in ``ids`` order: inline, or from ``workers`` spawned loader processes
    (each item's views are uint8, a quarter of the float32 bytes through ``/dev/shm``; each
    worker is sent :func:`~clip_es.data.base.worker_view` of the dataset, not its whole index).

    Spawned, not forked: a forked child inherits OpenCV's/torch's thread pools in a broken
    state once the parent has used them (see :func:`clip_es.refine.run._mp_context`).
    """
    prep = engine.preparer()
    if workers == 0 or len(ids) <= 1:
        for image_id in ids:
            yield prep.load(ds, image_id)
        return
    workers = min(workers, len(ids))
    loader = torch.utils.data.DataLoader(_Inputs(worker_view(ds, ids), ids, prep), batch_size=None, shuffle=False,
                                         num_workers=workers, multiprocessing_context="spawn",
                                         worker_init_fn=_init_loader_worker,
                                         pin_memory=False,  # cat_views pins the batch (one copy, not two)
                                         prefetch_factor=max(2, 2 * engine.cfg.batch_size // workers + 1))
    yield from loader


#: The most threads writing records (compression releases the GIL, so a few overlap).
WRITER_THREADS = 4


def writer_threads() -> int:
    """Record writers: the thread budget (:func:`~clip_es.threads.default_threads`), at most
    :data:`WRITER_THREADS`: on a one-thread budget one writer, so writers do not contend with
    the computation for the GIL and the core."""
    from clip_es.threads import default_threads

    return max(1, min(WRITER_THREADS, default_threads()))


class _Writer:
    """Writes records on a small thread pool; the first error stops all later writes.

    Records are independent, so they may land in any order. Each write is :func:`save_cam`
    (atomic: a temp file renamed into place, so a record is whole or absent whatever
    happens to the process). Records are not fsynced one by one (that cost ~6 ms each):
    after a power loss a record may be empty or torn, and resume, which opens every
    existing record before it skips it, recomputes such a record. :meth:`put` and
    :meth:`close` re-raise a write error in the caller's thread.
    """

    def __init__(self, on_written, depth: int, threads: int = WRITER_THREADS):
        self._q: queue.Queue = queue.Queue(maxsize=max(2, depth))
        self._on_written = on_written
        self.error: BaseException | None = None
        self._threads = [threading.Thread(target=self._run, name=f"clipes-cam-writer-{i}", daemon=True)
                         for i in range(max(1, threads))]
        for t in self._threads:
            t.start()

    def _run(self) -> None:
        while True:
            job = self._q.get()
            if job is None:
                return
            if self.error is not None:
                continue  # drain without writing
            path, image_id, keys, cam, caa, size = job
            try:
                save_cam(path, keys, cam, caa, size)
                self._on_written(image_id)
            except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
                if self.error is None:
                    self.error = e

    def check(self) -> None:
        if self.error is not None:
            raise self.error

    def put(self, path: Path, image_id: str, keys, cam, caa, size) -> None:
        self.check()
        self._q.put((path, image_id, keys, cam, caa, size))

    def close(self, check: bool = True) -> None:
        """Write what is queued (unless a write failed), stop the threads; re-raise the first error."""
        for _ in self._threads:
            self._q.put(None)
        for t in self._threads:
            t.join()
        if check:
            self.check()


def _run_images(engine: CamEngine, ds, ids: list[str], out: Path, res: StageResult, done_ids: list[str],
                bar, workers: int = 0) -> None:
    """Compute and write every image of ``ids``; per-image failures go to ``res.failed``.

    Out of memory on a batch (``MemoryError``, CUDA's ``OutOfMemoryError``, a cuBLAS/cuDNN
    allocation failure) retries its images one by one, after the failed attempt is freed
    (outside the ``except`` block, whose traceback would keep the batch's activations
    alive) and, on CUDA, the allocator's cache emptied; an image that does not fit alone fails.
    The failure is remembered: a later batch at least as large (as many images or more, each
    as many pixels or more) goes straight to one by one instead of running out of memory again.

    Raises:
        OutputWriteError: a record cannot be written (fatal for the stage).
    """
    batch_size = engine.cfg.batch_size
    cuda = engine.clip.device.type == "cuda"
    lock = threading.Lock()

    def written(image_id: str) -> None:
        with lock:
            res.done += 1
            done_ids.append(image_id)
            bar.update(1)

    def fail(image_id: str, reason: str) -> None:
        with lock:
            res.failed[image_id] = reason
            bar.update(1)
        log.warning("%s", reason)

    writer = _Writer(written, depth=2 * batch_size, threads=writer_threads())

    too_big: list[tuple[int, int]] = []  # (images, pixels per image) of the batches that ran out of memory

    def run(batch: list[Prepared]) -> None:
        load = (len(batch), batch[0].work[0] * batch[0].work[1])
        if len(batch) > 1 and any(n <= load[0] and px <= load[1] for n, px in too_big):
            for it in batch:  # at least as big as a batch that did not fit: straight to one by one
                run([it])
            return
        oom = None
        try:
            maps = engine.compute_batch(batch)
        except Exception as e:  # noqa: BLE001 - only allocation failures are handled, the rest re-raised
            if not is_out_of_memory(e):
                raise
            oom = f"{type(e).__name__}"
        if oom is not None:  # here the exception, its traceback and the batch's activations are gone
            if cuda:
                torch.cuda.empty_cache()
            if len(batch) > 1:  # retry one by one: only the image that does not fit fails
                too_big.append(load)
                for it in batch:
                    run([it])
                return
            fail(batch[0].id, _oom_reason(batch[0].id, oom, engine.cfg.max_side))
            return
        for it, (cam, caa) in zip(batch, maps):
            writer.put(out / f"{it.id}.npz", it.id, it.keys, cam, caa, it.size)
        computed[0] += len(batch)  # queued for writing (written even if the run is interrupted now)

    computed = [0]
    buckets: dict[tuple, list[Prepared]] = {}
    max_pending = 4 * batch_size  # bounds memory when sizes vary (COCO): flush the fullest bucket
    try:
        for item in _inputs(engine, ds, ids, workers):
            if item.error is not None:  # per-image: record and go on
                fail(item.id, item.error)
                continue
            bucket = buckets.setdefault(item.bucket, [])
            bucket.append(item)
            if len(bucket) >= batch_size:
                run(buckets.pop(item.bucket))
            elif sum(len(b) for b in buckets.values()) > max_pending:
                run(buckets.pop(max(buckets, key=lambda k: len(buckets[k]))))
            writer.check()
            hold_for_test(computed[0])
        for key in list(buckets):
            run(buckets.pop(key))
    except BaseException:
        writer.close(check=False)
        raise
    writer.close()
