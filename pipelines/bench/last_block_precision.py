"""Can the last block and its GradCAM backward run in bf16 too? (issue 21, "What to build" 2)

    OMP_NUM_THREADS=1 python pipelines/bench/last_block_precision.py [--toy 200] [--photos 8]

Today ``--precision auto`` runs the frozen blocks in bf16 on CPUs and GPUs with native bf16
and keeps the last block, its backward and CAA in fp32/fp64. This script computes, in one
run, the maps of three variants on the same images and prints the argmax agreement (of
``[1 - max, maps]`` at the original size, the eval/refine reading) of each with fp32 and the
seconds per image:

    fp32          everything fp32 (the reference)
    bf16-frozen   today's auto on this CPU: frozen blocks bf16, last block fp32
    bf16-last     frozen blocks and the last block's forward/backward bf16 (CAA stays fp64)

on (a) the bundled clipes-tiny, held-out toy images (world seed 1, val split) and (b) a
random-weight ViT-B/16 (``open_clip.create_model('ViT-B-16-quickgelu')``, no download) on
synthetic 500x375 photos (toy scenes scaled up, 3 labels each, VOC background words). The
adoption rule is agreement >= 99.5 % on (a) and >= 99 % on (b), CAM and CAA.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).parent))

from bench_cam_stage import make_images  # noqa: E402

from clip_es.cam.run import CamConfig, build_engine  # noqa: E402
from clip_es.cam.store import upsample  # noqa: E402
from clip_es.data.registry import open_dataset  # noqa: E402
from clip_es.model.resolve import load_clip  # noqa: E402

VARIANTS = (("fp32", "fp32", "fp32"), ("bf16-frozen", "bf16", "fp32"), ("bf16-last", "bf16", "bf16"))


def labels(maps: np.ndarray, keys) -> np.ndarray:
    keys = np.asarray(keys, np.int64)
    if len(keys) == 0:
        return np.zeros(maps.shape[1:], np.int64)
    stack = np.concatenate([(1.0 - maps.max(0))[None], maps], 0)
    return np.concatenate([[0], keys + 1])[stack.argmax(0)]


def measure(clip, ds, ids, background: str) -> dict[str, dict]:
    out = {}
    for name, frozen, last in VARIANTS:
        cfg = CamConfig(dataset="toy", root=".", split="val", out=".",
                        precision=frozen, background=background)
        engine = build_engine(cfg, ds.classes, clip)
        engine.last_block = last
        maps, t = {}, 0.0
        for image_id in ids:
            image, keys = ds.load_image(image_id), list(ds.labels(image_id))
            t0 = time.perf_counter()
            cam, caa = engine.compute(image, keys)
            t += time.perf_counter() - t0
            size = image.shape[:2]
            maps[image_id] = (keys, upsample(cam, size), upsample(caa, size))
        out[name] = {"maps": maps, "s_per_img": t / len(ids)}
    return out


def report(title: str, res: dict[str, dict]) -> None:
    print(f"\n{title}")
    print(f"{'variant':<12} {'CAM agree':>10} {'CAA agree':>10} {'s/img':>8} {'speed':>7}")
    ref = res["fp32"]
    for name, r in res.items():
        agree = []
        for kind in (1, 2):
            same = total = 0
            for image_id, m in ref["maps"].items():
                a, b = labels(m[kind], m[0]), labels(r["maps"][image_id][kind], m[0])
                same += int((a == b).sum())
                total += a.size
            agree.append(100 * same / total)
        print(f"{name:<12} {agree[0]:>9.2f}% {agree[1]:>9.2f}% {r['s_per_img']:>8.3f} "
              f"{ref['s_per_img'] / r['s_per_img']:>6.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--toy", type=int, default=200, help="held-out toy images (clipes-tiny)")
    ap.add_argument("--photos", type=int, default=8, help="synthetic VOC-size photos (random ViT-B/16)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from clip_es.data.toy import make_toy

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.toy:
            root = make_toy(tmp / "toy", n=int(args.toy * 1.5), seed=1, val_fraction=2 / 3, progress=False)
            ds = open_dataset("toy", root, "val")
            report(f"clipes-tiny, {args.toy} held-out toy images (seed 1, val)",
                   measure(load_clip("clipes-tiny"), ds, ds.ids()[:args.toy], "toy"))
        if args.photos:
            import open_clip

            torch.manual_seed(0)
            torch.save(open_clip.create_model("ViT-B-16-quickgelu").state_dict(), tmp / "vitb16.pt")
            make_images(tmp / "photos", args.photos)
            ds = open_dataset("folder", tmp / "photos", "labels")
            clip = load_clip("ViT-B-16-quickgelu", str(tmp / "vitb16.pt"))
            report(f"random ViT-B/16, {args.photos} synthetic 500x375 photos, 3 labels each",
                   measure(clip, ds, ds.ids(), "voc"))


if __name__ == "__main__":
    main()
