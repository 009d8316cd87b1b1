"""Issue #16 item 1 and part of 11: command-line mistakes print click's usual usage paragraph and
exit 2 with no traceback, whatever typer (and click) version is installed; ``--version``; flags
shown as flags in ``--help``.

The usage errors run as real subprocesses (``python -m clip_es``), as a user meets them.
"""

from __future__ import annotations

import importlib.metadata as md
import os
import subprocess
import sys

import pytest

from tests.conftest import run_cli


def _clipes(*argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "100"}
    return subprocess.run([sys.executable, "-m", "clip_es", *argv], capture_output=True, text=True, env=env,
                          timeout=120)


USAGE_ERRORS = [
    (["cam", "-d", "voc", "-r", "x"], "Missing option '--out'"),
    (["--limt", "3"], "No such option: --limt"),
    (["cam", "-d", "voc", "-r", "x", "-o", "y", "--limit", "abc"], "Invalid value for '--limit'"),
    (["bogus"], "No such command 'bogus'"),
    (["refine", "--conf", "0.5"], "Missing option '--run'"),
    (["toy", "make"], "Missing option '--out'"),
    (["eval", "--run", "r", "--json", "--stage"], "requires an argument"),
]


@pytest.mark.parametrize("argv,message", USAGE_ERRORS, ids=[" ".join(a) for a, _ in USAGE_ERRORS])
def test_usage_error_is_one_paragraph_and_exit_2(argv, message):
    p = _clipes(*argv)
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert sum(ln.startswith("Usage: clipes") for ln in lines) == 1, p.stderr
    assert len(lines) <= 4, p.stderr  # Usage, Try '... --help', Error
    assert lines[-1].startswith("Error: ") and message in lines[-1], p.stderr
    assert p.stdout == ""


def test_usage_error_in_process_is_exit_2_without_exception(capsys):
    assert run_cli(["cam", "-d", "voc", "-r", "x", "--limit", "abc", "-o", "y"]) == 2
    err = capsys.readouterr().err
    assert "Invalid value for '--limit'" in err and "Traceback" not in err


def test_usage_errors_of_any_click_copy_are_recognised():
    """typer >= 0.29 raises its bundled click's exceptions, older typer the click package's."""
    import typer

    from clip_es.cli import _is_usage_error

    click = pytest.importorskip("click")  # the separate package: typer < 0.29 parses with it

    assert _is_usage_error(click.UsageError("x"))
    assert _is_usage_error(click.BadParameter("x"))
    bundled = getattr(typer, "_click", None)
    if bundled is not None:
        assert _is_usage_error(bundled.exceptions.NoSuchOption("--limt"))
    assert not _is_usage_error(ValueError("x"))


def test_version():
    p = _clipes("--version")
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == f"clipes {md.version('clip_es')}"
    assert p.stderr == ""


def _commands():
    import typer

    from clip_es.cli import app

    group = typer.main.get_command(app)
    out = []
    for name, cmd in group.commands.items():
        if hasattr(cmd, "commands"):
            out += [[name, sub] for sub in cmd.commands]
        else:
            out.append([name])
    return out


def test_help_shows_flags_as_flags(capsys):
    assert run_cli(["--help"]) == 0
    text = capsys.readouterr().out
    assert "--version" in text and "<bool>" not in text
    for argv in _commands():
        assert run_cli([*argv, "--help"]) == 0, argv
        text = capsys.readouterr().out
        assert "<bool>" not in text, (argv, text)
        assert "Traceback" not in text
    assert run_cli(["cam", "--help"]) == 0
    flip = [ln for ln in capsys.readouterr().out.splitlines() if "--flip" in ln]
    assert flip and flip[0].split()[0] == "--flip" and flip[0].split()[1] != "<bool>"


def test_typer_range_is_declared():
    """pyproject gives typer a tested range (a fresh install takes the newest the range allows)."""
    from pathlib import Path

    import tomllib

    deps = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]["dependencies"]
    typer_dep = [d for d in deps if d.replace(" ", "").startswith("typer")]
    assert typer_dep and "<" in typer_dep[0], typer_dep
