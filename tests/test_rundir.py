"""Run-directory primitives."""

from __future__ import annotations


def test_atomic_writes_get_normal_file_permissions(tmp_path):
    import os

    from clip_es.rundir import atomic_write_bytes

    atomic_write_bytes(tmp_path / "x.bin", b"1")
    um = os.umask(0)
    os.umask(um)
    assert (tmp_path / "x.bin").stat().st_mode & 0o777 == 0o666 & ~um
