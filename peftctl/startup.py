"""Heavy imports a command's process can skip.

`import peft` imports bitsandbytes (peft/helpers.py, and peft's layer dispatch when an adapter is attached), and
importing bitsandbytes wraps its default kernels in torch.compile, which imports torch's inductor compiler
(torch._inductor.compile_fx and what it pulls in): about 1 s of the 6-7 s of CPU time that `peftctl count-params`
takes on this 2-core machine, and far more where imports are slow (9.4 s of 10.9 s for `import peft` in one profile).
bitsandbytes also prints a kernel-loading failure on a CPU. Counting builds the model on the meta device and never
quantises it (params.py says why), so bitsandbytes is never needed there.

Hiding bitsandbytes is process-wide and sticky: peft and transformers cache "is bitsandbytes installed" on first
ask. It is therefore only done in a process that `main()` started for one command: for count-params always, and for
train once its recipe is read and says the run can never need bitsandbytes (`train_may_need_bitsandbytes`) -- never
inside the library, where the same process may load a 4-bit model next. A model's own code (trust_remote_code)
that imports bitsandbytes unconditionally would fail to build under count-params.

Where bitsandbytes is imported (a QLoRA run), its torch.compile wrappers are made on first call instead of at its
import (`defer_bitsandbytes_compile`): its import then costs 0.03-0.05 s instead of 1.15-1.35 s here, and the
inductor compiler is never imported unless one of those functions runs. They are its default (CPU) kernels: a CUDA
run calls bitsandbytes' CUDA kernels and peftctl's own, never them, so on a GPU the compiler's 2.7-3.2 s of
imports (measured in the memory plan's phase of the 8B QLoRA run) leave the time to the first step.
"""

from __future__ import annotations

import functools
import importlib.abc
import inspect
import logging
import os
import sys
import threading

# Third-party loggers that report, at import, optional kernels this machine lacks: advice for their developers,
# not for a user training a model (bitsandbytes on a CPU with AVX512-BF16: "Failed to load CPU gemm_4bit_forward
# from kernels-community ..."). They configure no level of their own, so a level set before the import holds.
CHATTY_LOGGERS = ("bitsandbytes.backends.cpu.ops",)

# commands whose whole process never needs bitsandbytes (count-params builds on the meta device, unquantised)
NO_BITSANDBYTES = frozenset({"count-params"})


def command_of(argv: list[str]) -> str | None:
    """The subcommand named on the command line (the first word that is not an option), if any."""
    return next((arg for arg in argv if not arg.startswith("-")), None)


_ONE_COMMAND = False  # set by prepare(): this process runs one command, then exits


def prepare(argv: list[str]) -> None:
    """Called by `main()` once, before the command runs, in a process that runs that one command and exits."""
    global _ONE_COMMAND
    _ONE_COMMAND = True
    if not os.environ.get("PEFTCTL_DEBUG"):  # PEFTCTL_DEBUG=1 shows everything
        for name in CHATTY_LOGGERS:
            logging.getLogger(name).setLevel(logging.ERROR)
    if command_of(argv) in NO_BITSANDBYTES:
        hide_bitsandbytes()
    else:
        defer_bitsandbytes_compile()


def hide_bitsandbytes() -> bool:
    """Make `import bitsandbytes` fail and importlib.util.find_spec('bitsandbytes') answer None, as if it were not
    installed: peft then imports without it and attaches plain layers. No-op (False) when it is already imported."""
    if "bitsandbytes" in sys.modules:
        return False
    sys.modules["bitsandbytes"] = None  # the import system's own marker for "not importable"
    return True


def hide_bitsandbytes_for_training(recipe) -> bool:
    """For `peftctl train` in a process of its own, once the recipe is read: hide bitsandbytes where the run can
    never need it. A bf16 LoRA run then skips its import, and the torch compiler it pulls in (2.7 s of the time to
    the first step on the GPU machine, 1.1 s here). True when hidden."""
    if not _ONE_COMMAND or train_may_need_bitsandbytes(recipe):
        return False
    return hide_bitsandbytes()


def train_may_need_bitsandbytes(recipe) -> bool:
    """Whether a training run of this (validated) recipe may import bitsandbytes: a quantised base -- the recipe's,
    QLoRA's, or a checkpoint saved quantised (its config's quantization_config, which transformers honours) --
    bitsandbytes' optimisers, or code that is not peftctl's (the model's own, a metric of the user's). A base whose
    config cannot be read here (a hub id) counts as one that may."""
    import json
    from pathlib import Path

    evaluation = recipe.evaluation
    user_metric = evaluation is not None and any(":" in m for m in (evaluation.metrics or []))
    if (recipe.quantization is not None or recipe.method.name == "qlora" or recipe.training.optimizer != "adamw"
            or recipe.model.trust_remote_code or user_metric):
        return True
    config = Path(recipe.model.name) / "config.json"
    try:
        return "quantization_config" in json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return True


def defer_bitsandbytes_compile() -> bool:
    """Have bitsandbytes' import (whenever it comes: peft imports it) run with a `torch.compile` that wraps a
    function lazily: the real torch.compile is called, with the same arguments, on the wrapper's first call, and
    what it returns is called from then on. torch.compile only wraps; compiling already waited for the first call.
    So bitsandbytes computes what it computed, and a failure to compile reaches its own fallback (`_try_torch_compile`
    calls the original function when the compiled one raises) at the first call instead of at the import. Anything
    but a plain function (a module) is compiled at once, and torch.compile is the caller's again after the import.
    Only in a process `main()` started for one command, like `hide_bitsandbytes`. False when bitsandbytes is already
    imported or the deferral is in place."""
    if "bitsandbytes" in sys.modules or any(isinstance(f, _DeferCompileFinder) for f in sys.meta_path):
        return False
    sys.meta_path.insert(0, _DeferCompileFinder())
    return True


class _DeferCompileFinder(importlib.abc.MetaPathFinder):
    """Finds bitsandbytes through the other finders and has its module executed with torch.compile deferred. It
    stays in place for availability checks (`importlib.util.find_spec`), which get the same spec and import
    nothing; once bitsandbytes is imported the import system no longer asks. A finder that itself asks
    `importlib.util.find_spec` while this one searches gets an answer without this one (no recursion), and a spec
    is wrapped once however often it is found."""

    def __init__(self):
        self._searching = threading.local()

    def find_spec(self, name, path=None, target=None):
        if name != "bitsandbytes" or name in sys.modules or getattr(self._searching, "active", False):
            return None
        self._searching.active = True
        try:
            for finder in sys.meta_path:
                if finder is self or not hasattr(finder, "find_spec"):
                    continue
                spec = finder.find_spec(name, path, target)
                if spec is not None:
                    loader = spec.loader
                    if (loader is not None and hasattr(loader, "exec_module")
                            and not isinstance(loader, _DeferCompileLoader)):
                        spec.loader = _DeferCompileLoader(loader)
                    return spec
            return None
        finally:
            self._searching.active = False


class _DeferCompileLoader(importlib.abc.Loader):
    """The package's own loader, its module executed with torch.compile deferred; afterwards the module names its
    own loader again, as if imported plainly."""

    def __init__(self, loader):
        self.loader = loader

    def __getattr__(self, name):  # get_source, is_package, resource readers: the loader's own
        if name == "loader":  # not set yet (a copy being made): no lookup through this method again
            raise AttributeError(name)
        return getattr(self.loader, name)

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        import torch

        compile_now = torch.compile
        torch.compile = _compile_on_first_call(compile_now)
        try:
            self.loader.exec_module(module)
        finally:
            torch.compile = compile_now
            module.__loader__ = self.loader
            if module.__spec__ is not None:
                module.__spec__.loader = self.loader


def _compile_on_first_call(compile_now):
    @functools.wraps(compile_now)
    def compile_later(model=None, **options):
        if model is None:  # used as @torch.compile(**options)
            return lambda fn: compile_later(fn, **options)
        if not inspect.isfunction(model):
            return compile_now(model, **options)
        compiled, failed = None, None

        @functools.wraps(model)
        def first_call_compiles(*args, **kwargs):
            nonlocal compiled, failed
            if failed is not None:  # as torch.compile at the import would have: it failed once, for good
                raise failed.with_traceback(None)  # (no traceback growing call after call)
            if compiled is None:
                try:
                    compiled = compile_now(model, **options)
                except Exception as e:
                    failed = e
                    raise
            return compiled(*args, **kwargs)

        return first_call_compiles

    return compile_later
