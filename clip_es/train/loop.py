"""The ``train`` stage: fit the segmenter on a run's pseudo masks (``clipes train``).

Outputs in ``RUN/<name>/`` (``name`` defaults to ``segmenter``)::

    config.json   stage parameters (also in the manifest, hashed)
    text.pt       cached CLIP text embeddings of the classes
    last.pt       checkpoint: model, optimizer, step, config, class text, RNG state
    model.pt      the same weights for inference only (no optimizer: a third of last.pt)
    log.csv       loss curve: step, loss (mean over processes), lr

Checkpoints (formats in :mod:`clip_es.train.checkpoint`) are written atomically every
``save_every`` steps and at the end. ``resume=True`` continues from
``last.pt`` and reproduces the loss curve of an uninterrupted run exactly (same device and
thread count): the sample stream is a function of the step (see :mod:`clip_es.train.data`),
the LR schedule of the step, and everything else is in the checkpoint.

Multi-process: launched by ``torchrun`` (set-up in :mod:`clip_es.train.distributed`), each
process trains on its own slice of every step's samples with DDP; ``batch_size`` is per
process. Only rank 0 writes files. BatchNorm statistics are per process (no SyncBN).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from tqdm import tqdm

from clip_es.data.registry import dataset_of_run
from clip_es.errors import ClipEsError, ConfigError, RunDirError
from clip_es.model.precision import PRECISIONS, autocast_dtype, exact_fp32, resolve_precision
from clip_es.rundir import RunDir, atomic_write_bytes, params_hash
from clip_es.stage import bind_device, resolve_device
# checkpoint I/O and the DDP set-up live in their own modules; re-exported for existing imports
from clip_es.train.checkpoint import (CHECKPOINT_FORMAT, LAST, MODEL, load_checkpoint,  # noqa: F401
                                      load_model_state, model_state, rank_rng_state, rng_state, save_checkpoint,
                                      set_rng_state, weights_only)
from clip_es.train.data import CropDataset, LabelSource, StepBatchSampler
from clip_es.train.distributed import DistInfo, broadcast_error, distributed  # noqa: F401
from clip_es.train.families import (SCHEDULES, BuildContext, TrainDefaults, check_background_query,
                                    get_family)
from clip_es.train.losses import IGNORE, ce_loss, get_loss
from clip_es.train.model import count_parameters
from clip_es.train.text import cached_text, run_background_words, run_text_setup
from clip_es.threads import start_forked_workers, threads_from_config

log = logging.getLogger(__name__)

LOG = "log.csv"
#: TrainConfig fields a family's recipe fills when left ``None`` (:class:`TrainDefaults`' fields).
RECIPE_FIELDS = tuple(TrainDefaults.__dataclass_fields__)
#: ``crop_size`` meaning "from the data" (:func:`auto_crop_size`).
AUTO_CROP = 0
#: ``input_scale`` meaning "from the data and the CLIP's patch" (:func:`auto_input_scale`).
AUTO_SCALE = 0
#: :func:`auto_input_scale`'s target: patches along the images' median shorter side.
MIN_PATCH_GRID = 20


@dataclass(frozen=True)
class TrainConfig:
    """Everything ``clipes train`` needs. Saved as ``RUN/<name>/config.json``.

    Attributes:
        run: run directory (with a cam stage, and refine outputs unless ``labels`` says otherwise).
        name: sub-folder / manifest stage name (``segmenter``; e.g. ``segmenter_nofusion`` for the ablation).
        labels: ``refine``, ``crf``, ``gt`` or a folder of ``<id>.png`` masks.
        steps: optimizer steps in total.
        batch_size: images per step and process.
        crop_size: training crop side in pixels.
        lr, weight_decay: AdamW; the LR warms up linearly for ``warmup`` steps (at most ``steps // 5``;
            config.json records the number used) then follows ``schedule``: ``cosine`` to 0 or ``poly``
            (power 0.9 to ``min_lr``; see :func:`lr_at`).
        backbone_lr_mult: LR multiplier of the backbone (e.g. 0.1 with pretrained weights).
        scale_range: random rescale range before cropping.
        input_scale: ``zegclip``: the ViT sees each input this many times larger (a finer patch grid,
            cost about ``scale^2``); ``0`` = :func:`auto_input_scale`.
        background_query: ``zegclip``'s background query (:data:`~clip_es.train.families.BACKGROUND_QUERIES`):
            ``text`` scores background as the best-matching of ``background_words`` (empty: the run's,
            :func:`~clip_es.train.text.run_background_words`), ``learnt`` trains one embedding.

        ``steps``, ``batch_size``, ``crop_size``, ``scale_range``, ``lr``, ``weight_decay``, ``warmup``,
        ``schedule``, ``min_lr``, ``input_scale`` and ``background_query`` left ``None`` take the family's recipe
        (:class:`~clip_es.train.families.TrainDefaults`: ``FAMILY.train_defaults``); :meth:`validate`
        returns the config with them filled in, and that is what config.json and checkpoints record.
        arch: segmenter family (:mod:`clip_es.train.families`): ``fusion`` (the CNN segmenter),
            ``zegclip`` (frozen CLIP ViT + prompts + decoder), ``clip`` (training-free).
        head: the CNN segmenter's head (``plain``, ``denseclip``, ``fusion``; see :data:`clip_es.train.model.HEADS`).
        loss: a :data:`clip_es.train.losses.LOSSES` name (``ce``: softmax cross-entropy, ``sigmoid``:
            per-class focal + dice); ``None`` = the family's default.
        unseen: class names held out (inductive zero-shot protocol): their pixels in the training
            masks become ignored and their names never reach the model; recorded in the checkpoint.
        transductive: with ``unseen``, trained inductively until step ``self_train_from * steps``
            (seen names only, unseen pixels ignored), then on every name: each pixel the masks give to
            an unseen class is labelled with the unseen class the model scores highest there (ZegCLIP's
            self-training; the mask's own unseen label is never used).
        self_train_from: fraction of ``steps`` before self-training starts (``transductive``; 1 = never:
            the same as inductive).
        prompts, relation: ``zegclip``: deep visual prompt tokens per block (0 = none), relationship
            descriptor on (``False``: class queries from the text alone).
        dense_path: ``clip``: the last block's ``value`` path (MaskCLIP) or the ``plain`` block.
        backbone, backbone_weights, backbone_pretrained: timm CNN and its initialisation.
        dim, heads, fusion_blocks: segmenter width, attention heads, fusion depth (0 = plain head).
        device: ``cpu``, ``cuda`` or ``auto``.
        seed: decides initialisation, sample order and augmentation.
        workers: dataloader worker processes.
        precision: ``fp32`` (IEEE: no TF32, :func:`~clip_es.model.precision.exact_fp32`), ``bf16`` or
            ``fp16`` (the forward and the loss under ``torch.autocast``; fp16 with a ``GradScaler``
            on CUDA), or ``auto`` (``bf16`` where the device computes it natively: an Ampere+ GPU,
            a CPU with avx512_bf16/AMX; else ``fp32``). Resolved once per run; the checkpoint's
            config records the resolved value.
        save_every, log_every: checkpoint / log.csv period in steps.
        resume: continue from ``last.pt`` (required when it exists).
        clip_model, clip_pretrained: override for the CLIP that embeds the classes (default:
            the one recorded by the run's cam stage).
        threads: CPU threads per process (``None``: see :func:`clip_es.threads.default_threads`).
    """

    run: str
    name: str = "segmenter"
    labels: str = "refine"
    steps: int | None = None
    batch_size: int | None = None
    crop_size: int | None = None
    lr: float | None = None
    weight_decay: float | None = None
    warmup: int | None = None
    schedule: str | None = None
    min_lr: float | None = None
    input_scale: int | None = None
    background_query: str | None = None
    background_words: tuple[str, ...] = ()
    backbone_lr_mult: float = 1.0
    scale_range: tuple[float, float] | None = None
    loss: str | None = None
    arch: str = "fusion"
    head: str = "fusion"
    unseen: tuple[str, ...] = ()
    transductive: bool = False
    self_train_from: float = 0.5
    prompts: int = 10
    relation: bool = True
    dense_path: str = "value"
    backbone: str = "resnet18"
    backbone_weights: str | None = None
    backbone_pretrained: bool = False
    dim: int = 128
    heads: int = 4
    fusion_blocks: int = 2
    device: str = "auto"
    seed: int = 0
    workers: int = 0
    precision: str = "fp32"
    save_every: int = 200
    log_every: int = 10
    resume: bool = False
    clip_model: str | None = None
    clip_pretrained: str | None = None
    threads: int | None = None

    def resolved(self) -> "TrainConfig":
        """This config with every recipe field left ``None`` set to the family's default."""
        defaults = get_family(self.arch).train_defaults
        fill = {f: getattr(defaults, f) for f in RECIPE_FIELDS if getattr(self, f) is None}
        cfg = replace(self, **fill) if fill else self
        return replace(cfg, scale_range=tuple(float(v) for v in cfg.scale_range))

    def validate(self) -> "TrainConfig":
        """The resolved config (:meth:`resolved`), checked.

        Raises:
            ConfigError: an option out of range, with its name and the value.
        """
        cfg = self.resolved()
        get_loss(cfg.resolved_loss())
        if cfg.schedule not in SCHEDULES:
            raise ConfigError(f"unknown --schedule {cfg.schedule!r}; valid: {', '.join(SCHEDULES)}")
        check_background_query(cfg.background_query)
        if cfg.min_lr < 0:
            raise ConfigError(f"the schedule's minimum LR must be >= 0, got {cfg.min_lr}")
        for opt, v, lo in (("--steps", cfg.steps, 1), ("--batch-size", cfg.batch_size, 1),
                           ("--save-every", cfg.save_every, 1), ("--log-every", cfg.log_every, 1)):
            if v < lo:
                raise ConfigError(f"{opt} must be at least {lo}, got {v}")
        if cfg.input_scale < 0 or cfg.input_scale > 8:
            raise ConfigError(f"--input-scale must be 1-8 (or {AUTO_SCALE}: from the images), got {cfg.input_scale}")
        if cfg.crop_size != AUTO_CROP and cfg.crop_size < 32:
            raise ConfigError(f"--crop-size must be at least 32 (or {AUTO_CROP}: from the images), got {cfg.crop_size}")
        if cfg.precision not in PRECISIONS:
            raise ConfigError(f"--precision must be one of {', '.join(PRECISIONS)}, got {cfg.precision!r}")
        if cfg.workers < 0 or cfg.warmup < 0:
            raise ConfigError("--workers and --warmup must be >= 0")
        if not cfg.lr > 0 or cfg.weight_decay < 0 or not cfg.backbone_lr_mult >= 0:
            raise ConfigError(f"--lr must be > 0 and weight decay / backbone LR multiplier >= 0 "
                              f"(got {cfg.lr}, {cfg.weight_decay}, {cfg.backbone_lr_mult})")
        lo, hi = cfg.scale_range
        if not 0 < lo <= hi:
            raise ConfigError(f"scale range must satisfy 0 < min <= max, got {cfg.scale_range}")
        if not cfg.name or "/" in cfg.name or cfg.name.startswith("."):
            raise ConfigError(f"--name must be a plain folder name, got {cfg.name!r}")
        if cfg.name in ("cam", "refine", "crf"):
            raise ConfigError(f"--name {cfg.name!r} is another stage's folder; pick e.g. 'segmenter'")
        if cfg.transductive and not cfg.unseen:
            raise ConfigError("--transductive needs --unseen (the classes to self-train on)")
        if not 0 <= cfg.self_train_from <= 1:
            raise ConfigError(f"self-training start must be a fraction in [0, 1] (1 = never), "
                              f"got {cfg.self_train_from}")
        return cfg

    def resolved_loss(self) -> str:
        """``loss``, or the family's default when ``None``."""
        return self.loss if self.loss is not None else get_family(self.arch).default_loss

    def arch_record(self, text_dim: int):
        """The family's architecture record for these options (``text_dim`` = CLIP text width)."""
        return get_family(self.arch).arch_from_config(self, text_dim)


#: Fields that do not change what is trained (left out of the manifest hash).
_RUNTIME_FIELDS = ("run", "device", "workers", "resume", "save_every", "log_every", "clip_model", "clip_pretrained",
                   "threads")


#: Fields added after runs were recorded: left out of the parameters at these values, so older runs resume.
_LATER_DEFAULTS: dict[str, Any] = {"arch": "fusion", "head": "fusion", "unseen": (), "transductive": False,
                                   "self_train_from": 0.5, "prompts": 10, "relation": True, "dense_path": "value",
                                   "schedule": "cosine", "min_lr": 0.0, "precision": "fp32", "input_scale": 1,
                                   "background_query": "learnt", "background_words": ()}


def training_loss(loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], logits: torch.Tensor,
                  extras: dict[str, Any], y: torch.Tensor) -> torch.Tensor:
    """``loss_fn(logits, y)`` plus ``weight * CE`` of each ``(weight, aux_logits)`` in ``extras["aux"]``.

    ``logits`` ``(B, K+1, H, W)``, ``y`` ``(B, H, W)`` (255 = ignored, as in the main loss); auxiliary
    logits ``(B, K+1, h, w)`` are upsampled bilinearly to ``(H, W)`` first.
    """
    loss = loss_fn(logits, y)
    for weight, aux in extras.get("aux", ()):
        aux = F.interpolate(aux, size=y.shape[-2:], mode="bilinear", align_corners=False)
        loss = loss + weight * ce_loss(aux, y)
    return loss


def stage_params(cfg: TrainConfig) -> dict[str, Any]:
    """The output-deciding parameters (config.json, manifest hash) of the resolved config; ``warmup`` as
    :func:`lr_at` uses it, ``loss`` resolved to the family's default."""
    cfg = cfg.resolved()
    p = {k: v for k, v in asdict(cfg).items() if k not in _RUNTIME_FIELDS
         and not (k in _LATER_DEFAULTS and v == _LATER_DEFAULTS[k])}
    p["scale_range"] = list(cfg.scale_range)
    p["warmup"] = warmup_steps(cfg)
    p["loss"] = cfg.resolved_loss()
    if cfg.unseen:
        p["unseen"] = list(cfg.unseen)
    return p


def class_split(names: list[str], unseen: tuple[str, ...] | list[str]) -> tuple[list[int], list[int]]:
    """Indices of the seen and of the unseen classes in ``names``.

    Raises:
        ConfigError: an unseen name that is not a class of the run, or every class unseen.
    """
    bad = [u for u in unseen if u not in names]
    if bad:
        raise ConfigError(f"--unseen {', '.join(bad)}: not a class of this run; valid: {', '.join(names)}")
    seen = [i for i, n in enumerate(names) if n not in unseen]
    if not seen:
        raise ConfigError("--unseen names every class; leave at least one class to train on")
    return seen, [i for i, n in enumerate(names) if n in unseen]


#: Training-target value of a pixel whose mask names an unseen class (transductive protocol): ignored
#: until self-training starts, then labelled by the model (:func:`self_train_targets`).
PENDING = -1


def label_map(keep: list[int], pending: list[int] | tuple[int, ...] = ()) -> torch.Tensor:
    """``(256,)`` int64 lookup for training masks: background stays 0, class ``keep[j]`` (0-based)
    becomes ``j + 1`` (the model's channel), a class in ``pending`` becomes :data:`PENDING` (its
    pixels wait for self-training; ``pending`` classes may be in ``keep``), every other class and
    255 become ignored."""
    lut = torch.full((256,), IGNORE, dtype=torch.int64)
    lut[0] = 0
    for j, k in enumerate(keep):
        lut[k + 1] = j + 1
    for k in pending:
        lut[k + 1] = PENDING
    return lut


def self_train_targets(logits: torch.Tensor, target: torch.Tensor, unseen_channels: torch.Tensor,
                       started: bool = True) -> torch.Tensor:
    """Training targets of the transductive protocol (ZegCLIP's self-training).

    The pixels the masks give to an unseen class (:data:`PENDING`) are ignored until self-training
    starts; from then on each takes the unseen class the model scores highest there (argmax over the
    unseen channels only). Which unseen class the mask named is never used, and no other pixel changes.

    Args:
        logits: ``(B, N, H, W)`` (detached inside).
        target: ``(B, H, W)`` int64 from :func:`label_map`: channels, 255 = ignore, :data:`PENDING`.
        unseen_channels: ``(U,)`` int64 channel indices of the unseen classes.
        started: whether self-training has started.

    Returns:
        ``(B, H, W)`` int64 targets with no :data:`PENDING` left.
    """
    pending = target == PENDING
    if not started or not len(unseen_channels):
        return torch.where(pending, torch.full_like(target, IGNORE), target)
    choice = unseen_channels[logits.detach()[:, unseen_channels].argmax(1)]
    return torch.where(pending, choice, target)


@dataclass
class TrainResult:
    """What a training run did."""

    run: str
    checkpoint: str
    step: int
    steps: int
    last_loss: float | None
    images_per_s: float | None
    world_size: int = 1
    resumed_from: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        s = f"train: step {self.step}/{self.steps}"
        if self.last_loss is not None:
            s += f", last loss {self.last_loss:.4f}"
        if self.images_per_s:
            s += f", {self.images_per_s:.1f} img/s"
        if self.world_size > 1:
            s += f" ({self.world_size} processes)"
        s += f"; checkpoint {self.checkpoint}"
        weights = Path(self.checkpoint).with_name(MODEL)
        return s + (f" (for inference: {weights})" if weights.is_file() else "")


# ----------------------------------------------------------------------------- helpers
def median_shorter_side(ds, ids: list[str], sample: int = 64) -> int | None:
    """The median shorter side of up to ``sample`` of the images (evenly spaced over ``ids``; headers
    only), ``None`` without images."""
    from PIL import Image

    pick = ids[:: max(1, len(ids) // sample)][:sample]
    sides = []
    for i in pick:
        with Image.open(ds.image_path(i)) as im:
            sides.append(min(im.size))
    return int(sorted(sides)[len(sides) // 2]) if sides else None


def auto_crop_size(ds, ids: list[str], sample: int = 64, multiple: int = 32, lo: int = 128, hi: int = 512) -> int:
    """The crop side for ``crop_size = 0``: the median shorter side of up to ``sample`` of the images
    (:func:`median_shorter_side`), rounded down to a multiple of ``multiple`` and kept in
    ``[lo, hi]``. ZegCLIP's 512 crops are its images' shorter side after its 512-pixel rescale; this
    keeps that relation on images of any size (VOC's 500x375: 352; 640x480 COCO: 480).
    """
    side = median_shorter_side(ds, ids, sample) or hi
    return max(lo, min(hi, side // multiple * multiple))


def auto_input_scale(side: int | None, patch: int | None, grid: int = MIN_PATCH_GRID, hi: int = 4) -> int:
    """``input_scale = 0``: the least integer ``s >= 1`` with ``s * side / patch >= grid`` (at most
    ``hi``): enough patches along the images' median shorter ``side`` for a mask finer than the objects.

    ZegCLIP rescales VOC to a 512-pixel shorter side, 32 patches of ViT-B/16. At native size VOC's
    375-pixel side already gives 23 (``s = 1``, no extra cost), the toy world's 164 only 10 (``s = 2``;
    on the toy world 2 against 1 raised seen and unseen IoU alike: pipelines/toy/ZEROSHOT.md).
    Unknown side or patch: 1.
    """
    if not side or not patch:
        return 1
    return max(1, min(hi, math.ceil(grid * patch / side - 1e-9)))


def warmup_steps(cfg: TrainConfig) -> int:
    """Warm-up steps actually used: ``min(warmup, steps // 5)``."""
    return min(cfg.warmup, cfg.steps // 5)


#: ``poly``: the LR at step 0 of the warm-up, as a fraction of the schedule's (mmcv's ``warmup_ratio``).
POLY_WARMUP_START = 1e-6
POLY_POWER = 0.9


def lr_at(step: int, cfg: TrainConfig) -> float:
    """The LR of ``step`` (0-based) for a resolved ``cfg``.

    * ``cosine``: linear warm-up ``lr * (step + 1) / warm`` for :func:`warmup_steps` steps, then a
      cosine from ``lr`` to 0 over the remaining steps;
    * ``poly`` (ZegCLIP's, mmcv's policy): ``(lr - min_lr) * (1 - step / steps) ** 0.9 + min_lr`` over
      all steps, scaled during the warm-up by a factor rising linearly from ``1e-6`` to 1.
    """
    warm = warmup_steps(cfg)
    if cfg.schedule == "poly":
        lr = (cfg.lr - cfg.min_lr) * (1 - step / cfg.steps) ** POLY_POWER + cfg.min_lr
        if step < warm:
            lr *= 1 - (1 - step / warm) * (1 - POLY_WARMUP_START)
        return lr
    if step < warm:
        return cfg.lr * (step + 1) / warm
    t = (step - warm) / max(1, cfg.steps - warm)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * t))


def param_groups(model: torch.nn.Module, cfg: TrainConfig) -> list[dict[str, Any]]:
    """AdamW groups: no weight decay on norms, biases and scalars; backbone LR multiplier."""
    groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        key = (name.startswith("backbone."), p.ndim <= 1)
        groups.setdefault(key, []).append(p)
    out = []
    for (is_bb, no_wd), params in sorted(groups.items()):
        out.append({"params": params, "weight_decay": 0.0 if no_wd else cfg.weight_decay,
                    "lr_mult": cfg.backbone_lr_mult if is_bb else 1.0})
    return out


def _write_log(path: Path, rows: list[list]) -> None:
    text = "step,loss,lr\n" + "".join(f"{s},{loss!r},{lr!r}\n" for s, loss, lr in rows)
    atomic_write_bytes(path, text.encode())


# ----------------------------------------------------------------------------- the stage
@threads_from_config
def train_segmenter(cfg: TrainConfig, progress: bool = True,
                    on_step: Callable[[int, float], None] | None = None) -> TrainResult:
    """Train (or resume training) the segmenter of a run. The Python twin of ``clipes train``.

    Args:
        cfg: configuration.
        progress: show a tqdm bar (rank 0 only).
        on_step: called as ``on_step(step, loss)`` after each optimizer step (steps count
            from 1); may raise to stop (tests use it to simulate a killed run).

    Raises:
        ClipEsError subclasses: bad options, missing labels, run directory conflicts,
        an existing checkpoint without ``resume``.
    """
    cfg = cfg.validate()
    info = DistInfo.from_env()
    device = resolve_device(cfg.device)  # cuda:(LOCAL_RANK % GPUs) under torchrun
    bind_device(device)  # before the process group: NCCL and pin_memory use the current device
    with distributed(info, device, cfg.device):
        return _train(cfg, info, device, progress, on_step)


def _mixed_precision(precision: str, device: str):
    """``(autocast dtype or None, GradScaler or None)`` for a resolved training ``precision``: fp16
    on CUDA scales the loss (its gradients would underflow); bf16 has fp32's range and needs none."""
    amp = autocast_dtype(precision)
    if precision != "fp16" or not device.startswith("cuda"):
        return amp, None
    if hasattr(torch.amp, "GradScaler"):  # torch >= 2.3
        return amp, torch.amp.GradScaler("cuda")
    return amp, torch.cuda.amp.GradScaler()


def _every_rank_rng(info: DistInfo) -> list[dict[str, Any]] | None:
    """Every rank's :func:`rng_state`, gathered on rank 0 (``None`` on the others); a collective
    under torchrun, so all ranks call it at the same steps."""
    state = rng_state()
    if not info.enabled:
        return [state]
    import torch.distributed as dist

    states: list | None = [None] * info.world if info.main else None
    dist.gather_object(state, states, dst=0)
    return states


def _prepare(cfg: TrainConfig, run: RunDir, out: Path) -> dict[str, Any]:
    """Rank-0 preparation: check the checkpoint situation and the options, register the stage, cache the text."""
    if not run.manifest_path.is_file():
        raise RunDirError(f"{run.path}: no manifest.json; run 'clipes cam' (and 'clipes refine') into it first")
    ckpt = out / LAST
    if ckpt.is_file() and not cfg.resume:
        raise RunDirError(f"{ckpt} exists; pass --resume to continue it, or delete {out} (and its manifest "
                          f"entry) / use another --name to train afresh")
    # options that name classes or label folders are checked before the stage is recorded
    class_split([str(c[0]) for c in run_text_setup(run)["classes"]], cfg.unseen)
    LabelSource(run, cfg.labels)
    run.begin_stage(cfg.name, stage_params(cfg))
    return cached_text(run, out, cfg.clip_model, cfg.clip_pretrained)


def _train(cfg: TrainConfig, info: DistInfo, device: str, progress: bool,
           on_step: Callable[[int, float], None] | None) -> TrainResult:
    import torch.distributed as dist

    run = RunDir(cfg.run)
    out = run.stage_dir(cfg.name)
    ds = dataset_of_run(run) if run.manifest_path.is_file() else None  # no manifest: _prepare says so
    if cfg.crop_size == AUTO_CROP and ds is not None:  # every rank reads the same headers
        cfg = replace(cfg, crop_size=auto_crop_size(ds, ds.ids()))
    if cfg.input_scale == AUTO_SCALE and ds is not None:
        patch = run_text_setup(run)["clip"].get("patch_size")
        cfg = replace(cfg, input_scale=auto_input_scale(median_shorter_side(ds, ds.ids()), patch))
    if cfg.background_query == "text" and not cfg.background_words and run.manifest_path.is_file():
        cfg = replace(cfg, background_words=tuple(run_background_words(run)))
    cfg = replace(cfg, precision=resolve_precision(cfg.precision, device))  # never "auto" from here on
    payload: dict[str, Any] | None = None
    err: BaseException | None = None
    if info.main:
        try:
            payload = _prepare(cfg, run, out)
        except BaseException as e:  # re-raised below on every rank
            err = e
    broadcast_error(info, err)
    if payload is None:
        payload = torch.load(out / "text.pt", map_location="cpu", weights_only=True)

    ds = ds if ds is not None else dataset_of_run(run)
    labels = LabelSource(run, cfg.labels)
    ids = labels.available(ds, ds.ids())
    if not ids:
        raise ConfigError(f"no training masks: none of the {len(ds.ids())} images of split {ds.split!r} has a "
                          f"mask in label source {cfg.labels!r}")
    if info.main:
        log.info("training on %d images of %s (labels: %s)", len(ids), ds.split, cfg.labels)

    ids_hash = params_hash({"ids": ids})
    family = get_family(cfg.arch)
    names = [str(c[0]) for c in payload["classes"]]
    seen, unseen = class_split(names, cfg.unseen)
    all_text = payload["embeddings"].to(device)
    # inductive: the model sees only the seen names, masks renumbered to them, unseen pixels ignored.
    # transductive: inductive until self-training starts (as ZegCLIP's seen-only first stage: an unseen
    # name in the text before then only ever meets negatives), then every name, the unseen pixels pending
    # and labelled by the model's own unseen argmax (self_train_targets)
    phases = {False: (all_text[seen], label_map(seen).to(device))}
    if cfg.transductive:
        phases[True] = (all_text, label_map(list(range(len(names))), unseen).to(device))
    unseen_channels = torch.tensor([u + 1 for u in unseen], dtype=torch.int64, device=device)
    self_train_step = int(cfg.self_train_from * cfg.steps) if cfg.transductive else cfg.steps
    arch = cfg.arch_record(int(all_text.shape[1]))
    torch.manual_seed(cfg.seed)
    ctx = BuildContext(text=payload, device=device, for_training=True, backbone_weights=cfg.backbone_weights,
                       backbone_pretrained=cfg.backbone_pretrained, clip_model=cfg.clip_model,
                       clip_pretrained=cfg.clip_pretrained)
    model = family.build(arch, ctx).to(device)
    if info.enabled:  # the same initial weights on every rank, then each rank its own dropout masks
        torch.manual_seed(cfg.seed + info.rank)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(param_groups(model, cfg), lr=cfg.lr) if trainable else None
    loss_fn = get_loss(cfg.resolved_loss())

    ckpt_path = out / LAST
    start, rows, resumed = 0, [], None
    if cfg.resume and ckpt_path.is_file():
        ck = load_checkpoint(ckpt_path)
        if ck["format"] != CHECKPOINT_FORMAT:
            raise RunDirError(f"{ckpt_path} holds weights only (no optimizer state); it cannot be resumed")
        if ck["config"]["arch"] != arch.to_dict():
            raise RunDirError(f"{ckpt_path} was trained with another architecture; use another --name")
        load_model_state(model, ck["model"], ckpt_path)
        if opt is not None:
            opt.load_state_dict(ck["optimizer"])
        start, rows, resumed = int(ck["step"]), [list(r) for r in ck["log"]], int(ck["step"])
        if ck.get("ids_hash") != ids_hash and info.main:
            log.warning("the training images changed since %s was saved (labels added or removed): the "
                        "resumed run samples differently from an uninterrupted one", ckpt_path)
        set_rng_state(rank_rng_state(ck, info.rank, info.world))
        if info.main:
            log.info("resuming %s at step %d", ckpt_path, start)

    net: torch.nn.Module = model
    if info.enabled and opt is not None:
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [torch.device(device).index] if device.startswith("cuda") else None  # cuda:I -> [I]
        net = DistributedDataParallel(model, device_ids=device_ids)

    sampler = StepBatchSampler(len(ids), cfg.batch_size, cfg.steps, start, info.rank, info.world, cfg.seed)
    mean255 = tuple(int(round(255 * m)) for m in arch.mean)
    data = CropDataset(ds, ids, labels, cfg.crop_size, cfg.scale_range, cfg.seed, mean255)
    # its own generator: starting an iterator must not draw from the global RNG, which a resumed run
    # restores from the checkpoint for the model's own randomness (dropout)
    loader = torch.utils.data.DataLoader(data, batch_sampler=sampler, num_workers=cfg.workers,
                                         pin_memory=device.startswith("cuda"),
                                         generator=torch.Generator().manual_seed(cfg.seed))

    def save(step: int, rngs: list[dict[str, Any]]) -> None:
        """Rank 0 writes the checkpoint; ``rngs``: every rank's RNG state (:func:`_every_rank_rng`)."""
        ck = {"format": CHECKPOINT_FORMAT, "model": model_state(model),
              "optimizer": opt.state_dict() if opt is not None else {},
              "step": step, "config": {"train": stage_params(cfg), "arch": arch.to_dict(), "world_size": info.world,
                                       "precision": cfg.precision},
              "text": payload, "log": [list(r) for r in rows], "rng": rngs[0], "rng_ranks": rngs,
              "ids_hash": ids_hash}
        save_checkpoint(ckpt_path, ck)
        save_checkpoint(out / MODEL, weights_only(ck))
        _write_log(out / LOG, rows)

    n_trainable, n_total = sum(p.numel() for p in trainable), count_parameters(model)
    if info.main:
        log.info("segmenter %s: %.2fM parameters, %.2fM trainable, precision %s", cfg.arch, n_total / 1e6,
                 n_trainable / 1e6, cfg.precision)
    if opt is None:  # a family that needs no training: its checkpoint records the arch and the text
        if info.main:
            save(cfg.steps, [rng_state()] * info.world)  # nothing draws from the RNGs: every rank's is rank 0's
            run.record(cfg.name, status="done", step=cfg.steps, last_loss=None, images_per_s=None,
                       world_size=info.world, parameters=n_total, trainable_parameters=0)
        return TrainResult(str(run.path), str(ckpt_path), cfg.steps, cfg.steps, None, None, info.world, None)
    bar = tqdm(total=cfg.steps, initial=start, desc=f"train {cfg.name}", unit="step",
               disable=not (progress and info.main))
    net.train()
    step, last_loss, rate = start, None, None
    t_rate, n_rate = time.perf_counter(), 0
    amp, scaler = _mixed_precision(cfg.precision, device)
    try:
        with exact_fp32(device) if amp is None else contextlib.nullcontext():  # fp32 = IEEE fp32, backward too
            for images, masks in start_forked_workers(loader):
                lr = lr_at(step, cfg)
                for g in opt.param_groups:
                    g["lr"] = lr * g.get("lr_mult", 1.0)
                x = images.to(device, non_blocking=True).float().div_(255)
                self_training = step >= self_train_step
                text, lut = phases[self_training]
                y = lut[masks.to(device, non_blocking=True)]
                with torch.autocast(torch.device(device).type, dtype=amp, enabled=amp is not None):
                    logits, extras = net(x, text, return_extras=True)
                    if self_training:
                        y = self_train_targets(logits, y, unseen_channels)
                    loss = training_loss(loss_fn, logits, extras, y)
                opt.zero_grad(set_to_none=True)
                if scaler is not None:  # fp16 on CUDA: scaled loss, steps with inf/NaN gradients skipped
                    scaler.scale(loss).backward()
                    scaler.step(opt)
                    scaler.update()
                else:
                    loss.backward()
                    opt.step()
                value = loss.detach()
                if info.enabled:
                    dist.all_reduce(value)
                    value = value / info.world
                last_loss = float(value)
                if not math.isfinite(last_loss):
                    raise ClipEsError(f"loss became {last_loss} at step {step + 1}; lower --lr")
                step += 1
                rows.append([step, last_loss, lr])
                n_rate += x.shape[0] * info.world
                dt = time.perf_counter() - t_rate
                if dt > 2.0 or step == cfg.steps:
                    rate, t_rate, n_rate = n_rate / max(dt, 1e-9), time.perf_counter(), 0
                bar.update(1)
                bar.set_postfix(loss=f"{last_loss:.4f}", img_s=f"{rate:.1f}" if rate else "-")
                if step % cfg.save_every == 0 or step == cfg.steps:
                    rngs = _every_rank_rng(info)  # a collective: every rank, at the same steps
                    if info.main:
                        save(step, rngs)
                elif info.main and step % cfg.log_every == 0:
                    _write_log(out / LOG, rows)
                if on_step is not None:
                    on_step(step, last_loss)
    finally:
        bar.close()
    if info.enabled:
        dist.barrier()
    rngs = _every_rank_rng(info) if step == start else None
    if info.main:
        if rngs is not None and not ckpt_path.is_file():
            save(step, rngs)
        run.record(cfg.name, status="done" if step >= cfg.steps else "partial", step=step,
                   last_loss=last_loss, images_per_s=rate, world_size=info.world,
                   parameters=n_total, trainable_parameters=n_trainable)
    if info.enabled:  # every rank leaves (and tears the process group down) together, after rank 0's writes
        dist.barrier()
    return TrainResult(str(run.path), str(ckpt_path), step, cfg.steps, last_loss, rate, info.world, resumed)
