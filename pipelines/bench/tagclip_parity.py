"""Parity of the ``tagclip`` tagger with the official TagCLIP code (issue 28).

    python pipelines/bench/tagclip_parity.py OFFICIAL_CHECKOUT [--images N] [--work DIR]

OFFICIAL_CHECKOUT is a checkout of github:linyq2117/TagCLIP. Nothing of it is copied into
the project: the script copies the checkout to a temporary folder, patches that copy, runs its
``classify.py`` path (``classify()`` with its own ``mask_attn`` / ``cwr``) in a subprocess on
the CPU, and compares per-class scores and chosen tags with :mod:`clip_es.tag.tagclip`.

The CLIP is a random-weight open_clip ``ViT-B-16-quickgelu`` (seeded), its weights rounded to
float16 precision as OpenAI's released weights are (this project reads an OpenAI-layout file
through float16, as open_clip does; the official ``build_model`` keeps what the file holds),
saved as a state dict;
open_clip's state-dict keys are OpenAI's, so the official ``clip.load(path)`` builds the same
model from it (its non-persistent ``attn_mask`` buffer is not in the file). The images are toy
scenes (no download). Classes: the first toy classes, background: a few of VOC's words, and
the 85 templates on both sides.

Patches to the temporary copy (listed in the output too):

1. ``clip/clip_model.py``: ``upsample_pos_emb`` returns ``emb.half()``, so on the CPU the
   interpolated position embeddings are rounded to float16 before the fp32 forward; the
   patch keeps them in float32 (the release on a GPU runs the whole model in fp16).
2. ``classify.py``: after the image loop, the per-class scores (``pred_label_id``) are saved
   with ``np.save`` to the file named by ``$TAGCLIP_SCORES``.
3. The driver sets ``classify``'s module globals instead of its ``__main__`` block: ``device =
   "cpu"`` (the release picks CUDA when present), ``args`` (dataset ``voc2007``, the image
   folder, ``save_file=True`` so the tags are written to ``output/voc2007_val_tagclip.txt``),
   ``class_names`` / ``NUM_CLASSES``, the image list. ``lxml`` (XML parsing, unused here) and
   ``pkg_resources`` (a version check) are stand-in modules when not installed, and
   ``torch.jit.load`` refuses at once, so ``clip.load`` falls back to reading the state dict
   from the start of the file (a failed TorchScript read leaves the file at its end).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parents[2]

DRIVER = textwrap.dedent("""
    import json, os, sys, types
    import numpy as np, torch
    torch.set_num_threads(1)
    for name in ("lxml", "pkg_resources"):
        try:
            __import__(name)
        except ImportError:
            mod = types.ModuleType(name)
            if name == "lxml":
                mod.etree = types.SimpleNamespace()
            else:
                import packaging.version
                mod.packaging = __import__("packaging")
            sys.modules[name] = mod
            if name == "lxml":
                sys.modules["lxml.etree"] = mod.etree
    spec = json.load(open(sys.argv[1]))
    import clip
    import classify
    classify.args = types.SimpleNamespace(dataset="voc2007", img_root=spec["img_root"], save_file=True)
    classify.device = "cpu"
    classify.model_type = "clip"
    classify.class_names = spec["classes"] + spec["background"]
    classify.NUM_CLASSES = len(spec["classes"])
    classify.image_list = spec["images"]
    classify.all_label_list = [["0"] for _ in spec["images"]]
    def _not_jit(*a, **k):  # a state dict, not a TorchScript archive: clip.load's fallback reads it
        raise RuntimeError("not a TorchScript archive")
    torch.jit.load = _not_jit
    model, _ = clip.load(spec["weights"], device="cpu")
    model.eval()
    classify.model = model
    classify.classify()
""")


def patch_copy(src: Path, dst: Path) -> list[str]:
    """Copy the checkout to ``dst`` and apply the patches; return their descriptions."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".git"))
    done = []
    p = dst / "clip" / "clip_model.py"
    s = p.read_text()
    if "emb = nn.parameter.Parameter(emb.half())" not in s:
        raise SystemExit(f"{p}: the float16 cast of upsample_pos_emb was not found; is this TagCLIP's checkout?")
    p.write_text(s.replace("emb = nn.parameter.Parameter(emb.half())", "emb = nn.parameter.Parameter(emb)"))
    done.append("clip/clip_model.py: upsample_pos_emb keeps float32 (was emb.half())")
    p = dst / "classify.py"
    s = p.read_text()
    anchor = "    gt_one_hot = np.zeros((len(gt_label_id), NUM_CLASSES))"
    if anchor not in s:
        raise SystemExit(f"{p}: the line after the image loop was not found; is this TagCLIP's checkout?")
    p.write_text(s.replace(anchor, "    np.save(os.environ['TAGCLIP_SCORES'], np.stack(pred_label_id))\n" + anchor))
    done.append("classify.py: np.save(pred_label_id) to $TAGCLIP_SCORES after the image loop")
    (dst / "output").mkdir(exist_ok=True)
    (dst / "_driver.py").write_text(DRIVER)
    done.append("driver: classify's globals set (device cpu, args, class list, images); lxml/pkg_resources "
                "stand-ins when missing")
    return done


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("official", type=Path, help="checkout of github:linyq2117/TagCLIP")
    ap.add_argument("--images", type=int, default=3, help="toy images to compare")
    ap.add_argument("--classes", type=int, default=3, help="toy classes scored (85 templates each)")
    ap.add_argument("--background", default="grass,sky,water", help="background words")
    ap.add_argument("--seed", type=int, default=0, help="weights seed")
    ap.add_argument("--work", type=Path, default=None, help="folder for the patched copy and files (default: temp)")
    a = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.path.insert(0, str(HERE))
    import open_clip
    import torch
    from PIL import Image

    from clip_es.data.base import ClassSpec
    from clip_es.data.toy import TOY_CLASSES, scene_for
    from clip_es.model.resolve import load_clip
    from clip_es.tag.registry import build_tagger
    from clip_es.tag.templates import IMAGENET_TEMPLATES

    torch.set_num_threads(1)
    work = a.work or Path(tempfile.mkdtemp(prefix="tagclip_parity_"))
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(a.seed)
    model = open_clip.create_model("ViT-B-16-quickgelu")
    weights = work / "vit_b16_random.pt"
    # rounded to float16 precision, as OpenAI's released weights are: this project's loader reads an
    # OpenAI-layout file as open_clip does (through float16), the official build_model keeps float32
    torch.save({k: v.half().float() if v.is_floating_point() else v for k, v in model.state_dict().items()
                if k != "attn_mask"}, weights)
    img_dir = work / "images"
    img_dir.mkdir(exist_ok=True)
    names = []
    for i in range(a.images):
        sc = scene_for(2024, i, size=(150 + 20 * i, 230 - 10 * i))
        names.append(f"img{i}.jpg")
        Image.fromarray(sc.image).save(img_dir / names[-1], quality=95)
    classes = list(TOY_CLASSES[:a.classes])
    background = [w for w in a.background.split(",") if w]
    off = work / "official"
    if off.exists():
        shutil.rmtree(off)
    patches = patch_copy(a.official, off)
    spec = {"img_root": str(img_dir), "classes": classes, "background": background, "images": names,
            "weights": str(weights)}
    (work / "spec.json").write_text(json.dumps(spec))
    env = {**os.environ, "TAGCLIP_SCORES": str(work / "official_scores.npy"), "OMP_NUM_THREADS": "1",
           "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(off)}
    r = subprocess.run([sys.executable, "_driver.py", str(work / "spec.json")], cwd=off, env=env,
                       capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"official run failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    off_scores = np.load(work / "official_scores.npy")
    off_tags = {}
    for line in (off / "output" / "voc2007_val_tagclip.txt").read_text().splitlines():
        parts = line.split()
        off_tags[parts[0]] = sorted(int(k) for k in parts[1:])

    clip = load_clip(str(weights), device="cpu")
    tagger = build_tagger("tagclip", clip, [ClassSpec(c) for c in classes], templates=("{}",),
                          background=background, max_side=None, tag_templates=IMAGENET_TEMPLATES)
    ours, our_tags, crops = [], {}, {}
    for n in names:
        res = tagger.tag(np.array(Image.open(img_dir / n).convert("RGB")))
        ours.append(res.scores)
        our_tags[n[:-4]] = sorted(res.keys)
        crops[n] = [classes[k] for k in np.flatnonzero(~np.isnan(res.parts["crop"]))]
    ours = np.stack(ours)
    diff = float(np.abs(ours - off_scores).max())
    agree = sum(off_tags[k] == our_tags[k] for k in our_tags)
    commit = subprocess.run(["git", "-C", str(a.official), "rev-parse", "HEAD"], capture_output=True,
                            text=True).stdout.strip() or "unknown"
    print(f"official TagCLIP commit {commit}")
    print("patches to the temporary copy:")
    for p in patches:
        print(f"  - {p}")
    print(f"random-weight ViT-B-16-quickgelu (seed {a.seed}), {len(names)} toy images, classes {classes}, "
          f"background {background}, 85 templates")
    for n, o, s in zip(names, off_scores, ours):
        print(f"  {n}: official {np.round(o, 6).tolist()} tags {off_tags[n[:-4]]}")
        print(f"  {' ' * len(n)}  ours     {np.round(s, 6).tolist()} tags {our_tags[n[:-4]]}  "
              f"(CWR crops: {', '.join(crops[n]) or 'none'})")
    print(f"max |score difference| {diff:.3g}  (tolerance 1e-4)")
    print(f"tags identical on {agree}/{len(names)} images")
    ok = diff <= 1e-4 and agree == len(names)
    print("PARITY OK" if ok else "PARITY FAILED")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
