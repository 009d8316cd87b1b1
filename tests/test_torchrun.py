"""Scale-out: `torchrun -m clip_es cam/refine` shards by rank into one run folder that is
identical (same files, same bytes) to a single-process run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


from clip_es.stage import dist_shard


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", PYTHONHASHSEED="0")
    return env


def test_dist_shard_reads_torchrun_env(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert dist_shard((0, 1)) == (0, 1)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "2")
    assert dist_shard((0, 1)) == (2, 4)
    assert dist_shard((1, 3)) == (1, 3)  # an explicit --shard wins


def test_torchrun_two_processes_equal_single_process(toy_root, tiny_clip_path, tmp_path):
    cam_args = ["cam", "--dataset", "toy", "--root", str(toy_root), "--split", "trainval", "--model",
                str(tiny_clip_path), "--template", "a photo of a {}.", "--device", "cpu"]
    single, multi = tmp_path / "single", tmp_path / "multi"
    py = [sys.executable, "-m", "clip_es"]
    trun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "clip_es"]
    for cmd in (py + cam_args + ["--out", str(single)], py + ["refine", "--run-dir", str(single), "--workers", "1"],
                trun + cam_args + ["--out", str(multi)], trun + ["refine", "--run-dir", str(multi), "--workers", "1"]):
        out = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=600)
        assert out.returncode == 0, out.stderr[-2000:]
    a, b = _files(single), _files(multi)
    assert sorted(a) == sorted(b)
    assert len([k for k in a if k.startswith("cam/") and k.endswith(".npz")]) == 12
    diff = [k for k in a if a[k] != b[k]]
    assert not diff, f"files differ: {diff}"
