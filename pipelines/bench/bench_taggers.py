"""Cost of the zero-shot taggers (issue 28): images/s of ``global``, ``tagclip`` and ``blend`` and the
one-off cost of TagCLIP's text embeddings (85 templates x classes + background words).

    python pipelines/bench/bench_taggers.py --model clipes-tiny --threads 1 --n 50
    python pipelines/bench/bench_taggers.py --model random:ViT-B-16-quickgelu --classes voc --size 375x500 --n 5

``random:NAME`` is a seeded random-weight open_clip model (the cost does not depend on the
weights). Images are toy scenes of ``--size`` (H x W), or at the toy world's own sizes.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="clipes-tiny", help="clipes-tiny, a weight file, or random:OPEN_CLIP_NAME")
    ap.add_argument("--classes", default="toy", help="class set: toy, voc or coco")
    ap.add_argument("--background", default="voc", help="background words")
    ap.add_argument("--size", default=None, help="image size HxW (default: the toy world's sizes)")
    ap.add_argument("--n", type=int, default=50, help="images")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    a = ap.parse_args()
    import numpy as np
    import torch

    from clip_es.data.classes import background_words, builtin_classes
    from clip_es.data.toy import scene_for
    from clip_es.model.resolve import load_clip
    from clip_es.model.text import DEFAULT_TEMPLATE
    from clip_es.tag.registry import build_tagger
    from clip_es.threads import use_threads

    with use_threads(a.threads):
        model = a.model
        if model.startswith("random:"):
            import open_clip

            torch.manual_seed(0)
            m = open_clip.create_model(model.split(":", 1)[1])
            path = Path(tempfile.mkdtemp()) / "random.pt"
            torch.save({k: v for k, v in m.state_dict().items() if k != "attn_mask"}, path)
            model = str(path)
        clip = load_clip(model, device="cpu")
        classes = builtin_classes(a.classes)
        size = tuple(int(v) for v in a.size.split("x")) if a.size else None
        images = [scene_for(99, i, size).image for i in range(a.n)]
        print(f"model {a.model}, {len(classes)} classes + {len(background_words(a.background))} background words, "
              f"{a.n} images {images[0].shape[:2] if size else 'toy sizes'}, {torch.get_num_threads()} thread(s)")
        rate = {}
        for name in ("global", "tagclip", "blend"):
            t0 = time.perf_counter()
            tg = build_tagger(name, clip, classes, templates=(DEFAULT_TEMPLATE,),
                              background=background_words(a.background), max_side=None)
            text_s = time.perf_counter() - t0
            tg.tag(images[0])  # warm-up
            t0 = time.perf_counter()
            crops = 0
            for im in images:
                crops += int(np.isfinite(tg.tag(im).parts.get("crop", np.zeros(0))).sum())
            dt = time.perf_counter() - t0
            extra = f", {crops / a.n:.1f} crops/img" if name != "global" else ""
            rate[name] = a.n / dt
            print(f"  {name:8s} {a.n / dt:7.2f} img/s  ({1000 * dt / a.n:.0f} ms/img; text embeddings {text_s:.1f} s"
                  f"{extra})")
        print(f"  time per image vs global (this run): tagclip {rate['global'] / rate['tagclip']:.2f}x, "
              f"blend {rate['global'] / rate['blend']:.2f}x")


if __name__ == "__main__":
    main()
