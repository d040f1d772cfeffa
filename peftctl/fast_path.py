"""The fast-path decisions, in one place for the training loop and the memory plan: what a run autocasts to,
whether liger-kernel's fused kernels and fused linear cross-entropy apply. The plan must predict exactly what the
loop will do, so both ask here. Nothing here imports torch; liger is imported only when asked whether it exists.
"""

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


# liger's patch table (liger_kernel.transformers.monkey_patch.MODEL_TYPE_TO_APPLY_LIGER_FN, 0.8.5), for planning on
# a machine without liger for a GPU that has it; where liger is importable its own table is read instead
LIGER_MODEL_TYPES = {"llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3",
                     "granite", "olmo2", "olmo3", "glm4", "nemotron"}


def liger_model_types() -> set[str]:
    try:
        from liger_kernel.transformers import monkey_patch

        return set(monkey_patch.MODEL_TYPE_TO_APPLY_LIGER_FN)
    except Exception:  # noqa: BLE001 - not installed, or triton failing: the table this plan was written against
        return LIGER_MODEL_TYPES


def autocast_name(recipe, device_type: str = "cuda") -> str | None:
    """What the loop autocasts to: the compute dtype of a quantised base, else the weights' own (bf16/fp16).
    Never on the CPU: CPU autocast is slow and would blur exact comparisons; weights compute in their own dtype."""
    if device_type != "cuda":
        return None
    name = recipe.quantization.compute_dtype if recipe.quantization is not None else recipe.model.dtype
    return name if name in ("bfloat16", "float16") else None


def fast_kernels_apply(model_type: str | None, liger: bool) -> bool:
    """Whether liger's fused RMSNorm/RoPE/SwiGLU are patched into this model type."""
    return liger and model_type in liger_model_types()


def fused_loss_applies(model_type: str | None, *, plain_head: bool, prompt_learning: bool, liger: bool) -> bool:
    """Whether the loss goes through liger's fused linear cross-entropy (the logits are never materialised).
    Prompt-learning methods add virtual-token positions to the logits, so they keep the plain loss."""
    return liger and not prompt_learning and plain_head and model_type in PLAIN_HEAD_MODEL_TYPES


# The Triton kernel that draws LoRA's dropout mask inside the LoRA-A product (train/lora_dropout_kernel.py): where
# it runs, an adapted layer keeps x itself (shared by siblings) instead of a dropped copy and a mask. The plan and
# the fused branch both ask lora_dropout_kernel_applies, so the plan counts exactly what the loop keeps.
LORA_DROPOUT_KERNEL_DEVICES = {"cuda"}  # the tests add "cpu" to run the kernels in Triton's interpreter
LORA_DROPOUT_KERNEL_DTYPES = {"bfloat16", "float16", "float32"}
LORA_DROPOUT_KERNEL_MAX_R = 256  # r is padded to a power of two >= 16 for tl.dot; wider would spill registers
LORA_DROPOUT_KERNEL_MAX_ELEMENTS = 2 ** 31  # the mask's element offsets are int32: tokens x in_features below this


def triton_available() -> bool:
    """Whether triton imports here (CUDA builds of torch ship it); asked once, then remembered."""
    global _TRITON
    if _TRITON is None:
        try:
            importlib.import_module("triton.language")
            _TRITON = True
        except Exception:  # noqa: BLE001 - ImportError, or a triton that fails to initialise
            _TRITON = False
    return _TRITON


_TRITON: bool | None = None


def lora_dropout_kernel_applies(*, device_type: str, dropout: float, dtype: str, r: int, elements: int,
                                triton: bool) -> bool:
    """Whether a fused LoRA layer's branch goes through the dropout kernel: training with dropout (p = 0 keeps the
    plain product), on CUDA with triton, in a dtype and at an r the kernel supports, within int32 offsets.
    `dtype` is the branch's compute dtype (torch's name without "torch."); `elements` is tokens x in_features."""
    return (triton and device_type in LORA_DROPOUT_KERNEL_DEVICES and 0 < dropout < 1
            and dtype in LORA_DROPOUT_KERNEL_DTYPES and 0 < r <= LORA_DROPOUT_KERNEL_MAX_R
            and 0 < elements < LORA_DROPOUT_KERNEL_MAX_ELEMENTS)
