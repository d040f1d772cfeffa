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


# liger's fused linear cross-entropy computes the logits a chunk of tokens at a time, each chunk taking at most
# `chunk_mem_const` hidden-state-sized buffers (liger's default 1: 256-token chunks of an 8B's 8,192 tokens). Larger
# chunks keep the head's two GEMMs busier: the 8B head's forward and backward took 29.4 ms with 1 and 26.5 with 8 at
# 8,188 tokens, 18.7 and 7.5 ms at 2,047 (benchmarks/2026-12-02/issue21/runAF-flce-chunks.txt), for 0.44 GiB and
# 0.11 GiB more. Taken where the run does not checkpoint: a checkpointed run has traded speed for memory already.
FUSED_LOSS_CHUNK_MEM = 8


def fused_loss_chunk_mem(checkpointing: bool) -> int:
    """liger's `chunk_mem_const` for this run (the loss and the memory plan read it here)."""
    return 1 if checkpointing else FUSED_LOSS_CHUNK_MEM


def fused_loss_chunk_rows(tokens: int, vocab: int, hidden: int, chunk_mem: int) -> int:
    """The tokens of one chunk of liger's logits (ops/fused_linear_cross_entropy.py, 0.8.5: the next power of two
    of the tokens over ceil(vocab / (chunk_mem x hidden)), at most the tokens)."""
    per = -(-max(1, tokens) // -(-vocab // (chunk_mem * hidden)))
    return min(1 << (per - 1).bit_length(), max(1, tokens))


# Packed rows (several examples a row, positions restarting at 0): the attention kernel that keeps them apart.
# Candidates in order of speed; each later one is the fallback of the one before (decided by a probe before the
# first step, peftctl/packed_attention.py). "varlen" is torch's varlen flash attention fed the documents'
# cumulative lengths from the batch; "flex_attention" is transformers' flex with its packed-document block mask;
# "sdpa" builds a dense block-diagonal mask from position_ids (no flash kernel, the whole S x S computed).
PACKED_KERNELS = ("varlen", "flex_attention", "sdpa")
VARLEN_MIN_TORCH = (2, 10)

# Model types whose attention is softmax(q k^T * scaling) v over the module's own q/k/v, causal, with nothing the
# kernels would not reproduce (no soft-capping, sinks, alibi, or extra mask terms): the config checks below refuse
# sliding windows, dropout and non-causal configs on top. Checked against transformers 5.24's modeling files.
DOCUMENT_KERNEL_MODEL_TYPES = {"llama", "mistral", "qwen2", "qwen3", "phi3"}


def document_kernel_refusal(model_type: str | None, config, max_length: int | None) -> str | None:
    """Why this model's attention cannot go through a document kernel (varlen, flex), or None. `config` is the
    model's (text) config; only plain attributes are read, so a config on the meta device works as well."""
    if model_type not in DOCUMENT_KERNEL_MODEL_TYPES:
        return f"{model_type} is not on the list of model types checked for it"
    get = lambda name: getattr(config, name, None)  # noqa: E731
    if get("is_causal") is False:
        return "the config asks for bidirectional attention"
    kinds = get("layer_types") or []
    if any(kind != "full_attention" for kind in kinds):
        return "some layers are not full attention (" + ", ".join(sorted({str(k) for k in kinds})) + ")"
    window = get("sliding_window")
    if window and get("use_sliding_window") is not False and (max_length is None or window < max_length):
        return f"sliding window of {window} tokens"
    if get("attn_logit_softcapping"):
        return "attention soft-capping"
    if get("attention_dropout"):
        return f"attention dropout {get('attention_dropout')}"
    return None


def torch_version() -> tuple[int, int]:
    from importlib.metadata import version

    major, minor = version("torch").split(".")[:2]
    return int(major), int(minor)


def packed_attention_candidates(*, setting: str, packed: bool, device_type: str, dtype: str | None,
                                refusal: str | None, torch_at: tuple[int, int] | None = None
                                ) -> tuple[list[str], list[dict]]:
    """The kernels to try for this run, fastest first (the last always works), and those left out with why.

    Only for `model.attn_implementation: auto`, packed rows, CUDA and bf16/fp16 (the dtype attention computes
    in): anything else keeps what it has today -- the recipe's own kernel, or SDPA (its causal flash kernel for
    padded rows and rows of one example). The CPU keeps SDPA. `refusal`: document_kernel_refusal's answer for
    the model. The plan asks here too, so it predicts the loop.
    """
    if setting != "auto" or not packed:
        return [setting if setting != "auto" else "sdpa"], []
    if device_type != "cuda":
        return ["sdpa"], []
    if dtype not in ("bfloat16", "float16"):
        why = f"attention computes in {dtype}; the kernels need bfloat16 or float16"
        return ["sdpa"], [{"kernel": k, "refused": why} for k in PACKED_KERNELS[:-1]]
    if refusal:
        return ["sdpa"], [{"kernel": k, "refused": refusal} for k in PACKED_KERNELS[:-1]]
    at = torch_at or torch_version()
    if at < VARLEN_MIN_TORCH:
        return ["flex_attention", "sdpa"], [{"kernel": "varlen", "refused": f"torch {at[0]}.{at[1]} has no "
                                             "torch.nn.attention.varlen (2.10 or later)"}]
    return list(PACKED_KERNELS), []


def varlen_repeats_kv() -> bool:
    """Whether our varlen call repeats the key/value heads (torch's varlen_attn without `enable_gqa`): the
    repeated copies are what its backward keeps. Imports torch's varlen module when asked."""
    import inspect

    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return True
    # torch 2.11's kernel takes the fewer key/value heads as they are (measured on the H200); the run's probe
    # falls back to repeating them where a kernel does not, and 2.10's is planned with the repeat
    return "enable_gqa" not in inspect.signature(varlen_attn).parameters and torch_version() < (2, 11)


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


def keep_dequantized_setting(recipe):
    """quantization.keep_dequantized as it applies to this recipe: "auto", True or False (False without a 4-bit
    base). The plan decides "auto"; the loop takes True as it is where no plan runs."""
    quant = recipe.quantization
    return quant.keep_dequantized if quant is not None and quant.bits == 4 else False


# bitsandbytes 0.50 multiplies a 4-bit weight by dequantising it and calling F.linear for more rows than this, and
# through its own 4-bit GEMM kernel below: the fused LoRA branch's forward takes a dequantised matrix (peftctl's
# kernel's, or a kept one) only where bitsandbytes itself would dequantise.
BNB_DEQUANT_MIN_ROWS = 1537

NF4_KERNEL_DEVICES = {"cuda"}  # the tests add "cpu" to run the kernel in Triton's interpreter


def nf4_kernel_applies(device_type: str) -> bool:
    """Whether an NF4 weight that the fused LoRA branch dequantises goes through peftctl's one-launch kernel
    (peftctl/train/nf4_kernel.py; it also checks the weight's layout) rather than bitsandbytes' three launches."""
    return device_type in NF4_KERNEL_DEVICES and triton_available()


def lora_dropout_kernel_applies(*, device_type: str, dropout: float, dtype: str, r: int, elements: int,
                                triton: bool) -> bool:
    """Whether a fused LoRA layer's branch goes through the dropout kernel: training with dropout (p = 0 keeps the
    plain product), on CUDA with triton, in a dtype and at an r the kernel supports, within int32 offsets.
    `dtype` is the branch's compute dtype (torch's name without "torch."); `elements` is tokens x in_features."""
    return (triton and device_type in LORA_DROPOUT_KERNEL_DEVICES and 0 < dropout < 1
            and dtype in LORA_DROPOUT_KERNEL_DTYPES and 0 < r <= LORA_DROPOUT_KERNEL_MAX_R
            and 0 < elements < LORA_DROPOUT_KERNEL_MAX_ELEMENTS)
