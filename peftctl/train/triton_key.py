"""Triton's cache key, computed in the background while the model loads instead of inside the first step.

Triton names every compiled kernel in its cache by a key that starts with `triton_key()`: a SHA-256 of its own
sources and of its compiled library (libtriton, hundreds of MB). A process computes it once, at its first kernel
launch -- in a training run, inside the first step: 0.42-0.65 s of it on the H200 machine (cProfile of the first
step, benchmarks/2026-12-02/issue21), on every run, the Triton cache warm or not. Reading a file and hashing a
large buffer both release the GIL, so a thread started before the model loads computes it while the main thread
works; `triton_key` keeps its result (functools.lru_cache) and the first step finds it there.

The thread must not import: an import in a second thread while the main thread imports (setup does, through the
model load) can meet Python's import locks in a cycle, and then one of them sees a half-initialised module.
`triton_key` imports the packages under triton's compiler, backends and language folders to list their modules,
so the thread starts only where every one of them is imported already (`import triton` imports them all, and
transformers' import of torch's compiler imports triton); elsewhere nothing changes, and the first launch
computes the key as before. The caller joins the thread before the first step, so the key is never computed
twice at once.
"""

from __future__ import annotations

import inspect
import os
import sys
import threading


def start(device_type: str) -> threading.Thread | None:
    """A daemon thread computing Triton's cache key, or None where there is nothing to gain or it would import:
    not a CUDA run, triton not imported, the key already computed, a package the key's walk imports not imported
    yet, or a triton whose `triton_key` is not the cached function this relies on."""
    cache = sys.modules.get("triton.runtime.cache")
    key = getattr(cache, "triton_key", None)
    if device_type != "cuda" or key is None or not hasattr(key, "cache_info") or key.cache_info().currsize:
        return None
    if not _walked_packages_imported(sys.modules.get("triton")):
        return None
    thread = threading.Thread(target=_compute, args=(key,), name="peftctl-triton-key", daemon=True)
    try:
        thread.start()
    except RuntimeError:  # no thread to be had (a process at its limit): the first launch computes the key
        return None
    return thread


def _compute(key) -> None:
    try:
        key()
    except Exception:  # noqa: BLE001 - nothing kept; the first launch computes it and reports what fails
        pass


def _walked_packages_imported(triton) -> bool:
    """Whether every package `triton_key` imports (pkgutil.walk_packages imports each package below the folders
    it walks, to list its modules) is imported already. A package as pkgutil sees one: a folder, linked or not,
    with an `__init__` module of any suffix."""
    root = os.path.dirname(getattr(triton, "__file__", None) or "")
    if not root:
        return False
    for folder in ("compiler", "backends", "language"):
        base = os.path.join(root, folder)
        for path, subfolders, files in os.walk(base, followlinks=True):
            if path == base:
                continue
            if not any(inspect.getmodulename(file) == "__init__" for file in files):
                subfolders[:] = []  # not a package: walk_packages does not look inside
                continue
            name = f"triton.{folder}." + os.path.relpath(path, base).replace(os.sep, ".")
            if name not in sys.modules:
                return False
    return True
