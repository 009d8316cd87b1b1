"""The run directory: one folder per run, one sub-folder per stage (SPEC section 5).

Layout::

    RUN/manifest.json          dataset, model, per-stage params + hash, status, failures
    RUN/<stage>/config.json    that stage's frozen config
    RUN/<stage>/<id>.<ext>     one file per image, written atomically

A stage started into a RUN whose manifest holds the same stage with a different
parameter hash is refused (:class:`~clip_es.errors.RunDirError`), so stale and fresh
outputs never mix. Per-image files are written to a temp file in the same folder and
renamed into place, so a killed run leaves either a whole file or none. Temp files are
named ``.tmp-<pid>.<host>.<random>``; the next start sweeps those whose writer is gone
(a dead process of this host, or a file untouched for :data:`STALE_AFTER_S`), never a
live writer's, so a shard started later does not break one that is running. Manifest
updates take an exclusive file lock, so several processes (``--shard``, ``torchrun``)
can share one run.

A write that fails (disk full, read-only folder, permission) raises
:class:`OutputWriteError` naming the file and the fix; the target is left untouched and
no temp file remains.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import platform
import re
import socket
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from clip_es.errors import RunDirError

MANIFEST = "manifest.json"
_TMP_PREFIX = ".tmp-"
#: A temp file untouched for this long (seconds) is swept whoever wrote it (other hosts, reused pids).
STALE_AFTER_S = 3600.0
_HOST = re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:32]
_TMP_NAME = re.compile(r"^\.tmp-(\d+)\.([A-Za-z0-9]*)\.")


class OutputWriteError(RunDirError):
    """An output file could not be written (disk full, read-only or unwritable folder).

    Fatal for a stage: every later write would fail the same way. Files written before
    it are complete; the run resumes once the cause is fixed.
    """


def write_error(path: str | Path, e: OSError) -> OutputWriteError:
    """The :class:`OutputWriteError` for an ``OSError`` met while writing ``path``."""
    import errno

    reason = e.strerror or str(e)
    if e.errno == errno.ENOSPC or e.errno == errno.EDQUOT:
        fix = "free disk space (or write to another folder) and re-run the same command to resume"
    elif e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        fix = "the folder is not writable; choose a writable folder"
    else:
        fix = "check the output folder, or write to another one"
    return OutputWriteError(f"cannot write {path}: {reason}; {fix}")


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


def _default_file_mode() -> int:
    """``0o666`` minus the process umask (what ``open(path, "w")`` would give)."""
    um = os.umask(0)
    os.umask(um)
    return 0o666 & ~um


_FILE_MODE = _default_file_mode()


def atomic_write(path: str | Path, write: Callable[[Any], None], mode: str = "wb", fsync: bool = True) -> None:
    """Write ``path`` atomically: ``write(fileobj)`` into a temp file beside it, fsync, rename.

    ``fsync=False`` skips the fsync: still atomic for readers and against a killed process,
    but after a power loss the file may be empty or torn (for outputs that resume validates
    and recomputes, such as cam records).

    On any error the temp file is removed and ``path`` is untouched; an ``OSError``
    (disk full, read-only folder...) becomes :class:`OutputWriteError`, others are re-raised.
    """
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f"{_TMP_PREFIX}{os.getpid()}.{_HOST}.", dir=path.parent)
    except OSError as e:
        raise write_error(path, e) from e
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fchmod(f.fileno(), _FILE_MODE)  # mkstemp makes 0600; outputs get the usual umask'd mode
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):  # the error below is what matters; a leftover is swept later
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise write_error(path, e) from e
        raise


def atomic_write_bytes(path: str | Path, data: bytes, fsync: bool = True) -> None:
    atomic_write(path, lambda f: f.write(data), fsync=fsync)


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
        try:
            lock = open(self.path / ".manifest.lock", "a+")
        except OSError as e:
            raise write_error(self.path / ".manifest.lock", e) from e
        with lock:
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
            raise RunDirError(f"cannot create run folder {self.path}: {e.strerror}; choose a writable run folder") \
                from e
        if not os.access(self.path, os.W_OK):
            raise RunDirError(f"run folder {self.path} is not writable; choose a writable run folder")

    def update_top(self, **fields: Any) -> None:
        """Set top-level manifest fields (dataset, model, ...). Refuses to change a set ``dataset``."""
        with self._locked() as m:
            self._set_top(m, fields)

    def _set_top(self, m: dict[str, Any], fields: dict[str, Any]) -> None:
        if "dataset" in fields and m.get("dataset") not in (None, fields["dataset"]):
            raise RunDirError(f"{self.manifest_path}: this run was made for dataset {m['dataset']}, not "
                              f"{fields['dataset']}; use a new run folder")
        m.update(fields)
        m.setdefault("versions", library_versions())

    # ------------------------------------------------------------------ stages
    def stage_dir(self, stage: str) -> Path:
        return self.path / stage

    def stage_info(self, stage: str) -> dict[str, Any] | None:
        return self.read_manifest().get("stages", {}).get(stage)

    def begin_stage(self, stage: str, params: dict[str, Any], top: dict[str, Any] | None = None) -> Path:
        """Register (or re-enter) a stage with its parameters; return its folder.

        Args:
            stage: stage name (its folder name).
            params: the output-deciding parameters (hashed).
            top: top-level manifest fields to set (as :meth:`update_top`), written only when
                the checks pass, in the same locked update, so a refused run changes nothing.

        Raises:
            RunDirError: the stage exists in this run with different parameters, or ``top``
                names another dataset than the run's.
            OutputWriteError: the run folder cannot be written.
        """
        h = params_hash(params)
        with self._locked() as m:
            stages = m.setdefault("stages", {})
            old = stages.get(stage)
            if old is not None and old.get("hash") != h:
                raise self._changed_error(stage, _changed(params, old.get("params", {})))
            if top:
                self._set_top(m, top)
            if old is None:
                stages[stage] = {"params": params, "hash": h, "status": "running", "failed": {}}
            else:
                old["status"] = "running"
        d = self.stage_dir(stage)
        try:
            d.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise write_error(d, e) from e
        atomic_write_json(d / "config.json", params)
        self.sweep_temp(d)
        return d

    def _changed_error(self, stage: str, changed: list[str]) -> RunDirError:
        redo = ("re-run with --force to replace its outputs" if stage in FORCEABLE
                else f"delete {self.stage_dir(stage)} and its manifest entry to redo it")
        return RunDirError(f"{self.path}: stage '{stage}' already ran here with other parameters "
                           f"(changed: {', '.join(changed) or 'unknown'}); use a new run folder, or {redo}")

    def check_params(self, stage: str, params: dict[str, Any], ignore: tuple[str, ...] = ()) -> None:
        """Refuse early, writing nothing, when ``stage`` already ran here with parameters that differ
        from ``params`` in a key other than ``ignore`` (the same refusal :meth:`begin_stage` makes).

        For checks before a slow step: the cam stage compares everything but the model before
        loading the model; :meth:`begin_stage` still compares the whole set afterwards.
        """
        if not self.manifest_path.is_file():
            return
        old = self.read_manifest().get("stages", {}).get(stage)
        if old is None:
            return
        changed = [k for k in _changed(params, old.get("params", {})) if k not in ignore]
        if changed:
            raise self._changed_error(stage, changed)

    def check_writable(self) -> None:
        """Refuse, creating nothing, a run folder that could not be written: an existing one that is
        not a writable folder, or a new one whose nearest existing parent is not writable."""
        p = self.path
        if p.exists():
            if not p.is_dir():
                raise RunDirError(f"run folder {p} is a file; choose a run folder")
            try:  # a real write, not os.access: read-only mounts, ACLs and root squash all answer here
                fd, tmp = tempfile.mkstemp(prefix=f"{_TMP_PREFIX}{os.getpid()}.{_HOST}.", dir=p)
                os.close(fd)
                os.unlink(tmp)
            except OSError as e:
                raise RunDirError(f"run folder {p} is not writable ({e.strerror or e}); "
                                  "choose a writable run folder") from e
            return
        parent = p.absolute().parent
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
            raise RunDirError(f"cannot create run folder {p}: {parent} is not writable; choose a writable run folder")

    def retire_stage(self, stage: str, reason: str = "re-run with --force") -> tuple[list[str], Path | None]:
        """Move ``stage``'s outputs, and those of every stage computed from them, out of the way.

        For re-running a stage with other parameters in the same run (``--force``): the folders
        go to ``RUN/stale/<time>-<stage>/`` (nothing is deleted), their manifest entries move to
        the manifest's ``stale`` list (with ``moved_to`` and ``reason``), and ``RUN/eval.json``
        (results of the old outputs) goes with them, so ``clipes eval`` never reports stale
        results and the stage starts afresh. Downstream of ``cam`` is every other stage; of
        ``refine``, every stage but cam (trained segmenters). Returns the retired stage names and
        the folder they went to (``([], None)`` when the stage was not there).
        """
        with self._locked() as m:
            stages = m.setdefault("stages", {})
            if stage not in stages and not self.stage_dir(stage).exists():
                return [], None
            names = [stage] + [n for n in stages if n not in (stage, "cam")]  # everything is computed from cam
            dest = self.path / "stale" / f"{time.strftime('%Y%m%d-%H%M%S')}-{stage}"
            k = 1
            while dest.exists():
                k += 1
                dest = dest.with_name(f"{dest.name.split('~')[0]}~{k}")
            try:
                dest.mkdir(parents=True)
                for n in names:
                    if self.stage_dir(n).exists():
                        os.replace(self.stage_dir(n), dest / n)
                if (self.path / "eval.json").is_file():
                    os.replace(self.path / "eval.json", dest / "eval.json")
            except OSError as e:
                raise write_error(dest, e) from e
            when = time.strftime("%Y-%m-%dT%H:%M:%S")
            for n in names:
                entry = stages.pop(n, None) or {}
                m.setdefault("stale", []).append({"stage": n, "params": entry.get("params"), "hash": entry.get("hash"),
                                                  "moved_to": str((dest / n).relative_to(self.path)),
                                                  "reason": reason if n == stage else f"{stage} {reason}",
                                                  "time": when})
        return names, dest

    def record(self, stage: str, *, failed: dict[str, str] | None = None, done: list[str] | None = None,
               status: str | Callable[[dict[str, Any]], str] | None = None, **extra: Any) -> None:
        """Merge per-image failures (``{id: reason}``), clear failures of ``done`` ids, set status/extra.

        ``status`` may be a function of the merged stage entry, evaluated under the manifest
        lock, so processes sharing a run (shards, torchrun ranks) agree on the final status.
        """
        with self._locked() as m:
            st = m["stages"][stage]
            fails = st.setdefault("failed", {})
            for i in done or []:
                fails.pop(i, None)
            fails.update(failed or {})
            if callable(status):
                st["status"] = status(st)
            elif status:
                st["status"] = status
            st.update(extra)

    @staticmethod
    def sweep_temp(folder: Path) -> int:
        """Remove temp files a killed writer left in ``folder``; return how many.

        A temp file is left alone while its writer may still be running: one named with
        a live process id of this host (this process included), or one from another host
        younger than :data:`STALE_AFTER_S`. Unparsable ``.tmp-*`` names are swept.
        """
        n = 0
        for p in folder.glob(_TMP_PREFIX + "*"):
            if _writer_may_be_alive(p):
                continue
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
                n += 1
        return n


#: Stages ``--force`` can redo in place (:meth:`RunDir.retire_stage`).
FORCEABLE = ("cam", "refine")


def _changed(new: dict[str, Any], old: dict[str, Any]) -> list[str]:
    """Keys whose values differ between two parameter dicts (missing counts as ``None``)."""
    return sorted(k for k in set(new) | set(old) if new.get(k) != old.get(k))


def _writer_may_be_alive(tmp: Path) -> bool:
    """Whether the process that writes temp file ``tmp`` may still be running."""
    m = _TMP_NAME.match(tmp.name)
    if m is None:
        return False
    try:
        if time.time() - tmp.stat().st_mtime >= STALE_AFTER_S:  # no write stalls that long; pid maybe reused
            return False
    except FileNotFoundError:
        return False
    pid, host = int(m.group(1)), m.group(2)
    if host != _HOST:
        return True
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a live process of another user
        return True
    try:  # a killed process nobody has reaped yet (a zombie) still answers kill(pid, 0)
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True
