"""What the default ``--threads`` does when another job shares the CPUs (issue 15, part 5).

    python pipelines/bench/bench_threads.py [--busy 1] [--n 40] [--rounds 2]

Runs the cam stage (bundled clipes-tiny, ``--n`` toy images, fp32) with the default thread
count (``OMP_NUM_THREADS`` unset: every CPU of this process's affinity mask) and with
``--threads 1``, alternating, first on an otherwise idle machine (as far as this script
controls it) and then while ``--busy`` competing processes each keep one core busy with
a one-thread float32 matmul loop (another job on a shared server). Prints images/s of
every measurement and the default/1-thread ratio per condition (medians over rounds).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

BUSY = "import torch\ntorch.set_num_threads(1)\na = torch.randn(512, 512)\nwhile True:\n    a = (a @ a).tanh()\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--busy", type=int, default=1, help="competing one-thread processes")
    ap.add_argument("--n", type=int, default=40, help="toy images per measurement")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    os.environ.pop("OMP_NUM_THREADS", None)
    os.environ.pop("MKL_NUM_THREADS", None)
    import torch

    from clip_es.cam.run import CamConfig, generate_cams
    from clip_es.data.toy import make_toy
    from clip_es.model.resolve import load_clip
    from clip_es.threads import available_cpus, default_threads

    tmp = Path(tempfile.mkdtemp(prefix="bench-threads-"))
    root = make_toy(tmp / "toy", n=args.n, seed=3, val_fraction=0.0, progress=False)
    clip = load_clip("clipes-tiny")
    k = [0]

    def rate(threads):
        k[0] += 1
        cfg = CamConfig(dataset="toy", root=str(root), split="train", out=str(tmp / f"run{k[0]}"), precision="fp32",
                        threads=threads)
        t = time.perf_counter()
        res = generate_cams(cfg, clip=clip, progress=False)
        return res.done / (time.perf_counter() - t)

    rate(1)  # warm-up
    print(f"cam stage, clipes-tiny, {args.n} toy images, fp32; {available_cpus()} CPUs in this process's affinity "
          f"mask; default --threads = {default_threads()} (OMP_NUM_THREADS unset); torch {torch.__version__}")
    for label, busy in (("idle", 0), (f"{args.busy} busy process(es)", args.busy)):
        procs = [subprocess.Popen([sys.executable, "-c", BUSY], env={**os.environ, "OMP_NUM_THREADS": "1"})
                 for _ in range(busy)]
        try:
            time.sleep(2 if busy else 0)
            d, o = [], []
            for _ in range(args.rounds):
                d.append(rate(None))
                o.append(rate(1))
        finally:
            for p in procs:
                p.kill()
                p.wait()
        print(f"{label:<22} default ({default_threads()} threads): "
              f"{' '.join(f'{v:.1f}' for v in d)} img/s | 1 thread: {' '.join(f'{v:.1f}' for v in o)} img/s | "
              f"default / 1 thread = {statistics.median(d) / statistics.median(o):.2f}")


if __name__ == "__main__":
    main()
