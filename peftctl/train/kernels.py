"""The GPU fast path: liger-kernel's fused RMSNorm, RoPE and SwiGLU kernels, when installed (`pip install
peftctl[gpu]`). Everything works without it; the CPU never uses it."""

from __future__ import annotations

import logging

# Model types whose logits are exactly lm_head(final hidden state): no soft-capping or scaling, so the fused
# linear cross-entropy (which never materialises the logits) computes the same loss.
PLAIN_HEAD_MODEL_TYPES = {"llama", "mistral", "qwen2", "qwen3", "phi3"}


def liger_available() -> bool:
    try:
        import liger_kernel.transformers  # noqa: F401
    except Exception:  # noqa: BLE001 - ImportError, or triton failing to initialise
        return False
    return True


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
    logging.getLogger("liger_kernel").setLevel(logging.WARNING)
    monkey_patch._apply_liger_kernel_to_instance(model=model, rope=True, rms_norm=True, swiglu=True,
                                                 cross_entropy=False, fused_linear_cross_entropy=False)
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
