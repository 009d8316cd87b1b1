"""The cam stage's host-side overhead and its default speed, old code path vs new, in one run (issue 21).

    OMP_NUM_THREADS=1 python pipelines/bench/bench_cam_overhead.py [--old-ref 0b36d86] [--rounds 2]

The old code path is the clip_es package of ``--old-ref`` (default: the tree before issue 21),
extracted with ``git archive`` into a temporary folder; the new one is this checkout. Every
measurement runs in a fresh child process importing one of them, one compute thread, the
default ``clipes cam`` settings (``--precision auto``: bf16 on this CPU when it has
avx512_bf16/AMX; batch 1; loader workers: 0 before, ``auto`` = 0 on a CPU now), rows
alternating old/new for ``--rounds`` rounds (best of them kept), so both see the same
machine load.

1. Host overhead per image: the bundled ``clipes-tiny`` on ``--n-tiny`` synthetic 224x224
   photos (3 labels each, VOC background words). ``stage`` = the whole stage
   (:func:`generate_cams`: decode, resize, CLIP, GradCAM, CAA, record writes) per image,
   without the per-run costs (model load, text embeddings, manifest): ``(T(n) - T(1)) / (n - 1)``
   of two runs after a one-image warm-up; ``clip`` = the time spent inside the CLIP forward
   (frozen blocks) and the last block's forward and backward during those runs (timers around
   the functions both trees call, see :func:`time_clip`); overhead = stage - clip.
2. Default speed: a random-weight ViT-B/16 (``open_clip.create_model('ViT-B-16-quickgelu')``
   saved as a state dict, no download) on ``--n-vit`` synthetic 500x375 photos; seconds per
   image of the whole stage (as above), and the new records' argmax agreement with the old ones.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
OLD_REF = "0b36d86"


def time_clip(clip, run_mod, gradcam_mod) -> list[float]:
    """Wrap the CLIP forward/backward the stage calls with timers; returns the running total (s).

    Timed: the frozen blocks (``cam.run.dense_forward``); the last block's attention, LayerNorms
    and MLP, the pooled embedding (``pool_tokens``) and the backward (``torch.autograd.grad``)
    as the autograd GradCAM calls them; or, where the tree has it, the closed-form path
    (``cam.gradcam._analytic_weights``: the same last-block forward, pooling and logits, and the
    gradients without autograd) as a whole. Only the outermost timed call counts, so nothing is
    timed twice. Everything else (decode, resize, normalisation, the GradCAM combination and
    min-max, CAA, record writes, glue) is the host-side overhead.
    """
    import torch

    total = [0.0]
    depth = [0]

    def timed(fn):
        def wrapper(*a, **k):
            depth[0] += 1
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                depth[0] -= 1
                if depth[0] == 0:
                    total[0] += time.perf_counter() - t
        return wrapper

    run_mod.dense_forward = timed(run_mod.dense_forward)
    for name in ("attention", "pool_tokens", "_analytic_weights"):
        if hasattr(gradcam_mod, name):
            setattr(gradcam_mod, name, timed(getattr(gradcam_mod, name)))
    torch.autograd.grad = timed(torch.autograd.grad)
    blk = clip.visual.transformer.resblocks[-1]
    for m in (blk.ln_1, blk.ln_2, blk.mlp):
        m.forward = timed(m.forward)
    return total


def child(args) -> None:
    sys.path.insert(0, str(args.code))
    import torch

    torch.set_num_threads(1)
    import clip_es
    from clip_es.cam.run import CamConfig, generate_cams
    from clip_es.model.resolve import load_clip

    assert Path(clip_es.__file__).resolve().is_relative_to(args.code.resolve()), clip_es.__file__
    clip = load_clip(args.model, args.pretrained)
    base = dict(dataset="folder", root=str(args.data), split="labels", model=args.model, pretrained=args.pretrained,
                background="voc", device="cpu", threads=1, batch_size=args.batch_size)
    generate_cams(CamConfig(out=str(args.out) + "-warm", limit=1, **base), clip=clip, progress=False)
    from clip_es.cam import gradcam as gradcam_mod
    from clip_es.cam import run as run_mod

    clip_total = time_clip(clip, run_mod, gradcam_mod) if args.clip_time else [0.0]
    t = time.perf_counter()
    generate_cams(CamConfig(out=str(args.out) + "-one", limit=1, **base), clip=clip, progress=False)
    t_one, c_one = time.perf_counter() - t, clip_total[0]
    t = time.perf_counter()
    res = generate_cams(CamConfig(out=str(args.out), **base), clip=clip, progress=False)
    t_all, c_all = time.perf_counter() - t, clip_total[0] - c_one
    # per image, without the per-run costs (text embeddings, manifest): (T(n) - T(1)) / (n - 1)
    n = max(1, res.done - 1)
    out = {"done": res.done, "stage": (t_all - t_one) / n}
    if args.clip_time:
        out["clip"] = (c_all - c_one) / n
        out["overhead"] = out["stage"] - out["clip"]
    print("RESULT " + json.dumps(out))


def run_child(code: Path, data: Path, model: str, pretrained: str | None, out: Path, clip_time: bool,
              batch: int = 1) -> dict:
    cmd = [sys.executable, __file__, "--child", "--code", str(code), "--data", str(data), "--model", model,
           "--out", str(out), "--batch-size", str(batch)] + (["--pretrained", pretrained] if pretrained else []) + (
        ["--clip-time"] if clip_time else [])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(code)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=code)
    if proc.returncode != 0:
        raise SystemExit(f"{out.name} failed:\n{proc.stderr[-3000:]}")
    return json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1][len("RESULT "):])


def best_of(code: dict[str, Path], rounds: int, tmp: Path, tag: str, **kw) -> dict[str, dict]:
    best: dict[str, dict] = {}
    for r in range(rounds):
        for name, path in code.items():
            res = run_child(path, out=tmp / f"{tag}-{name}-{r}", **kw)
            res["run"] = tmp / f"{tag}-{name}-{r}"
            print(f"  {tag} round {r + 1} {name}: " + ", ".join(f"{k} {v * 1000:.1f} ms" for k, v in res.items()
                                                                 if k in ("stage", "clip", "overhead")), flush=True)
            if name not in best or res["stage"] < best[name]["stage"]:
                best[name] = res
    return best


def agreement(old_run: Path, new_run: Path) -> dict[str, float]:
    import numpy as np

    from clip_es.cam.store import load_cam

    out = {}
    for kind in ("cam", "caa"):
        eq = tot = 0
        diff = 0.0
        for f in sorted((old_run / "cam").glob("*.npz")):
            a, b = load_cam(f), load_cam(new_run / "cam" / f.name)
            ma, mb = getattr(a, kind), getattr(b, kind)
            diff = max(diff, float(np.abs(ma - mb).max(initial=0)))
            la = np.concatenate([(1 - ma.max(0))[None], ma]).argmax(0)
            lb = np.concatenate([(1 - mb.max(0))[None], mb]).argmax(0)
            eq += int((la == lb).sum())
            tot += la.size
        out[kind] = 100 * eq / tot
        out[f"{kind}_max_abs"] = diff
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old-ref", default=OLD_REF, help="git revision of the old code path")
    ap.add_argument("--n-tiny", type=int, default=24)
    ap.add_argument("--n-vit", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--tiny-batches", default="1,8", help="batch sizes of part 1 (1 = the default)")
    ap.add_argument("--batch-size", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--code", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--pretrained", help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--clip-time", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_cam_stage import make_images, save_vit

    from clip_es.model.precision import resolve_precision

    tmp = Path(tempfile.mkdtemp(prefix="bench-cam-overhead-"))
    old = tmp / "old"
    old.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", args.old_ref, "clip_es"], capture_output=True,
                             check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(old)], input=archive, check=True)
    code = {"old": old, "new": ROOT}
    print(f"old = {args.old_ref} (git archive), new = {ROOT}; 1 thread; --precision auto = "
          f"{resolve_precision('auto', 'cpu')} on this CPU; best of {args.rounds} alternating round(s)")

    make_images(tmp / "tiny-data", args.n_tiny, (224, 224))
    batches = [int(b) for b in args.tiny_batches.split(",")]
    tiny = {b: best_of(code, args.rounds, tmp, f"tiny-b{b}", data=tmp / "tiny-data", model="clipes-tiny",
                       pretrained=None, clip_time=True, batch=b) for b in batches}
    weights = tmp / "vit-b-16-random.pt"
    save_vit(weights)
    make_images(tmp / "vit-data", args.n_vit)
    vit = best_of(code, args.rounds, tmp, "vit", data=tmp / "vit-data", model="ViT-B-16-quickgelu",
                  pretrained=str(weights), clip_time=False)

    print(f"\n1. host overhead per image, clipes-tiny, {args.n_tiny} images 224x224 (ms per image)")
    print(f"{'batch':<6}{'code':<6}{'stage':>9}{'clip':>9}{'overhead':>10}")
    for b, res in tiny.items():
        for name in code:
            r = res[name]
            print(f"{b:<6}{name:<6}{r['stage'] * 1e3:>9.2f}{r['clip'] * 1e3:>9.2f}{r['overhead'] * 1e3:>10.2f}")
        print(f"batch {b}: overhead old/new {res['old']['overhead'] / res['new']['overhead']:.2f}x, "
              f"stage old/new {res['old']['stage'] / res['new']['stage']:.2f}x")
    print(f"\n2. default cam speed, random ViT-B/16, {args.n_vit} images 500x375 (s per image)")
    for name in code:
        print(f"{name:<6}{vit[name]['stage']:>9.3f} s  ({1 / vit[name]['stage']:.3f} img/s)")
    print(f"speed new/old: {vit['old']['stage'] / vit['new']['stage']:.2f}x")
    for tag, res in (("clipes-tiny", tiny[batches[0]]), ("ViT-B/16", vit)):
        a = agreement(res["old"]["run"], res["new"]["run"])
        print(f"new vs old records, {tag}: argmax agreement CAM {a['cam']:.2f} %, CAA {a['caa']:.2f} %; "
              f"max abs CAM {a['cam_max_abs']:.2e}, CAA {a['caa_max_abs']:.2e}")


if __name__ == "__main__":
    main()
