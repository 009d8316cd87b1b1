"""Sharpness-based prompt selection (SPEC section 1), checked against CAM mIoU.

For a template, each labelled image with two or more classes gives the softmax over
all foreground classes plus the background words of ``logit_scale * cos(image, text)``;
the scores ``s`` of the image's own classes give the dispersion ``var(s) / mean(s)``
(population variance). A template's sharpness is the mean over images; the lowest wins.
Because the paper's exact normalisation is not public, the ranking also reports each
template's CAM mIoU on the images that have ground truth, and the Spearman rank
correlation between the two columns, so the choice can be checked rather than trusted.

The image forward does not depend on the template: it runs once per image and every
candidate template reuses it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from clip_es.cam.gradcam import softmax_gradcam
from clip_es.cam.store import upsample
from clip_es.data.registry import DEFAULT_BACKGROUND, background_words, open_dataset
from clip_es.errors import ConfigError
from clip_es.model.dense import block_forward, dense_forward, pool_tokens
from clip_es.model.inputs import preprocess
from clip_es.model.resolve import load_clip
from clip_es.model.text import background_embeddings, check_templates, class_embeddings
from clip_es.scoring import confusion_matrix, iou_report, scores_to_labels
from clip_es.stage import resolve_device

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PromptsConfig:
    """Options of ``clipes prompts``.

    Attributes:
        templates: candidate templates (each with one ``{}``).
        limit: at most this many images with two or more labels are used.
        alpha: background power for the CAM mIoU column.
    """

    dataset: str
    root: str
    split: str
    templates: tuple[str, ...]
    class_file: str | None = None
    model: str = "clipes-tiny"
    pretrained: str | None = None
    background: str | None = None
    fusion: str = "sentence"
    pooling: str = "mean"
    device: str = "auto"
    limit: int = 100
    alpha: float = 1.0


@dataclass
class TemplateScore:
    """One row of the ranking."""

    template: str
    sharpness: float
    cam_miou: float | None


def dispersion(scores: np.ndarray) -> float:
    """``var(s) / mean(s)`` of the own-class softmax scores of one image."""
    return float(np.var(scores) / max(float(np.mean(scores)), 1e-12))


def spearman(a: list[float], b: list[float]) -> float | None:
    """Spearman rank correlation (average ranks for ties); ``None`` when undefined."""
    if len(a) < 2:
        return None

    def ranks(x):
        x = np.asarray(x, np.float64)
        order = np.argsort(x, kind="mergesort")
        r = np.empty(len(x))
        r[order] = np.arange(len(x))
        for v in np.unique(x):  # average ties
            idx = x == v
            r[idx] = r[idx].mean()
        return r

    ra, rb = ranks(a), ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return None
    return float(np.corrcoef(ra, rb)[0, 1])


def rank_templates(cfg: PromptsConfig, progress: bool = True) -> dict[str, Any]:
    """Score every candidate template; the Python twin of ``clipes prompts``.

    Returns:
        ``{"rows": [TemplateScore as dict, sorted by sharpness], "selected": template,
        "best_by_miou": template | None, "spearman": rho | None, "images": n, "gt_images": m}``;
        the CAM mIoU is scored on the ``m`` of the ``n`` images that have ground truth
        (``None`` when none has).
    """
    templates = check_templates(cfg.templates)
    if cfg.limit < 1:
        raise ConfigError(f"--limit must be at least 1, got {cfg.limit}")
    ds = open_dataset(cfg.dataset, cfg.root, cfg.split, cfg.class_file)
    clip = load_clip(cfg.model, cfg.pretrained, device=resolve_device(cfg.device))
    bg = background_words(cfg.background or DEFAULT_BACKGROUND.get(cfg.dataset, "none"))
    texts = [(class_embeddings(clip, ds.classes, [t], cfg.fusion), background_embeddings(clip, bg, [t]))
             for t in templates]
    ids = [i for i in ds.ids() if len(ds.labels(i)) >= 2][: cfg.limit]
    if not ids:
        raise ConfigError(f"no image of {cfg.dataset}:{cfg.split} carries two or more labels; "
                          "sharpness needs multi-label images")
    n_lab = len(ds.classes) + 1
    sharp = [[] for _ in templates]
    confs = [np.zeros((n_lab, n_lab), np.int64) for _ in templates]
    n_gt = 0
    for image_id in tqdm(ids, desc="prompts", unit="img", disable=not progress):
        keys = list(ds.labels(image_id))
        image = ds.load_image(image_id)
        gt = ds.load_gt(image_id)  # None: the image is ranked by sharpness only
        n_gt += gt is not None
        x = preprocess(image, 1.0, clip.patch_size, clip.mean, clip.std).to(clip.device)
        with torch.no_grad():
            d = dense_forward(clip.visual, x, attn_blocks=0)
            out, _, _ = block_forward(clip.visual.transformer.resblocks[-1], d.penultimate)
            img = F.normalize(pool_tokens(clip.visual, out, cfg.pooling), dim=-1)
        for j, (cls_t, bg_t) in enumerate(texts):
            probs = (clip.logit_scale * img @ torch.cat([cls_t, bg_t]).t()).softmax(-1)[0]
            sharp[j].append(dispersion(probs[keys].cpu().numpy()))
            if gt is not None:
                g = softmax_gradcam(clip.visual, d.penultimate, d.grid, torch.cat([cls_t[keys], bg_t]), len(keys),
                                    clip.logit_scale, pooling=cfg.pooling)
                cam = upsample(g.cam.cpu().numpy(), image.shape[:2])
                confs[j] += confusion_matrix(gt, scores_to_labels(np.asarray(keys), cam, cfg.alpha), n_lab)
    has_gt = n_gt > 0
    if 0 < n_gt < len(ids):
        log.info("prompts: %d of %d images have ground truth; CAM mIoU is scored on those", n_gt, len(ids))
    names = ["background"] + [c.name for c in ds.classes]
    rows = [TemplateScore(t, float(np.mean(s)), iou_report(c, names)["miou"] if has_gt else None)
            for t, s, c in zip(templates, sharp, confs)]
    rows.sort(key=lambda r: r.sharpness)
    best = max(rows, key=lambda r: r.cam_miou).template if has_gt else None
    rho = spearman([r.sharpness for r in rows], [r.cam_miou for r in rows]) if has_gt else None
    return {"rows": [r.__dict__ for r in rows], "selected": rows[0].template, "best_by_miou": best,
            "spearman": rho, "images": len(ids), "gt_images": n_gt}


def format_ranking(rep: dict[str, Any]) -> str:
    """The ranking as a text table."""
    w = max(10, *(len(r["template"]) for r in rep["rows"]))
    lines = [f"{'template':<{w}}  sharpness  CAM mIoU", "-" * (w + 21)]
    for r in rep["rows"]:
        m = f"{r['cam_miou'] * 100:8.1f}" if r["cam_miou"] is not None else f"{'-':>8}"
        lines.append(f"{r['template']:<{w}}  {r['sharpness']:9.4f}  {m}")
    lines.append(f"selected (lowest sharpness): {rep['selected']!r}   on {rep['images']} multi-label images")
    if rep.get("gt_images") is not None and rep["best_by_miou"] is not None:
        lines.append(f"CAM mIoU on the {rep['gt_images']} of them with ground truth")
    if rep["best_by_miou"] is not None:
        lines.append(f"best by CAM mIoU: {rep['best_by_miou']!r}")
    if rep["spearman"] is not None:
        lines.append(f"Spearman(sharpness, CAM mIoU) = {rep['spearman']:+.2f} (negative = lower sharpness, "
                     "better CAMs)")
    return "\n".join(lines)
