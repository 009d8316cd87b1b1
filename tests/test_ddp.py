"""Multi-process training: ``torchrun --nproc_per_node 2 -m clip_es train`` on CPU (gloo). Slow-marked."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import torch

from tests.test_segmenter import BACKBONE, base_run  # noqa: F401  (session fixture reused)


def test_torchrun_two_processes(base_run, tmp_path):  # noqa: F811
    # --run-dir, not --run: torchrun's argparse refuses "--run" as an ambiguous prefix of its --run-path
    run = tmp_path / "run"
    shutil.copytree(base_run, run)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "clip_es", "train", "--run-dir", str(run), "--labels", "gt", "--steps", "3", "--batch-size", "1",
           "--crop-size", "64", "--backbone", BACKBONE, "--dim", "32", "--device", "cpu", "--save-every", "2"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("step 3/3") == 1  # rank 0 reports, rank 1 stays quiet
    ck = torch.load(run / "segmenter" / "last.pt", map_location="cpu", weights_only=True)
    assert ck["step"] == 3 and ck["config"]["world_size"] == 2
    assert not any(k.startswith("module.") for k in ck["model"])  # the unwrapped model is saved
    rows = (run / "segmenter" / "log.csv").read_text().splitlines()
    assert rows[0] == "step,loss,lr" and len(rows) == 4
    m = json.loads((run / "manifest.json").read_text())
    assert m["stages"]["segmenter"]["world_size"] == 2 and m["stages"]["segmenter"]["status"] == "done"
    assert not list((run / "segmenter").glob(".tmp-*"))
