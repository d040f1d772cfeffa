"""Triton's cache key computed in a background thread during setup (peftctl/train/triton_key.py): only where the
thread would import nothing, its result kept where the first kernel launch looks, and joined before the first
step."""

import functools
import sys
import threading
import types

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
    for name in ("triton.backends.nvidia", "triton.language.extra", "triton.language.extra.cuda"):
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
    assert triton_key.start("cpu") is None and triton_key.start("mps") is None
    sys.modules["triton.runtime.cache"].triton_key = lambda: "uncached"  # not the lru-cached function relied on
    assert triton_key.start("cuda") is None
    monkeypatch.delitem(sys.modules, "triton.runtime.cache")
    assert triton_key.start("cuda") is None  # triton not imported at all
    assert ran_in == [] and key.cache_info().currsize == 0


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
    """What the thread relies on, checked against the installed triton: after `import triton`, every package its
    key's walk imports is imported, and computing the key imports no module."""
    triton = pytest.importorskip("triton")
    import triton.runtime.cache as cache

    assert hasattr(cache.triton_key, "cache_info")
    assert triton_key._walked_packages_imported(triton)
    before = set(sys.modules)
    assert cache.triton_key()
    assert set(sys.modules) - before == set()


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
    loop.train(loaded, loop.TrainOptions(quiet=True))
    assert events == ["started on cpu", "joined", "step"]
