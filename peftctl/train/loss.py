"""The loss of a micro-batch, as a sum over its trained tokens.

The loop divides by the trained tokens of the whole optimiser step (all micro-batches), so packing, accumulation
and several processes optimise the same quantity (docs/RECIPE.md). Labels are shifted here: position t predicts
token t+1.

Two ways to the same number: from the logits (any model, any method), or -- on the GPU with liger-kernel, for
models whose logits are plainly lm_head(hidden) -- a fused linear cross-entropy that never materialises the
logits (for Llama 3's 128k vocabulary, 4 x 2048 tokens of float32 logits and their gradient are 8 GiB).
"""

from __future__ import annotations

from collections.abc import Callable

from peftctl.data.packing import model_inputs
from peftctl.data.tokenize import IGNORE
from peftctl.model import base_model
from peftctl.packed_attention import uses_documents


def loss_sum(model, batch, *, prompt_learning: bool = False):
    """Summed token loss from the logits."""
    import torch.nn.functional as F

    documents = uses_documents(model)
    logits = model(**model_inputs(batch, prompt_learning=prompt_learning, documents=documents)).logits
    labels = batch.labels
    # Prompt and p-tuning return logits for the virtual positions too; the real tokens are the last ones.
    logits = logits[:, -labels.shape[1]:]
    shifted = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    return F.cross_entropy(shifted, labels[:, 1:].reshape(-1), ignore_index=IGNORE, reduction="sum")


def fused_loss_sum(model, batch, *, loss_module):
    """Summed token loss from the final hidden states through liger's fused linear cross-entropy."""
    base = base_model(model)
    inputs = model_inputs(batch, prompt_learning=False, documents=uses_documents(base))
    hidden = base.get_decoder()(**inputs).last_hidden_state
    head = base.get_output_embeddings()
    flat = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    return loss_module(head.weight, flat, batch.labels[:, 1:].reshape(-1), head.bias)


def build_loss(model, method_spec, device, *, checkpointing: bool = False) -> tuple[Callable, str]:
    """The loss function for this model and method, and its name for run.json. `checkpointing`: whether the run
    checkpoints its layers (the fused loss then computes its logits in liger's smallest chunks)."""
    from peftctl.fast_path import fused_loss_applies, fused_loss_chunk_mem, liger_available

    prompt_learning = method_spec.prompt_learning
    base = base_model(model)
    head = base.get_output_embeddings()
    plain_head = type(head).__name__ == "Linear" and not any(p.requires_grad for p in head.parameters())
    if (device.type == "cuda" and hasattr(base, "get_decoder")
            and fused_loss_applies(getattr(base.config, "model_type", None), plain_head=plain_head,
                                   prompt_learning=prompt_learning, liger=liger_available())):
        module = fused_loss_module(fused_loss_chunk_mem(checkpointing))
        return (lambda m, batch: fused_loss_sum(m, batch, loss_module=module)), "liger_fused_linear_cross_entropy"
    return (lambda m, batch: loss_sum(m, batch, prompt_learning=prompt_learning)), "logits_cross_entropy"


# LigerFusedLinearCrossEntropyFunction.forward's parameters up to the chunk size (liger 0.8.5), which its loss
# module does not pass on: the function is called with them in this order, and only where it takes them so.
_LIGER_LOSS_PARAMETERS = ("ctx", "_input", "weight", "target", "bias", "ce_weight", "ignore_index",
                          "lse_square_scale", "label_smoothing", "reduction", "softcap", "return_z_loss",
                          "accum_dtype", "use_token_scaling", "return_token_accuracy", "return_predicted_tokens",
                          "ce_impl", "ce_mode", "chunk_mem_const")


def fused_loss_module(chunk_mem: int):
    """liger's fused linear cross-entropy summed over the trained tokens, `(head weight, hidden, targets, bias)`
    -> loss, computing its logits `chunk_mem` hidden-state-sizes at a time (fast_path.fused_loss_chunk_mem) where
    this liger takes that setting, in its own chunks elsewhere. Its `chunk_mem` attribute says which it took."""
    import inspect

    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    module = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE, reduction="sum")
    module.chunk_mem = 1
    if chunk_mem == 1:
        return module
    from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction as function

    names = tuple(inspect.signature(function.forward).parameters)
    if names[:len(_LIGER_LOSS_PARAMETERS)] != _LIGER_LOSS_PARAMETERS:
        return module

    def loss(weight, hidden, target, bias=None):
        return function.apply(hidden, weight, target, bias, None, IGNORE, 0.0, 0.0, "sum", None, False, None, False,
                              False, False, None, None, chunk_mem)[0]

    loss.chunk_mem = chunk_mem
    return loss
