"""Segmenter checkpoint files: what ``clipes train`` writes and segment / export-onnx / eval read.

Two formats, both plain dicts of tensors and JSON-able values read with
``torch.load(weights_only=True)``:

* ``RUN/<name>/last.pt`` (:data:`CHECKPOINT_FORMAT`): the training state. ``model``,
  ``optimizer`` (AdamW moments: twice the model's size again), ``step``, ``config``
  (``train`` parameters, ``arch``, ``world_size``), ``text`` (the class text record),
  ``log``, ``rng`` and ``ids_hash``. What ``--resume`` continues from.
* ``RUN/<name>/model.pt`` (:data:`WEIGHTS_FORMAT`): for inference only. ``model``, ``step``,
  ``config`` and ``text``, no optimizer, RNG or log: about a third of ``last.pt`` in float32
  (the predictions are identical), a sixth in float16 (:func:`export_weights` with
  ``dtype="float16"``). ``clipes train`` writes it beside every ``last.pt``.

:func:`load_checkpoint` reads either; only a training checkpoint can be resumed.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clip_es.errors import ConfigError, WeightsError, first_line
from clip_es.rundir import atomic_write

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "clipes-segmenter/1"
WEIGHTS_FORMAT = "clipes-segmenter-weights/1"
LAST = "last.pt"
MODEL = "model.pt"
#: Keys a weights-only file keeps from a training checkpoint.
_WEIGHTS_KEYS = ("model", "step", "config", "text")
_DTYPES = {"float32": torch.float32, "float16": torch.float16}


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a segmenter checkpoint, training (``last.pt``) or weights-only (``model.pt``).

    The dict's ``format`` says which; both hold ``model``, ``step``, ``config`` and ``text``.

    Raises:
        WeightsError: missing, unreadable or not a segmenter checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"segmenter checkpoint {path} does not exist; train one with 'clipes train'")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise WeightsError(f"{path}: not a readable segmenter checkpoint ({type(e).__name__}: "
                           f"{first_line(e)})") from e
    if not isinstance(ck, dict) or ck.get("format") not in (CHECKPOINT_FORMAT, WEIGHTS_FORMAT):
        raise WeightsError(f"{path}: not a clipes segmenter checkpoint (format {CHECKPOINT_FORMAT} or "
                           f"{WEIGHTS_FORMAT})")
    return ck


def to_cpu(obj: Any) -> Any:
    """``obj`` with every tensor inside (nested dicts, lists, tuples) moved to the CPU."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [to_cpu(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(to_cpu(v) for v in obj)
    return obj


def save_checkpoint(path: str | Path, ck: dict[str, Any]) -> None:
    """Write ``ck`` to ``path`` atomically (a reader never sees half a file), every tensor on
    the CPU (a plain ``torch.load`` works on a machine without the GPU it was trained on)."""
    ck = to_cpu(ck)
    atomic_write(path, lambda f: torch.save(ck, f))


def weights_only(ck: dict[str, Any], dtype: str = "float32") -> dict[str, Any]:
    """The inference part of a checkpoint dict: model (floating tensors cast to ``dtype``), step, config, text."""
    if dtype not in _DTYPES:
        raise ConfigError(f"weights dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
    out = {k: ck[k] for k in _WEIGHTS_KEYS}
    out["model"] = {k: v.to(_DTYPES[dtype]) if v.is_floating_point() else v for k, v in ck["model"].items()}
    out["format"] = WEIGHTS_FORMAT
    return out


def export_weights(checkpoint: str | Path, out: str | Path, dtype: str = "float32") -> Path:
    """Write the weights-only file of ``checkpoint`` (e.g. a ``last.pt`` from before ``model.pt`` existed).

    Args:
        checkpoint: a segmenter checkpoint (either format).
        out: the file to write (``.pt``).
        dtype: ``float32`` (same predictions) or ``float16`` (half the size; predictions may
            differ on a few boundary pixels).

    Raises:
        WeightsError: ``checkpoint`` is not a segmenter checkpoint.
        OutputWriteError: ``out`` cannot be written.
    """
    out = Path(out)
    save_checkpoint(out, weights_only(load_checkpoint(checkpoint), dtype))
    return out


def model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict a checkpoint stores: everything but the keys under the module's
    ``frozen_prefixes`` (frozen weights the family restores from elsewhere, e.g. a CLIP named
    and hashed in the checkpoint's text record); :func:`save_checkpoint` moves it to the CPU."""
    frozen = tuple(getattr(model, "frozen_prefixes", ()))
    return {k: v for k, v in model.state_dict().items() if not (frozen and k.startswith(frozen))}


def load_model_state(model: torch.nn.Module, state: dict[str, torch.Tensor], path: str | Path = "checkpoint") -> None:
    """Load what :func:`model_state` saved; only keys under ``frozen_prefixes`` may be absent.

    Raises:
        WeightsError: keys missing or left over, or tensors of another shape.
    """
    frozen = tuple(getattr(model, "frozen_prefixes", ()))
    try:
        res = model.load_state_dict(state, strict=False)
    except RuntimeError as e:
        raise WeightsError(f"{path}: weights do not fit the recorded architecture ({first_line(e, 200)})") from e
    missing = [k for k in res.missing_keys if not (frozen and k.startswith(frozen))]
    if missing or res.unexpected_keys:
        raise WeightsError(f"{path}: weights do not fit the recorded architecture (missing "
                           f"{', '.join(missing[:3]) or '-'}; unexpected {', '.join(res.unexpected_keys[:3]) or '-'})")


def segmenter_file(folder: str | Path) -> Path | None:
    """The checkpoint a stage folder offers for inference: ``last.pt``, else ``model.pt``, else ``None``."""
    for name in (LAST, MODEL):
        if (Path(folder) / name).is_file():
            return Path(folder) / name
    return None


def rng_state() -> dict[str, Any]:
    """Every RNG a training step draws from (torch, numpy, python, CUDA), as checkpoint values."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    st: dict[str, Any] = {"torch": torch.get_rng_state(),
                          "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                                    "has_gauss": int(np_state[3]), "cached": float(np_state[4])},
                          "python": {"version": py_state[0], "state": list(py_state[1]),
                                     "gauss": py_state[2]}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` saved."""
    torch.set_rng_state(st["torch"])
    n = st["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    p = st["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    if "cuda" in st and torch.cuda.is_available():
        restore_cuda_rng(st["cuda"], torch.cuda.device_count())


def rank_rng_state(ck: dict[str, Any], rank: int, world: int) -> dict[str, Any]:
    """The RNG state rank ``rank`` of ``world`` resumes from: its own (``ck["rng_ranks"][rank]``,
    saved by every rank at each checkpoint) when the checkpoint was saved by as many ranks;
    otherwise (an older checkpoint with rank 0's only, or another world size) rank 0's
    (``ck["rng"]``), with a warning that the resumed run then draws differently."""
    ranks = ck.get("rng_ranks")
    if ranks is not None and len(ranks) == world:
        return ranks[rank]
    saved = len(ranks) if ranks is not None else 1
    if world > 1 or saved > 1:
        log.warning("the checkpoint holds the RNG state of %d rank(s), this run has %d: rank %d resumes from rank "
                    "0's; its random draws (dropout) differ from an uninterrupted run", saved, world, rank)
    return ck["rng"]


def restore_cuda_rng(states: list[torch.Tensor], count: int) -> None:
    """Set the RNG state of CUDA devices ``0..min(len(states), count) - 1`` from ``states``.

    A checkpoint saved on a machine with more GPUs than this one (``set_rng_state_all``
    would raise) or fewer resumes; the devices without a saved state keep theirs, and a
    warning says the resumed run then draws differently from an uninterrupted one.
    """
    for i, state in enumerate(states[:count]):
        torch.cuda.set_rng_state(state, i)
    if len(states) != count:
        log.warning("the checkpoint holds %d CUDA RNG state(s), this machine has %d CUDA device(s): restored "
                    "%d; random draws on the GPU may differ from an uninterrupted run", len(states), count,
                    min(len(states), count))
