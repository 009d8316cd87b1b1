"""The ``refine`` stage: cam-stage CAA maps -> dense CRF or PAMR -> confidence-guided pseudo masks.

Per image (files listed in :mod:`clip_es.refine.store`): read ``RUN/cam/<id>.npz`` and
the original image, stack ``[bg, caa_1..caa_K]``, refine it with the ``--method`` taken
from :data:`~clip_es.refine.methods.METHODS` (dense CRF, :func:`~clip_es.refine.crf.dense_crf`,
by default; PAMR, :func:`~clip_es.refine.pamr.pamr`, on the CPU or a GPU) and write the
refined argmax (``RUN/refine/crf``, whatever the method), the pseudo mask (255 where
``conf < --conf``) and optionally the confidence. ``--no-crf`` writes the plain argmax of
``[bg, caa]`` instead.

Devices. The CRF runs on the CPU. A torch method (PAMR) runs on ``--device`` (``auto``:
the GPU when there is one, one per rank under ``torchrun``); on a GPU the images are
refined in this process, one after the other (the GPU's part is milliseconds, so a
pool of processes would only add CUDA contexts). Its outputs on a GPU may differ from
the CPU's in a few pixels where two classes tie within float32 rounding; the device is
not part of the stage parameters.

Working resolution. Images whose longer side exceeds ``RefineConfig.max_side`` (default
1024 px) are refined at a working size with that longer side: the image is downscaled
with area interpolation, the CAA maps are resized straight from their stored grid, the
CRF (or the ``--no-crf`` argmax) runs there, and the label, confidence and mask images
are brought back to the original size with nearest-neighbour interpolation, so every
output has the image's size. CRF kernel widths are in working-image pixels. Images at
or below the cap are refined at their own size, exactly as without it. The cap bounds
the CRF's memory and time. Measured process peak RSS for one CRF call at 1024x768: 0.34 GB
on a natural image with 3 labels, 0.63 / 1.03 GB on a worst-case random-noise image with
3 / 9 labels (about 0.07 GB per extra label); uncapped, a 3 MP noise image already needs
2.3 GB and a 48 MP photo would need tens of GB. For one 8000x6000 JPEG the whole stage
peaks at 0.54 GB per worker process (mostly decoding the image; no torch is imported);
``tests/test_reliability.py`` asserts the bound.

Failures. Per-image problems (unreadable image, corrupt cam file, a size mismatch, out
of memory) are recorded in the manifest (``stages.refine.failed``) and the stage goes
on; an output that cannot be written (disk full, read-only folder) stops it with
:class:`~clip_es.rundir.OutputWriteError`, leaving complete files only.

Images are independent, so with ``workers > 1`` they are spread over a process pool in
chunks; every output depends only on its own image, so the files are byte-identical
whatever the number of workers. Like every stage it resumes: images whose outputs are
complete are skipped, and the run refuses a second refine with other parameters.
"""

from __future__ import annotations

import logging
import math
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from tqdm import tqdm

from clip_es.cam.store import CamMaps, load_cam, upsample
from clip_es.data.image_io import mask_to_png_bytes, read_image
from clip_es.data.registry import dataset_of_run
from clip_es.errors import ClipEsError, ConfigError, DatasetError, RunDirError
from clip_es.refine.crf import CrfParams, conf_to_uint8, labels_from_q, scores_to_probs, stack_scores
from clip_es.refine.methods import DEFAULT_METHOD, METHODS, get_method
from clip_es.refine.pamr import PamrParams
from clip_es.refine.store import CONF, CRF, MASKS, STAGE, is_valid_png, refine_dir
from clip_es.rundir import OutputWriteError, RunDir, atomic_write_bytes
from clip_es.scoring import scores_to_labels
from clip_es.stage import (StageResult, completion_status, dist_shard, fit_image, hold_for_test, resolve_device,
                           select_ids, working_size)
from clip_es.threads import process_budget, resolve_threads, threads_from_config

log = logging.getLogger(__name__)

#: Largest number of images one pool task carries. Tasks are small (about 16 per worker)
#: so the workers finish together; a task's overhead (~1 ms) is tiny next to one CRF.
MAX_CHUNK = 8


@dataclass(frozen=True)
class RefineConfig:
    """Everything the refine stage needs. Its output-deciding part is saved as ``RUN/refine/config.json``.

    Attributes:
        run: the run directory (must hold a cam stage).
        crf: refine (``False``: argmax of ``[bg, caa]``, no confidence, no 255; the name
            predates ``method``).
        conf: confidence threshold; pixels with ``max_c Q_c < conf`` become 255 in the mask;
            ``None``: the method's own default (:attr:`RefineMethod.default_conf`).
        alpha: background power, ``bg = (1 - max_k caa_k) ** alpha``.
        crf_params: kernel parameters and iterations of the CRF.
        method: refinement method, a key of :data:`~clip_es.refine.methods.METHODS` (``crf``, ``pamr``).
        pamr_params: PAMR dilations, iterations and ``sigma``.
        device: torch device of a torch method (``auto``, ``cpu``, ``cuda``, ``cuda:N``); the CRF
            accepts ``auto`` and ``cpu`` only.
        save_conf: also write ``RUN/refine/conf/<id>.png`` (uint8 ``round(conf * 255)``).
        max_side: working-resolution cap in pixels (see the module doc); ``None`` = refine at
            the original size whatever it is.
        workers: processes; ``None`` = the thread budget; 1 = no pool. Each worker runs one
            thread, so ``workers`` is capped at the budget.
        limit: only the first ``limit`` images (in dataset order) that have cam outputs.
        shard: ``(i, n)``: refine images ``i, i+n, ...`` of those (``torchrun`` sets it from the rank).
        threads: CPU thread budget (``None``: every CPU this process may use; see
            :func:`clip_es.threads.process_budget`); ``workers * 1 thread`` never exceeds it.
    """

    run: str
    crf: bool = True
    conf: float | None = None
    alpha: float = 1.0
    crf_params: CrfParams = field(default_factory=CrfParams)
    method: str = DEFAULT_METHOD
    pamr_params: PamrParams = field(default_factory=PamrParams)
    device: str = "auto"
    save_conf: bool = False
    max_side: int | None = 1024
    workers: int | None = None
    limit: int | None = None
    shard: tuple[int, int] = (0, 1)
    threads: int | None = None

    def validate(self) -> "RefineConfig":
        method = get_method(self.method)
        if not 0.0 <= self.resolved_conf() <= 1.0:
            raise ConfigError(f"--conf must be in [0, 1], got {self.conf}")
        if not self.crf and self.method != DEFAULT_METHOD:
            raise ConfigError(f"--no-crf refines nothing, so --method {self.method} has no effect; drop one of them")
        if not method.torch_device and self.device not in ("auto", "cpu"):
            raise ConfigError(f"--method {method.name} runs on the CPU only, got --device {self.device}; "
                              "use --device cpu (or auto), or a method that runs on a GPU: "
                              + ", ".join(name for name, m in METHODS.items() if m.torch_device))
        if not self.alpha > 0:
            raise ConfigError(f"--alpha must be > 0, got {self.alpha}")
        if self.workers is not None and self.workers < 1:
            raise ConfigError(f"--workers must be at least 1, got {self.workers}")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"--limit must be at least 1, got {self.limit}")
        if self.shard[1] < 1 or not 0 <= self.shard[0] < self.shard[1]:
            raise ConfigError(f"--shard must be I/N with 0 <= I < N, got {self.shard[0]}/{self.shard[1]}")
        if self.max_side is not None and self.max_side < 1:
            raise ConfigError(f"--max-side must be a positive number of pixels (0 on the command line: no cap), "
                              f"got {self.max_side}")
        if self.save_conf and not self.crf:
            raise ConfigError("--save-conf needs the CRF (confidence is max_c Q_c); drop --no-crf or --save-conf")
        self.crf_params.validate()
        self.pamr_params.validate()
        resolve_threads(self.threads)
        return self

    def resolved_conf(self) -> float:
        """``conf``, or the method's default threshold when ``None``."""
        return self.conf if self.conf is not None else get_method(self.method).default_conf

    def method_params(self) -> Any:
        """The parameter dataclass of the chosen method (its :attr:`RefineMethod.params_field`)."""
        return getattr(self, get_method(self.method).params_field)

    def refine_device(self) -> str:
        """Where the method runs: ``device`` resolved for a torch method, else ``cpu``."""
        if self.crf and get_method(self.method).torch_device:
            return resolve_device(self.device)
        return "cpu"

    def resolved_workers(self) -> int:
        """``workers``, or the thread budget when ``None``; never more than the budget."""
        budget = process_budget(self.threads)
        if self.workers is not None and self.workers > budget:
            log.warning("--workers %d is more than the %d-thread budget (--threads); using %d worker processes",
                        self.workers, budget, budget)
        return max(1, min(self.workers if self.workers is not None else budget, budget))


def stage_params(cfg: RefineConfig, cam_hash: str | None) -> dict[str, Any]:
    """The parameters that decide the outputs (hashed into the manifest).

    ``save_conf``, ``workers``, ``limit``, ``shard`` and ``device`` are left out: they change
    which files are written or where they are computed, not their content. ``method`` is
    left out when it is the default (CRF), so runs made before it existed keep their hash.
    """
    p: dict[str, Any] = {"source": "caa", "crf": cfg.crf, "alpha": cfg.alpha, "cam_hash": cam_hash,
                         "max_side": cfg.max_side}
    if cfg.crf:
        method = get_method(cfg.method)
        p["conf"] = cfg.resolved_conf()
        if method.name != DEFAULT_METHOD:
            p["method"] = method.name
        p[method.params_field] = asdict(cfg.method_params())
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
    method: str
    params: Any  # the method's parameter dataclass
    save_conf: bool
    max_side: int | None = None
    device: str = "cpu"

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
        maps, size = _load_cam_grid(Path(self.cam_dir) / f"{image_id}.npz")
        image = None
        if self.crf:
            image = read_image(image_path)
            if image.shape[:2] != size:
                raise DatasetError(f"{image_path}: image is {image.shape[1]}x{image.shape[0]} but its cam maps "
                                   f"are {size[1]}x{size[0]}; the image changed since 'clipes cam' ran; "
                                   "re-run cam into a new run folder")
            image = fit_image(image, self.max_side)  # the full-size decode is freed before refining
        labels, conf, mask = refine_image(maps.caa, maps.keys, size, image, crf=self.crf, conf=self.conf,
                                          alpha=self.alpha, method=self.method, params=self.params,
                                          max_side=self.max_side, device=self.device)
        del image
        if self.crf:
            atomic_write_bytes(outs[CRF], mask_to_png_bytes(labels))
            if self.save_conf:
                atomic_write_bytes(outs[CONF], _gray_png_bytes(conf_to_uint8(conf)))
        atomic_write_bytes(outs[MASKS], mask_to_png_bytes(mask))
        return "done"


def refine_image(caa: np.ndarray, keys: np.ndarray, size: tuple[int, int], image: np.ndarray | None = None, *,
                 crf: bool = True, conf: float | None = None, alpha: float = 1.0, method: str = DEFAULT_METHOD,
                 params: Any = None, max_side: int | None = 1024, device: str = "cpu"
                 ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """One image's refine step without files: what ``clipes refine`` computes for it.

    Args:
        caa: ``(K, h, w)`` float32 CAA maps as the cam stage stores them (patch grid, or the
            working size for multi-view runs); resized here to the working size.
        keys: ``(K,)`` 0-based class indices of the maps.
        size: the original image ``(H, W)``.
        image: ``(H, W, 3)`` uint8 RGB, the original or already at the working size
            (:func:`~clip_es.stage.fit_image`); needed only with ``crf``.
        crf, alpha, method, max_side, device: as in :class:`RefineConfig` (``crf=False``: no refinement).
        conf: confidence threshold (``None``: the method's default).
        params: the method's parameter dataclass (``None``: its defaults, as in :class:`RefineConfig`).

    Returns:
        ``(labels, confidence, mask)`` at ``size``: ``(H, W)`` uint8 CRF argmax (0 background,
        ``k + 1`` class ``k``), ``(H, W)`` float32 ``max_c Q_c`` (``None`` without CRF), and the
        ``(H, W)`` uint8 pseudo mask (255 where the confidence is below ``conf``; without CRF
        the plain argmax of ``[bg, caa]``, equal to ``labels``).
    """
    work = working_size(size, max_side)
    caa = upsample(caa, work)  # (K, h, w) float32 at the working size
    if not crf:
        labels = _to_size(scores_to_labels(keys, caa, alpha), size)
        return labels, None, labels
    if image is None:
        raise ValueError("refine_image needs the image to refine (or crf=False)")
    m = get_method(method)
    if params is None:
        params = getattr(RefineConfig(run=""), m.params_field)
    image = fit_image(image, max_side)  # at ``work``
    q = m.refine(image, scores_to_probs(stack_scores(caa, alpha)), params, device)
    del image, caa
    labels, confidence, mask = labels_from_q(q, keys, m.default_conf if conf is None else conf)
    del q
    return _to_size(labels, size), _to_size(confidence, size), _to_size(mask, size)


def _load_cam_grid(path: Path) -> tuple[CamMaps, tuple[int, int]]:
    """A cam record with maps as stored (not upsampled) and the original image ``(H, W)``.

    Raises:
        RunDirError: a corrupt or incomplete record.
    """
    maps = load_cam(path, full_size=False)
    try:
        with np.load(path, allow_pickle=False) as z:
            h, w = (int(v) for v in z["size"])
    except (OSError, KeyError, ValueError, EOFError) as e:  # load_cam just read it; a race at most
        raise RunDirError(f"{path}: corrupt cam file ({e}); delete it and re-run 'clipes cam'") from e
    return maps, (h, w)


def _to_size(a: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``(h, w)`` uint8 (or float32) -> ``size`` with nearest-neighbour (pixel-centre aligned); unchanged if equal."""
    if a.shape == tuple(size):
        return a
    return cv2.resize(a, (size[1], size[0]), interpolation=cv2.INTER_NEAREST_EXACT)


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
        except OutputWriteError:  # disk full / read-only: every image would fail; stop the stage
            raise
        except ClipEsError as e:
            out.append((image_id, "failed", str(e)))
        except MemoryError:
            out.append((image_id, "failed", f"{image_path}: out of memory in {job.method}; lower --max-side "
                                            f"(now {job.max_side}) or use fewer --workers"))
    return out


def _init_worker() -> None:
    """Pool worker start-up: one OpenCV and one torch thread per process (parallelism comes from the pool).

    Workers ignore SIGINT: Ctrl-C reaches the whole process group, and the main process alone
    handles it (cancels the pending chunks, lets running ones finish their atomic writes, and
    the CLI prints one "interrupted" line) instead of every worker printing a traceback.
    """
    import os
    import signal

    import cv2

    cv2.setNumThreads(1)
    os.environ["OMP_NUM_THREADS"] = "1"  # read when a torch method first imports torch in this worker
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _mp_context():
    """``spawn``: every worker starts from a fresh interpreter.

    Not ``fork``: a forked child inherits the caller's thread-pool state without its
    threads, so after the calling process has used OpenCV (or torch) threads, as
    :func:`~clip_es.cam.run.generate_cams` does, forked workers hang or crash
    (``cv2.setNumThreads`` waiting forever on the parent's condition variable, or a
    ``BrokenProcessPool``). Spawned workers import only this module's dependencies (no
    torch), about a second each, once per run. As for any spawn pool, a script calling
    :func:`refine_masks` must guard its entry point with ``if __name__ == "__main__":``.
    """
    import multiprocessing as mp

    return mp.get_context("spawn")


def unguarded_main_script() -> str | None:
    """Where a spawn pool started now would re-run the caller's script, else ``None``.

    A spawned worker imports the main script again (as ``__mp_main__``), so a script that calls
    :func:`refine_masks` from its top level without ``if __name__ == "__main__":`` would have
    each worker re-run that code (loading models, starting pools of its own) and the pool
    break. Returns ``"FILE:LINE"`` of the unguarded top-level call in the main script, or
    ``None`` when the call is guarded, comes from a notebook or an interactive session (no
    main file), or from ``python -m package`` (spawn does not re-run a package's ``__main__``).
    """
    import ast
    import sys

    main = sys.modules.get("__main__")
    main_file = getattr(main, "__file__", None)
    spec_name = getattr(getattr(main, "__spec__", None), "name", None) or ""
    if not main_file or spec_name.endswith("__main__") or not str(main_file).endswith(".py"):
        return None
    frame, line = sys._getframe(1), None
    while frame is not None:  # the outermost frame of the main script's top-level code
        if frame.f_code.co_name == "<module>" and frame.f_globals is vars(main):
            line = frame.f_lineno
        frame = frame.f_back
    if line is None:
        return None
    try:
        tree = ast.parse(Path(main_file).read_text(encoding="utf-8"))
    except (OSError, SyntaxError, ValueError):
        return None

    def is_main_guard(test: ast.expr) -> bool:
        return (isinstance(test, ast.Compare) and len(test.ops) == 1 and isinstance(test.ops[0], ast.Eq)
                and {ast.unparse(test.left), ast.unparse(test.comparators[0])} in
                ({"__name__", "'__main__'"}, {"__name__", '"__main__"'}))

    for node in tree.body:
        if isinstance(node, ast.If) and is_main_guard(node.test) and \
                node.body[0].lineno <= line <= (node.body[-1].end_lineno or node.body[-1].lineno):
            return None
    return f"{main_file}:{line}"


def _chunks(items: list, workers: int) -> list[list]:
    size = max(1, min(MAX_CHUNK, math.ceil(len(items) / (workers * 16))))
    return [items[i:i + size] for i in range(0, len(items), size)]


@threads_from_config
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
    expected = select_ids(ids, cfg.limit, (0, 1))
    ids = select_ids(ids, cfg.limit, dist_shard(cfg.shard))
    out = run.begin_stage(STAGE, stage_params(cfg, cam_info.get("hash")))
    kinds = (MASKS, CRF, CONF) if cfg.save_conf else (MASKS, CRF) if cfg.crf else (MASKS,)
    for kind in kinds:
        (out / kind).mkdir(exist_ok=True)
        RunDir.sweep_temp(out / kind)
    method = get_method(cfg.method)
    device = cfg.refine_device()
    job = _Job(str(cam_dir), str(refine_dir(run, MASKS)), str(refine_dir(run, CRF)), str(refine_dir(run, CONF)),
               cfg.crf, cfg.resolved_conf(), cfg.alpha, method.name, cfg.method_params(), cfg.save_conf,
               cfg.max_side, device)

    res = StageResult(STAGE, str(run.path))
    items: list[tuple[str, str]] = []
    for image_id in ids:
        try:
            items.append((image_id, str(ds.image_path(image_id))))
        except ClipEsError as e:
            res.failed[image_id] = str(e)
    done_ids: list[str] = []
    workers = min(cfg.resolved_workers(), max(1, len(items)))
    if device != "cpu" and workers > 1:
        log.info("refining on %s in this process (%d worker processes asked for)", device, workers)
        workers = 1
    if workers > 1 and (where := unguarded_main_script()):
        log.warning("refine_masks was called at %s outside an 'if __name__ == \"__main__\":' block; worker "
                    "processes would re-run the script, so this run refines in one process. Put the script's "
                    "calls under that guard to use %d processes", where, workers)
        workers = 1
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
        hold_for_test(res.done + res.skipped + len(res.failed))

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
    run.record(STAGE, failed=res.failed, done=done_ids,
               status=lambda st: completion_status(st, refine_dir(run, MASKS), ".png", expected))
    return res
