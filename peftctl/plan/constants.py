"""The memory plan's constants: the one place to calibrate, each with where it came from."""

from __future__ import annotations

KiB, MiB, GiB = 1024, 1024 ** 2, 1024 ** 3
# The fast path's measured peaks, 2026-11-28, one H200 (BENCHMARKS.md's cases 1-4), which this plan
# reproduces within 2% (+0.3% to +1.6%; tests/test_plan.py::test_plan_reproduces_the_h200_benchmarks; case 4
# showed when gradients and autocast copies exist at the peak, so it is not independent): bf16 LoRA q,k,v,o
# 4 x 2048 full rows 50.51 GiB, packed rows 54.53 GiB; QLoRA all-linear 4 x 2048 57.89 GiB; 1 x 2048 checkpointed
# 6.89 GiB.

# Weights (exact; checked against the storage of real bitsandbytes layers on a tiny model in tests/test_plan.py)
NF4_BLOCK = 64  # bitsandbytes 4-bit: one absmax per 64 weights (transformers' BitsAndBytesConfig default)
NF4_NESTED_BLOCK = 256  # double quantisation: the absmax values are 8-bit, with one fp32 absmax per 256 of them
NF4_PER_TENSOR = 64  # the nf4/fp4 code book: 16 fp32 values per quantised tensor
NF4_NESTED_PER_TENSOR = 1024 + 4  # double quantisation's 256-entry fp32 code book and its fp32 offset
INT8_ROW_SCALE = 4  # LLM.int8: one fp32 scale (SCB) per output row
# The adapter and its optimiser (peft casts adapter weights to fp32: autocast_adapter_dtype=True; ours are fp32)
ADAPTER_BYTES = 4
GRADIENT_BYTES = 4  # gradients have the parameters' dtype (all of them count only with gradient accumulation)
ADAM_BYTES = 8  # AdamW's exp_avg and exp_avg_sq, fp32 like the parameters (fused AdamW keeps no more)
AUTOCAST_COPY_BYTES = 2  # autocast keeps a bf16/fp16 copy of each fp32 weight it feeds a matmul, saved for backward
# Activations, per element saved for the backward pass (counted with autograd's saved-tensor hooks on CPU,
# tests/test_plan.py; the CUDA kernels' differences are noted where they matter)
NORM_SAVED_BYTES = 4  # RMSNorm/LayerNorm upcast their input to fp32 and keep that copy
DROPOUT_MASK_BYTES = 1  # CUDA's fused dropout keeps a bool mask (the CPU kernel keeps a float tensor instead)
LSE_BYTES = 4  # SDPA (flash, efficient, cuDNN) keeps an fp32 logsumexp per head and query
ACT_FN_SAVED = {  # elements of the MLP's intermediate width a non-gated activation keeps (gated MLPs: 3, below)
    "gelu_new": 4, "gelu_fast": 4, "quick_gelu": 2,  # python composites: input, tanh, and two products
}
GATED_MLP_SAVED = 3  # act(gate) * up keeps gate (for act's backward), act(gate) and up
FAST_GATED_MLP_SAVED = 2  # liger's SwiGLU/GeGLU keeps gate and up only (ops/swiglu.py: save_for_backward(a, b))
FAST_NORM_ROW_BYTES = 4  # liger's RMSNorm keeps its input as it is plus an fp32 inverse RMS per row
# liger's fused linear cross-entropy (ops/fused_linear_cross_entropy.py): the final hidden state, its flattened
# copy and the input gradient it computes in the forward pass and keeps (3 x hidden elements per token), plus one
# chunk of logits (fast_path.fused_loss_chunk_rows) and an fp32 loss per token
FUSED_LOSS_HIDDEN_COPIES = 3
BACKWARD_TRANSIENT = (3, 4)  # one layer's backward: ~3 gradients of the MLP width and ~4 of the hidden width
#                              (estimate, not measured; it matters only where a layer outweighs the loss)
ACTIVATION_SCALE = 1.0  # calibration knob on all activations: set from scripts/measure_memory.py's table
#                         (its "ACTIVATION_SCALE that fits" line); 1.0 = the saved-tensor counts as they are
# The loss (train/loss.py): logits in the autocast dtype, .float() -> fp32, log_softmax keeps its fp32 output; in
# the backward pass nll's fp32 gradient and log_softmax's fp32 gradient join it: 12 bytes per logit at once.
LOSS_BACKWARD_BYTES = 4 + 4 + 4
# The card (estimates until measured: measure_memory.py reports max_memory_reserved beside the allocated peak)
WORKSPACE = 64 * MiB  # cuBLAS/cuBLASLt workspaces, taken from PyTorch's caching allocator (32 MiB each on Hopper)
CUDA_CONTEXT = int(0.6 * GiB)  # CUDA context and kernel images: outside max_memory_allocated (nvidia-smi sees it)
ALLOCATOR_SLACK = 0.08  # the caching allocator reserves more than it hands out (block rounding, fragmentation)
# quantization.keep_dequantized: auto keeps the 4-bit layers' matrices only where the plan with them leaves at
# least this share of the card free: they buy a few per cent of speed, which is not worth a run at the card's edge
KEEP_DEQUANTIZED_HEADROOM = 0.10
# Cross-check with the reference H200 figures of BENCHMARKS.md (HF Trainer, so not the same loop): bf16 LoRA
# q,k,v,o at 4 x 2048 with checkpointing measured 29.0 GiB; this plan says 29.2 GiB for peftctl's loop.

ATTENTION_INPUT_NAMES = {"q_proj", "k_proj", "v_proj", "qkv_proj", "c_attn", "query_key_value", "W_pack", "Wqkv"}
MLP_INPUT_NAMES = {"gate_proj", "up_proj", "gate_up_proj", "c_fc", "fc1", "w1", "w3"}
ATTENTION_OUTPUT_NAMES = {"o_proj", "out_proj", "wo"}  # (and GPT-2's attn.c_proj): they read the attention output
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
