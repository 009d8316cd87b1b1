"""Reduced precision for the frozen CLIP forward (``--precision auto|fp32|bf16|fp16``).

Only the frozen, gradient-free part of the cam stage (the patch embedding and blocks
``1..L-1``) runs under :func:`torch.autocast`; the last block, the GradCAM gradients,
CAA (float64) and everything refine reads stay in full precision.

``auto`` resolves per device, once per run, and the resolved value (never ``auto``) is
what the run's manifest records:

* CUDA: ``bf16`` when ``torch.cuda.is_bf16_supported()`` (Ampere and newer), else ``fp32``.
* CPU: ``bf16`` when the CPU has native bf16 arithmetic, i.e. the ``avx512_bf16`` or
  ``amx_bf16`` flag (read from ``/proc/cpuinfo`` on Linux; where that file is missing,
  torch's own probes ``torch._C._cpu._is_avx512_bf16_supported`` /
  ``_is_amx_tile_supported`` are asked), else ``fp32``. Without those instructions bf16
  on a CPU is emulated and slower than fp32.
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path
from typing import Iterator

from clip_es.errors import ConfigError

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


def resolve_precision(precision: str, device: str) -> str:
    """``fp32``, ``bf16`` or ``fp16`` for ``device`` (see the module doc for ``auto``).

    Raises:
        ConfigError: an unknown value, or ``fp16``/``bf16`` where the device cannot run it.
    """
    if precision not in PRECISIONS:
        raise ConfigError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    cuda = str(device).startswith("cuda")
    if precision == "auto":
        if cuda:
            import torch

            return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
        return "bf16" if cpu_has_bf16() else "fp32"
    if precision == "bf16" and cuda:
        import torch

        if not torch.cuda.is_bf16_supported():
            raise ConfigError("--precision bf16: this GPU has no bf16 support; use --precision fp16 or fp32")
    return precision


@contextlib.contextmanager
def autocast(precision: str, device: str) -> Iterator[None]:
    """``torch.autocast`` for a resolved ``bf16``/``fp16``; nothing for ``fp32``."""
    if precision == "fp32":
        yield
        return
    import torch

    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    with torch.autocast("cuda" if str(device).startswith("cuda") else "cpu", dtype=dtype):
        yield
