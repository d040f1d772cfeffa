"""The GPU fast path: liger-kernel's fused RMSNorm, RoPE and SwiGLU kernels, when installed (`pip install
peftctl[gpu]`). Everything works without it; the CPU never uses it."""

from __future__ import annotations

import contextlib
import importlib
import io
import logging
import os
import sys
import warnings

# Model types whose logits are exactly lm_head(final hidden state): no soft-capping or scaling, so the fused
# linear cross-entropy (which never materialises the logits) computes the same loss.
PLAIN_HEAD_MODEL_TYPES = {"llama", "mistral", "qwen2", "qwen3", "phi3"}


def liger_available() -> bool:
    try:
        import_quietly("liger_kernel.transformers")
    except Exception:  # noqa: BLE001 - ImportError, or triton failing to initialise
        return False
    return True


def import_quietly(name: str, logger_prefix: str = "liger_kernel") -> str:
    """Import a module without its import-time chatter reaching the user's terminal; returns what it printed.

    liger-kernel 0.8 logs "Backend impl ... could not be imported" for each optional backend it lacks (CuTe DSL,
    Ascend), on every rank and also under --quiet, through a logger it configures itself (so setting its level
    beforehand does not hold) -- at import and again when an op's backends are first looked up (when the kernels
    are applied). During the import, logging below ERROR is disabled and stdout/stderr go to a buffer; afterwards
    its loggers are left at ERROR, so the lazy lookups stay quiet too. PEFTCTL_DEBUG=1 lets everything through.
    """
    if name in sys.modules or os.environ.get("PEFTCTL_DEBUG"):
        importlib.import_module(name)
        return ""
    buffer = io.StringIO()
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
            warnings.simplefilter("ignore")
            importlib.import_module(name)
    finally:
        logging.disable(previous)
        _quiet_loggers(logger_prefix, buffer)
    return buffer.getvalue()


def _quiet_loggers(prefix: str, buffer) -> None:
    """Its loggers to errors-only, and any handler made during the import back onto the real stderr."""
    for logger_name in list(logging.root.manager.loggerDict):
        if logger_name == prefix or logger_name.startswith(prefix + "."):
            logger = logging.getLogger(logger_name)
            logger.setLevel(logging.ERROR)
            for handler in logger.handlers:
                if getattr(handler, "stream", None) is buffer:
                    handler.setStream(sys.stderr)


def apply_fast_kernels(model, device) -> list[str]:
    """Patch the model's norms, rotary embedding and MLP with liger's kernels; returns what was applied.

    Must run before the adapter is attached: the MLP replacement still calls the layer's own gate/up/down modules,
    which peft then wraps as usual.
    """
    if device.type != "cuda" or not liger_available():
        return []
    from liger_kernel.transformers import monkey_patch

    model_type = getattr(model.config, "model_type", None)
    if model_type not in getattr(monkey_patch, "MODEL_TYPE_TO_APPLY_LIGER_FN", {}):
        return []
    # Its backend registry logs the optional backends it lacks here too (on first lookup of each op).
    previous = logging.root.manager.disable
    if not os.environ.get("PEFTCTL_DEBUG"):
        logging.disable(logging.WARNING)
    try:
        monkey_patch._apply_liger_kernel_to_instance(model=model, rope=True, rms_norm=True, swiglu=True,
                                                     cross_entropy=False, fused_linear_cross_entropy=False)
    finally:
        logging.disable(previous)
    return ["rope", "rms_norm", "swiglu"]


def skip_adapter_input_casts(model) -> int:
    """Under autocast, stop peft from casting each adapter's input to the adapter's float32 dtype.

    peft casts the (bf16) activations to float32 before the LoRA branch; dropout then keeps that float32 copy for
    the backward pass, for every adapted layer -- gigabytes on an 8B model -- while autocast runs the matmul in
    bf16 anyway. The adapter weights stay float32; only the needless activation copy goes. Returns the number of
    layers changed.
    """
    changed = 0
    for module in model.modules():
        if getattr(module, "cast_input_dtype_enabled", False):
            module.cast_input_dtype_enabled = False
            changed += 1
    return changed
