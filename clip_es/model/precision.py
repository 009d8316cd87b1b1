"""Reduced precision for the frozen CLIP forward (``--precision auto|fp32|bf16|fp16``).

Only the frozen, gradient-free part of the cam stage (the patch embedding and blocks
``1..L-1``) runs under :func:`torch.autocast`; the last block, the GradCAM gradients,
CAA (float64) and everything refine reads stay in full precision.

"fp32" means IEEE fp32: :func:`exact_fp32` switches off TF32 for matmuls and convolutions
on CUDA (and oneDNN's bf16/TF32 fp32 matmuls on the CPU, where torch has the new
``fp32_precision`` API) for the block it wraps, whatever the process set before
(``torch.set_float32_matmul_precision("high")`` makes every fp32 matmul TF32 on Ampere+).

``auto`` resolves per device, once per run, and the resolved value (never ``auto``) is
what the run's manifest records:

* CUDA: ``bf16`` when the run's GPU has bf16 tensor cores, i.e. compute capability 8.0
  or higher (Ampere and newer), else ``fp32``. ``torch.cuda.is_bf16_supported()`` is not
  asked: it counts emulation (V100, T4 say yes, and run bf16 slower than fp32) and it asks
  the current device, not the run's.
* CPU: ``bf16`` when the CPU has native bf16 arithmetic, i.e. the ``avx512_bf16`` or
  ``amx_bf16`` flag (read from ``/proc/cpuinfo`` on Linux; where that file is missing,
  torch's own probes ``torch._C._cpu._is_avx512_bf16_supported`` /
  ``_is_amx_tile_supported`` are asked), else ``fp32``. Without those instructions bf16
  on a CPU is emulated and slower than fp32.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from pathlib import Path
from typing import Iterator

from clip_es.errors import ConfigError

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16", "fp16")

_CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def _cpuinfo_flags(path: str = "/proc/cpuinfo") -> set[str] | None:
    try:
        text = Path(path).read_text()
    except OSError:
        return None
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return flags


@functools.lru_cache(maxsize=None)
def cpu_has_bf16() -> bool:
    """True when this CPU computes bf16 natively (``avx512_bf16`` or AMX)."""
    flags = _cpuinfo_flags()
    if flags is not None:
        return any(f in flags for f in _CPU_BF16_FLAGS)
    try:  # no /proc/cpuinfo: torch's CPUID probes (private API; absent means no)
        import torch

        cpu = torch._C._cpu
        return bool(cpu._is_avx512_bf16_supported() or cpu._is_amx_tile_supported())
    except (AttributeError, RuntimeError):
        return False


def cuda_capability(device: str) -> tuple[int, int]:
    """``(major, minor)`` compute capability of the CUDA ``device`` (``cuda`` or ``cuda:N``)."""
    import torch

    return tuple(torch.cuda.get_device_capability(torch.device(device)))


def has_native_bf16(device: str) -> bool:
    """True when ``device`` computes bf16 natively: a GPU of compute capability >= 8.0, or a
    CPU with ``avx512_bf16``/AMX (:func:`cpu_has_bf16`). The one place ``auto`` asks."""
    if str(device).startswith("cuda"):
        return cuda_capability(str(device)) >= (8, 0)
    return cpu_has_bf16()


def resolve_precision(precision: str, device: str) -> str:
    """``fp32``, ``bf16`` or ``fp16`` for ``device`` (see the module doc for ``auto``).

    Raises:
        ConfigError: an unknown value. An explicit ``bf16`` where it would be emulated is
            honoured with a warning.
    """
    if precision not in PRECISIONS:
        raise ConfigError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "auto":
        return "bf16" if has_native_bf16(device) else "fp32"
    if precision == "bf16" and not has_native_bf16(device):
        log.warning("--precision bf16 on %s, which has no native bf16 arithmetic (GPUs: compute capability 8.0 "
                    "and newer; CPUs: avx512_bf16 or AMX): it is emulated and slower than fp32", device)
    return precision


def autocast_dtype(precision: str):
    """The ``torch`` dtype autocast uses for a resolved precision; ``None`` for ``fp32``."""
    import torch

    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def _backends():
    """``torch.backends`` (a function so tests can hand :func:`exact_fp32` fake flags)."""
    import torch

    return torch.backends


#: per device kind, the ``torch.backends`` (module, operator) pairs of the new ``fp32_precision`` API
_FP32_OPS = {"cuda": (("cuda", "matmul"), ("cudnn", "conv")), "cpu": (("mkldnn", "matmul"), ("mkldnn", "conv"))}


@contextlib.contextmanager
def exact_fp32(device: str) -> Iterator[None]:
    """Inside the block, fp32 matmuls and convolutions on ``device`` are IEEE fp32 (no TF32).

    torch >= 2.9 has the ``fp32_precision`` API (``torch.backends.cuda.matmul.fp32_precision``,
    ``torch.backends.cudnn.conv.fp32_precision``, oneDNN's on the CPU): those are set to
    ``"ieee"`` and restored, and the legacy ``allow_tf32`` flags are never read (recent torch
    raises on reading them once the new API was used). Older torch: CUDA's legacy
    ``torch.backends.cuda.matmul.allow_tf32`` and ``torch.backends.cudnn.allow_tf32`` are set
    to ``False`` and restored (they have no CPU counterpart).
    """
    b = _backends()
    kind = "cuda" if str(device).startswith("cuda") else "cpu"
    if hasattr(getattr(getattr(b, "cuda", None), "matmul", None), "fp32_precision"):
        flags = [getattr(getattr(b, mod), op) for mod, op in _FP32_OPS[kind]
                 if hasattr(getattr(getattr(b, mod, None), op, None), "fp32_precision")]
        saved = [f.fp32_precision for f in flags]
        try:
            for f in flags:
                f.fp32_precision = "ieee"
            yield
        finally:
            for f, v in zip(flags, saved):
                f.fp32_precision = v
        return
    if kind != "cuda":
        yield
        return
    saved_legacy = (b.cuda.matmul.allow_tf32, b.cudnn.allow_tf32)
    try:
        b.cuda.matmul.allow_tf32 = False
        b.cudnn.allow_tf32 = False
        yield
    finally:
        b.cuda.matmul.allow_tf32, b.cudnn.allow_tf32 = saved_legacy


@contextlib.contextmanager
def autocast(precision: str, device: str) -> Iterator[None]:
    """``torch.autocast`` for a resolved ``bf16``/``fp16``; for ``fp32`` no autocast and
    :func:`exact_fp32` (torch enables cuDNN's TF32 convolutions by default, which would round
    the patch embedding's inputs to 10 mantissa bits at ``--precision fp32``, and a process
    may have enabled TF32 matmuls)."""
    import torch

    if precision == "fp32":
        with exact_fp32(device):
            yield
        return

    with torch.autocast("cuda" if str(device).startswith("cuda") else "cpu", dtype=autocast_dtype(precision)):
        yield
