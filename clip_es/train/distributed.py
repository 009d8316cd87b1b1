"""Multi-process training set-up: torchrun's environment, the process group, shared failures.

Launched by ``torchrun`` (``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` set), each process trains
on its own slice of every step's samples with DDP (gloo on CPU, nccl on CUDA). Without
those variables everything here is a no-op for one process.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

from clip_es.errors import ClipEsError, ConfigError


@dataclass(frozen=True)
class DistInfo:
    """This process's place: ``rank`` of ``world`` processes, ``local_rank`` on its machine."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> "DistInfo":
        """Read torchrun's ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` (single process when unset)."""
        try:
            world = int(os.environ.get("WORLD_SIZE", "1"))
            rank = int(os.environ.get("RANK", "0"))
            local = int(os.environ.get("LOCAL_RANK", str(rank)))
        except ValueError as e:
            raise ConfigError(f"malformed torchrun environment (RANK/WORLD_SIZE/LOCAL_RANK): {e}") from e
        return cls(rank, world, local)


@contextmanager
def distributed(info: DistInfo, device: str) -> Iterator[None]:
    """Init the process group for ``info`` (no-op for one process), destroy it on exit."""
    import torch.distributed as dist

    owned = False
    if info.enabled and not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        dist.init_process_group(backend=backend)
        owned = True
    try:
        yield
    finally:
        if owned and dist.is_initialized():
            dist.destroy_process_group()


def broadcast_error(info: DistInfo, err: BaseException | None) -> None:
    """Make every rank raise when rank 0 failed during preparation (instead of hanging)."""
    if not info.enabled:
        if err is not None:
            raise err
        return
    import torch.distributed as dist

    msg = [f"{type(err).__name__}: {err}" if err is not None else None]
    dist.broadcast_object_list(msg, src=0)
    if err is not None:
        raise err
    if msg[0] is not None:
        raise ClipEsError(f"rank 0 failed: {msg[0]}")
