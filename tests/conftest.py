"""Shared fixtures: a random tiny CLIP checkpoint (OpenAI layout) and a tiny toy dataset.

Nothing here touches the network; everything is seeded.
"""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

import pytest
import torch

from clip_es.model.tiny import TinyClipConfig, build_tiny_clip

#: Small enough for fast tests, same layout as clipes-tiny (3 blocks so CAA sees >1 attention map).
TEST_CLIP = TinyClipConfig(embed_dim=64, image_size=64, patch_size=16, vision_width=64, vision_layers=3,
                           text_width=64, text_layers=1)


@pytest.fixture(scope="session")
def tiny_clip_path(tmp_path_factory) -> Path:
    """Path to a seeded random tiny CLIP saved as an OpenAI-layout fp32 state dict."""
    torch.manual_seed(0)
    model = build_tiny_clip(TEST_CLIP)
    path = tmp_path_factory.mktemp("clip") / "tiny-test-clip.pt"
    torch.save({k: v for k, v in model.state_dict().items() if k != "attn_mask"}, path)
    return path


@pytest.fixture(scope="session")
def tiny_clip(tiny_clip_path):
    """The loaded :class:`~clip_es.model.resolve.ClipModel` of :func:`tiny_clip_path`."""
    from clip_es.model.resolve import load_clip

    return load_clip(str(tiny_clip_path))


@pytest.fixture(scope="session")
def toy_root(tmp_path_factory) -> Path:
    """A 12-image toy dataset (VOC layout; val = last 3). Treat as read-only."""
    from clip_es.data.toy import make_toy

    return make_toy(tmp_path_factory.mktemp("toy") / "toy", n=12, seed=5, val_fraction=0.25, progress=False)


def run_cli(argv: list[str]) -> int:
    """Run ``clipes ARGV`` in-process and return its exit code (0 when ``main`` returns)."""
    from clip_es.cli import main

    try:
        main(argv)
    except SystemExit as e:
        return int(e.code or 0)
    return 0



def make_read_only(folders: list[Path], root: Path, monkeypatch) -> None:
    """Make ``folders`` unwritable: by file mode, or (as root, which ignores modes: CI
    containers) by making every temp file under ``root`` fail as a read-only file system would."""
    if os.geteuid() != 0:
        for d in folders:
            d.chmod(0o555)
        return
    real = tempfile.mkstemp

    def read_only(*a, dir=None, **kw):
        if dir is not None and Path(dir).resolve().is_relative_to(root.resolve()):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        return real(*a, dir=dir, **kw)

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
