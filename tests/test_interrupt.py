"""Issue #7, interruption: ``clipes cam`` and ``clipes refine`` killed with SIGKILL part-way
(the whole process group, pool workers included), then re-run with the same command, give
outputs byte-identical to an uninterrupted run, and leave no temp files.

The killed commands run as real subprocesses (``python -m clip_es``) on a toy set (40
images for cam, 24 for refine) with the tiny test CLIP; they are killed once 4-5 outputs
exist, which leaves seconds of margin before they would finish.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from clip_es.cam.store import is_valid_cam
from clip_es.data.image_io import read_mask
from clip_es.rundir import RunDir

N_IMAGES = 40
#: Images of the refine runs (the first ones of the toy set; a CRF costs more than a CAM).
N_REFINE = 24
TEMPLATE = "a photo of a {}."


@pytest.fixture(scope="module")
def toy40(tmp_path_factory) -> Path:
    from clip_es.data.toy import make_toy

    return make_toy(tmp_path_factory.mktemp("toy40") / "toy", n=N_IMAGES, seed=7, val_fraction=0.0, progress=False)


def _env() -> dict[str, str]:
    import torch

    # the same thread count as this process, so the in-process reference computes alike
    return {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()), "PYTHONWARNINGS": "ignore"}


def _cam_cmd(root: Path, out: Path, clip: Path) -> list[str]:
    return [sys.executable, "-m", "clip_es", "cam", "-d", "toy", "-r", str(root), "-s", "train", "-o", str(out),
            "-m", str(clip), "-t", TEMPLATE, "--device", "cpu"]


def _refine_cmd(run: Path, workers: int) -> list[str]:
    return [sys.executable, "-m", "clip_es", "refine", "--run", str(run), "--workers", str(workers)]


def _kill_part_way(cmd: list[str], folder: Path, pattern: str, at_least: int, total: int,
                   timeout: float = 240.0) -> int:
    """Start ``cmd``; once ``folder`` holds ``at_least`` files matching ``pattern``, SIGKILL its
    process group. Returns how many outputs existed after the kill (asserted < ``total``)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=_env(),
                            start_new_session=True)
    deadline = time.monotonic() + timeout
    try:
        while len(list(folder.glob(pattern))) < at_least:
            if proc.poll() is not None:
                pytest.fail(f"{cmd[3]} ended (rc {proc.returncode}) before it could be killed: "
                            f"{proc.stderr.read().decode()[-2000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"{cmd[3]} wrote no outputs within {timeout} s")
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    n = len(list(folder.glob(pattern)))
    assert at_least <= n < total, f"not interrupted part-way ({n} of {total} outputs)"
    return n


def _plant_dead_writers_temp(folder: Path, pid: int) -> None:
    """Temp files as a killed writer leaves them (the kill may or may not have hit a write)."""
    host = "".join(ch for ch in socket.gethostname() if ch.isalnum())[:32]
    (folder / f".tmp-{pid}.{host}.abc123").write_bytes(b"half a file")
    (folder / ".tmp-legacy").write_bytes(b"")


def _run_to_end(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _files(folder: Path, pattern: str) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.glob(pattern))}


def test_cam_killed_part_way_resumes_to_identical_outputs(toy40, tmp_path, tiny_clip, tiny_clip_path):
    from clip_es.cam.run import CamConfig, generate_cams

    ref = tmp_path / "ref"
    res = generate_cams(CamConfig(dataset="toy", root=str(toy40), split="train", out=str(ref),
                                  model=str(tiny_clip_path), templates=(TEMPLATE,), device="cpu"),
                        clip=tiny_clip, progress=False)
    assert res.ok and res.done == N_IMAGES

    out = tmp_path / "run"
    cmd = _cam_cmd(toy40, out, tiny_clip_path)
    _kill_part_way(cmd, out / "cam", "*.npz", at_least=5, total=N_IMAGES)
    assert all(is_valid_cam(p) for p in (out / "cam").glob("*.npz"))  # whole files or none
    assert RunDir(out).stage_info("cam")["status"] == "running"
    _plant_dead_writers_temp(out / "cam", pid=_dead_pid())

    _run_to_end(cmd)
    assert _files(out / "cam", "*.npz") == _files(ref / "cam", "*.npz")
    assert len(_files(out / "cam", "*.npz")) == N_IMAGES
    assert (out / "cam" / "config.json").read_bytes() == (ref / "cam" / "config.json").read_bytes()
    st = RunDir(out).stage_info("cam")
    assert st["status"] == "done" and st["failed"] == {}
    assert not list(out.rglob(".tmp-*"))


@pytest.fixture(scope="module")
def cam_run(toy40, tmp_path_factory, tiny_clip, tiny_clip_path) -> tuple[Path, Path]:
    """``(cam-only run of N_REFINE images, the same run refined uninterrupted)``. Copy before use."""
    from clip_es.cam.run import CamConfig, generate_cams
    from clip_es.refine.run import RefineConfig, refine_masks

    base = tmp_path_factory.mktemp("cam_run")
    run = base / "cam_run"
    assert generate_cams(CamConfig(dataset="toy", root=str(toy40), split="train", out=str(run),
                                   model=str(tiny_clip_path), templates=(TEMPLATE,), device="cpu",
                                   limit=N_REFINE), clip=tiny_clip, progress=False).ok
    ref = Path(shutil.copytree(run, base / "ref"))
    res = refine_masks(RefineConfig(run=str(ref), workers=2), progress=False)  # outputs do not depend on workers
    assert res.ok and res.done == N_REFINE
    return run, ref


@pytest.mark.parametrize("workers", [1, 2])
def test_refine_killed_part_way_resumes_to_identical_outputs(cam_run, tmp_path, workers):
    cam_only, ref = cam_run
    out = Path(shutil.copytree(cam_only, tmp_path / "run"))
    cmd = _refine_cmd(out, workers)
    _kill_part_way(cmd, out / "refine" / "masks", "*.png", at_least=4, total=N_REFINE)
    for p in (out / "refine").glob("*/*.png"):
        read_mask(p)  # whole files or none
    _plant_dead_writers_temp(out / "refine" / "masks", pid=_dead_pid())

    _run_to_end(cmd)
    assert _files(out / "refine", "*/*.png") == _files(ref / "refine", "*/*.png")
    assert len(_files(out / "refine", "masks/*.png")) == N_REFINE
    st = RunDir(out).stage_info("refine")
    assert st["status"] == "done" and st["failed"] == {}
    assert not list(out.rglob(".tmp-*"))


def test_live_writers_temp_file_is_not_swept(tmp_path):
    """A shard that starts later must not delete the temp file another running shard is writing."""
    host = "".join(ch for ch in socket.gethostname() if ch.isalnum())[:32]
    live = tmp_path / f".tmp-{os.getppid()}.{host}.xyz"  # our parent is alive
    dead = tmp_path / f".tmp-{_dead_pid()}.{host}.xyz"
    other_host_fresh = tmp_path / ".tmp-1.someotherhost.xyz"
    other_host_old = tmp_path / ".tmp-1.someotherhost.old"
    for p in (live, dead, other_host_fresh, other_host_old):
        p.write_bytes(b"x")
    os.utime(other_host_old, (time.time() - 7200, time.time() - 7200))
    assert RunDir.sweep_temp(tmp_path) == 2
    assert live.exists() and other_host_fresh.exists()
    assert not dead.exists() and not other_host_old.exists()


def _dead_pid() -> int:
    """The id of a process that has exited and been reaped."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid
