"""pipelines/bench/gpu_check.sh: its CPU dry run (the same steps as on a GPU, tiny sizes) runs
every step and prints the lines the GPU run's report is read from."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "pipelines" / "bench" / "gpu_check.sh"
STEPS = ("tests", "toy", "cam", "refine", "train", "segment", "label", "torchrun-cam", "torchrun-refine",
         "torchrun-train", "bench-cam", "bench-refine", "bench-grads")


def _env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "PYTEST_ADDOPTS")}
    env.update(PYTHON=sys.executable, WORK=str(tmp_path / "work"), OMP_NUM_THREADS="1")
    return env


def test_unknown_option_is_a_usage_error(tmp_path: Path) -> None:
    out = subprocess.run(["bash", str(SCRIPT), "--gpu"], capture_output=True, text=True, env=_env(tmp_path))
    assert out.returncode == 2 and "--dry-run" in out.stderr
    assert not (tmp_path / "work").exists()


def test_dry_run_runs_every_step(tmp_path: Path) -> None:
    out = subprocess.run(["bash", str(SCRIPT), "--dry-run"], capture_output=True, text=True, env=_env(tmp_path),
                         timeout=900)
    text = out.stdout
    assert out.returncode == 0, text[-4000:] + out.stderr[-2000:]
    lines = text.splitlines()
    assert lines[0].startswith("gpu_check: mode dry-run, device cpu")
    done = [m.group(1) for ln in lines if (m := re.match(r"STEP (\S+): ok \(\d+\.\d s\)$", ln))]
    assert tuple(done) == STEPS
    assert lines[-1] == f"gpu_check: {len(STEPS)} steps, 0 failed"
    # the benchmark tables: cam stage with busy and roofline columns, refine methods with their ratio
    assert re.search(r"roofline: float32 matmul [\d.]+ TFLOP/s on cpu; image encoder forward [\d.]+ GFLOP", text)
    assert re.search(r"precision\s+batch\s+workers\s+img/s\s+ratio\s+peak RSS GB\s+GPU busy %\s+roofline %", text)
    assert re.search(r"\n\s+fp32\s+1\s+0\s+[\d.]+\s+1\.00x", text)
    assert re.search(r"crf  cpu:\s+[\d.]+ img/s", text) and re.search(r"pamr cpu:\s+[\d.]+ img/s", text)
    assert re.search(r"ratio pamr/crf: [\d.]+x", text)
    m = re.search(r"\[1b\] last block \+ gradients: analytic [\d.]+s \| autograd batched [\d.]+s "
                  r"\(ratio [\d.]+x\) \| max \|diff\| ([\d.e+-]+)", text)
    assert m and float(m.group(1)) <= 1e-5  # the closed form equals autograd on ViT-B/16's block
    work = tmp_path / "work"
    assert (work / "run" / "segmenter" / "model.pt").is_file()
    assert len(list((work / "run-ddp" / "refine" / "masks").glob("*.png"))) == \
        len(list((work / "run-ddp" / "cam").glob("*.npz"))) > 0
