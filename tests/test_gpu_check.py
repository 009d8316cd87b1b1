"""pipelines/bench/gpu_check.sh: the Python it picks, its one-line import check, the --wheels
install with --no-index, the files it leaves under $OUT, and its CPU dry run (the same steps as on
a GPU, tiny sizes; every step in the slow-marked test, the steps new in issue 29 in the fast one)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "pipelines" / "bench" / "gpu_check.sh"
STEPS = ("bench-cam", "bench-grads", "toy", "cam", "bench-refine", "real-oom", "refine", "train", "segment", "label",
         "tests", "torchrun-cam", "torchrun-refine", "torchrun-train")


def _env(tmp_path: Path, **kw: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "PYTEST_ADDOPTS", "PYTHONPATH", "PYTHON")}
    env.update(PYTHON=sys.executable, WORK=str(tmp_path / "work"), OUT=str(tmp_path / "out"), OMP_NUM_THREADS="1")
    env.update(kw)
    return {k: v for k, v in env.items() if v is not None}


def _out_files(tmp_path: Path) -> list[Path]:
    return [p for p in (tmp_path / "out").rglob("*") if p.is_file()]


def test_unknown_option_is_a_usage_error(tmp_path: Path) -> None:
    out = subprocess.run(["bash", str(SCRIPT), "--gpu"], capture_output=True, text=True, env=_env(tmp_path))
    assert out.returncode == 2 and "--dry-run" in out.stderr and "--wheels DIR" in out.stderr
    assert not (tmp_path / "work").exists()
    out = subprocess.run(["bash", str(SCRIPT), "--wheels", str(tmp_path)], capture_output=True, text=True,
                         env=_env(tmp_path))
    assert out.returncode == 2 and "no *.whl there" in out.stderr and "gpu_wheels.sh" in out.stderr


def test_without_venv_or_python_it_says_what_it_needs(tmp_path: Path) -> None:
    """A checkout without .venv and no PYTHON: one line naming both ways (not python3 from PATH)."""
    repo = tmp_path / "repo" / "pipelines" / "bench"
    repo.mkdir(parents=True)
    shutil.copy(SCRIPT, repo)
    shutil.copy(SCRIPT.parent / "find_python.sh", repo)
    env = {k: v for k, v in _env(tmp_path).items() if k != "PYTHON"}
    out = subprocess.run(["bash", str(repo / "gpu_check.sh"), "--dry-run"], capture_output=True, text=True, env=env)
    assert out.returncode == 2 and out.stdout == ""
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "make setup" in lines[0] and "PYTHON=" in lines[0]


def test_missing_packages_are_named_in_one_line(tmp_path: Path) -> None:
    """A Python without the project's packages (a bare venv): exit 2 before any step, one line that
    names what is missing and how to bring it, also in the summary under $OUT."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp_path / "bare")], check=True)
    out = subprocess.run(["bash", str(SCRIPT), "--dry-run"], capture_output=True, text=True,
                         env=_env(tmp_path, PYTHON=str(tmp_path / "bare" / "bin" / "python")))
    assert out.returncode == 2
    line = out.stdout.strip()
    assert "\n" not in line and "lacks: torch (ModuleNotFoundError" in line and "open_clip_torch" in line
    assert "pytest" in line and "gpu_wheels.sh DIR" in line and "STEP" not in line
    assert (tmp_path / "out" / "gpu_check-summary.txt").read_text().strip() == line
    assert len(_out_files(tmp_path)) <= 8


def test_dry_run_with_wheels_installs_with_no_index(tmp_path: Path) -> None:
    """The project's wheel installed with --no-index into a scratch folder before anything else; the
    steps new in issue 29 (bench-grads' [4] under CPU bf16 autocast, real-oom) pass; $OUT holds the
    summary and one archive of every log, and the summary alone has each step's figures."""
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                    "-w", str(wheels), str(ROOT)], check=True, capture_output=True, cwd=tmp_path)
    out = subprocess.run(["bash", str(SCRIPT), "--dry-run", "--wheels", str(wheels), "--only", "bench-grads,real-oom"],
                         capture_output=True, text=True, env=_env(tmp_path, PIP_NO_INDEX="1"), timeout=300)
    text = out.stdout
    assert out.returncode == 0, text[-4000:] + out.stderr[-2000:]
    lines = text.splitlines()
    assert re.match(r"STEP wheels: ok \(1 wheels from .* installed with --no-index into .*/site", lines[0])
    assert (tmp_path / "work" / "site" / "clip_es" / "__init__.py").is_file()
    assert lines[1].startswith("gpu_check: mode dry-run, device cpu")
    assert re.search(r"\[4\] cam stage on cpu with bf16 autocast: [\d.]+ images/s", text)
    m = re.search(r"\[1b\] last block \+ gradients: analytic [\d.]+s \| autograd batched [\d.]+s "
                  r"\(ratio [\d.]+x\) \| max \|diff\| ([\d.e+-]+)", text)
    assert m and float(m.group(1)) <= 1e-5  # the closed form equals autograd on ViT-B/16's block
    m = re.search(r"STEP real-oom: ok .*: 1 OOM caught \(OutOfMemoryError\), 4/4 written .* keys same, "
                  r"max \|diff\| ([\d.e+-]+)$", text, re.M)
    assert m and float(m.group(1)) <= 1e-5
    assert lines[-1].startswith("gpu_check: 2 steps, 0 failed, 0 skipped")
    files = sorted(p.name for p in _out_files(tmp_path))
    assert files == ["gpu_check-logs.tar.gz", "gpu_check-summary.txt"]
    assert (tmp_path / "out" / "gpu_check-summary.txt").read_text() == text
    with tarfile.open(tmp_path / "out" / "gpu_check-logs.tar.gz") as tar:
        names = {Path(n).name for n in tar.getnames()}
    assert {"wheels.log", "imports.log", "bench-grads.log", "real-oom.log"} <= names


@pytest.mark.slow
def test_dry_run_runs_every_step(tmp_path: Path) -> None:
    out = subprocess.run(["bash", str(SCRIPT), "--dry-run"], capture_output=True, text=True, env=_env(tmp_path),
                         timeout=900)
    text = out.stdout
    assert out.returncode == 0, text[-4000:] + out.stderr[-2000:]
    lines = text.splitlines()
    assert lines[0].startswith("gpu_check: mode dry-run, device cpu")
    done = [m.group(1) for ln in lines if (m := re.match(r"STEP (\S+): ok \(\d+\.\d s\)", ln))]
    assert tuple(done) == STEPS
    assert re.match(rf"gpu_check: {len(STEPS)} steps, 0 failed, 0 skipped \(\d+ s\)$", lines[-1])
    # the benchmark tables: cam stage with busy and roofline columns, refine methods with their ratio
    assert re.search(r"roofline: float32 matmul [\d.]+ TFLOP/s on cpu; image encoder forward [\d.]+ GFLOP", text)
    assert re.search(r"precision\s+batch\s+workers\s+img/s\s+ratio\s+peak RSS GB\s+GPU busy %\s+roofline %", text)
    assert re.search(r"\n\s+fp32\s+1\s+0\s+[\d.]+\s+1\.00x", text)
    assert re.search(r"crf  cpu:\s+[\d.]+ img/s", text) and re.search(r"pamr cpu:\s+[\d.]+ img/s", text)
    assert re.search(r"ratio pamr/crf: [\d.]+x", text)
    assert re.search(r"STEP cam: ok \(\d+\.\d s\): cam: 4 done, 0 failed", text)
    assert re.search(r"STEP train: ok .*train: step 2/2", text)
    work = tmp_path / "work"
    assert (work / "run" / "segmenter" / "model.pt").is_file()
    assert len(list((work / "run-ddp" / "refine" / "masks").glob("*.png"))) == \
        len(list((work / "run-ddp" / "cam").glob("*.npz"))) > 0
    assert sorted(p.name for p in _out_files(tmp_path)) == ["gpu_check-logs.tar.gz", "gpu_check-summary.txt"]
