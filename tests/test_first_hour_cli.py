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
from tests.conftest import make_read_only

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


def _sigint_part_way(argv: list[str], marker: Path, at_least: int,
                     timeout: float = 240.0) -> subprocess.CompletedProcess:
    """Start ``clipes ARGV`` with the stage's test hold (``clip_es.stage.HOLD_ENV``): once it has
    finished ``at_least`` images its main loop creates ``marker`` and waits there, so the SIGINT to
    its process group (what Ctrl-C in a terminal does) always lands part-way through the run,
    however fast the machine. Returns the finished process with its stderr."""
    from clip_es.stage import HOLD_ENV

    env = {**_env(), HOLD_ENV: f"{at_least}:{marker}"}
    # SIG_DFL in the child: a test runner started in the background of a script (nohup, CI) inherits
    # SIGINT ignored, and Python then never turns Ctrl-C into KeyboardInterrupt
    proc = subprocess.Popen([sys.executable, "-m", "clip_es", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + timeout
    try:
        while not marker.exists():
            if proc.poll() is not None:
                pytest.fail(f"ended (rc {proc.returncode}) before the interrupt: {proc.stderr.read()[-2000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"not {at_least} images within {timeout} s")
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
    p = _sigint_part_way(argv, tmp_path / "held", at_least=3)
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
    p = _sigint_part_way(["refine", "--run", str(run), "--workers", "2"], tmp_path / "held", at_least=2)
    assert p.returncode == 130, p.stderr[-2000:]
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    assert p.stderr.rstrip().splitlines()[-1] == INTERRUPTED
    assert not list(run.rglob(".tmp-*"))
    assert len(list((run / "refine" / "masks").glob("*.png"))) >= 2  # workers may finish the rest meanwhile


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


# ----------------------------------------------------------------------------- item 11: refusals before the model load
def _cam_cfg(root, out, clip_path, **kw):
    from clip_es.cam.run import CamConfig

    return CamConfig(dataset="toy", root=str(root), split="train", out=str(out), model=str(clip_path),
                     templates=(TEMPLATE,), device="cpu", **kw)


@pytest.fixture
def no_model_load(monkeypatch):
    """Make loading a CLIP in the cam stage fail loudly: a refusal must come before it."""
    import clip_es.cam.run as cam_run

    def load_clip(*a, **kw):
        raise AssertionError("the model was loaded before the refusal")

    monkeypatch.setattr(cam_run, "load_clip", load_clip)


def test_changed_options_refused_before_model_load(toy_root, tmp_path, tiny_clip, tiny_clip_path, no_model_load):
    from clip_es.cam.run import generate_cams
    from clip_es.errors import RunDirError

    out = tmp_path / "run"
    assert generate_cams(_cam_cfg(toy_root, out, tiny_clip_path, limit=2), clip=tiny_clip, progress=False).ok
    manifest = (out / "manifest.json").read_bytes()
    with pytest.raises(RunDirError, match=r"other parameters \(changed: caa_threshold\).*--force"):
        generate_cams(_cam_cfg(toy_root, out, tiny_clip_path, limit=2, caa_threshold=0.5), progress=False)
    assert (out / "manifest.json").read_bytes() == manifest


def test_read_only_run_folder_refused_before_model_load(toy_root, tmp_path, tiny_clip, tiny_clip_path,
                                                        monkeypatch, no_model_load):
    from clip_es.cam.run import generate_cams
    from clip_es.errors import RunDirError

    out = tmp_path / "run"
    out.mkdir()
    make_read_only([out], out, monkeypatch)
    try:
        with pytest.raises(RunDirError, match="not writable"):
            generate_cams(_cam_cfg(toy_root, out, tiny_clip_path, limit=1), progress=False)
    finally:
        out.chmod(0o755)
    assert list(out.iterdir()) == []


def test_unwritable_parent_refused_before_model_load(toy_root, tmp_path, no_model_load, monkeypatch):
    from clip_es.cam.run import generate_cams
    from clip_es.errors import RunDirError

    parent = tmp_path / "ro"
    parent.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == parent else real_access(p, mode, **kw))
    with pytest.raises(RunDirError, match="cannot create run folder"):
        generate_cams(_cam_cfg(toy_root, parent / "a" / "run", "x.pt", limit=1), progress=False)
    assert list(parent.iterdir()) == []


# ----------------------------------------------------------------------------- failures, warnings, --log-file
@pytest.fixture
def toy_two_broken(toy_root, tmp_path) -> tuple[Path, list[str]]:
    """A copy of the 12-image toy set whose first two train images are truncated JPEGs."""
    root = Path(shutil.copytree(toy_root, tmp_path / "toy"))
    ids = (root / "ImageSets" / "Segmentation" / "train.txt").read_text().split()[:2]
    for i in ids:
        p = root / "JPEGImages" / f"{i}.jpg"
        p.write_bytes(p.read_bytes()[:200])
    return root, ids


def test_summary_lists_failure_reasons_and_warnings_get_their_own_line(toy_two_broken, tmp_path, tiny_clip_path):
    root, broken = toy_two_broken
    log = tmp_path / "logs" / "cam.log"
    p = _clipes("--log-file", str(log), *_cam_argv(root, tmp_path / "run", tiny_clip_path))
    assert p.returncode == 1, p.stderr[-2000:]
    out = p.stdout.splitlines()
    assert out[0].startswith("cam: 7 done, 2 failed: see ")
    reasons = out[1:]
    assert len(reasons) == 2 and all(ln.startswith("  ") for ln in reasons)
    for i, ln in zip(broken, reasons):
        assert f"{i}.jpg" in ln, reasons
    # a warning printed while the progress bar is drawn starts its own line (tqdm.write), not after the bar
    warned = [seg for ln in p.stderr.split("\n") for seg in ln.split("\r") if "WARNING" in seg]
    assert len(warned) == 2, p.stderr[-3000:]
    assert all(seg.startswith("WARNING clip_es.cam.run: ") for seg in warned), warned
    assert "cam:" in p.stderr  # the bar was drawn
    text = log.read_text()
    assert sum("WARNING clip_es.cam.run" in ln for ln in text.splitlines()) == 2
    assert text[:4].isdigit()  # lines start with the time


def test_summary_caps_the_reasons():
    from clip_es.stage import StageResult

    r = StageResult("refine", "/r", done=1, failed={f"i{k}": f"/d/i{k}.jpg: unreadable" for k in range(5)})
    lines = r.summary().splitlines()
    assert lines[1:] == ["  /d/i0.jpg: unreadable", "  /d/i1.jpg: unreadable", "  /d/i2.jpg: unreadable",
                         "  ... and 2 more"]
    assert r.summary(reasons=0) == lines[0]
    assert StageResult("cam", "/r", done=2, skipped=1).summary() == "cam: 2 done, 0 failed; 1 already there"


def test_log_file_that_cannot_be_written_is_one_line(tmp_path, capsys):
    (tmp_path / "f").write_text("")
    assert run_cli(["--log-file", str(tmp_path / "f" / "x.log"), "toy", "make", "--out", str(tmp_path / "t"),
                    "--n", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --log-file") and len(err.strip().splitlines()) == 1


# ----------------------------------------------------------------------------- --force
def test_force_reruns_a_stage_with_other_parameters_in_the_same_run(toy_root, tmp_path, tiny_clip_path, capsys):
    import json

    from clip_es.rundir import RunDir

    run = tmp_path / "run"
    cam = ["cam", "-d", "toy", "-r", str(toy_root), "-o", str(run), "-m", str(tiny_clip_path), "-t", TEMPLATE,
           "--device", "cpu", "--limit", "3"]
    assert run_cli(cam) == 0
    assert run_cli(["refine", "--run", str(run), "--workers", "1"]) == 0
    assert run_cli(["eval", "--run", str(run)]) == 0
    assert set(json.loads((run / "eval.json").read_text())["stages"]) == {"cam", "caa", "crf", "masks"}
    old_cam = RunDir(run).stage_info("cam")
    capsys.readouterr()

    assert run_cli([*cam, "--caa-threshold", "0.5"]) == 2
    assert "re-run with --force" in capsys.readouterr().err
    assert run_cli([*cam, "--caa-threshold", "0.5", "--force"]) == 0
    err = capsys.readouterr().err
    assert "--force: moved the previous cam, refine outputs to" in err
    m = RunDir(run).read_manifest()
    assert set(m["stages"]) == {"cam"} and m["stages"]["cam"]["params"]["caa_threshold"] == 0.5
    assert m["stages"]["cam"]["status"] == "done"
    stale = {e["stage"]: e for e in m["stale"]}
    assert set(stale) == {"cam", "refine"} and stale["cam"]["hash"] == old_cam["hash"]
    assert "cam re-run with --force" in stale["refine"]["reason"]
    moved = run / stale["cam"]["moved_to"]
    assert len(list(moved.glob("*.npz"))) == 3 and (moved.parent / "refine" / "masks").is_dir()
    assert (moved.parent / "eval.json").is_file() and not (run / "eval.json").exists()
    assert len(list((run / "cam").glob("*.npz"))) == 3 and not (run / "refine").exists()
    # eval reports only what is current: no stale refine results
    assert run_cli(["eval", "--run", str(run), "--json"]) == 0
    assert set(json.loads(capsys.readouterr().out)["stages"]) == {"cam", "caa"}

    # refine: the same for its own parameters, cam untouched
    assert run_cli(["refine", "--run", str(run), "--workers", "1"]) == 0
    cam_files = {p.name: p.read_bytes() for p in (run / "cam").glob("*.npz")}
    assert run_cli(["refine", "--run", str(run), "--workers", "1", "--conf", "0.5"]) == 2
    assert run_cli(["refine", "--run", str(run), "--workers", "1", "--conf", "0.5", "--force"]) == 0
    m = RunDir(run).read_manifest()
    assert m["stages"]["refine"]["params"]["conf"] == 0.5 and set(m["stages"]) == {"cam", "refine"}
    assert [e["stage"] for e in m["stale"]] == ["cam", "refine", "refine"]
    assert {p.name: p.read_bytes() for p in (run / "cam").glob("*.npz")} == cam_files
    assert len(list((run / "refine" / "masks").glob("*.png"))) == 3


def test_force_is_refused_with_shards(toy_root, tmp_path, tiny_clip_path, capsys):
    assert run_cli(["cam", "-d", "toy", "-r", str(toy_root), "-o", str(tmp_path / "r"), "--shard", "0/2",
                    "--force"]) == 2
    assert "--force cannot be combined with --shard" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


# ----------------------------------------------------------------------------- item 9: demo table after a resume
def test_demo_table_after_resume_shows_compute_times(tmp_path, tiny_clip_path, monkeypatch):
    import copy

    import clip_es.demo as demo
    from clip_es.demo import TOY_RECIPE, DemoConfig, run_demo
    from clip_es.rundir import RunDir

    def recipe(cfg):
        r = copy.deepcopy(TOY_RECIPE)
        r["model"] = {"model": str(tiny_clip_path)}
        r["cam"]["templates"] = [TEMPLATE]
        r["refine"]["workers"] = 1
        r["train"].update(steps=2, batch_size=2, crop_size=64, device="cpu")
        return r

    monkeypatch.setattr(demo, "demo_recipe", recipe)
    cfg = DemoConfig(out=str(tmp_path / "demo"), n=10, device="cpu")
    first = run_demo(cfg, progress=False, echo=lambda s: None)
    assert "resumed" not in first.table() and "*" not in first.table()
    manifest = RunDir(first.run).read_manifest()["stages"]
    recorded = {k: manifest[k]["compute_seconds"] for k in ("cam", "refine", "segmenter")}
    assert all(v > 0 for v in recorded.values())

    again = run_demo(cfg, progress=False, echo=lambda s: None)
    rows = {r["stage"]: r for r in again.rows}
    for label, stage in (("CAM", "cam"), ("CRF", "refine"), ("segmenter", "segmenter")):
        assert rows[label]["resumed"] and rows[label]["seconds"] == pytest.approx(recorded[stage], abs=1e-3)
    assert again.seconds["cam"] < 60  # what skipping took, not shown
    table = again.table()
    assert "* resumed: outputs already in the run folder" in table
    cam_line = next(ln for ln in table.splitlines() if ln.startswith("CAM"))
    assert cam_line.endswith(f"{recorded['cam']:.0f}s*")


# ----------------------------------------------------------------------------- clipes run --set
def test_run_set_overrides_a_recipe(toy_root, tmp_path, tiny_clip_path, capsys):
    from clip_es.rundir import RunDir

    recipe = tmp_path / "r.toml"
    recipe.write_text('[dataset]\nkind = "toy"\nsplit = "train"\n\n[model]\nmodel = "clipes-tiny"\n\n'
                      '[cam]\ntemplates = ["a clean origami {}."]\ncaa_threshold = 0.4\n\n[refine]\nconf = 0.95\n')
    run = tmp_path / "run"
    code = run_cli(["run", str(recipe), "--root", str(toy_root), "--out", str(run),
                    "--set", f"cam.model={tiny_clip_path}", "--set", "cam.limit=2", "--set", "cam.device=cpu",
                    "--set", "cam.caa_threshold=0.5", "--set", "cam.scales=1.0,0.5",
                    "--set", f'cam.templates=["{TEMPLATE}"]', "--set", "refine.workers=1",
                    "--set", "refine.crf.iters=3", "--set", "refine.save_conf=true"])
    out = capsys.readouterr()
    assert code == 0, out.err
    m = RunDir(run).read_manifest()["stages"]
    cam = m["cam"]["params"]
    assert cam["caa_threshold"] == 0.5 and cam["scales"] == [1.0, 0.5] and cam["templates"] == [TEMPLATE]
    assert cam["model"]["source"] == str(tiny_clip_path)
    assert m["refine"]["params"]["crf_params"]["iters"] == 3
    assert len(list((run / "cam").glob("*.npz"))) == 2 and len(list((run / "refine" / "conf").glob("*.png"))) == 2


@pytest.mark.parametrize("item,message", [
    ("cam.modle=ViT-B-16", "--set cam.modle: unknown key 'modle' in [cam]; valid: "),
    ("cam.caa_threshold=abc", "--set cam.caa_threshold: expects a number, got 'abc'"),
    ("train.steps=1.5", "--set train.steps: expects a whole number or none, got '1.5'"),
    ("camm.model=x",
     "--set camm.model: unknown section 'camm'; valid: dataset, model, label, cam, refine, train, eval"),
    ("cam.model", "--set 'cam.model': expected SECTION.KEY=VALUE"),
    ("refine.crf.sxy=3", "unknown key 'sxy' in [refine.crf]; valid: bi_compat, bi_srgb, bi_sxy,"),
])
def test_run_set_mistakes_are_one_line(toy_root, tmp_path, capsys, item, message):
    recipe = Path(__file__).resolve().parents[1] / "pipelines" / "toy.toml"
    assert run_cli(["run", str(recipe), "--root", str(toy_root), "--out", str(tmp_path / "run"), "--set", item]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and message in err, err
    if "modle" in item:
        assert ", caa_threshold, " in err and ", model, " in err
    assert not (tmp_path / "run").exists()


def test_set_values_are_typed():
    from clip_es.errors import ConfigError
    from clip_es.recipe import apply_overrides

    r = {"dataset": {"kind": "toy"}, "cam": {}, "refine": {}, "eval": {}}
    o = apply_overrides(r, ["cam.flip=true", "cam.max_side=512", "cam.limit=none", "refine.conf=1",
                            "eval.stages=cam,caa", "model.pretrained=/m/ViT-B-16.pt", "cam.background=none"])
    assert o["cam"] == {"flip": True, "max_side": 512, "limit": None, "background": "none"}
    assert o["refine"]["conf"] == 1.0 and isinstance(o["refine"]["conf"], float)
    assert o["eval"]["stages"] == ["cam", "caa"] and o["model"]["pretrained"] == "/m/ViT-B-16.pt"
    assert r["cam"] == {}  # the input is not changed
    with pytest.raises(ConfigError, match=r"no \[train\] section"):
        apply_overrides(r, ["train.steps=5"])
    with pytest.raises(ConfigError, match="expects true or false"):
        apply_overrides(r, ["cam.flip=3"])


# ----------------------------------------------------------------------------- --ann-file
def test_coco_ann_file_on_the_cli(tmp_path, tiny_clip_path, capsys):
    import json

    from clip_es.rundir import RunDir
    from tests.test_datasets import _coco

    root = _coco(tmp_path)
    ann = tmp_path / "elsewhere" / "my_instances.json"
    ann.parent.mkdir()
    (root / "annotations" / "instances_val2014.json").rename(ann)
    run = tmp_path / "run"
    cam = ["cam", "-d", "coco", "-r", str(root), "-s", "val2014", "-o", str(run), "-m", str(tiny_clip_path),
           "-t", TEMPLATE, "--device", "cpu"]
    assert run_cli(cam) == 2
    assert "COCO annotation file" in capsys.readouterr().err and not run.exists()
    assert run_cli([*cam, "--ann-file", str(ann)]) == 0, capsys.readouterr().err
    m = RunDir(run).read_manifest()
    assert m["dataset"]["ann_file"] == str(ann.resolve()) and m["stages"]["cam"]["params"]["ann_file"] == str(ann.resolve())
    assert len(list((run / "cam").glob("*.npz"))) == 3
    # later stages reopen the dataset with the recorded annotation file
    assert run_cli(["refine", "--run", str(run), "--workers", "1"]) == 0, capsys.readouterr().err
    capsys.readouterr()
    assert run_cli(["eval", "--run", str(run), "--json"]) == 0, capsys.readouterr().err
    assert json.loads(capsys.readouterr().out)["stages"]["masks"]["images"] == 3
    assert run_cli(["cam", "-d", "toy", "-r", str(root), "-o", str(tmp_path / "r2"), "--ann-file", str(ann)]) == 2
    assert "--ann-file is for COCO" in capsys.readouterr().err


def test_cam_hash_without_ann_file_is_unchanged(tiny_clip):
    """Runs made before --ann-file existed resume: the option is left out of the hash when unset."""
    from clip_es.cam.run import CamConfig, stage_params

    p = stage_params(CamConfig(dataset="toy", root="r", split="train", out="o"), tiny_clip, [])
    assert "ann_file" not in p


# ----------------------------------------------------------------------------- item 8: messages name the right option
def test_run_folder_messages_do_not_say_out_to_run_commands(cam_run, tmp_path, capsys):
    run = Path(shutil.copytree(cam_run, tmp_path / "run"))
    assert run_cli(["refine", "--run", str(run), "--workers", "1", "--limit", "2"]) == 0
    capsys.readouterr()
    assert run_cli(["refine", "--run", str(run), "--workers", "1", "--limit", "2", "--conf", "0.5"]) == 2
    err = capsys.readouterr().err
    assert "already ran here with other parameters (changed: conf)" in err
    assert "--out" not in err and "use a new run folder, or re-run with --force" in err


def test_write_error_fixes_name_no_option(tmp_path):
    import errno

    from clip_es.rundir import write_error

    for code in (errno.ENOSPC, errno.EROFS, errno.EIO):
        msg = str(write_error(tmp_path / "x", OSError(code, os.strerror(code))))
        assert "--out" not in msg and str(tmp_path / "x") in msg
