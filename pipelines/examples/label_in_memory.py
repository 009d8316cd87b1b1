"""Pseudo masks for images held in memory, no run folder (notebook-style: one ``# %%`` cell each).

    python pipelines/examples/label_in_memory.py [--out label_in_memory.png]

Three toy images are made in memory by :mod:`clip_es.data.toy` (so their exact ground truth
is known), labelled with the bundled toy CLIP by :class:`clip_es.Labeler`: the first with its
labels given, the other two with labels predicted zero-shot, then an overlay sheet is saved
(per row: the image, the pseudo mask over it, its first label's CAA map). On your photos: pass
paths, PIL images or ``(H, W, 3)`` uint8 arrays, your class names and a real CLIP
(``model="ViT-B-16", pretrained="openai"``, or a local checkpoint file).
"""

# %% imports
from __future__ import annotations

import argparse

import numpy as np
from PIL import Image

import clip_es
from clip_es.data.toy import TOY_CLASSES, scene_for
from clip_es.draw import heatmap_overlay, mask_overlay

# %% three images in memory
scenes = [scene_for(7, i) for i in range(3)]
images = [s.image for s in scenes]  # (H, W, 3) uint8 RGB


def main(out: str) -> None:
    # %% one Labeler: the CLIP loads and the classes are embedded once
    labeler = clip_es.Labeler(classes=TOY_CLASSES, device="cpu")
    print(labeler)

    # %% the first image with its labels given, the others predicted zero-shot, in order
    given = [TOY_CLASSES[k - 1] for k in scenes[0].labels]
    results = list(labeler.label_many(images, labels=[given, None, None]))
    for i, (scene, res) in enumerate(zip(scenes, results)):
        truth = [TOY_CLASSES[k - 1] for k in scene.labels]
        sure = res.mask != 255
        right = (res.mask == scene.mask)[sure].mean() if sure.any() else float("nan")
        probs = "" if res.probabilities is None else "  zero-shot: " + ", ".join(
            f"{n} {p:.2f}" for n, p in sorted(res.probabilities.items(), key=lambda kv: -kv[1])[:3])
        print(f"image {i}: labels {res.labels} (truth {truth}); {sure.mean():.0%} of pixels labelled, "
              f"{right:.1%} of them right{probs}")

    # %% overlay sheet: image | pseudo mask | CAA of the first label, one row per image
    rows = []
    for image, res in zip(images, results):
        tiles = [image, mask_overlay(image, res.mask), heatmap_overlay(image, res.caa[0])]
        rows.append(np.concatenate(tiles, axis=1))
    width = max(r.shape[1] for r in rows)
    sheet = np.concatenate([np.pad(r, ((0, 4), (0, width - r.shape[1]), (0, 0))) for r in rows], axis=0)
    Image.fromarray(sheet).save(out)
    print(f"overlay: {out} ({sheet.shape[1]}x{sheet.shape[0]})")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="label_in_memory.png", help="where to save the overlay sheet (PNG)")
    main(parser.parse_args().out)
