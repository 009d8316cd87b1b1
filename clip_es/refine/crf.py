"""The pure core of the refine stage: score stacking, dense CRF, confidence labels.

Everything here is array-in / array-out and touches no files (SPEC section 3):

* :func:`stack_scores` builds ``[bg, s_1..s_K]`` with ``bg = (1 - max_k s_k) ** alpha``;
* :func:`scores_to_probs` clips to ``eps`` and normalises per pixel;
* :func:`dense_crf` runs a fully connected CRF (pydensecrf2) with unary ``-log p`` on the
  original RGB image (uint8, no mean subtraction) and returns the marginals ``Q``;
* :func:`labels_from_q` turns ``Q`` into the CRF argmax, the confidence ``max_c Q_c`` and
  the confidence-guided pseudo mask (255 where ``conf < threshold``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from clip_es.errors import ConfigError
from clip_es.refine.method import RefineMethod, check_inputs

#: Scores are clipped to this before normalising and taking ``-log`` (a zero score would
#: give an infinite unary).
EPS = 1e-5
#: Mask value of pixels left out of the pseudo mask (low confidence).
IGNORE = 255


@dataclass(frozen=True)
class CrfParams:
    """Dense-CRF parameters (the CLIP-ES values are the defaults).

    Attributes:
        gauss_sxy: spatial std (pixels) of the Gaussian (smoothness) kernel.
        gauss_compat: weight of the Gaussian kernel (Potts compatibility).
        bi_sxy: spatial std (pixels) of the bilateral (appearance) kernel.
        bi_srgb: colour std (0..255 units) of the bilateral kernel.
        bi_compat: weight of the bilateral kernel.
        iters: mean-field iterations.
    """

    gauss_sxy: float = 1.0
    gauss_compat: float = 3.0
    bi_sxy: float = 67.0
    bi_srgb: float = 3.0
    bi_compat: float = 4.0
    iters: int = 10

    def validate(self) -> "CrfParams":
        for name in ("gauss_sxy", "bi_sxy", "bi_srgb"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"CRF {name.replace('_', '-')} must be > 0, got {getattr(self, name)}")
        for name in ("gauss_compat", "bi_compat"):
            if getattr(self, name) < 0:
                raise ConfigError(f"CRF {name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if self.iters < 1:
            raise ConfigError(f"CRF iterations must be at least 1, got {self.iters}")
        return self


def stack_scores(maps: np.ndarray, alpha: float = 1.0) -> np.ndarray:
    """Prepend the background score to per-class maps.

    Args:
        maps: ``(K, H, W)`` class scores in [0, 1] (K may be 0).
        alpha: background power, ``bg = (1 - max_k maps_k) ** alpha``.

    Returns:
        ``(K + 1, H, W)`` float32 ``[bg, maps_1..maps_K]`` (a new array).
    """
    maps = np.asarray(maps, np.float32)
    if maps.ndim != 3:
        raise ValueError(f"maps must be (K, H, W), got shape {maps.shape}")
    if maps.shape[0] == 0:
        return np.ones((1, *maps.shape[1:]), np.float32)
    bg = np.clip(1.0 - maps.max(0), 0.0, 1.0) ** np.float32(alpha)
    return np.concatenate([bg[None].astype(np.float32), maps], 0)


def scores_to_probs(scores: np.ndarray, eps: float = EPS) -> np.ndarray:
    """Clip scores to ``[eps, inf)`` and normalise them to a distribution per pixel.

    Args:
        scores: ``(C, H, W)`` non-negative scores.

    Returns:
        ``(C, H, W)`` float32, summing to 1 over ``C`` at every pixel (a new array).
    """
    p = np.maximum(np.asarray(scores, np.float32), np.float32(eps))
    return p / p.sum(0, keepdims=True)


def dense_crf(image: np.ndarray, probs: np.ndarray, params: CrfParams = CrfParams()) -> np.ndarray:
    """Fully connected CRF marginals.

    Unary ``-log(max(p, EPS))``; a Gaussian pairwise term (``gauss_sxy``, ``gauss_compat``)
    and a bilateral one (``bi_sxy``, ``bi_srgb`` on the RGB values, ``bi_compat``); Potts
    compatibilities; ``params.iters`` mean-field steps. Deterministic; inputs are not modified.

    Args:
        image: ``(H, W, 3)`` uint8 RGB, the original image (no mean subtraction).
        probs: ``(C, H, W)`` per-pixel class distribution (C >= 1).
        params: kernel parameters.

    Returns:
        ``(C, H, W)`` float32 marginals ``Q``, in [0, 1], summing to 1 over ``C``.
    """
    import pydensecrf.densecrf as dcrf

    check_inputs(image, probs)
    c, h, w = probs.shape
    if c == 1:
        return np.ones((1, h, w), np.float32)
    unary = -np.log(np.clip(probs.reshape(c, -1), EPS, 1.0)).astype(np.float32)
    crf = dcrf.DenseCRF2D(w, h, c)
    crf.setUnaryEnergy(np.ascontiguousarray(unary))
    crf.addPairwiseGaussian(sxy=params.gauss_sxy, compat=params.gauss_compat)
    rgb = np.array(image, dtype=np.uint8, order="C", copy=True)  # pydensecrf wants a writeable C buffer
    crf.addPairwiseBilateral(sxy=params.bi_sxy, srgb=params.bi_srgb, rgbim=rgb, compat=params.bi_compat)
    q = np.array(crf.inference(params.iters), dtype=np.float32).reshape(c, h, w)
    return q


def _crf_refine(image: np.ndarray, probs: np.ndarray, params: CrfParams, device: str = "cpu") -> np.ndarray:
    """:func:`dense_crf` as a :data:`~clip_es.refine.method.RefineFn` (pydensecrf runs on the CPU only)."""
    return dense_crf(image, probs, params)


METHOD = RefineMethod(name="crf", refine=_crf_refine, params_field="crf_params", default_conf=0.95,
                      torch_device=False, summary="dense CRF, pydensecrf2 (CPU only)")


def label_lut(keys: np.ndarray) -> np.ndarray:
    """``(K + 1,)`` uint8 map from stack index to label id: ``[0, keys_1 + 1, ...]``."""
    return np.concatenate([[0], np.asarray(keys, np.int64) + 1]).astype(np.uint8)


def labels_from_q(q: np.ndarray, keys: np.ndarray, threshold: float
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """CRF argmax, confidence and confidence-guided mask.

    Args:
        q: ``(K + 1, H, W)`` marginals over ``[bg, keys...]``.
        keys: ``(K,)`` 0-based class indices.
        threshold: pixels with ``max_c q_c < threshold`` become :data:`IGNORE` in the mask.

    Returns:
        ``(labels, conf, mask)``: ``(H, W)`` uint8 label ids (0 bg, ``k + 1`` class ``k``),
        ``(H, W)`` float32 confidence in [0, 1], and ``(H, W)`` uint8 ``labels`` with 255
        where ``conf < threshold``.
    """
    labels = label_lut(keys)[q.argmax(0)]
    conf = q.max(0).astype(np.float32)
    mask = np.where(conf < threshold, np.uint8(IGNORE), labels).astype(np.uint8)
    return labels, conf, mask


def conf_to_uint8(conf: np.ndarray) -> np.ndarray:
    """``(H, W)`` confidence in [0, 1] -> uint8 ``round(conf * 255)``."""
    return np.rint(np.clip(conf, 0.0, 1.0) * 255.0).astype(np.uint8)
