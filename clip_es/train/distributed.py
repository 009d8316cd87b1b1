"""Multi-process training set-up: torchrun's environment, the process group, shared failures.

Launched by ``torchrun`` (``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` set), each process trains
on its own slice of every step's samples with DDP (gloo on CPU, nccl on CUDA). Without
those variables everything here is a no-op for one process.
"""

from __future__ import annotations

import gc
import os
import socket
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

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


def check_one_gpu_per_rank(info: DistInfo, requested: str, device: str, local_world: int, cuda_count: int,
                           visible_set: bool) -> None:
    """Refuse, before the process group exists, two local ranks that would compute on one GPU
    (NCCL's first collective would fail with a "duplicate GPU" error that names no option).

    A pure function of what this rank sees: with ``CUDA_VISIBLE_DEVICES`` unset every local
    rank sees the same GPUs, so ``--device cuda:N`` (one GPU for all) or more local ranks than
    GPUs (``LOCAL_RANK % count`` repeats) put two ranks on one GPU. With it set (a launcher
    may give each rank its own GPU) the ranks compare their GPUs after the process group
    starts instead (:func:`duplicate_gpus`).

    Args:
        requested: ``--device`` as given; ``device``: what :func:`~clip_es.stage.resolve_device` chose.
        local_world: torchrun's ``LOCAL_WORLD_SIZE`` (ranks on this machine).
        cuda_count: CUDA devices this process sees.
        visible_set: ``CUDA_VISIBLE_DEVICES`` is set.

    Raises:
        ConfigError: two local ranks on one GPU, with the fix.
    """
    if not info.enabled or not device.startswith("cuda") or local_world < 2 or visible_set:
        return
    fix = (f"start at most {cuda_count} process(es) per machine (torchrun --nproc_per_node {cuda_count}) "
           f"with --device cuda (rank I computes on cuda:I), or train on the CPU with --device cpu (gloo)")
    if requested.startswith("cuda:"):
        raise ConfigError(f"--device {requested} under torchrun puts all {local_world} local ranks on one GPU, "
                          f"which NCCL refuses; {fix}")
    if local_world > cuda_count:
        raise ConfigError(f"torchrun started {local_world} ranks on this machine but it has {cuda_count} GPU(s): "
                          f"local ranks 0 and {cuda_count} would share cuda:0 (LOCAL_RANK % {cuda_count}), which "
                          f"NCCL refuses; {fix}")


def duplicate_gpus(gpus: Sequence[tuple[str, str]]) -> list[list[int]]:
    """Groups of ranks (two or more) that name one GPU, from every rank's ``(host, GPU id)``."""
    seen: dict[tuple[str, str], list[int]] = {}
    for rank, key in enumerate(gpus):
        seen.setdefault(tuple(key), []).append(rank)
    return [ranks for ranks in seen.values() if len(ranks) > 1]


def gpu_id(device: str) -> str:
    """A GPU's identity across processes: its UUID where torch reports it, else its PCI bus id, else
    ``CUDA_VISIBLE_DEVICES`` and the index."""
    import torch

    props = torch.cuda.get_device_properties(torch.device(device))
    for attr in ("uuid", "pci_bus_id"):
        value = getattr(props, attr, None)
        if value is not None:
            return str(value)
    return f"{os.environ.get('CUDA_VISIBLE_DEVICES', '')}:{torch.device(device).index}"


def _compare_gpus(info: DistInfo, device: str) -> None:
    """Every rank's ``(host, GPU id)`` over a gloo group (no NCCL collective yet); refuse a shared GPU."""
    import torch.distributed as dist

    group = dist.new_group(backend="gloo")
    try:
        gpus: list = [None] * info.world
        dist.all_gather_object(gpus, (socket.gethostname(), gpu_id(device)), group=group)
    finally:
        dist.destroy_process_group(group)
    shared = duplicate_gpus(gpus)
    if shared:
        raise ConfigError(f"ranks {' and '.join(map(str, shared[0]))} compute on one GPU ({gpus[shared[0][0]][1]} on "
                          f"{gpus[shared[0][0]][0]}), which NCCL refuses; give each rank its own GPU "
                          f"(CUDA_VISIBLE_DEVICES per rank, or torchrun --nproc_per_node <= GPUs with --device cuda), "
                          f"or train on the CPU with --device cpu (gloo)")


@contextmanager
def distributed(info: DistInfo, device: str, requested: str | None = None) -> Iterator[None]:
    """Init the process group for ``info`` (no-op for one process), destroy it on exit.

    On CUDA, two local ranks on one GPU are refused before the first collective
    (:func:`check_one_gpu_per_rank`, then :func:`duplicate_gpus` across the ranks).

    Raises:
        ConfigError: two ranks on one GPU.
    """
    import torch.distributed as dist

    owned = False
    if info.enabled and not dist.is_initialized():
        cuda = device.startswith("cuda")
        if cuda:
            import torch

            check_one_gpu_per_rank(info, requested or device, device, int(os.environ.get("LOCAL_WORLD_SIZE", "1")),
                                   torch.cuda.device_count(), "CUDA_VISIBLE_DEVICES" in os.environ)
        dist.init_process_group(backend="nccl" if cuda else "gloo")
        owned = True
        if cuda:
            try:
                _compare_gpus(info, device)
            except BaseException:
                dist.destroy_process_group()
                raise
    try:
        yield
    finally:
        if owned and dist.is_initialized():
            # a DDP wrapper lives on in reference cycles (its hooks) and holds the group; collected
            # after the group is gone, or never, it can abort the process at exit ("terminate called
            # without an active exception", seen once on rank 1 of a 2-process gloo test)
            gc.collect()
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
