"""The memory plan: peak GPU memory of a training run, estimated before anything is loaded.

It follows what peftctl's loop really keeps on the GPU (train/loop.py, train/loss.py, train/kernels.py): the frozen
base weights as loaded (bf16, or bitsandbytes 4/8-bit with embeddings and lm_head left unquantised), the adapter in
float32 with its gradients and AdamW's two float32 states, the tensors autograd saves for the backward pass of
every decoder layer for one micro-batch (or, with gradient checkpointing, each layer's input plus one layer
recomputed), and the loss. Two paths, as the loop takes them:

- the fast path (a CUDA device with liger-kernel installed, for the model types it patches): liger's RMSNorm and
  SwiGLU keep less than transformers' own, and its fused linear cross-entropy never materialises the logits;
- the plain path: the loop takes logits for all positions, `.float()`s them and calls cross_entropy, so float32
  log-probs and two float32 gradients of that size are alive together at the start of the backward pass.

Under autocast the loop also stops peft from copying each adapter's input to float32 (kernels.
skip_adapter_input_casts), so adapted layers that read the same input (q/k/v, gate/up) keep it once.

    peak   = base weights + adapter + AdamW states (+ gradients accumulated so far + autocast copies)
             + activations kept for the backward pass + the loss's buffers (or one layer's backward, if larger)
             + dequantisation buffer + workspace
    needed = peak x (1 + ALLOCATOR_SLACK) + CUDA_CONTEXT

The peak falls at the start of a backward pass: everything the forward pass kept is alive, this micro-batch's
gradients do not exist yet.

Several GPUs (train/distributed.py): `plan_memory(..., world_size=N, engine="ddp"|"fsdp")` plans one GPU's share
(per_gpu below); activations are never divided, since every rank computes its own micro-batches.

`peak` is what `torch.cuda.max_memory_allocated()` reports; `needed` is what the card must hold. Every constant
sits in constants.py with where it came from; `scripts/measure_memory.py` measures real peaks on a GPU to
calibrate them (bytes per token per layer are printed beside each estimate for that purpose).

The activation model is for decoder-only transformers of the llama family (llama, mistral, qwen2, gemma, phi3...);
other architectures get the same model from their config sizes, with a wider error. Mixture-of-experts layers are
not modelled.

The plan's parts, in the order it is made: constants.py (every number, with its source), shape.py (the model's
shape from the meta model), estimate.py (the components of the peak for one setting), card.py (the GPU planned
for), verdict.py (peak, verdict, remedies; what the training loop asks).
"""

from __future__ import annotations

from peftctl.plan.card import Card, card_from_option, local_card, parse_gpu_memory
from peftctl.plan.estimate import (
    Component,
    Setting,
    activation_bytes,
    dropout_kernel_layers,
    estimate,
    per_gpu,
    setting_for,
    weight_bytes,
)
from peftctl.plan.shape import Adapted, ModelShape, model_shape
from peftctl.plan.verdict import MemoryPlan, describe_plan, memory_mode, needs_checkpointing, plan_memory, remedies

__all__ = ["Adapted", "ModelShape", "model_shape", "Component", "Setting", "activation_bytes",
           "dropout_kernel_layers", "estimate", "per_gpu", "setting_for", "weight_bytes", "Card", "card_from_option",
           "local_card", "parse_gpu_memory", "MemoryPlan", "describe_plan", "memory_mode", "needs_checkpointing",
           "plan_memory", "remedies"]
