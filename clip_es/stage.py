"""Pieces every stage runner shares: the result record, device choice, working size, image selection.

Imports no torch at module level: CPU-only stages (refine, export) and their pool workers
stay light.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from clip_es.errors import ConfigError, first_line


#: How many failure reasons a stage summary lists (the manifest has them all).
SHOW_REASONS = 3


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


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when available, else ``cpu``; validates explicit values."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cuda" and "LOCAL_RANK" in os.environ:  # torchrun: one GPU per local process
            device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        return device
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda asked for, but no CUDA device is available; use --device cpu")
    if device != "cpu" and not device.startswith("cuda"):
        raise ConfigError(f"--device must be cpu, cuda or auto, got {device!r}")
    return device


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
