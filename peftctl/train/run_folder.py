"""The run folder (docs/RECIPE.md): which folder peftctl may write into, its lock, and its manifest run.json.

Files inside it are written through peftctl.files, so a reader never sees a half-written one.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from peftctl.errors import InvalidInput
from peftctl.files import alive, atomic_write_text

RUN_FILES = ("adapter", "merged", "checkpoints", "recipe.yaml", "run.json", "metrics.jsonl", "loss.png",
             "tensorboard")

LOCK_FILE = ".peftctl.lock"
_HELD: dict[str, int] = {}  # resolved output.dir -> the descriptor holding its lock in this process


class RunFolder:
    """output.dir. peftctl writes only into a folder that holds one of its runs (run.json says so) or into one where
    none of the run's names is taken; --force removes only what the previous run's manifest names, and only once
    the new run has validated its inputs (`clear_previous`); an advisory lock keeps a second run out."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._replace_previous = False

    adapter = property(lambda self: self.path / "adapter")
    merged = property(lambda self: self.path / "merged")
    checkpoints = property(lambda self: self.path / "checkpoints")
    recipe = property(lambda self: self.path / "recipe.yaml")
    manifest = property(lambda self: self.path / "run.json")
    metrics = property(lambda self: self.path / "metrics.jsonl")
    loss_plot = property(lambda self: self.path / "loss.png")
    tensorboard = property(lambda self: self.path / "tensorboard")

    def holds_a_run(self) -> bool:
        """A run.json written by peftctl: the only proof that the run names in this folder are ours."""
        return self.manifest.is_file() and "peftctl_version" in self.read_manifest()

    def claim(self, *, resume: bool, force: bool, inputs=()) -> None:
        """Make the folder ready for this run and lock it: refuse to overwrite another run unless --force or
        --resume, refuse files of a run's names that peftctl did not write, and refuse a folder that holds the
        run's own model or data. Nothing is deleted here (see `clear_previous`)."""
        self._create()
        for item in inputs:
            if _inside(Path(item), self.path):
                raise InvalidInput(f"output.dir {self.path} holds this run's own input {item}",
                                   hint="point output.dir at a folder of its own, e.g. --set output.dir=runs/NAME")
        self.lock()
        if self.holds_a_run():
            if not resume and not force:
                raise InvalidInput(f"output.dir {self.path} already holds a run",
                                   hint="continue it with --resume auto, replace it with --force, or change "
                                        "output.dir (--set output.dir=...)")
            self._replace_previous = force and not resume
            return
        foreign = [name for name in RUN_FILES if os.path.lexists(self.path / name)]
        if foreign:
            names = ", ".join(str(self.path / name) for name in foreign)
            raise InvalidInput(f"output.dir {self.path} holds {names}, which no peftctl run wrote (it has no run.json "
                               "of peftctl); a run would overwrite it", hint="choose an empty or new folder for "
                               "output.dir (--set output.dir=...); peftctl never replaces files it did not write, "
                               "not even with --force")

    def _create(self) -> None:
        text = str(self.path)
        if "\0" in text:
            raise InvalidInput(f"output.dir {text!r} contains a NUL byte", hint="give a plain folder path")
        if self.path.is_symlink() and not self.path.exists():
            raise InvalidInput(f"output.dir {self.path} is a broken or looping symbolic link",
                               hint="point output.dir at a real folder")
        if self.path.exists() and not self.path.is_dir():
            raise InvalidInput(f"output.dir {self.path} is a file, not a folder")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except (OSError, ValueError) as e:
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            raise InvalidInput(f"output.dir {self.path} cannot be created: {reason}",
                               hint="check the path and its permissions, or choose another output.dir") from None

    def lock(self) -> None:
        """An exclusive advisory lock (flock) on output.dir/.peftctl.lock, holding the holder's pid and host. The
        kernel drops it when the holder dies, so a lock left by a killed run is never in the way; where the
        filesystem has no flock, a holder on this host whose pid is gone counts as stale."""
        import fcntl
        import socket

        key = str(self.path.resolve())
        lock_path = self.path / LOCK_FILE
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise InvalidInput(f"output.dir {self.path}: cannot write its lock file ({e.strerror})",
                               hint="check the folder's permissions, or choose another output.dir") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise self._in_use(lock_path) from None
        except OSError:  # no flock here (some network filesystems): judge the recorded holder
            holder = _read_holder(lock_path)
            if holder and holder.get("pid") != os.getpid() and _holder_alive(holder):
                os.close(fd)
                raise self._in_use(lock_path) from None
        holder = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                             "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        os.ftruncate(fd, 0)
        os.pwrite(fd, holder.encode() + b"\n", 0)
        _HELD[key] = fd

    def _in_use(self, lock_path: Path) -> InvalidInput:
        holder = _read_holder(lock_path) or {}
        who = f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, since {holder.get('since', '?')}"
        return InvalidInput(f"output.dir {self.path} is in use by another peftctl run ({who})",
                            hint="wait for it to finish (or stop it), or choose another output.dir")

    def release(self) -> None:
        try:
            fd = _HELD.pop(str(self.path.resolve()), None)
        except (OSError, ValueError):
            return
        if fd is not None:
            os.close(fd)  # the lock goes with it; the file stays, so nobody can lock a different inode meanwhile

    def locked_here(self) -> bool:
        try:
            return str(self.path.resolve()) in _HELD
        except (OSError, ValueError):
            return False

    def clear_previous(self) -> None:
        """--force: remove what the previous run's manifest names, now that this run's inputs proved good."""
        if not self._replace_previous:
            return
        self._replace_previous = False
        names = self.read_manifest().get("run_files") or RUN_FILES
        for name in names:
            if name not in RUN_FILES:  # a manifest names only our own files; anything else is not ours to delete
                continue
            target = self.path / name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            elif os.path.lexists(target):
                target.unlink()

    def read_manifest(self) -> dict:
        try:
            return json.loads(self.manifest.read_text())
        except (OSError, json.JSONDecodeError):
            return {}

    def write_manifest(self, data: dict) -> None:
        # run_files: what --force may later delete here (our names only; see clear_previous)
        data = {**data, "run_files": list(RUN_FILES)}
        atomic_write_text(self.manifest, json.dumps(data, indent=2, default=str) + "\n")


def _inside(item: Path, folder: Path) -> bool:
    try:
        item, folder = Path(os.path.realpath(item)), Path(os.path.realpath(folder))
    except (OSError, ValueError):
        return False
    return item == folder or folder in item.parents


def _read_holder(lock_path: Path) -> dict | None:
    try:
        return json.loads(lock_path.read_text() or "null")
    except (OSError, ValueError):
        return None


def _holder_alive(holder: dict) -> bool:
    import socket

    if holder.get("host") != socket.gethostname():
        return True  # another machine's process: we cannot tell, so it holds the folder
    pid = holder.get("pid")
    return isinstance(pid, int) and alive(pid)
