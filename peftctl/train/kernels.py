"""The GPU fast path: liger-kernel's fused RMSNorm, RoPE and SwiGLU kernels, when installed (`pip install
peftctl[gpu]`). Everything works without it; the CPU never uses it."""

from __future__ import annotations

import logging
import os

from peftctl.fast_path import fast_kernels_apply, liger_available


def apply_fast_kernels(model, device) -> list[str]:
    """Patch the model's norms, rotary embedding and MLP with liger's kernels; returns what was applied.

    Must run before the adapter is attached: the MLP replacement still calls the layer's own gate/up/down modules,
    which peft then wraps as usual.
    """
    if device.type != "cuda" or not fast_kernels_apply(getattr(model.config, "model_type", None),
                                                        liger_available()):
        return []
    from liger_kernel.transformers import monkey_patch

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
