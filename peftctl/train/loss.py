"""The loss of a micro-batch, as a sum over its trained tokens.

The loop divides by the trained tokens of the whole optimiser step (all micro-batches), so packing, accumulation
and several processes optimise the same quantity (RECIPE.md). Labels are shifted here: position t predicts
token t+1.
"""

from __future__ import annotations

from peftctl.data.tokenize import IGNORE


def model_inputs(batch, *, prompt_learning: bool) -> dict:
    """Packed rows are delimited by position_ids alone: a 2D attention mask (or a cache) would make transformers
    skip the per-example mask, so none is passed and use_cache is always False. Prompt-learning methods prepend
    virtual tokens and cannot use position_ids; they get the padding mask only."""
    if prompt_learning:
        return {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, "use_cache": False}
    inputs = {"input_ids": batch.input_ids, "position_ids": batch.position_ids, "use_cache": False}
    if batch.attention_mask is not None:
        inputs["attention_mask"] = batch.attention_mask
    return inputs


def loss_sum(model, batch, *, prompt_learning: bool = False):
    import torch.nn.functional as F

    logits = model(**model_inputs(batch, prompt_learning=prompt_learning)).logits
    labels = batch.labels
    # Prompt and p-tuning return logits for the virtual positions too; the real tokens are the last ones.
    logits = logits[:, -labels.shape[1]:]
    shifted = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    return F.cross_entropy(shifted, labels[:, 1:].reshape(-1), ignore_index=IGNORE, reduction="sum")
