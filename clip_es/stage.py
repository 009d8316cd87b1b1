"""Pieces every stage runner shares: the result record, device choice, image selection."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from clip_es.errors import ConfigError


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

    def summary(self) -> str:
        s = f"{self.stage}: {self.done} done, {self.skipped} already there, {len(self.failed)} failed"
        if self.failed:
            s += f": see {Path(self.run) / 'manifest.json'} (stages.{self.stage}.failed)"
        return s


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when available, else ``cpu``; validates explicit values."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda asked for, but no CUDA device is available; use --device cpu")
    if device != "cpu" and not device.startswith("cuda"):
        raise ConfigError(f"--device must be cpu, cuda or auto, got {device!r}")
    return device


def select_ids(ids: list[str], limit: int | None, shard: tuple[int, int]) -> list[str]:
    """``--limit`` first, then every ``n``-th id starting at ``i``."""
    ids = ids[:limit] if limit else ids
    i, n = shard
    return ids[i::n]
