"""Issue #16, a newcomer's first hour with the CLI: Ctrl-C (item 5), a missing checkpoint path
(item 7), messages naming the right option (item 8), the demo table after a resume (item 9),
warnings beside progress bars and refusals before the model load (item 11), ``--set``,
``--force``, ``--log-file`` and failure reasons in the stage summary.

Commands run as real subprocesses (``python -m clip_es``) where the behaviour is the
process's (signals, stderr layout); the tiny test CLIP keeps them to seconds.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from clip_es.cli import INTERRUPTED
from tests.conftest import run_cli

TEMPLATE = "a photo of a {}."


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def _clipes(*argv: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "clip_es", *argv], capture_output=True, text=True, env=_env(),
                          timeout=timeout)


@pytest.fixture(scope="module")
def toy30(tmp_path_factory) -> Path:
    from clip_es.data.toy import make_toy

    return make_toy(tmp_path_factory.mktemp("toy30") / "toy", n=30, seed=7, val_fraction=0.0, progress=False)


def _cam_argv(root: Path, out: Path, clip: Path, *extra: str) -> list[str]:
    return ["cam", "-d", "toy", "-r", str(root), "-s", "train", "-o", str(out), "-m", str(clip), "-t", TEMPLATE,
            "--device", "cpu", *extra]


def _sigint_part_way(argv: list[str], folder: Path, pattern: str, at_least: int,
                     timeout: float = 240.0) -> subprocess.CompletedProcess:
    """Start ``clipes ARGV``; once ``folder`` holds ``at_least`` outputs, send SIGINT to its process
    group (what Ctrl-C in a terminal does); return the finished process with its stderr."""
    proc = subprocess.Popen([sys.executable, "-m", "clip_es", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_env(), start_new_session=True)
    deadline = time.monotonic() + timeout
    try:
        while len(list(folder.glob(pattern))) < at_least:
            if proc.poll() is not None:
                pytest.fail(f"ended (rc {proc.returncode}) before the interrupt: {proc.stderr.read()[-2000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"no outputs within {timeout} s")
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


# ----------------------------------------------------------------------------- item 5: Ctrl-C
def test_ctrl_c_during_cam_says_interrupted_and_resumes(toy30, tmp_path, tiny_clip_path):
    out = tmp_path / "run"
    argv = _cam_argv(toy30, out, tiny_clip_path)
    p = _sigint_part_way(argv, out / "cam", "*.npz", at_least=3)
    assert p.returncode == 130, p.stderr[-2000:]
    assert "Traceback" not in p.stderr
    assert p.stderr.rstrip().splitlines()[-1] == INTERRUPTED
    n = len(list((out / "cam").glob("*.npz")))
    assert n < 30
    again = _clipes(*argv)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"30 done" not in again.stdout and f"{n} already there" in again.stdout


@pytest.fixture(scope="module")
def cam_run(toy30, tmp_path_factory, tiny_clip, tiny_clip_path) -> Path:
    """A cam-only run of the 30 images (copy before use)."""
    from clip_es.cam.run import CamConfig, generate_cams

    run = tmp_path_factory.mktemp("cam_run") / "run"
    assert generate_cams(CamConfig(dataset="toy", root=str(toy30), split="train", out=str(run),
                                   model=str(tiny_clip_path), templates=(TEMPLATE,), device="cpu"),
                         clip=tiny_clip, progress=False).ok
    return run


def test_ctrl_c_during_refine_with_workers_is_one_line(cam_run, tmp_path):
    run = Path(shutil.copytree(cam_run, tmp_path / "run"))
    p = _sigint_part_way(["refine", "--run", str(run), "--workers", "2"], run / "refine" / "masks", "*.png",
                         at_least=2)
    assert p.returncode == 130, p.stderr[-2000:]
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    assert p.stderr.rstrip().splitlines()[-1] == INTERRUPTED
    assert not list(run.rglob(".tmp-*"))


# ----------------------------------------------------------------------------- item 7: missing checkpoint path
@pytest.mark.parametrize("model", ["/path/missing.pt", "missing.safetensors", "ckpts/clip"])
def test_missing_checkpoint_path_says_file_does_not_exist(toy_root, tmp_path, capsys, model):
    from clip_es.errors import WeightsError
    from clip_es.model.resolve import load_clip

    with pytest.raises(WeightsError, match="checkpoint file does not exist"):
        load_clip(model)
    assert run_cli(["cam", "-d", "toy", "-r", str(toy_root), "-o", str(tmp_path / "run"), "--model", model]) == 2
    err = capsys.readouterr().err
    assert "checkpoint file does not exist" in err and "unknown model" not in err and model in err
    assert not (tmp_path / "run").exists()


def test_model_folder_and_unknown_name(tmp_path):
    from clip_es.errors import RegistryError, WeightsError
    from clip_es.model.resolve import load_clip

    with pytest.raises(WeightsError, match="is a folder"):
        load_clip(str(tmp_path))
    with pytest.raises(RegistryError, match="unknown model 'ViT-B-17'"):
        load_clip("ViT-B-17")
