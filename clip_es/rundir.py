"""The run directory: one folder per run, one sub-folder per stage (SPEC section 5).

Layout::

    RUN/manifest.json          dataset, model, per-stage params + hash, status, failures
    RUN/<stage>/config.json    that stage's frozen config
    RUN/<stage>/<id>.<ext>     one file per image, written atomically

A stage started into a RUN whose manifest holds the same stage with a different
parameter hash is refused (:class:`~clip_es.errors.RunDirError`), so stale and fresh
outputs never mix. Per-image files are written to a temp file in the same folder and
renamed into place, so a killed run leaves either a whole file or none (temp files of a
killed run are swept at the next start). Manifest updates take an exclusive file lock,
so several processes (``--shard``, ``torchrun``) can share one run.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import platform
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

from clip_es.errors import RunDirError

MANIFEST = "manifest.json"
_TMP_PREFIX = ".tmp-"


def params_hash(params: dict[str, Any]) -> str:
    """Stable short hash of a JSON-serialisable parameter dict."""
    blob = json.dumps(params, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """SHA-256 hex digest of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def atomic_write(path: str | Path, write: Callable[[Any], None], mode: str = "wb") -> None:
    """Write ``path`` atomically: ``write(fileobj)`` into a temp file beside it, fsync, rename.

    On any error the temp file is removed and the error re-raised; ``path`` is untouched.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX, dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2, sort_keys=True, default=str)), mode="w")


def library_versions() -> dict[str, str]:
    """Versions of the libraries whose behaviour affects outputs."""
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("clip_es", "torch", "open_clip_torch", "numpy", "opencv-python-headless", "pydensecrf2", "timm"):
        with contextlib.suppress(md.PackageNotFoundError):
            out[pkg] = md.version(pkg)
    return out


class RunDir:
    """A run directory. Cheap to construct; touches the disk only when asked."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    # ------------------------------------------------------------------ manifest
    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST

    def read_manifest(self) -> dict[str, Any]:
        """The manifest as a dict (empty skeleton when the run is new)."""
        try:
            return json.loads(self.manifest_path.read_text())
        except FileNotFoundError:
            return {"stages": {}}
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RunDirError(f"{self.manifest_path} is not valid JSON ({e}); "
                              "move it away or use a new run folder") from e

    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict[str, Any]]:
        """Read-modify-write the manifest under an exclusive lock."""
        self.ensure()
        with open(self.path / ".manifest.lock", "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                m = self.read_manifest()
                yield m
                atomic_write_json(self.manifest_path, m)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def ensure(self) -> None:
        """Create the run folder; a clear error if that is impossible."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise RunDirError(f"cannot create run folder {self.path}: {e.strerror}; choose a writable --out") from e
        if not os.access(self.path, os.W_OK):
            raise RunDirError(f"run folder {self.path} is not writable; choose a writable --out")

    def update_top(self, **fields: Any) -> None:
        """Set top-level manifest fields (dataset, model, ...). Refuses to change a set ``dataset``."""
        with self._locked() as m:
            for k, v in fields.items():
                if k == "dataset" and m.get(k) not in (None, v):
                    raise RunDirError(f"{self.manifest_path}: this run was made for dataset {m[k]}, not {v}; "
                                      "use a new run folder")
                m[k] = v
            m.setdefault("versions", library_versions())

    # ------------------------------------------------------------------ stages
    def stage_dir(self, stage: str) -> Path:
        return self.path / stage

    def stage_info(self, stage: str) -> dict[str, Any] | None:
        return self.read_manifest().get("stages", {}).get(stage)

    def begin_stage(self, stage: str, params: dict[str, Any]) -> Path:
        """Register (or re-enter) a stage with its parameters; return its folder.

        Raises:
            RunDirError: the stage exists in this run with different parameters.
        """
        h = params_hash(params)
        with self._locked() as m:
            stages = m.setdefault("stages", {})
            old = stages.get(stage)
            if old is not None and old.get("hash") != h:
                changed = sorted(k for k in set(params) | set(old.get("params", {}))
                                 if params.get(k) != old.get("params", {}).get(k))
                raise RunDirError(
                    f"{self.path}: stage '{stage}' already ran here with other parameters "
                    f"(changed: {', '.join(changed) or 'unknown'}); use a new --out folder, or delete "
                    f"{self.stage_dir(stage)} and its manifest entry to redo it")
            if old is None:
                stages[stage] = {"params": params, "hash": h, "status": "running", "failed": {}}
            else:
                old["status"] = "running"
        d = self.stage_dir(stage)
        d.mkdir(parents=True, exist_ok=True)
        atomic_write_json(d / "config.json", params)
        self.sweep_temp(d)
        return d

    def record(self, stage: str, *, failed: dict[str, str] | None = None, done: list[str] | None = None,
               status: str | None = None, **extra: Any) -> None:
        """Merge per-image failures (``{id: reason}``), clear failures of ``done`` ids, set status/extra."""
        with self._locked() as m:
            st = m["stages"][stage]
            fails = st.setdefault("failed", {})
            for i in done or []:
                fails.pop(i, None)
            fails.update(failed or {})
            if status:
                st["status"] = status
            st.update(extra)

    @staticmethod
    def sweep_temp(folder: Path) -> int:
        """Remove temp files a killed writer left in ``folder``; return how many."""
        n = 0
        for p in folder.glob(_TMP_PREFIX + "*"):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
                n += 1
        return n
