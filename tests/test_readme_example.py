"""Issue #16 item 2 and issue #23: the README's Python examples run. The in-memory one (``Labeler``,
``Segmenter``) runs exactly as written, after ``make demo`` (here: with a segmenter trained for a few
steps where the demo puts it). The run-folder one runs as a script in a subprocess
(refine's spawn workers import the script again) and without its ``__main__`` guard (the
library then refines in one process and says why, instead of a ``BrokenProcessPool``).

The example is taken from README.md by the test; the only change is the model (the tiny test
CLIP instead of ``ViT-B-16``/``openai``, which cannot be downloaded here). It runs in a folder
holding ``mydata/`` in the README's folder layout, made from a toy set.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

README = Path(__file__).parents[1] / "README.md"


def readme_block(after: str) -> str:
    """The first python block of README.md after the text ``after``."""
    text = README.read_text(encoding="utf-8")
    start = text.index(after)
    m = re.compile(r"```python\n(.*?)```", re.S).search(text, start)
    assert m, f"no python block after {after!r}"
    return m.group(1)


def readme_example() -> str:
    return readme_block("the same from Python (as a script")


@pytest.fixture(scope="module")
def mydata(tmp_path_factory, toy_root) -> Path:
    """``mydata/`` as the README lays it out: images/, classes.txt, train.csv (the toy's train split)."""
    base = tmp_path_factory.mktemp("readme")
    root = base / "mydata"
    (root / "images").mkdir(parents=True)
    ids = (toy_root / "ImageSets" / "Segmentation" / "train.txt").read_text().split()[:6]
    labels = json.loads((toy_root / "labels.json").read_text())
    for i in ids:
        shutil.copy(toy_root / "JPEGImages" / f"{i}.jpg", root / "images" / f"{i}.jpg")
    shutil.copy(toy_root / "classes.txt", root / "classes.txt")
    (root / "train.csv").write_text("image,labels\n" + "".join(f"{i}.jpg,{';'.join(labels[i])}\n" for i in ids))
    return base


def _adapt(code: str, clip: Path) -> str:
    assert 'model="ViT-B-16", pretrained="openai"' in code
    code = code.replace('model="ViT-B-16", pretrained="openai"', f'model={str(clip)!r}, device="cpu"')
    # two workers (and a two-thread budget, which caps them) whatever the machine, so the spawn pool is really used
    assert 'RefineConfig(run="runs/mine")' in code
    return code.replace('RefineConfig(run="runs/mine")', 'RefineConfig(run="runs/mine", workers=2, threads=2)')


def _run_script(folder: Path, code: str) -> subprocess.CompletedProcess:
    script = folder / "example.py"
    script.write_text(code, encoding="utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, str(script)], cwd=folder, capture_output=True, text=True, env=env,
                          timeout=600)


def _check_outputs(folder: Path, p: subprocess.CompletedProcess) -> None:
    assert p.returncode == 0, p.stderr[-3000:]
    assert "Traceback" not in p.stderr
    assert p.stdout.splitlines()[:2] == ["cam: 6 done, 0 failed", "refine: 6 done, 0 failed"], p.stdout
    assert len(list((folder / "runs" / "mine" / "refine" / "masks").glob("*.png"))) == 6
    coco = json.loads((folder / "mine_masks.json").read_text())
    assert len(coco["images"]) == 6


def test_readme_example_runs_as_a_script(mydata, tmp_path, tiny_clip_path):
    folder = Path(shutil.copytree(mydata, tmp_path / "as_written"))
    p = _run_script(folder, _adapt(readme_example(), tiny_clip_path))
    _check_outputs(folder, p)
    assert "__main__" not in p.stderr  # guarded: no warning, the pool was used


def test_readme_example_without_guard_falls_back_to_one_process(mydata, tmp_path, tiny_clip_path):
    code = _adapt(readme_example(), tiny_clip_path)
    head, guard = code.split('if __name__ == "__main__":')
    body = textwrap.dedent(guard.split("\n", 1)[1])
    folder = Path(shutil.copytree(mydata, tmp_path / "unguarded"))
    p = _run_script(folder, head + body)
    _check_outputs(folder, p)
    assert "outside an 'if __name__ == \"__main__\":' block" in p.stderr and "example.py:" in p.stderr


def test_guard_detection(tmp_path):
    """Called under the guard or from a function the guard calls: no warning (pool used)."""
    code = textwrap.dedent("""
        from clip_es.refine.run import unguarded_main_script
        def f():
            return unguarded_main_script()
        top = f()
        if __name__ == "__main__":
            print(top, f(), sep="|")
        if "__main__" == __name__:
            print(f())
    """)
    (tmp_path / "g.py").write_text(code)
    p = subprocess.run([sys.executable, str(tmp_path / "g.py")], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    top, guarded, reversed_guard = p.stdout.strip().replace("\n", "|").split("|")
    assert top.endswith("g.py:5") and guarded == "None" and reversed_guard == "None"


@pytest.fixture(scope="module")
def demo_folder(tmp_path_factory, toy_root, tiny_clip_path) -> Path:
    """A folder holding ``demo/run/segmenter/model.pt`` where ``make demo`` writes it (trained a few steps)."""
    from clip_es.cam.run import CamConfig, generate_cams
    from clip_es.train.loop import TrainConfig, train_segmenter

    base = tmp_path_factory.mktemp("readme_api")
    run = base / "demo" / "run"
    generate_cams(CamConfig(dataset="toy", root=str(toy_root), split="train", out=str(run), model=str(tiny_clip_path),
                            device="cpu", limit=1, threads=1), progress=False)
    train_segmenter(TrainConfig(run=str(run), steps=2, labels="gt", batch_size=2, crop_size=64, backbone="test_resnet",
                                dim=32, heads=4, device="cpu", log_every=1, warmup=1, threads=1), progress=False)
    assert (run / "segmenter" / "model.pt").is_file()
    return base


def test_readme_in_memory_example_runs_as_written(demo_folder):
    code = readme_block("## From Python")
    assert "clip_es.Labeler(" in code and "clip_es.Segmenter.load(" in code
    p = _run_script(demo_folder, code)
    assert p.returncode == 0, p.stderr[-3000:]
    lines = p.stdout.splitlines()
    assert len(lines) == 7, p.stdout
    for line in lines[:6]:  # ['star'] (1, 193, 168) 97% labelled, 99.9% right
        assert re.fullmatch(r"\[('\w+'(, )?)+\] \(\d, \d+, \d+\) \d+% labelled, [\d.]+% right", line), line
    assert re.fullmatch(r"\(\d+, \d+\) [0-2]", lines[6]), lines[6]
    assert "WARNING" not in p.stderr and "outside it" not in p.stderr  # the toy CLIP on toy names: silent
