"""Writing files and folders without ever leaving a half-written one behind.

Every file is written to a temporary name beside its destination, flushed to disk, then renamed over it; folders
(adapter/, merged/, checkpoints) are built under a temporary name and renamed into place. A reader therefore sees
the old version or the new one, never a mix. Training, merging and evaluation all write this way.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path


def current_umask() -> int:
    """The process umask (reading it means setting it; it is put back at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    try:
        os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp makes it 0600; files follow the umask, as other tools'
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def follow_umask(path: Path) -> None:
    """Give a staged folder and what was written into it the modes the umask asks for: mkdtemp makes folders 0700
    and some writers (safetensors) make files 0600, so a run folder would mix modes other tools do not."""
    mask = current_umask()
    os.chmod(path, 0o777 & ~mask)
    for root, dirs, files in os.walk(path):
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o777 & ~mask)
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~mask)


def sync_tree(path: Path) -> None:
    for root, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(Path(root))


@contextmanager
def staged_dir(final: Path, label: str = "tmp"):
    """Yield a folder beside `final` named after this process; on success it replaces `final` in one rename (the
    previous folder is put back if that rename fails). Stale folders of the same label left by a killed process
    are removed first."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    for kind in (label, "old"):
        for stale in final.parent.glob(f".{final.name}.{kind}-*"):
            pid = stale.name[len(f".{final.name}.{kind}-"):].split("-")[0]
            if pid.isdigit() and not alive(int(pid)):
                shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.{label}-{os.getpid()}-", dir=str(final.parent)))
    try:
        yield tmp
        follow_umask(tmp)
        sync_tree(tmp)
        old = None
        if final.exists():
            old = final.parent / f".{final.name}.old-{os.getpid()}-{time.monotonic_ns()}"
            os.replace(final, old)
        try:
            os.replace(tmp, final)
        except BaseException:
            if old is not None:
                os.replace(old, final)  # put the previous folder back
            raise
        fsync_dir(final.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True
