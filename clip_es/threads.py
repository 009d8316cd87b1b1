"""How many CPU threads a compute command uses (``--threads``), in one place.

Every compute command (cam, refine, train, segment, demo) takes ``threads``: ``None``
means :func:`default_threads`: ``OMP_NUM_THREADS`` when set (the usual way to pin a
process), else torch's thread count (its default: the physical cores), capped at the CPUs
this process may run on (``os.sched_getaffinity``, which honours ``taskset``, cgroup
cpusets and container limits). The library applies it with :func:`use_threads` around the work and restores
the caller's setting afterwards, so a Python-API caller's own thread settings survive.

Process pools (refine's CRF workers, data-loader workers) split the budget: ``workers
* threads_per_worker <= threads`` (:func:`split_threads`).

Imports neither torch nor OpenCV at module level (refine's workers stay light).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
from typing import Any, Callable, Iterator, TypeVar

from clip_es.errors import ConfigError

log = logging.getLogger(__name__)


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask; ``os.cpu_count()`` where there is none)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


#: The budget of the innermost :func:`use_threads` block (a stage run inside ``clipes demo``
#: or a recipe inherits the outer ``--threads``).
_ACTIVE: list[int] = []


def default_threads() -> int:
    """The enclosing :func:`use_threads` budget; else ``OMP_NUM_THREADS`` when set to a
    positive integer; else, when torch is imported, its current intra-op thread count
    (torch's own default is the number of physical cores, so hyper-threads are not
    oversubscribed; a Python caller's ``torch.set_num_threads`` is honoured) capped at
    :func:`available_cpus`; else :func:`available_cpus`."""
    if _ACTIVE:
        return _ACTIVE[-1]
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    torch = sys.modules.get("torch")
    if torch is not None:
        return max(1, min(torch.get_num_threads(), available_cpus()))
    return available_cpus()


def resolve_threads(threads: int | None) -> int:
    """``threads`` validated, or :func:`default_threads` for ``None``.

    Raises:
        ConfigError: ``threads < 1``.
    """
    if threads is None:
        return default_threads()
    if int(threads) < 1:
        raise ConfigError(f"--threads must be at least 1, got {threads}")
    return int(threads)


def process_budget(threads: int | None) -> int:
    """How many single-threaded worker processes may run: ``threads`` when given, else the
    enclosing :func:`use_threads` budget, else :func:`available_cpus` (``OMP_NUM_THREADS``
    is a per-process setting, which one-thread workers honour anyway)."""
    if threads is not None:
        return resolve_threads(threads)
    return _ACTIVE[-1] if _ACTIVE else available_cpus()


def split_threads(threads: int | None, workers: int) -> tuple[int, int]:
    """``(workers, threads per worker)`` with ``workers * per_worker <= threads``.

    ``workers`` is lowered to the thread budget when it exceeds it (each worker needs one).
    """
    total = resolve_threads(threads)
    workers = max(1, min(int(workers), total))
    return workers, max(1, total // workers)


@contextlib.contextmanager
def use_threads(threads: int | None) -> Iterator[int]:
    """Run the block with ``threads`` torch intra-op threads and OpenCV threads; restore them after.

    torch is configured only if it is already imported (CPU-only stages never import it).
    Yields the resolved count.
    """
    n = resolve_threads(threads)
    torch = sys.modules.get("torch")
    prev_torch = torch.get_num_threads() if torch is not None else None
    try:
        import cv2

        prev_cv2 = cv2.getNumThreads()
    except ImportError:  # pragma: no cover - cv2 is a dependency
        cv2, prev_cv2 = None, None
    if torch is not None and prev_torch != n:
        torch.set_num_threads(n)
    if cv2 is not None:
        cv2.setNumThreads(n)
    log.info("using %d CPU thread(s) (%d CPUs available to this process)", n, available_cpus())
    _ACTIVE.append(n)
    try:
        yield n
    finally:
        _ACTIVE.pop()
        if torch is not None and torch.get_num_threads() != prev_torch:
            torch.set_num_threads(prev_torch)
        if cv2 is not None:
            cv2.setNumThreads(prev_cv2)


def start_forked_workers(loader) -> Iterator:
    """``iter(loader)`` for a forked ``DataLoader``, its workers starting with one OpenCV thread.

    A forked worker inherits the parent's ``cv2.setNumThreads(n)``, so ``w`` workers would run
    ``w * n`` OpenCV threads (torch's own count the DataLoader already sets to 1 in workers);
    calling ``cv2.setNumThreads`` inside a forked child can hang once the parent has used
    OpenCV's pool (it waits on the parent's lock). So the parent holds one OpenCV thread while
    the workers fork (they fork when the iterator is created) and gets its own count back
    right after.
    """
    try:
        import cv2
    except ImportError:  # pragma: no cover - cv2 is a dependency
        return iter(loader)
    prev = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        return iter(loader)
    finally:
        cv2.setNumThreads(prev)


F = TypeVar("F", bound=Callable[..., Any])


def threads_from_config(fn: F) -> F:
    """Decorate a stage function ``fn(cfg, ...)``: run it under ``use_threads(cfg.threads)``."""

    @functools.wraps(fn)
    def wrapper(cfg, *args, **kwargs):
        with use_threads(getattr(cfg, "threads", None)):
            return fn(cfg, *args, **kwargs)

    return wrapper  # type: ignore[return-value]
