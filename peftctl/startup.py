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
"""

from __future__ import annotations

import logging
import os
import sys

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
