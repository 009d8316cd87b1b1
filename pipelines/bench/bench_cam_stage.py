"""The whole ``cam`` stage, per speed option, on the same images in one run (issue 15, part 6).

    OMP_NUM_THREADS=1 python pipelines/bench/bench_cam_stage.py [--n 8] [--threads 1]
    python pipelines/bench/bench_cam_stage.py --device cuda        # on a GPU machine

CPU: a random-weight open_clip ViT-B/16 (``ViT-B-16-quickgelu``, no download; saved as a
state dict and loaded the way ``clipes cam --model ViT-B-16-quickgelu --pretrained FILE``
does) on ``--n`` synthetic VOC-size photos (500x375 JPEGs of toy scenes, 3 labels each,
VOC background words). For every combination of precision (fp32, bf16, fp16; ``auto`` is
reported as what it resolves to), ``--batch-size`` 1/4/8 and ``--workers`` 0/2 it runs
:func:`~clip_es.cam.run.generate_cams` into a fresh run folder, in a fresh child process
(so each row's peak RSS is its own), after a one-image warm-up in that process, and prints
images/s of the stage (with loader workers: the steady rate from the first batch's records
to the last, since each run spawns its workers and their start-up is not the stage's speed) (decode, CLIP, GradCAM, CAA, writes; the model load excluded), the
ratio to today's path (fp32, batch 1, workers 0) and the child's peak RSS. The rows are
measured one after the other in this one run, so the ratios compare like with like on a
shared machine; absolute images/s are not comparable across runs.

Threads: every child runs with ``--threads`` (default 1) compute threads, as
``OMP_NUM_THREADS=1`` would; loader workers use one thread each on top.

CUDA (``--device cuda``): bf16, batch 1/16/32, workers 2, images/s and
``torch.cuda.max_memory_allocated``.

Options for the GPU check (``pipelines/bench/gpu_check.sh``): ``--model clipes-tiny`` runs
the bundled tiny CLIP instead of the random ViT-B/16 (its dry run); ``--busy`` samples the
GPU's utilisation (``torch.cuda.utilization``, else ``nvidia-smi``) every 50 ms while a
row is timed and reports the mean share of samples (``-`` on the CPU); ``--roofline``
times a square matmul (bf16 on CUDA, fp32 on the CPU) and adds each row's share of that
roofline: images/s times the image encoder's forward FLOPs per image (linear and
patch-embedding weights and the attention products at this input size, counted from the
model; the GradCAM backward and the text side are left out, so it is a lower bound).
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
sys.path.insert(0, str(ROOT))

H, W = 375, 500


def make_images(root: Path, n: int, size: tuple[int, int] = (H, W)) -> None:
    """``n`` JPEGs of ``size = (h, w)`` (default 500x375; toy scenes scaled up) with three labels
    each, as a folder dataset."""
    import cv2

    from clip_es.data.toy import TOY_CLASSES, scene_for

    (root / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    h, w = size
    for i in range(n):
        scene = scene_for(11, i, (h // 2, w // 2))
        img = cv2.resize(scene.image, (w, h), interpolation=cv2.INTER_LINEAR)
        cv2.imwrite(str(root / "images" / f"img{i:03d}.jpg"), img[..., ::-1].copy(), [cv2.IMWRITE_JPEG_QUALITY, 90])
        labels = [TOY_CLASSES[(i + j) % len(TOY_CLASSES)] for j in range(3)]
        lines.append(f"img{i:03d}," + ";".join(labels))
    (root / "classes.txt").write_text("".join(f"{c}\n" for c in TOY_CLASSES))
    (root / "labels.csv").write_text("\n".join(lines) + "\n")


def save_vit(path: Path) -> None:
    import open_clip
    import torch

    torch.manual_seed(0)
    torch.save(open_clip.create_model("ViT-B-16-quickgelu").state_dict(), path)


class BusySampler:
    """Mean GPU utilisation while running (a thread polling every ``period`` s); ``None`` when not measurable."""

    def __init__(self, device: str, period: float = 0.05):
        import threading

        self.device, self.period, self.samples = device, period, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _read(self) -> float | None:
        import torch

        try:
            return float(torch.cuda.utilization(torch.device(self.device)))
        except Exception:  # no pynvml: ask nvidia-smi
            idx = torch.device(self.device).index or 0
            try:
                out = subprocess.run(["nvidia-smi", "-i", str(idx), "--query-gpu=utilization.gpu",
                                      "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=5)
                return float(out.stdout.strip().splitlines()[0])
            except (OSError, ValueError, IndexError, subprocess.SubprocessError):
                return None

    def _loop(self) -> None:
        while not self._stop.wait(self.period):
            v = self._read()
            if v is not None:
                self.samples.append(v)

    def __enter__(self) -> "BusySampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def mean(self) -> float | None:
        return sum(self.samples) / len(self.samples) if self.samples else None


def matmul_roofline(device: str, n: int = 8192, reps: int = 20) -> tuple[float, str]:
    """Measured FLOP/s of an ``n x n`` matmul (bf16 on CUDA, fp32 on the CPU, ``n`` capped at 1024 there)."""
    import torch

    cuda = device.startswith("cuda")
    dtype = torch.bfloat16 if cuda else torch.float32
    n = n if cuda else min(n, 1024)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    if cuda:
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    if cuda:
        torch.cuda.synchronize()
    return 2 * n ** 3 * reps / (time.perf_counter() - t), str(dtype).replace("torch.", "")


def encoder_flops(model: str, weights: Path | None, hw: tuple[int, int] = (H, W)) -> float:
    """Forward FLOPs per image of the CLIP image encoder at the cam stage's input for an ``hw`` image."""
    import torch

    from clip_es.model.inputs import input_size
    from clip_es.model.resolve import load_clip

    clip = load_clip(model, str(weights) if weights else None, device="cpu")
    p = clip.patch_size
    h, w = input_size(hw, 1.0, p)
    n = (h // p) * (w // p) + 1
    flops = 0.0
    for m in clip.visual.modules():
        if isinstance(m, torch.nn.Linear):
            flops += 2 * n * m.weight.numel()
        elif isinstance(m, torch.nn.MultiheadAttention):
            flops += 2 * n * m.in_proj_weight.numel() + 4 * n * n * m.embed_dim
        elif isinstance(m, torch.nn.Conv2d):
            flops += 2 * (n - 1) * m.weight.numel()
    return flops


def child(args) -> None:
    """One configuration: load, warm up on one image, time the stage on all images."""
    import resource

    import torch

    from clip_es.cam.run import CamConfig, generate_cams
    from clip_es.model.resolve import load_clip

    pretrained = str(args.weights) if args.weights else None
    clip = load_clip(args.model, pretrained, device=args.device)
    base = dict(dataset="folder", root=str(args.data), split="labels", model=args.model,
                pretrained=pretrained, background="voc", device=args.device, precision=args.precision,
                batch_size=args.batch_size, workers=args.workers, threads=args.threads)
    generate_cams(CamConfig(out=str(args.out) + "-warm", limit=1, **base), clip=clip, progress=False)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    import contextlib

    sampler = BusySampler(args.device) if args.busy and args.device.startswith("cuda") else None
    t, t_wall = time.perf_counter(), time.time()
    with sampler or contextlib.nullcontext():
        res = generate_cams(CamConfig(out=str(args.out), **base), clip=clip, progress=False)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
    dt = time.perf_counter() - t
    # loader workers are spawned by each run (a second or more before the first image arrives, which
    # the one-image warm-up, inline, never paid): with workers the rate is the steady one, from the
    # first batch's records to the last record, and the start-up is reported beside it
    startup = None
    if args.workers > 0:
        stamps = sorted(p.stat().st_mtime for p in (Path(args.out) / "cam").glob("*.npz"))
        b = args.batch_size
        if len(stamps) > b and stamps[-1] > stamps[b - 1]:
            startup = max(0.0, stamps[b - 1] - t_wall)
            dt = (stamps[-1] - stamps[b - 1]) * res.done / (len(stamps) - b)
    from clip_es.rundir import RunDir

    resolved = RunDir(args.out).stage_info("cam")["params"]["precision"]
    out = {"ok": res.ok, "done": res.done, "seconds": dt, "img_s": res.done / dt, "precision": resolved,
           "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "startup_s": startup}
    if args.device.startswith("cuda"):
        out["gpu_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
    out["busy"] = sampler.mean() if sampler else None
    print("RESULT " + json.dumps(out))


def run_child(tmp: Path, weights: Path | None, data: Path, device: str, precision: str, batch: int, workers: int,
              threads: int, tag: str, model: str = "ViT-B-16-quickgelu", busy: bool = False) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    cmd = [sys.executable, __file__, "--child", "--data", str(data), "--device", device,
           "--precision", precision, "--batch-size", str(batch), "--workers", str(workers), "--threads", str(threads),
           "--out", str(tmp / tag), "--model", model] + (["--weights", str(weights)] if weights else [])
    cmd += ["--busy"] if busy else []
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{tag} failed:\n{proc.stderr[-3000:]}")
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--n", type=int, default=8, help="images (CPU); a multiple of 8 keeps batches full")
    ap.add_argument("--threads", type=int, default=1, help="compute threads per configuration")
    ap.add_argument("--precisions", default="fp32,bf16,fp16")
    ap.add_argument("--rounds", type=int, default=1, help="measure every row this many times (round-robin), keep "
                    "the best")
    ap.add_argument("--batches", default=None, help="comma-separated batch sizes (default 1,4,8; cuda 1,16,32)")
    ap.add_argument("--workers", default=None, help="comma-separated loader workers (default 0,2; cuda 2)")
    ap.add_argument("--model", default="ViT-B-16-quickgelu", help="ViT-B-16-quickgelu (random weights, default) "
                    "or clipes-tiny (the bundled tiny CLIP: the GPU check's dry run)")
    ap.add_argument("--busy", action="store_true", help="sample the GPU's utilisation while each row is timed")
    ap.add_argument("--roofline", action="store_true", help="measure a matmul roofline and report each row's share")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--weights", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)
    ap.add_argument("--batch-size", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        args.workers = int(args.workers)
        child(args)
        return
    cuda = args.device.startswith("cuda")
    n = args.n if not cuda else max(args.n, 64)
    batches = [int(b) for b in (args.batches or ("1,16,32" if cuda else "1,4,8")).split(",")]
    workers = [int(w) for w in (args.workers or ("2" if cuda else "0,2")).split(",")]
    precisions = ["bf16"] if cuda and args.precisions == "fp32,bf16,fp16" else args.precisions.split(",")
    tmp = Path(tempfile.mkdtemp(prefix="bench-cam-stage-"))
    random_vit = args.model == "ViT-B-16-quickgelu"
    weights, data = (tmp / "vit-b-16-random.pt" if random_vit else None), tmp / "data"
    if random_vit:
        save_vit(weights)
    make_images(data, n)
    roof = None
    if args.roofline:
        roof, roof_dtype = matmul_roofline(args.device)
        flops = encoder_flops(args.model, weights)
        print(f"roofline: {roof_dtype} matmul {roof / 1e12:.2f} TFLOP/s on {args.device}; image encoder forward "
              f"{flops / 1e9:.2f} GFLOP per image, so at most {roof / flops:.1f} img/s")
    from clip_es.model.precision import cpu_has_bf16, resolve_precision

    auto = resolve_precision("auto", args.device)
    print(f"cam stage, {'random-weight ViT-B/16 (quickgelu)' if random_vit else args.model}, {n} images {W}x{H} (input 512x384, 768 tokens), "
          f"3 labels each, VOC background words; device {args.device}; {args.threads} compute thread(s) "
          f"(OMP_NUM_THREADS={args.threads}), loader workers 1 thread each; --precision auto resolves to {auto} "
          f"here (CPU avx512_bf16/AMX: {cpu_has_bf16()})")
    rows = []
    for rnd in range(args.rounds):  # round-robin: every row sees the same spread of machine load
        for i, (p, b, w) in enumerate((p, b, w) for p in precisions for b in batches for w in workers):
            r = run_child(tmp, weights, data, args.device, p, b, w, args.threads, f"{p}-b{b}-w{w}-r{rnd}",
                          args.model, args.busy)
            r.update(asked=p, batch=b, workers=w, tag=f"{p}-b{b}-w{w}-r{rnd}")
            if rnd == 0:
                rows.append(r)
            elif r["img_s"] > rows[i]["img_s"]:  # best of the rounds
                rows[i] = r
            print(f"  round {rnd + 1}: {p} batch {b} workers {w}: {r['img_s']:.3f} img/s", flush=True)
    ref = next((r for r in rows if r["asked"] == "fp32" and r["batch"] == 1 and r["workers"] == 0), rows[0])
    head = f"{'precision':<10}{'batch':>6}{'workers':>8}{'img/s':>9}{'ratio':>8}{'peak RSS GB':>13}"
    if cuda:
        head += f"{'GPU mem GB':>12}"
    if args.busy:
        head += f"{'GPU busy %':>12}"
    if roof:
        head += f"{'roofline %':>12}"
    print(head)
    print("-" * len(head))
    for r in rows:
        line = (f"{r['asked']:<10}{r['batch']:>6}{r['workers']:>8}{r['img_s']:>9.3f}"
                f"{r['img_s'] / ref['img_s']:>7.2f}x{r['peak_rss_gb']:>13.2f}")
        if cuda:
            line += f"{r['gpu_mem_gb']:>12.2f}"
        if args.busy:
            line += f"{r['busy']:>12.1f}" if r.get("busy") is not None else f"{'-':>12}"
        if roof:
            line += f"{100 * r['img_s'] * flops / roof:>12.2f}"
        print(line)
    print(f"ratio: images/s over {ref['asked']} batch {ref['batch']} workers {ref['workers']} (today's path); "
          f"best of {args.rounds} round(s)")
    ups = [r["startup_s"] for r in rows if r.get("startup_s") is not None]
    if ups:
        print(f"rows with workers: steady images/s from the first batch's records to the last (the workers' "
              f"start-up, {min(ups):.1f}-{max(ups):.1f} s to the first batch, left out)")
    compare(tmp, rows, ref)


def compare(tmp: Path, rows: list[dict], ref: dict) -> None:
    """Records of every row against the reference run: identical bytes? argmax agreement?"""
    import numpy as np

    from clip_es.cam.store import load_cam

    def records(tag):
        return {f.name: f for f in sorted((tmp / tag / "cam").glob("*.npz"))}

    base = records(ref["tag"])
    for r in rows:
        if r is ref:
            continue
        other = records(r["tag"])
        same = all(base[k].read_bytes() == other[k].read_bytes() for k in base) and base.keys() == other.keys()
        agree = {}
        for kind in ("cam", "caa"):
            eq = tot = 0
            for k in base:
                a, b = load_cam(base[k]), load_cam(other[k])
                la = np.concatenate([(1 - getattr(a, kind).max(0))[None], getattr(a, kind)]).argmax(0)
                lb = np.concatenate([(1 - getattr(b, kind).max(0))[None], getattr(b, kind)]).argmax(0)
                eq += int((la == lb).sum())
                tot += la.size
            agree[kind] = 100 * eq / tot
        print(f"{r['asked']:<6} batch {r['batch']} workers {r['workers']} vs reference: "
              f"{'byte-identical' if same else 'differs'}; argmax agreement CAM {agree['cam']:.2f} %, "
              f"CAA {agree['caa']:.2f} %")


if __name__ == "__main__":
    main()
