"""Pieces every stage runner shares: the result record, device choice, working size, image selection.

Imports no torch at module level: CPU-only stages (refine, export) and their pool workers
stay light.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from clip_es.errors import ConfigError, first_line


#: How many failure reasons a stage summary lists (the manifest has them all).
SHOW_REASONS = 3

#: Test hook, inert unless set: ``N:FILE`` makes a stage's main loop stop once ``N`` images are
#: finished, create ``FILE`` and sleep there (signals are delivered as anywhere else) for up to
#: :data:`HOLD_MAX_S` seconds, so a test can interrupt a run at a known point whatever the
#: machine's speed (tests/test_first_hour_cli.py, the Ctrl-C tests).
HOLD_ENV = "CLIPES_TEST_HOLD"
HOLD_MAX_S = 120.0


@dataclass
class StageResult:
    """What a stage run did. ``failed`` maps image id to the reason."""

    stage: str
    run: str
    done: int = 0
    skipped: int = 0
    failed: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.failed

    def summary(self, reasons: int = SHOW_REASONS) -> str:
        """``cam: 8 done, 1 failed: see RUN/manifest.json (stages.cam.failed); 3 already there``, then,
        when images failed, the first ``reasons`` failure reasons, one indented line each."""
        s = f"{self.stage}: {self.done} done, {len(self.failed)} failed"
        if self.failed:
            s += f": see {Path(self.run) / 'manifest.json'} (stages.{self.stage}.failed)"
        if self.skipped:
            s += f"; {self.skipped} already there"
        shown = list(self.failed.items())[:max(0, reasons)]
        for image_id, reason in shown:
            line = first_line(reason) or "(no reason given)"
            s += f"\n  {line if image_id in line else f'{image_id}: {line}'}"
        if shown and len(self.failed) > len(shown):
            s += f"\n  ... and {len(self.failed) - len(shown)} more"
        return s


def pick_device(requested: str, local_rank: int | None, cuda_count: int) -> str:
    """The device one process computes on: a pure function of what it was asked and where it runs.

    Args:
        requested: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        local_rank: torchrun's ``LOCAL_RANK`` (``None`` outside torchrun).
        cuda_count: CUDA devices this process sees (``torch.cuda.device_count()``; 0 without CUDA).

    Returns:
        ``cpu``, or ``cuda:I`` with an explicit index: for ``auto`` (with a GPU) and ``cuda``,
        ``I = LOCAL_RANK % cuda_count`` (0 outside torchrun), so N ranks on N GPUs get one each
        and launchers that give every rank its own ``CUDA_VISIBLE_DEVICES`` (one visible
        device) all get ``cuda:0``; an explicit ``cuda:N`` is kept as asked.

    Raises:
        ConfigError: an unknown value, CUDA asked for without a CUDA device, or an index
            beyond the visible devices.
    """
    if requested == "cpu" or (requested == "auto" and cuda_count < 1):
        return "cpu"
    if requested not in ("auto", "cuda") and not requested.startswith("cuda:"):
        raise ConfigError(f"--device must be cpu, cuda, cuda:N or auto, got {requested!r}")
    if cuda_count < 1:
        raise ConfigError(f"--device {requested} asked for, but no CUDA device is available; use --device cpu")
    if requested in ("auto", "cuda"):
        return f"cuda:{(local_rank or 0) % cuda_count}"
    index = requested.partition(":")[2]
    if not index.isdigit():
        raise ConfigError(f"--device must be cpu, cuda, cuda:N or auto, got {requested!r}")
    if int(index) >= cuda_count:
        raise ConfigError(f"--device {requested}: only {cuda_count} CUDA device(s) visible (cuda:0.."
                          f"cuda:{cuda_count - 1}); check CUDA_VISIBLE_DEVICES or pass --device cuda")
    return f"cuda:{int(index)}"


def resolve_device(device: str) -> str:
    """:func:`pick_device` for this process (``LOCAL_RANK`` and the visible CUDA devices).

    Every command (cam, prompts, train, segment, label, zero-shot) resolves its ``--device``
    here, so under ``torchrun`` each local rank gets its own GPU whatever it was asked.
    """
    local = os.environ.get("LOCAL_RANK")
    if local is not None and not local.strip().isdigit():
        raise ConfigError(f"malformed torchrun environment: LOCAL_RANK={local!r}")
    count = 0
    if device != "cpu":
        import torch

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return pick_device(device, int(local) if local is not None else None, count)


def bind_device(device: str) -> None:
    """Make ``device`` (from :func:`resolve_device`) this process's current CUDA device; no-op on CPU.

    NCCL collectives, ``pin_memory`` threads, autocast and ``empty_cache`` act on the
    current device, so a rank that computes on ``cuda:1`` must also make it current.
    """
    if device.startswith("cuda"):
        import torch

        torch.cuda.set_device(torch.device(device))


def hold_for_test(finished: int) -> None:
    """The :data:`HOLD_ENV` hook: called by a stage's main loop with how many images it has
    finished; a no-op unless that variable is set (once its ``FILE`` exists, it never holds again)."""
    spec = os.environ.get(HOLD_ENV)
    if not spec:
        return
    count, _, marker = spec.partition(":")
    if not count.isdigit() or not marker:
        raise ConfigError(f"{HOLD_ENV} must be N:FILE, got {spec!r}")
    if finished < int(count) or os.path.exists(marker):
        return
    with open(marker, "w", encoding="utf-8") as f:
        f.write(f"{finished}\n")
    deadline = time.monotonic() + HOLD_MAX_S
    while time.monotonic() < deadline:
        time.sleep(0.01)


def oom_error_type(torch) -> type[BaseException]:
    """torch's out-of-memory exception class: ``torch.cuda.OutOfMemoryError`` (torch 1.13 and
    newer; ``torch.OutOfMemoryError``, the same class, exists only from torch 2.5, while the
    project supports torch 2.1). The one place the project names it."""
    return torch.cuda.OutOfMemoryError


def is_out_of_memory(e: BaseException) -> bool:
    """True for an allocation failure of one batch: ``MemoryError``, CUDA's
    ``OutOfMemoryError``, and the plain ``RuntimeError`` cuBLAS/cuDNN raise when their
    workspace allocation fails (``CUBLAS_STATUS_ALLOC_FAILED``, ``CUDNN_STATUS_ALLOC_FAILED``)."""
    torch = sys.modules.get("torch")
    if isinstance(e, MemoryError) or (torch is not None and isinstance(e, oom_error_type(torch))):
        return True
    return isinstance(e, RuntimeError) and any(s in str(e) for s in ("CUBLAS_STATUS_ALLOC_FAILED",
                                                                     "CUDNN_STATUS_ALLOC_FAILED"))


def working_size(size: tuple[int, int], max_side: int | None) -> tuple[int, int]:
    """The ``(h, w)`` a stage computes at for an image of ``size = (H, W)``.

    ``size`` itself when ``max_side`` is ``None``/0 or ``max(H, W) <= max_side``; else
    the size scaled (aspect kept, rounded, at least 1) so that its longer side is ``max_side``.
    """
    h, w = size
    if not max_side or max(h, w) <= max_side:
        return h, w
    r = max_side / max(h, w)
    return max(1, round(h * r)), max(1, round(w * r))


def fit_image(image, max_side: int | None):
    """``image`` itself, or an area-downscaled copy at :func:`working_size` (longer side ``max_side``)."""
    h, w = working_size(image.shape[:2], max_side)
    if (h, w) == image.shape[:2]:
        return image
    import cv2

    return cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA)


def select_ids(ids: list[str], limit: int | None, shard: tuple[int, int]) -> list[str]:
    """``--limit`` first, then every ``n``-th id starting at ``i``."""
    ids = ids[:limit] if limit else ids
    i, n = shard
    return ids[i::n]


def dist_shard(shard: tuple[int, int] = (0, 1)) -> tuple[int, int]:
    """The shard this process works on.

    An explicit shard (``--shard I/N`` other than ``0/1``) wins; under ``torchrun``
    (``WORLD_SIZE`` > 1) it is ``(RANK, WORLD_SIZE)``, so ``torchrun --nproc_per_node N -m
    clip_es cam ...`` splits the images over N processes writing one run folder; otherwise
    every image.
    """
    if tuple(shard) != (0, 1):
        return shard
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return (int(os.environ.get("RANK", "0")), world) if world > 1 else (0, 1)


def completion_status(stage_entry: dict, folder: Path, suffix: str, expected: list[str]) -> str:
    """A stage's status from its merged manifest entry and its output folder.

    ``partial`` when any image failed; ``done`` once every expected image has its file
    (every shard finished); ``running`` while other shards are still at work.
    """
    if stage_entry.get("failed"):
        return "partial"
    return "done" if all((folder / f"{i}{suffix}").is_file() for i in expected) else "running"
