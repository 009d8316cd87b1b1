"""Segmenter families: one registry that train, checkpoint, segment, eval, show and ONNX ask.

A family is a way to turn an image and a list of CLIP class text embeddings into per-pixel
class scores. Each family lives in its own module, which owns its architecture record,
its build and its forward; this module only maps a family name to that module (a plain
dict, imported lazily) and states the contract every family keeps. No code outside a
family's module asks which family it holds.

=============  ===========================================  ==============================
family         module                                        what it is
=============  ===========================================  ==============================
``fusion``     :mod:`clip_es.train.model`                    timm CNN + neck + a head
                                                             (``plain``, ``denseclip``, ``fusion``)
``zegclip``    :mod:`clip_es.train.zegclip`                  frozen CLIP ViT + deep prompts +
                                                             relationship descriptor + decoder
``clip``       :mod:`clip_es.train.clipdense`                training-free patch-text cosine
=============  ===========================================  ==============================

The contract (duck-typed; see :class:`Family` and :class:`SegmenterModule`):

* the family object (module attribute ``FAMILY``) turns a :class:`~clip_es.train.loop.TrainConfig`
  into an architecture record (``arch_from_config``), reads one back from a checkpoint
  (``arch_from_dict``; every record's ``to_dict()`` holds ``"family"``), and builds the
  ``nn.Module`` from a record and a :class:`BuildContext` (``build``). ``trainable`` is
  ``False`` for a family that needs no training (the checkpoint then holds no weights);
  ``default_loss`` names the ``--loss`` used when none is given; ``train_defaults`` (a
  :class:`TrainDefaults`) the optimisation recipe ``clipes train`` uses for every option the
  user leaves unset (steps, batch, crop, scale range, LR, weight decay, warm-up, schedule).
* the module's ``forward(x, text, return_extras=False)`` takes ``x`` ``(B, 3, H, W)`` RGB in
  [0, 1] (normalised inside) and ``text`` ``(K, D)`` L2-normalised class embeddings and
  returns ``(B, K+1, H, W)`` logits, channel 0 the background; with ``return_extras=True``
  it returns ``(logits, extras)`` where ``extras["aux"]`` is a list of ``(weight, logits)``
  auxiliary terms the training loop scores with cross-entropy against the same target.
  Attributes: ``mean`` (``(1, 3, 1, 1)`` buffer, the padding colour), ``stride`` (inputs are
  padded to a multiple of it), ``score_kind`` (``"softmax"`` or ``"sigmoid"``: how logits
  become the scores a calibration offset is subtracted from), ``calibration`` (the default
  offset for trained classes when untrained names are asked for), ``frozen_prefixes``
  (state-dict key prefixes of frozen weights that checkpoints leave out and the build
  restores, e.g. a frozen CLIP named and hashed in the checkpoint instead), and
  ``export_module(text)`` returning a ``forward(x) -> logits`` module for ONNX or raising
  :class:`~clip_es.errors.ConfigError` with the reason it cannot be exported.
"""

from __future__ import annotations

import difflib
import importlib
from dataclasses import asdict, dataclass
from typing import Any, Callable, Protocol

from clip_es.errors import ConfigError, RegistryError

#: Family name -> module that defines ``FAMILY``. Adding a family: its module plus one line here.
FAMILIES: dict[str, str] = {
    "fusion": "clip_es.train.model",
    "zegclip": "clip_es.train.zegclip",
    "clip": "clip_es.train.clipdense",
}

#: The family of checkpoints written before the arch record named one.
DEFAULT_FAMILY = "fusion"


@dataclass(frozen=True)
class BuildContext:
    """What a family may need to build a module beyond its architecture record.

    Attributes:
        text: the run's class text payload (``classes``, ``embeddings``, ``clip`` record, ...;
            see :mod:`clip_es.train.text`).
        device: where the module will run (a family loading a frozen CLIP loads it there).
        for_training: ``True`` when building for ``clipes train`` (initial weights from the
            options below), ``False`` when rebuilding from a checkpoint (weights follow).
        backbone_weights, backbone_pretrained: CNN initialisation options of ``clipes train``.
        clip_model, clip_pretrained: override for the CLIP the text record names.
    """

    text: dict[str, Any]
    device: str = "cpu"
    for_training: bool = False
    backbone_weights: str | None = None
    backbone_pretrained: bool = False
    clip_model: str | None = None
    clip_pretrained: str | None = None

    def load_clip(self):
        """The frozen CLIP the text record names (or the override), sha256-checked."""
        from clip_es.train.text import load_recorded_clip

        return load_recorded_clip(self.text["clip"], self.clip_model, self.clip_pretrained, self.device)


SCHEDULES = ("cosine", "poly")
#: How a frozen-CLIP family makes its background query: ``text``, the CLIP text of background words
#: (fixed; a pixel's background score is its best-matching word's), or ``learnt``, one trained embedding.
BACKGROUND_QUERIES = ("text", "learnt")


def check_background_query(value: str) -> None:
    """Raises ConfigError: ``value`` is not one of :data:`BACKGROUND_QUERIES`."""
    if value not in BACKGROUND_QUERIES:
        raise ConfigError(f"unknown --background-query {value!r}; valid: {', '.join(BACKGROUND_QUERIES)}")


@dataclass(frozen=True)
class TrainDefaults:
    """A family's training recipe: what ``clipes train`` uses for each option left unset.

    Attributes:
        steps, batch_size, crop_size: optimizer steps, images per step and process, crop side (pixels).
        scale_range: random rescale range before cropping.
        lr: peak AdamW learning rate of every trainable parameter (times ``--backbone-lr-mult``
            on a CNN backbone).
        weight_decay: AdamW weight decay (never on norms, biases and scalars).
        warmup: linear warm-up steps (at most a fifth of the steps).
        schedule: ``cosine`` (to 0 after the warm-up) or ``poly`` (``(1 - t/T)^0.9`` to ``min_lr``
            over all steps, the warm-up scaling it from ``1e-6`` of its value, as mmcv's poly policy).
        min_lr: the ``poly`` schedule's floor.
        input_scale: how many times larger a frozen-CLIP family feeds its inputs to the ViT (a finer
            patch grid); ``0`` = from the images (:func:`~clip_es.train.loop.auto_input_scale`). Families
            that do not read it ignore it.
        background_query: how a frozen-CLIP family with a background query makes it (``zegclip``:
            :data:`BACKGROUND_QUERIES`); others ignore it.
    """

    steps: int = 2000
    batch_size: int = 8
    crop_size: int = 320
    scale_range: tuple[float, float] = (0.5, 2.0)
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup: int = 100
    schedule: str = "cosine"
    min_lr: float = 0.0
    input_scale: int = 1
    background_query: str = "learnt"


class Family(Protocol):
    """What a family module's ``FAMILY`` object provides."""

    name: str
    trainable: bool
    default_loss: str
    train_defaults: TrainDefaults

    def arch_from_config(self, cfg: Any, text_dim: int) -> Any: ...

    def arch_from_dict(self, d: dict[str, Any]) -> Any: ...

    def build(self, arch: Any, ctx: BuildContext) -> Any: ...

    def upgrade_state(self, arch: dict[str, Any], state: dict[str, Any]) -> dict[str, Any]: ...


class SegmenterModule(Protocol):
    """The attributes every family's ``nn.Module`` has (see the module docstring)."""

    stride: int
    score_kind: str
    calibration: float
    frozen_prefixes: tuple[str, ...]

    def export_module(self, text: Any) -> Any: ...


def family_names() -> list[str]:
    return list(FAMILIES)


def get_family(name: str) -> Family:
    """The family registered as ``name``.

    Raises:
        RegistryError: unknown name (lists the valid ones).
    """
    if name not in FAMILIES:
        close = difflib.get_close_matches(str(name), FAMILIES, n=1)
        raise RegistryError(f"unknown segmenter --arch {name!r}; valid: {', '.join(FAMILIES)}"
                            + (f" (did you mean {close[0]}?)" if close else ""))
    return importlib.import_module(FAMILIES[name]).FAMILY


def family_of(arch: dict[str, Any]) -> Family:
    """The family of an architecture record read from a checkpoint (older records: ``fusion``)."""
    return get_family(str(arch.get("family", DEFAULT_FAMILY)))


def record_to_dict(family: str, arch: Any) -> dict[str, Any]:
    """A frozen-dataclass arch record as the JSON-able dict checkpoints store: its fields (tuples
    as lists) and the ``family`` that reads it back."""
    d = {"family": family, **asdict(arch)}
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def record_from_dict(cls: type, d: dict[str, Any]) -> Any:
    """The record ``cls`` from a checkpoint dict: keys it does not know dropped, lists back to tuples."""
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in cls.__dataclass_fields__})


def check_text(text: Any, dim: int) -> None:
    """Refuse class text that is not ``(K, dim)`` (embedded with another CLIP, or not a matrix).

    Raises:
        ConfigError: with the shape found and the fix.
    """
    if text.ndim != 2 or text.shape[1] != dim:
        raise ConfigError(f"class text must be (K, {dim}) CLIP embeddings, got {tuple(text.shape)}; embed the "
                          "classes with the CLIP the model was trained with")


def scores_fn(kind: str) -> Callable[[Any], Any]:
    """``logits (B, N, H, W) -> scores`` for a module's ``score_kind``."""
    import torch

    if kind == "softmax":
        return lambda z: torch.softmax(z, 1)
    if kind == "sigmoid":
        return torch.sigmoid
    raise RegistryError(f"unknown score kind {kind!r}; valid: softmax, sigmoid")
