"""Triton's cache key computed in a background thread during setup (peftctl/train/triton_key.py): only where the
thread would import nothing, its result kept where the first kernel launch looks, and joined before the first
step."""

import functools
import json
import sys
import threading
import types
from pathlib import Path

import pytest

from peftctl.train import triton_key


def _fake_triton(tmp_path, monkeypatch, *, imported=True, raises=False):
    """A triton package tree on disk (packages below compiler/, backends/ and language/, and a folder without
    __init__.py whose subfolder is a package, which pkgutil.walk_packages never reaches), its packages in
    sys.modules where `imported`, and an lru-cached `triton_key` that records the threads it ran in."""
    root = tmp_path / "triton"
    for package in ("", "compiler", "backends", "backends/nvidia", "language", "language/extra",
                    "language/extra/cuda", "language/not_a_package/below"):
        (root / package).mkdir(parents=True, exist_ok=True)
        (root / package / "__init__.py").write_text("")
    (root / "backends" / "nvidia" / "__init__.py").rename(root / "backends" / "nvidia" / "__init__.pyc")
    (tmp_path / "linked").mkdir()  # a package folder linked in: pkgutil follows the link
    (tmp_path / "linked" / "__init__.py").write_text("")
    (root / "language" / "linked").symlink_to(tmp_path / "linked", target_is_directory=True)
    ran_in = []

    @functools.lru_cache
    def key():
        ran_in.append(threading.current_thread().name)
        if raises:
            raise OSError("libtriton unreadable")
        return "3.x-hashes"

    triton = types.ModuleType("triton")
    triton.__file__ = str(root / "__init__.py")
    cache = types.ModuleType("triton.runtime.cache")
    cache.triton_key = key
    monkeypatch.setitem(sys.modules, "triton", triton)
    monkeypatch.setitem(sys.modules, "triton.runtime.cache", cache)
    for name in ("triton.backends.nvidia", "triton.language.extra", "triton.language.linked",
                 "triton.language.extra.cuda"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    if not imported:  # (the real one may be imported by another test)
        monkeypatch.delitem(sys.modules, "triton.language.extra.cuda")
    return key, ran_in


def test_the_key_is_computed_in_a_thread_and_kept_for_the_first_launch(tmp_path, monkeypatch):
    key, ran_in = _fake_triton(tmp_path, monkeypatch)
    thread = triton_key.start("cuda")
    assert thread is not None and thread.daemon
    thread.join(timeout=10)
    assert ran_in == ["peftctl-triton-key"]
    assert key() == "3.x-hashes" and ran_in == ["peftctl-triton-key"]  # the launch finds it: not computed again
    assert triton_key.start("cuda") is None  # already there: no second thread


def test_no_thread_where_it_would_import_or_gain_nothing(tmp_path, monkeypatch):
    key, ran_in = _fake_triton(tmp_path, monkeypatch, imported=False)
    assert triton_key.start("cuda") is None  # a package the key's walk imports is not imported yet
    monkeypatch.setitem(sys.modules, "triton.language.extra.cuda", types.ModuleType("triton.language.extra.cuda"))
    for package in ("triton.backends.nvidia", "triton.language.linked"):  # an __init__.pyc, a linked folder
        with monkeypatch.context() as patched:
            patched.delitem(sys.modules, package)
            assert triton_key.start("cuda") is None
    assert triton_key.start("cpu") is None and triton_key.start("mps") is None
    sys.modules["triton.runtime.cache"].triton_key = lambda: "uncached"  # not the lru-cached function relied on
    assert triton_key.start("cuda") is None
    monkeypatch.delitem(sys.modules, "triton.runtime.cache")
    assert triton_key.start("cuda") is None  # triton not imported at all
    assert ran_in == [] and key.cache_info().currsize == 0


def test_no_thread_to_be_had_leaves_the_key_to_the_first_launch(tmp_path, monkeypatch):
    key, ran_in = _fake_triton(tmp_path, monkeypatch)

    def refused(self):
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(threading.Thread, "start", refused)
    assert triton_key.start("cuda") is None and ran_in == []


def test_a_failing_key_leaves_nothing_behind(tmp_path, monkeypatch):
    key, ran_in = _fake_triton(tmp_path, monkeypatch, raises=True)
    escaped = []
    monkeypatch.setattr(threading, "excepthook", lambda args: escaped.append(args.exc_value))
    thread = triton_key.start("cuda")
    thread.join(timeout=10)
    assert ran_in == ["peftctl-triton-key"] and escaped == [] and key.cache_info().currsize == 0
    with pytest.raises(OSError, match="unreadable"):  # the first launch computes it again and reports the failure
        key()


def test_the_real_triton_key_imports_nothing_once_triton_is_imported():
    """What the thread relies on, checked against the installed triton in a process that imported triton and
    nothing more: every package its key's walk imports is imported, and computing the key imports no module."""
    import subprocess

    pytest.importorskip("triton")
    code = ("import sys, triton, triton.runtime.cache as cache\n"
            "from peftctl.train import triton_key\n"
            "ready, cached = triton_key._walked_packages_imported(triton), hasattr(cache.triton_key, 'cache_info')\n"
            "before = set(sys.modules)\n"
            "key = cache.triton_key()\n"
            "print(ready, cached, bool(key), sorted(set(sys.modules) - before))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["True", "True", "True", "[]"]


def test_setup_joins_the_thread_before_the_first_step(tiny_model, write_recipe, monkeypatch):
    from peftctl.recipe.loader import load_recipe
    from peftctl.train import loop

    events = []

    class Thread:
        def join(self):
            events.append("joined")

    monkeypatch.setattr(triton_key, "start", lambda device_type: events.append(f"started on {device_type}")
                        or Thread())
    forward_backward = loop.forward_backward
    monkeypatch.setattr(loop, "forward_backward", lambda *a, **k: events.append("step") or forward_backward(*a, **k))
    loaded = load_recipe(str(write_recipe(tiny_model("llama"), training={"max_steps": 1, "micro_batch_size": 2})),
                         [])
    result = loop.train(loaded, loop.TrainOptions(quiet=True))
    assert events == ["started on cpu", "joined", "step"]
    manifest = json.loads((Path(result.run_dir) / "run.json").read_text())
    assert manifest["fast_path"]["triton_key_in_background"] is True  # said where it happened

    monkeypatch.setattr(triton_key, "start", lambda device_type: None)
    again = load_recipe(str(write_recipe(tiny_model("llama"), "again.yaml", out="again",
                                         training={"max_steps": 1, "micro_batch_size": 2})), [])
    manifest = json.loads((Path(loop.train(again, loop.TrainOptions(quiet=True)).run_dir) / "run.json").read_text())
    assert manifest["fast_path"]["triton_key_in_background"] is False
