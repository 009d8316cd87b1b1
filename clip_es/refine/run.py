"""The ``refine`` stage: cam-stage CAA maps -> dense CRF -> confidence-guided pseudo masks.

Per image (files listed in :mod:`clip_es.refine.store`): read ``RUN/cam/<id>.npz`` and
the original image, stack ``[bg, caa_1..caa_K]``, run :func:`~clip_es.refine.crf.dense_crf`
and write the CRF argmax, the pseudo mask (255 where ``conf < --conf``) and optionally the
confidence. ``--no-crf`` writes the plain argmax of ``[bg, caa]`` instead.

Images are independent, so with ``workers > 1`` they are spread over a process pool in
chunks; every output depends only on its own image, so the files are byte-identical
whatever the number of workers. Like every stage it resumes: images whose outputs are
complete are skipped, and the run refuses a second refine with other parameters.
"""

from __future__ import annotations

import logging
import math
import os
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from clip_es.cam.store import load_cam
from clip_es.data.image_io import mask_to_png_bytes, read_image
from clip_es.errors import ClipEsError, ConfigError, DatasetError, RunDirError
from clip_es.evaluate import dataset_of_run, scores_to_labels
from clip_es.refine.crf import CrfParams, conf_to_uint8, dense_crf, labels_from_q, scores_to_probs, stack_scores
from clip_es.refine.store import CONF, CRF, MASKS, STAGE, is_valid_png, refine_dir
from clip_es.rundir import RunDir, atomic_write_bytes
from clip_es.stage import StageResult

log = logging.getLogger(__name__)

#: Largest number of images one pool task carries. Tasks are small (about 16 per worker)
#: so the workers finish together; a task's overhead (~1 ms) is tiny next to one CRF.
MAX_CHUNK = 8


@dataclass(frozen=True)
class RefineConfig:
    """Everything the refine stage needs. Its output-deciding part is saved as ``RUN/refine/config.json``.

    Attributes:
        run: the run directory (must hold a cam stage).
        crf: run the dense CRF (``False``: argmax of ``[bg, caa]``, no confidence, no 255).
        conf: confidence threshold; pixels with ``max_c Q_c < conf`` become 255 in the mask.
        alpha: background power, ``bg = (1 - max_k caa_k) ** alpha``.
        crf_params: kernel parameters and iterations.
        save_conf: also write ``RUN/refine/conf/<id>.png`` (uint8 ``round(conf * 255)``).
        workers: processes; ``None`` = every core this process may use; 1 = no pool.
        limit: only the first ``limit`` images (in dataset order) that have cam outputs.
    """

    run: str
    crf: bool = True
    conf: float = 0.95
    alpha: float = 1.0
    crf_params: CrfParams = field(default_factory=CrfParams)
    save_conf: bool = False
    workers: int | None = None
    limit: int | None = None

    def validate(self) -> "RefineConfig":
        if not 0.0 <= self.conf <= 1.0:
            raise ConfigError(f"--conf must be in [0, 1], got {self.conf}")
        if not self.alpha > 0:
            raise ConfigError(f"--alpha must be > 0, got {self.alpha}")
        if self.workers is not None and self.workers < 1:
            raise ConfigError(f"--workers must be at least 1, got {self.workers}")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"--limit must be at least 1, got {self.limit}")
        if self.save_conf and not self.crf:
            raise ConfigError("--save-conf needs the CRF (confidence is max_c Q_c); drop --no-crf or --save-conf")
        self.crf_params.validate()
        return self

    def resolved_workers(self) -> int:
        """``workers``, or the number of usable cores when ``None``."""
        if self.workers is not None:
            return self.workers
        try:
            return max(1, len(os.sched_getaffinity(0)))
        except AttributeError:  # not Linux
            return max(1, os.cpu_count() or 1)


def stage_params(cfg: RefineConfig, cam_hash: str | None) -> dict[str, Any]:
    """The parameters that decide the outputs (hashed into the manifest).

    ``save_conf``, ``workers`` and ``limit`` are left out: they change which files are
    written, not their content.
    """
    p: dict[str, Any] = {"source": "caa", "crf": cfg.crf, "alpha": cfg.alpha, "cam_hash": cam_hash}
    if cfg.crf:
        p["conf"] = cfg.conf
        p["crf_params"] = asdict(cfg.crf_params)
    return p


@dataclass(frozen=True)
class _Job:
    """What a worker needs to refine images (small and picklable: no dataset object)."""

    cam_dir: str
    masks_dir: str
    crf_dir: str
    conf_dir: str
    crf: bool
    conf: float
    alpha: float
    crf_params: CrfParams
    save_conf: bool

    def outputs(self, image_id: str) -> dict[str, Path]:
        """The files this job writes for ``image_id`` (the mask last: its presence marks completion)."""
        out = {}
        if self.crf:
            out[CRF] = Path(self.crf_dir) / f"{image_id}.png"
            if self.save_conf:
                out[CONF] = Path(self.conf_dir) / f"{image_id}.png"
        out[MASKS] = Path(self.masks_dir) / f"{image_id}.png"
        return out

    def refine_one(self, image_id: str, image_path: str) -> str:
        """Refine one image; ``"done"`` or ``"skipped"`` (outputs already complete).

        Raises:
            ClipEsError: a per-image problem (unreadable image, corrupt cam file, size mismatch).
        """
        outs = self.outputs(image_id)
        if all(is_valid_png(p) for p in outs.values()):
            return "skipped"
        maps = load_cam(Path(self.cam_dir) / f"{image_id}.npz")
        if not self.crf:
            atomic_write_bytes(outs[MASKS], mask_to_png_bytes(scores_to_labels(maps.keys, maps.caa, self.alpha)))
            return "done"
        image = read_image(image_path)
        if image.shape[:2] != maps.size:
            raise DatasetError(f"{image_path}: image is {image.shape[1]}x{image.shape[0]} but its cam maps are "
                               f"{maps.size[1]}x{maps.size[0]}; the image changed since 'clipes cam' ran; "
                               "re-run cam into a new run folder")
        q = dense_crf(image, scores_to_probs(stack_scores(maps.caa, self.alpha)), self.crf_params)
        labels, conf, mask = labels_from_q(q, maps.keys, self.conf)
        atomic_write_bytes(outs[CRF], mask_to_png_bytes(labels))
        if self.save_conf:
            atomic_write_bytes(outs[CONF], _gray_png_bytes(conf_to_uint8(conf)))
        atomic_write_bytes(outs[MASKS], mask_to_png_bytes(mask))
        return "done"


def _gray_png_bytes(a: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(a, np.uint8), mode="L").save(buf, format="PNG")
    return buf.getvalue()


def _run_chunk(job: _Job, items: list[tuple[str, str]]) -> list[tuple[str, str, str]]:
    """Refine ``[(id, image_path)]``; ``[(id, status, reason)]`` with status done/skipped/failed."""
    out = []
    for image_id, image_path in items:
        try:
            out.append((image_id, job.refine_one(image_id, image_path), ""))
        except ClipEsError as e:
            out.append((image_id, "failed", str(e)))
        except MemoryError:
            out.append((image_id, "failed", f"{image_path}: out of memory in the CRF; downscale the image "
                                            "or use fewer --workers"))
    return out


def _init_worker() -> None:
    """Pool worker start-up: one OpenCV thread per process (parallelism comes from the pool)."""
    import cv2

    cv2.setNumThreads(1)


def _mp_context():
    """``fork`` on Linux (fast start; workers use only numpy/OpenCV/pydensecrf), else the default."""
    import multiprocessing as mp

    return mp.get_context("fork") if sys.platform.startswith("linux") else mp.get_context()


def _chunks(items: list, workers: int) -> list[list]:
    size = max(1, min(MAX_CHUNK, math.ceil(len(items) / (workers * 16))))
    return [items[i:i + size] for i in range(0, len(items), size)]


def refine_masks(cfg: RefineConfig, progress: bool = True) -> StageResult:
    """Run the refine stage (resumable, parallel). The Python-API twin of ``clipes refine``.

    Returns:
        A :class:`StageResult`; per-image failures are listed (and recorded in the manifest), not raised.

    Raises:
        ConfigError: bad options.
        RunDirError: no cam stage in the run, or refine already ran there with other parameters.
        DatasetError: the run's dataset cannot be reopened.
    """
    cfg = cfg.validate()
    run = RunDir(cfg.run)
    if not run.manifest_path.is_file():
        raise RunDirError(f"{run.path}: no manifest.json; run 'clipes cam --out {run.path}' first")
    cam_info = run.stage_info("cam")
    cam_dir = run.stage_dir("cam")
    if cam_info is None or not cam_dir.is_dir():
        raise RunDirError(f"{run.path}: no cam stage outputs; run 'clipes cam --out {run.path}' first")
    ds = dataset_of_run(run)
    all_ids = ds.ids()
    ids = [i for i in all_ids if (cam_dir / f"{i}.npz").is_file()]
    if len(ids) < len(all_ids):
        log.info("%d of %d images of the split have no cam output; refining the %d that do",
                 len(all_ids) - len(ids), len(all_ids), len(ids))
    ids = ids[: cfg.limit] if cfg.limit else ids
    out = run.begin_stage(STAGE, stage_params(cfg, cam_info.get("hash")))
    kinds = (MASKS, CRF, CONF) if cfg.save_conf else (MASKS, CRF) if cfg.crf else (MASKS,)
    for kind in kinds:
        (out / kind).mkdir(exist_ok=True)
        RunDir.sweep_temp(out / kind)
    job = _Job(str(cam_dir), str(refine_dir(run, MASKS)), str(refine_dir(run, CRF)), str(refine_dir(run, CONF)),
               cfg.crf, cfg.conf, cfg.alpha, cfg.crf_params, cfg.save_conf)

    res = StageResult(STAGE, str(run.path))
    items: list[tuple[str, str]] = []
    for image_id in ids:
        try:
            items.append((image_id, str(ds.image_path(image_id))))
        except ClipEsError as e:
            res.failed[image_id] = str(e)
    done_ids: list[str] = []
    workers = min(cfg.resolved_workers(), max(1, len(items)))
    bar = tqdm(total=len(items), desc="refine", unit="img", disable=not progress)

    def collect(results: list[tuple[str, str, str]]) -> None:
        for image_id, status, reason in results:
            if status == "failed":
                res.failed[image_id] = reason
                log.warning("%s", reason)
            elif status == "skipped":
                res.skipped += 1
            else:
                res.done += 1
                done_ids.append(image_id)
        bar.update(len(results))

    try:
        if workers == 1:
            for item in items:
                collect(_run_chunk(job, [item]))
        else:
            with ProcessPoolExecutor(max_workers=workers, mp_context=_mp_context(), initializer=_init_worker) as ex:
                futures = [ex.submit(_run_chunk, job, chunk) for chunk in _chunks(items, workers)]
                try:
                    for fut in as_completed(futures):
                        collect(fut.result())
                except BaseException:
                    for fut in futures:
                        fut.cancel()
                    raise
    finally:
        bar.close()
    run.record(STAGE, failed=res.failed, done=done_ids, status="done" if not res.failed else "partial")
    return res
